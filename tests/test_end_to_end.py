"""End to end: pretrain a few steps on generated images, interrupt, resume, evaluate k-NN."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_distill.checkpoints import CheckpointError, load_file
from ssl_distill.config import load_config
from ssl_distill.engine.train import NonFiniteLossError, Trainer, train

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, n_per_class: int, seed: int) -> Path:
    """Two classes of 32x32 images: horizontal vs vertical stripes with noise."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("horizontal", "vertical")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            period = rng.integers(3, 7)
            stripes = (np.arange(32) // period % 2 * 200).astype(np.float64)
            img = np.tile(stripes[:, None] if c == 0 else stripes[None, :], (1, 32) if c == 0 else (32, 1))
            img = np.clip(img + rng.normal(0, 20, (32, 32)), 0, 255).astype(np.uint8)
            Image.fromarray(np.stack([img, np.roll(img, 1, 0), img], -1)).save(root / name / f"{i:03d}.png")
    return root


def tiny_overrides(train_dir: Path, out: Path) -> list[str]:
    return [
        f"data.train_dir={train_dir}", f"run.output_dir={out}", "run.progress=false", "run.log_every=2",
        "run.checkpoint_every=3", "run.threads=1", "data.batch_size=4", "data.num_workers=0",
        "data.crops.global_size=32", "data.crops.local_size=16", "data.crops.n_local=2",
        "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32",
        "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
        "optim.epochs=2", "optim.warmup_epochs=1", "model.drop_path_rate=0.1",
        "monitor.knn_every_epochs=0",  # the recipe's online k-NN reads data/fmnist; tests turn it on themselves
        "run.precision=fp32",  # not the recipe's auto: two runs compared must not time their way to two precisions
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    return make_folder(base / "train", 12, 0), make_folder(base / "val", 4, 1)


CONFIG = ROOT / "configs" / "dino_tiny_fmnist.yaml"


def assert_same_teacher_and_center(a: dict, b: dict) -> None:
    """Two training checkpoints hold bit-identical teachers and DINO centers."""
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key
    assert torch.equal(a["loss"]["center"], b["loss"]["center"])


@pytest.mark.slow
def test_interrupted_run_resumes_bit_identically_and_evaluates(folders, tmp_path):
    train_dir, val_dir = folders
    # uninterrupted: 24 images / batch 4 = 6 iterations per epoch, 12 in all
    full = tmp_path / "full"
    train(load_config(CONFIG, tiny_overrides(train_dir, full)))
    # interrupted mid-epoch at step 8 (epoch 1, batch 2), then the same command again; with a data
    # worker this time: augmentations depend on (seed, epoch, index) only, not on who computes them
    part = tmp_path / "part"
    last = train(load_config(CONFIG, tiny_overrides(train_dir, part) + ["run.stop_at_step=8", "data.num_workers=1"]))
    assert last["step"] == 8
    ck = load_file(part / "checkpoint.pth")
    assert (ck["step"], ck["epoch"], ck["batch"]) == (8, 1, 2)
    train(load_config(CONFIG, tiny_overrides(train_dir, part)))

    a, b = load_file(full / "checkpoint.pth"), load_file(part / "checkpoint.pth")
    assert a["step"] == b["step"] == 12
    assert_same_teacher_and_center(a, b)
    log = [json.loads(line) for line in (part / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 12 and {"loss", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy",
                                      "teacher_kl_uniform", "images_per_s"} <= set(log[-1])
    assert (part / "config.yaml").is_file()

    # evaluate through the command line, as a user would
    out = subprocess.run(
        [sys.executable, "-m", "ssl_distill.cli", "knn", str(part), "--train", str(train_dir), "--val", str(val_dir),
         "knn.image_size=32", "knn.resize_size=32", "knn.ks=[3,5]", "knn.num_workers=0"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    res = json.loads((part / "knn.json").read_text())
    assert set(res["accuracy"]) == {"k=3", "k=5"} and res["precision"] == "fp32"
    assert res["accuracy"]["k=3"]["top1"] >= 87.5  # stripe orientation; chance is 50%: at most 1 of 8 wrong
    assert "k=3: top-1" in out.stdout


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(folders, tmp_path):
    train_dir, _ = folders
    cfg = load_config(CONFIG, tiny_overrides(train_dir, tmp_path / "nan"))
    trainer = Trainer(cfg)
    original = trainer.objectives[0].forward  # the DINO term
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = original(*args, **kwargs)
        if calls["n"] == 5:
            out["dino"] = out["dino"] * float("nan")
        return out

    trainer.objectives[0].forward = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 4: dino=nan \(lr=.*teacher_temp=.*checkpoint"):
        trainer.fit()
    ck = load_file(tmp_path / "nan" / "checkpoint.pth")
    assert ck["step"] == 3  # the last good checkpoint, untouched
    assert all(torch.isfinite(v).all() for v in ck["teacher"].values())
    # before the first checkpoint: the message says so instead of naming a file that is not there
    trainer = Trainer(load_config(CONFIG, tiny_overrides(train_dir, tmp_path / "nan_first")))
    original = trainer.objectives[0].forward

    def first_step_nan(*args, **kwargs):
        out = original(*args, **kwargs)
        out["dino"] = out["dino"] * float("nan")
        return out

    trainer.objectives[0].forward = first_step_nan
    with pytest.raises(NonFiniteLossError, match=r"step 0: dino=nan .*no checkpoint was written yet"):
        trainer.fit()
    assert not (tmp_path / "nan_first" / "checkpoint.pth").exists()


def test_missing_and_empty_folders_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        out = subprocess.run(
            [sys.executable, "-m", "ssl_distill.cli", "train", str(CONFIG), f"data.train_dir={folder}",
             f"run.output_dir={tmp_path / 'run'}"],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode != 0
        assert str(folder) in out.stderr and ".png" in out.stderr and "Traceback" not in out.stderr


def test_unknown_key_fails_with_suggestion():
    out = subprocess.run([sys.executable, "-m", "ssl_distill.cli", "train", str(CONFIG), "optim.warmup_epoch=1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "did you mean 'optim.warmup_epochs'" in out.stderr


def test_corrupt_images_are_skipped_named_counted_and_abort_above_one_percent(folders, tmp_path):
    import shutil

    from ssl_distill.data.folder import DataError

    train_dir, _ = folders
    data = tmp_path / "data"
    shutil.copytree(train_dir, data)
    (data / "vertical" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # truncated PNG
    (data / "vertical" / "noise.jpg").write_bytes(b"not an image at all")
    cfg = load_config(CONFIG, tiny_overrides(data, tmp_path / "run"))
    with pytest.warns(UserWarning, match=r"(broken\.png|noise\.jpg)"):
        with pytest.raises(DataError, match=r"bad|unreadable|corrupt"):
            train(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["bad_images"] >= 1


def test_resuming_with_another_model_names_the_keys_and_the_fix(folders, tmp_path):
    train_dir, _ = folders
    over = tiny_overrides(train_dir, tmp_path) + ["run.stop_at_step=2"]
    train(load_config(CONFIG, over))
    before = (tmp_path / "checkpoint.pth").read_bytes()
    with pytest.raises(CheckpointError, match=r"missing keys \['backbone\.vit\.blocks\.2\..*holds another model.*--fresh"):
        Trainer(load_config(CONFIG, over + ["model.depth=3"]))
    assert (tmp_path / "checkpoint.pth").read_bytes() == before  # nothing lost


def test_auto_precision_is_chosen_once_per_run(folders, tmp_path, monkeypatch):
    """``run.precision: auto`` times bf16 against fp32 at the start; a resume keeps that choice even where the
    timing (e.g. on a busy machine) would now say otherwise, so a resumed run cannot switch precision."""
    from ssl_distill import runtime

    train_dir, _ = folders
    overrides = tiny_overrides(train_dir, tmp_path / "run") + ["run.precision=auto"]
    monkeypatch.setattr(runtime, "bf16_is_faster_on_cpu", lambda: True)
    first = Trainer(load_config(CONFIG, overrides + ["run.stop_at_step=2"]))
    assert first.precision == "bf16"
    first.fit()
    assert load_file(tmp_path / "run" / "checkpoint.pth")["precision"] == "bf16"
    monkeypatch.setattr(runtime, "bf16_is_faster_on_cpu", lambda: False)
    resumed = Trainer(load_config(CONFIG, overrides))
    assert resumed.state.step == 2 and resumed.precision == "bf16"
    assert Trainer(load_config(CONFIG, overrides), fresh=True).precision == "fp32"  # a new run measures again
