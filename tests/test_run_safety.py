"""Nothing a user types loses a run: outputs that would replace a run's files, stale files of an earlier run,
resumes that would break the schedule, signals, and paths in the way; each ends in one sentence."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from ssl_distill.checkpoints import FORMAT, LATEST, atomic_save, load_file
from ssl_distill.cli import run as cli
from ssl_distill.config import config_to_dict, load_config
from ssl_distill.engine.build import build_model
from ssl_distill.engine.train import Trainer, train

from test_bad_input import cli_error
from test_end_to_end import CONFIG, make_folder, tiny_overrides


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("safety") / "train", 8, 0)


ODIS = ["odis.weight=1", "dino.weight=0", "ibot.weight=1", "masking.shape=block", "data.boxes=boxes.json"]


def written_run(out: Path, extra: tuple[str, ...] = ()) -> Path:
    """A run directory holding a training checkpoint of a tiny model (written directly, no training)."""
    cfg = load_config(CONFIG, tiny_overrides(out / "no_images", out) + list(extra))
    torch.manual_seed(0)
    teacher, student = build_model(cfg, 0.0), build_model(cfg, 0.0)
    atomic_save({"format": FORMAT, "teacher": teacher.state_dict(), "student": student.state_dict(),
                 "config": config_to_dict(cfg)}, out / LATEST)
    return out


# ---------------------------------------------------------------- export replaces nothing it should not
@pytest.mark.parametrize("name", [LATEST, "checkpoint_epoch0001.pth"])
def test_export_never_replaces_a_training_checkpoint(name, tmp_path, capsys):
    run = written_run(tmp_path / "run")
    if name != LATEST:
        shutil.copy(run / LATEST, run / name)
    before = (run / name).read_bytes()
    for force in ([], ["--force"]):
        err = cli_error(["export", str(run), str(run / name), *force], capsys)
        assert f"{run / name} is a training checkpoint" in err and "another file" in err, err
    assert (run / name).read_bytes() == before and not (run / name).with_suffix(".json").exists()


def test_export_replaces_an_existing_file_only_with_force_and_never_the_file_it_reads(tmp_path, capsys):
    run = written_run(tmp_path / "run")
    out = tmp_path / "backbone.safetensors"
    out.write_bytes(b"an older export")
    err = cli_error(["export", str(run), str(out)], capsys)
    assert f"{out} exists: pass --force" in err
    assert out.read_bytes() == b"an older export"
    assert cli(["export", str(run), str(out), "--force"]) == 0 and out.read_bytes() != b"an older export"
    sidecar = out.with_suffix(".json")  # the description beside the file is guarded the same way
    other = tmp_path / "backbone.pth"
    err = cli_error(["export", str(run), str(other)], capsys)
    assert f"{sidecar} exists: pass --force" in err and not other.exists()
    err = cli_error(["export", str(out), str(out), "--force"], capsys)
    assert f"{out} is the checkpoint being exported" in err
    folder = tmp_path / "exports"
    folder.mkdir()
    err = cli_error(["export", str(run), str(folder)], capsys)
    assert f"{folder} is a folder: name the output file" in err and not any(folder.iterdir())


def test_export_of_an_odis_run_lists_the_obj_token_among_what_it_leaves_out(tmp_path, capsys):
    run = written_run(tmp_path / "run", tuple(ODIS))
    out = tmp_path / "odis.safetensors"
    assert cli(["export", str(run), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "obj_token ([OBJ] token), obj_pos_embed ([OBJ] token)" in printed and "masked_embed (mask token)" in printed
    info = json.loads(out.with_suffix(".json").read_text())
    assert {"obj_token", "obj_pos_embed", "masked_embed"} == set(info["dropped"])


# ---------------------------------------------------------------- a file where a folder is expected
@pytest.mark.parametrize("below", [False, True])
def test_a_file_as_the_run_directory_is_refused_in_one_sentence(below, train_dir, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    out = notes / "run" if below else notes
    for command in ("train", "submit"):
        extra = ["--local"] if command == "submit" else []
        err = cli_error([command, str(CONFIG), *tiny_overrides(train_dir, out), *extra], capsys)
        assert f"run.output_dir={out}" in err and "not a folder" in err, err
    assert notes.read_text() == "mine"


def test_a_file_as_the_discover_output_is_refused_before_any_work(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    err = cli_error(["discover", str(tmp_path / "no_run"), "--images", str(tmp_path), "--out", str(notes)], capsys)
    assert f"--out={notes} is a file, not a folder" in err
    assert notes.read_text() == "mine"


# ---------------------------------------------------------------- a new run keeps nothing of an earlier one
def test_fresh_moves_every_file_of_the_earlier_run_aside(train_dir, tmp_path, capsys):
    out = tmp_path / "run"
    over = tiny_overrides(train_dir, out) + ["run.keep_every_epochs=1"]
    train(load_config(CONFIG, over))  # 2 epochs: checkpoint_epoch0001.pth and 0002.pth
    (out / "knn.json").write_text("{}")  # an evaluation of the earlier run
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    train(load_config(CONFIG, over + ["optim.epochs=1"]), fresh=True)
    said = capsys.readouterr().out
    assert "--fresh: moved the earlier run's checkpoint.pth, checkpoint_epoch0001.pth, checkpoint_epoch0002.pth" in said
    (previous,) = (out / "previous").iterdir()
    assert str(previous) in said
    assert sorted(p.name for p in out.iterdir()) == [LATEST, "checkpoint_epoch0001.pth", "config.yaml",
                                                     "filelist.json", "log.jsonl", "notes.txt", "previous"]
    moved = {p.name: p.read_bytes() for p in previous.iterdir()}
    assert moved == {k: v for k, v in before.items() if k != "notes.txt"}  # moved whole, nothing deleted
    assert load_file(out / LATEST)["step"] == 4  # 16 images / batch 4 x 1 epoch


def online_knn(val_dir: Path) -> list[str]:
    return ["monitor.knn_every_epochs=1", f"knn.train_dir={val_dir}", f"knn.val_dir={val_dir}",
            "knn.image_size=32", "knn.resize_size=32", "knn.ks=[3]", "knn.num_workers=0", "monitor.knn_precision=fp32"]


def failing_first_step(trainer: Trainer, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(trainer, "train_step", fail)


@pytest.mark.parametrize("existed", [False, True])
def test_a_start_that_fails_before_its_first_step_leaves_no_run_behind(existed, train_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    if existed:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    over = tiny_overrides(train_dir, out) + online_knn(train_dir) + ["run.stop_at_step=1"]
    trainer = Trainer(load_config(CONFIG, over))
    failing_first_step(trainer, monkeypatch)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.fit()  # after its step-0 k-NN record
    if not existed:
        assert not out.exists()  # the directory this start created is not a run
        return
    assert (out / "notes.txt").read_text() == "mine" and "kind" in (out / "log.jsonl").read_text()
    monkeypatch.undo()
    rerun = time.time()
    Trainer(load_config(CONFIG, over)).fit()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    knn = [r for r in records if r.get("kind") == "knn" and r["step"] == 0]
    assert len(knn) == 1 and knn[0]["time"] >= rerun  # the rerun's own random-init point
    (previous,) = (out / "previous").iterdir()
    assert {"log.jsonl", "config.yaml"} <= {p.name for p in previous.iterdir()}


# ---------------------------------------------------------------- a resume follows the run's schedule
def test_a_resume_that_would_break_the_schedule_is_refused(train_dir, tmp_path, capsys):
    out = tmp_path / "run"
    over = tiny_overrides(train_dir, out)
    train(load_config(CONFIG, over + ["run.stop_at_step=2"]))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = cli_error(["train", str(CONFIG), *over, "data.batch_size=8", "optim.lr=0.001"], capsys)
    assert "data.batch_size: 4 -> 8; optim.lr: 0.002 -> 0.001" in err, err
    assert "--fresh" in err and "another run.output_dir" in err and str(out / "config.yaml") in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing read, built or written


def test_an_accepted_change_is_recorded_and_config_yaml_holds_the_run_as_resumed(train_dir, tmp_path, capsys):
    out = tmp_path / "run"
    over = tiny_overrides(train_dir, out)
    train(load_config(CONFIG, over + ["run.stop_at_step=2"]))
    capsys.readouterr()
    train(load_config(CONFIG, over + ["run.log_every=1", "data.crops.flip_p=0.2", "run.stop_at_step=3"]))
    assert "note: config differs from the checkpoint's" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    changes = [r for r in records if r.get("kind") == "config_change"]
    assert len(changes) == 1 and changes[0]["step"] == 2
    assert changes[0]["changes"] == {"data.crops.flip_p": [0.5, 0.2], "run.log_every": [2, 1]}  # stop_at_step: not
    saved = load_config(out / "config.yaml")
    assert (saved.run.log_every, saved.data.crops.flip_p, saved.run.stop_at_step) == (1, 0.2, 3)
    assert load_file(out / LATEST)["step"] == 3


# ---------------------------------------------------------------- signals: exit codes and a second Ctrl-C
def signal_during_step(monkeypatch, at: int, sig: signal.Signals) -> None:
    """Every Trainer sends ``sig`` to its own process while step ``at`` runs (the loop ends after that step)."""
    real = Trainer.train_step

    def step(self, crops, index, *masks):
        out = real(self, crops, index, *masks)
        if index == at:
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(Trainer, "train_step", step)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_stopped_by_a_signal_exits_with_its_shell_code_after_its_checkpoint(sig, code, train_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    out = tmp_path / "run"
    signal_during_step(monkeypatch, 4, sig)
    assert cli(["train", str(CONFIG), *tiny_overrides(train_dir, out)]) == code  # a finished run exits 0
    printed = capsys.readouterr()
    assert json.loads(printed.out.strip().splitlines()[-1])["signal"] == sig.name
    assert f"(exit code {code}); run the same command to resume" in printed.err
    assert load_file(out / LATEST)["step"] == 5


def test_exit_codes_of_the_ways_a_run_ends(monkeypatch):
    from ssl_distill.launch.submit import LOCAL_REQUEUE_EXIT, exit_code_after

    for var in ("SUBMITIT_LOCAL_JOB_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    last = {"step": 5, "requeues": 0}
    assert exit_code_after(last, 0) == 0  # finished
    assert exit_code_after({**last, "stopped": "stop", "signal": "SIGTERM"}, 1) == 143  # every rank
    assert exit_code_after({**last, "stopped": "requeue", "signal": "SIGUSR2"}, 0) == 140  # no scheduler to requeue
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", "7")
    assert exit_code_after({**last, "stopped": "requeue", "signal": "SIGUSR2"}, 0) == LOCAL_REQUEUE_EXIT


def test_a_second_ctrl_c_during_the_checkpoint_write_says_what_is_on_disk(train_dir, tmp_path, monkeypatch, capsys):
    from ssl_distill.atomic import atomic_write

    out = tmp_path / "run"
    signal_during_step(monkeypatch, 4, signal.SIGINT)  # the first Ctrl-C: checkpoint after this step, then stop

    def save_interrupted(obj, path):  # the second Ctrl-C arrives while that checkpoint is being written
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            if obj["step"] == 5:
                f.write(b"half a checkpoint")
                os.kill(os.getpid(), signal.SIGINT)
            torch.save(obj, f)

    monkeypatch.setattr("ssl_distill.engine.train.atomic_save", save_interrupted)
    with pytest.raises(SystemExit) as e:
        cli(["train", str(CONFIG), *tiny_overrides(train_dir, out)])
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"interrupted (Ctrl-C): training stopped at once after 5 steps; {out / LATEST} holds step 4")  # epoch end
    assert not any("Traceback" in line for line in err)
    assert load_file(out / LATEST)["step"] == 4 and not list(out.glob(".*tmp-*"))  # the last checkpoint, whole


# ---------------------------------------------------------------- settings first, folders named by their key
def test_demo_checks_its_settings_before_writing_any_image(tmp_path, capsys):
    data = tmp_path / "fmnist"
    err = cli_error(["demo", "--data", str(data), "--limit-per-class", "1", "optim.lrr=0.1"], capsys)
    assert "did you mean 'optim.lr'" in err and not data.exists()


def test_a_missing_knn_folder_is_named_by_its_key(train_dir, tmp_path, capsys):
    missing = tmp_path / "gone"
    run = written_run(tmp_path / "run", (f"knn.train_dir={missing}", f"knn.val_dir={train_dir}"))
    err = cli_error(["knn", str(run)], capsys)
    assert err == (f"error: knn.train_dir={missing} (from the run config): does not exist; pass --train with a "
                   "labeled folder (<class>/<image>)")
    err = cli_error(["knn", str(run), f"knn.val_dir={missing}", "--train", str(train_dir)], capsys)
    assert f"error: knn.val_dir={missing}: does not exist" in err
    err = cli_error(["knn", str(run), "--train", str(train_dir), "--val", str(missing)], capsys)
    assert f"--val {missing}: does not exist" in err
    out = tmp_path / "new_run"
    err = cli_error(["train", str(CONFIG), *tiny_overrides(train_dir, out), "monitor.knn_every_epochs=1",
                     f"knn.train_dir={missing}", f"knn.val_dir={train_dir}"], capsys)
    assert f"knn.train_dir={missing} (the online k-NN's train folder): does not exist" in err
    assert "monitor.knn_every_epochs=0" in err and not out.exists()
