"""Inputs that must end in one sentence naming the fix, before anything is scanned, built or written."""
from __future__ import annotations

import argparse
import os
import re

import pytest
import torch

from ssl_distill.checkpoints import LATEST, atomic_save, load_file
from ssl_distill.cli import run as cli
from ssl_distill.config import ConfigError, load_config
from ssl_distill.data.folder import scan_image_folder
from ssl_distill.engine.train import Trainer

from test_end_to_end import CONFIG, make_folder, tiny_overrides


def cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command line; it must exit 1 with one line on stderr (no traceback), returned."""
    with pytest.raises(SystemExit) as e:
        cli(args)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------- numbers as YAML 1.1 reads them
@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("1E+3", 1000.0), ("5e0", 5.0), ("1_0e-1", 1.0)])
def test_every_float_spelling_is_a_number_in_overrides(text, value):
    assert load_config(CONFIG, [f"optim.lr={text}"]).optim.lr == value


def test_exponents_in_recipe_files_are_numbers(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1e-4\n  min_lr: 1e-6\n  betas: [9e-1, 0.999]\nmodel:\n  depth: 1e1\n")
    cfg = load_config(recipe)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.betas, cfg.model.depth) == (1e-4, 1e-6, (0.9, 0.999), 10)
    assert isinstance(cfg.model.depth, int)


@pytest.mark.parametrize("override, expect", [
    ("model.depth=2.5", "model.depth: expected an integer"),
    ("optim.lr=1e-4x", "optim.lr: expected a number"),
    ("optim.lr=true", "optim.lr: expected a number"),
])
def test_what_is_not_a_number_is_still_refused(override, expect):
    with pytest.raises(ConfigError, match=expect):
        load_config(CONFIG, [override])


# ---------------------------------------------------------------- values that used to crash or mislead
@pytest.mark.parametrize("overrides, expect", [
    (["run.log_every=0"], "run.log_every=0 is out of range: expected 1 <= log_every"),
    (["run.checkpoint_every=0"], "run.checkpoint_every=0 is out of range"),
    (["model.patch_size=0"], "model.patch_size=0 is out of range"),
    (["run.stop_at_step=0"], r"run.stop_at_step=0 is out of range: expected 1 <= stop_at_step \(null trains"),
    (["data.crops.n_global=1", "data.crops.n_local=0"], "no pair of different views.*n_local >= 1"),
    (["dino.teacher_temp=0"], "dino.teacher_temp=0.0 is out of range: expected 0 < teacher_temp"),
    (["data.crops.local_scale=[0.4,0.05]"], "first value must not exceed the second"),
    (["data.crops.blur_p=[1.0,1.5,0.5]"], r"data.crops.blur_p\[1\]=1.5 is out of range"),
    (["optim.momentum_teacher=nan"], "optim.momentum_teacher=nan is out of range"),
    (["knn.ks=[]"], "knn.ks is empty"),
])
def test_out_of_range_values_name_the_key_and_write_nothing(overrides, expect, tmp_path, capsys):
    out = tmp_path / "run"
    err = cli_error(["train", str(CONFIG), f"run.output_dir={out}", *overrides], capsys)
    assert err.startswith("config error: ")
    assert re.search(expect, err), err
    assert not out.exists()


def test_one_global_view_with_local_views_is_a_valid_layout():
    cfg = load_config(CONFIG, ["data.crops.n_global=1", "data.crops.n_local=2"])
    assert (cfg.data.crops.n_global, cfg.data.crops.n_local) == (1, 2)


def test_stop_at_step_stops_there(tmp_path):
    train_dir = make_folder(tmp_path / "train", 8, 0)
    cfg = load_config(CONFIG, tiny_overrides(train_dir, tmp_path / "run") + ["run.stop_at_step=1"])
    last = Trainer(cfg).fit()
    assert last["step"] == 1 and load_file(tmp_path / "run" / LATEST)["step"] == 1


# ---------------------------------------------------------------- the machine cannot run the config
def test_fp16_on_cpu_is_refused_before_the_folder_is_scanned(tmp_path, capsys):
    out = tmp_path / "run"
    err = cli_error(["train", str(CONFIG), "run.device=cpu", "run.precision=fp16", f"run.output_dir={out}",
                     f"data.train_dir={tmp_path / 'no_such_folder'}"], capsys)
    assert "run.precision=fp16 needs a CUDA GPU" in err and "run.precision=bf16" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_the_folder_is_scanned(tmp_path, capsys):
    out = tmp_path / "run"
    err = cli_error(["train", str(CONFIG), "run.device=cuda", f"run.output_dir={out}",
                     f"data.train_dir={tmp_path / 'no_such_folder'}"], capsys)
    assert "run.device=cuda but this machine has no usable CUDA GPU" in err and "run.device=cpu" in err
    assert not out.exists()


def official_dino_checkpoint() -> dict:
    """What DINO's main_dino.py writes: no format entry, prefixed weights, an argparse.Namespace."""
    return {"student": {"module.backbone.cls_token": torch.zeros(1, 1, 8)},
            "teacher": {"backbone.cls_token": torch.zeros(1, 1, 8)},
            "epoch": 3, "args": argparse.Namespace(arch="vit_small", patch_size=16)}


@pytest.mark.parametrize("content", ["official", "garbage"])
def test_a_checkpoint_ssl_distill_did_not_write_is_named_and_kept(content, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / LATEST
    if content == "official":
        torch.save(official_dino_checkpoint(), ckpt)
    else:
        ckpt.write_bytes(b"not a checkpoint at all")
    before = ckpt.read_bytes()
    err = cli_error(["train", str(CONFIG), f"run.output_dir={out}", f"data.train_dir={tmp_path / 'missing'}"], capsys)
    expect = "was not written by ssl-distill training" if content == "official" else "is not a PyTorch checkpoint"
    assert expect in err and "--fresh" in err and "another run.output_dir" in err, err
    assert ckpt.read_bytes() == before and sorted(p.name for p in out.iterdir()) == [LATEST]



def test_a_damaged_latest_checkpoint_names_the_newest_intact_kept_copy(tmp_path, capsys):
    from ssl_distill.checkpoints import FORMAT

    out = tmp_path / "run"
    out.mkdir()
    atomic_save({"format": FORMAT, "epoch": 1}, out / "checkpoint_epoch0001.pth")
    atomic_save({"format": FORMAT, "epoch": 2}, out / "checkpoint_epoch0002.pth")
    good = (out / "checkpoint_epoch0002.pth").read_bytes()
    (out / LATEST).write_bytes(good[: len(good) // 2])  # damaged after it was written (a copy cut short)
    (out / "checkpoint_epoch0002.pth").write_bytes(good[:300])  # and the newest kept copy with it
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = cli_error(["train", str(CONFIG), f"run.output_dir={out}", f"data.train_dir={tmp_path / 'missing'}"], capsys)
    assert "truncated or damaged" in err and "--fresh" in err, err
    assert err.rstrip().endswith("or copy checkpoint_epoch0001.pth, the newest of the run's kept copies, over "
                                 "checkpoint.pth to resume from that epoch")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / "checkpoint_epoch0001.pth").unlink()  # no intact kept copy: no such advice
    err = cli_error(["train", str(CONFIG), f"run.output_dir={out}", f"data.train_dir={tmp_path / 'missing'}"], capsys)
    assert "truncated or damaged" in err and "kept copies" not in err


# ---------------------------------------------------------------- run directory hygiene
def test_a_failed_start_leaves_no_run_directory_but_keeps_an_existing_one(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    new = tmp_path / "new" / "run"
    with pytest.raises(Exception, match="No images found"):
        Trainer(load_config(CONFIG, tiny_overrides(empty, new)))
    assert not new.exists() and not new.parent.exists()  # nor the parent it created (the demo left runs/)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="No images found"):
        Trainer(load_config(CONFIG, tiny_overrides(empty, existing)))
    assert (existing / "notes.txt").read_text() == "mine"


def test_a_batch_larger_than_the_folder_names_the_key_and_writes_nothing(tmp_path, capsys):
    train_dir = make_folder(tmp_path / "train", 2, 0)  # fewer images than one batch
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        cli(["train", str(CONFIG), *tiny_overrides(train_dir, out), "data.batch_size=64"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "data.batch_size=64 x 1 process(es) is larger than the" in err and "lower data.batch_size" in err
    assert not out.exists()


def test_stale_temporary_checkpoints_are_removed_at_start(tmp_path, capsys):
    train_dir = make_folder(tmp_path / "train", 8, 0)
    out = tmp_path / "run"
    cfg = load_config(CONFIG, tiny_overrides(train_dir, out) + ["run.stop_at_step=1"])
    Trainer(cfg).fit()
    good = load_file(out / LATEST)
    for pid in (111, 222):  # what a kill -9 during atomic_save leaves behind
        (out / f".{LATEST}.tmp-{pid}").write_bytes(b"\0" * 4096)
    (out / ".checkpoint_epoch0001.pth.tmp-333").write_bytes(b"\0")
    (out / "notes.tmp-444").write_text("not ours")
    capsys.readouterr()
    trainer = Trainer(load_config(CONFIG, tiny_overrides(train_dir, out) + ["run.stop_at_step=2"]))
    said = capsys.readouterr().out
    assert "removed 3 temporary file(s)" in said and f".{LATEST}.tmp-111" in said
    assert sorted(p.name for p in out.glob(".*tmp-*")) == []
    assert (out / "notes.tmp-444").exists()
    kept = load_file(out / LATEST)
    assert trainer.state.step == 1 and all(torch.equal(kept["teacher"][k], v) for k, v in good["teacher"].items())


def test_atomic_save_leaves_no_temporary_on_success(tmp_path):
    atomic_save({"x": torch.ones(2)}, tmp_path / "a.pth")
    assert [p.name for p in tmp_path.iterdir()] == ["a.pth"]


# ---------------------------------------------------------------- symbolic links
def test_symbolic_link_loops_list_each_image_once(tmp_path):
    root = make_folder(tmp_path / "data", 3, 0)  # horizontal/, vertical/, 3 images each
    os.symlink(root, root / "horizontal" / "loop")  # a loop back to the top
    os.symlink(root / "vertical", root / "horizontal" / "again")  # a second way into a folder
    os.symlink(root / "horizontal" / "000.png", root / "vertical" / "alias.png")  # a second name for a file
    unlabeled = scan_image_folder(root, labeled=False)
    assert len(unlabeled) == 6 and len(set(unlabeled.paths)) == 6
    labeled = scan_image_folder(root, labeled=True)
    assert len(labeled) == 6
    assert labeled.labels.count(0) == 3 and labeled.labels.count(1) == 3


def test_linked_folders_are_followed(tmp_path):
    real = make_folder(tmp_path / "real", 2, 0)
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(real / "horizontal", root / "linked")
    assert sorted(scan_image_folder(root, labeled=False).paths) == ["linked/000.png", "linked/001.png"]


def test_auto_precision_takes_bf16_only_where_it_is_faster(monkeypatch):
    from ssl_distill import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "bf16_is_faster_on_cpu", lambda: False)
    assert runtime.resolve_precision(cpu, "auto") == "fp32"
    monkeypatch.setattr(runtime, "bf16_is_faster_on_cpu", lambda: True)
    assert runtime.resolve_precision(cpu, "auto") == "bf16"
    assert runtime.resolve_precision(torch.device("cuda"), "auto") == "bf16"
    assert runtime.resolve_precision(cpu, "fp32") == "fp32" and runtime.resolve_precision(cpu, "bf16") == "bf16"
    with pytest.raises(ConfigError, match="run.precision must be fp32, bf16, fp16 or auto"):
        runtime.check_precision(cpu, "half")


def test_timing_the_cpu_leaves_the_global_rng_alone():
    """``run.precision`` / ``monitor.knn_precision: auto`` time matmuls once per process; that must not move the
    global RNG (drop path draws from it, and a resumed run restores it before the online k-NN is built)."""
    from ssl_distill import runtime

    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    runtime.gemm_seconds(torch.float32, n=32, repeats=1)
    assert torch.equal(torch.rand(4), expected)


def test_an_output_path_through_a_file_is_one_line(tmp_path, capsys):
    """Outputs named under a file (or as one) are refused in one sentence naming the path, whatever the command."""
    import errno

    from ssl_distill.errors import path_problem

    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    images = make_folder(tmp_path / "images", 2, 0)
    for args in (["prepare-fmnist", str(blocker / "fmnist"), "--limit-per-class", "1"],
                 ["make-scenes", str(images), str(blocker), "--n-train", "2", "--n-test", "1"]):
        err = cli_error(args, capsys)
        assert err.startswith(f"error: cannot create {blocker}") and "a file is in the way" in err, err
    assert blocker.read_text() == "mine"
    assert path_problem(IsADirectoryError(errno.EISDIR, "Is a directory", "/x")) == (
        "/x is a folder where a file is needed: name a file")
    assert path_problem(OSError(errno.ENOSPC, "No space left on device", "/x/ck.pth")).startswith(
        "no space left on the device (writing /x/ck.pth)")
    assert path_problem(OSError(errno.EIO, "I/O error")) is None  # anything else keeps its traceback


@pytest.mark.parametrize("args, expect", [
    (["discover", "ck.pth", "--images", "x", "--limit", "-1"], "argument --limit: must be >= 1, got -1"),
    (["visualize", "ck.pth", "x.png", "--max-side", "0"], "argument --max-side: must be >= 1, got 0"),
    (["linear", "ck.pth", "--num-workers", "-1"], "argument --num-workers: must be >= 0, got -1"),
    (["knn", "ck.pth", "--n-last-blocks", "two"], "argument --n-last-blocks: expected an integer, got 'two'"),
    (["submit", "c.yaml", "--mem-gb", "0"], "argument --mem-gb: must be a positive number, got 0"),
    (["linear", "ck.pth", "--lrs", "0.1", "-1"], "argument --lrs: must be a positive number, got -1"),  # trained
    (["linear", "ck.pth", "--cs", "0"], "argument --cs: must be a positive number, got 0"),
    (["object-knn", "--scenes", "s", "--temperature", "nan"], "argument --temperature: must be a positive number"),
])
def test_counts_and_sizes_must_be_positive_before_anything_runs(args, expect, capsys):
    # discover --limit -1 used to drop the last image (names[:-1]) and a negative fast-probe lr trained; the
    # others failed later or not at all
    with pytest.raises(SystemExit) as e:
        cli(args)
    assert e.value.code == 2 and expect in capsys.readouterr().err


def test_a_key_given_twice_in_a_recipe_is_an_error_naming_both_lines(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text(f"base: {CONFIG}\noptim:\n  lr: 0.001\n  weight_decay: 0.04\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: invalid YAML: key 'lr' appears twice in one mapping "
                                          r"\(lines 3 and 5\): keep one"):
        load_config(recipe, [])
    recipe.write_text(f"base: {CONFIG}\noptim:\n  lr: 0.001\noptim:\n  epochs: 2\n")  # a section given twice
    with pytest.raises(ConfigError, match=r"key 'optim' appears twice in one mapping \(lines 2 and 4\)"):
        load_config(recipe, [])


def test_a_run_of_zero_steps_says_so_and_writes_nothing(tmp_path, capsys):
    # 8 images, batch 4: 0.1 epochs rounds to no step (it used to blame optim.freeze_backbone_steps=0)
    out = tmp_path / "run"
    train = make_folder(tmp_path / "images", 4, 0)
    err = cli_error(["train", str(CONFIG), *tiny_overrides(train, out), "optim.epochs=0.1"], capsys)
    assert err == ("config error: The run has 0 steps (optim.epochs=0.1 x 2 batches of 4 images): nothing to train; "
                   "raise optim.epochs")
    assert not out.exists()


def test_a_boxes_file_named_from_the_training_folder_is_pointed_to(tmp_path, capsys):
    import json

    out, train = tmp_path / "run", make_folder(tmp_path / "images", 4, 0)
    (train / "scene_boxes_x.json").write_text(json.dumps({"images": [], "annotations": []}))
    err = cli_error(["train", str(CONFIG), *tiny_overrides(train, out), "data.boxes=scene_boxes_x.json", "odis.weight=1"],
                    capsys)
    assert err == (f"error: data.boxes=scene_boxes_x.json: no such file (the path is read from the working directory, "
                   f"{os.getcwd()}); the training folder has one: data.boxes={train / 'scene_boxes_x.json'}")
    assert not out.exists()


def test_a_demo_try_out_smaller_than_one_batch_names_the_limit_to_give(tmp_path, capsys):
    data = tmp_path / "fm"
    err = cli_error(["demo", "--limit-per-class", "3", "--data", str(data), f"run.output_dir={tmp_path / 'run'}"],
                    capsys)
    assert err == ("config error: --limit-per-class 3 keeps 30 training images, fewer than one batch of "
                   "data.batch_size=64: give --limit-per-class 7 or more")
    assert not data.exists() and not (tmp_path / "run").exists()  # checked before 70,000 images are written


def test_options_are_taken_by_their_whole_names_only(capsys):
    # argparse's abbreviations read `knn RUN --k 20` as `--key 20`, a DINO user's --nb_knn habit gone wrong
    with pytest.raises(SystemExit) as e:
        cli(["knn", "run", "--k", "20"])
    assert e.value.code == 2 and "unrecognized arguments: --k 20" in capsys.readouterr().err
