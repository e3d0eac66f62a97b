"""Online k-NN during training: when it runs, what it logs, and that training does not notice it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_distill.checkpoints import load_file
from ssl_distill.config import ConfigError, MonitorConfig, load_config
from ssl_distill.data.folder import scan_image_folder
from ssl_distill.engine.online_knn import evaluation_steps, seeded_subset
from ssl_distill.engine.train import train
from test_end_to_end import CONFIG, assert_same_teacher_and_center, make_folder, tiny_overrides


def test_evaluation_steps_in_steps_and_epochs():
    assert evaluation_steps(MonitorConfig(), 6, 12) == set()  # off by default
    assert evaluation_steps(MonitorConfig(knn_every_steps=5), 6, 12) == {0, 5, 10, 12}  # + start and end
    assert evaluation_steps(MonitorConfig(knn_every_epochs=0.5), 6, 12) == {0, 3, 6, 9, 12}
    assert evaluation_steps(MonitorConfig(knn_every_epochs=0.5, knn_at_start=False), 468, 1404) == {
        234, 468, 702, 936, 1170, 1404}  # the demo: every half epoch of 468 steps
    assert evaluation_steps(MonitorConfig(knn_every_epochs=0.4), 5, 10) == {0, 2, 4, 6, 8, 10}


def test_seeded_subset_is_fixed_by_the_seed_and_keeps_folder_order(tmp_path):
    files = scan_image_folder(make_folder(tmp_path / "f", 10, 0), labeled=True)
    a, b, c = (seeded_subset(files, 7, seed) for seed in (3, 3, 4))
    assert a.paths == b.paths != c.paths and len(a) == 7 and a.paths == sorted(a.paths)
    assert all(files.labels[files.paths.index(p)] == y for p, y in zip(a.paths, a.labels))
    assert seeded_subset(files, 0, 3) is files and seeded_subset(files, 50, 3) is files


def test_monitor_config_is_checked():
    with pytest.raises(ConfigError, match="both set the online k-NN interval"):
        load_config(CONFIG, ["monitor.knn_every_steps=3"])  # the recipe sets knn_every_epochs
    with pytest.raises(ConfigError, match="needs a labeled val folder: set monitor.knn_val_dir or knn.val_dir"):
        load_config(None, ["monitor.knn_every_steps=3", "knn.train_dir=x"])
    with pytest.raises(ConfigError, match="monitor.knn_train_size=-1 is out of range"):
        load_config(CONFIG, ["monitor.knn_train_size=-1"])
    assert load_config(CONFIG).monitor.knn_every_epochs == 0.5  # the demo turns it on


def _knn_records(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if r.get("kind") == "knn"]


@pytest.mark.slow
def test_online_knn_leaves_training_bit_identical_and_logs_at_the_requested_steps(tmp_path, capsys):
    train_dir, val_dir = make_folder(tmp_path / "train", 12, 0), make_folder(tmp_path / "val", 4, 1)
    # 24 images / batch 4: 6 steps per epoch, 12 in all; k-NN at 0, 4, 8 and 12 (the end)
    monitor = ["monitor.knn_every_steps=4", f"knn.train_dir={train_dir}", f"knn.val_dir={val_dir}",
               "monitor.knn_train_size=16", "monitor.knn_val_size=6", "knn.image_size=32", "knn.resize_size=32",
               "knn.ks=[3,20]", "knn.num_workers=0", "monitor.knn_precision=fp32"]
    plain = tmp_path / "plain"
    train(load_config(CONFIG, tiny_overrides(train_dir, plain)))
    watched = tmp_path / "watched"
    train(load_config(CONFIG, tiny_overrides(train_dir, watched) + monitor))
    # interrupted between the evaluations at 4 and 8, then the same command again
    resumed = tmp_path / "resumed"
    bf16 = ["monitor.knn_precision=bf16"]  # the default: a bfloat16 copy of the backbone on CPU
    train(load_config(CONFIG, tiny_overrides(train_dir, resumed) + monitor + bf16 + ["run.stop_at_step=6"]))
    train(load_config(CONFIG, tiny_overrides(train_dir, resumed) + monitor + bf16))

    reference = load_file(plain / "checkpoint.pth")
    for run in (watched, resumed):
        ck = load_file(run / "checkpoint.pth")
        assert ck["step"] == 12
        assert_same_teacher_and_center(reference, ck)
        assert [r["step"] for r in _knn_records(run)] == [0, 4, 8, 12]  # each exactly once
    # the training records are the same numbers too (the loss of every logged window)
    losses = [(r["step"], r["loss"]) for r in map(json.loads, (plain / "log.jsonl").read_text().splitlines())]
    watched_losses = [(r["step"], r["loss"]) for r in map(json.loads, (watched / "log.jsonl").read_text().splitlines())
                      if r.get("kind") != "knn"]
    assert losses == watched_losses

    records = _knn_records(watched)
    first = records[0]
    assert first["epoch"] == 0 and records[1]["epoch"] == pytest.approx(4 / 6)
    assert {"knn_top1_k3", "knn_top5_k3", "knn_top1_k20", "knn_seconds", "time"} <= set(first)
    assert (first["knn_n_train"], first["knn_n_val"], first["knn_precision"]) == (16, 6, "fp32")
    assert all(0 <= r["knn_top1_k3"] <= 100 for r in records)
    assert "[online k-NN] step 8 (epoch 1.33): top-1" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_rank_zero_evaluates_and_the_teacher_is_unchanged(tmp_path):
    """torchrun, 2 gloo processes: rank 0 evaluates while rank 1 waits at the barrier; same teacher as
    the same run without online k-NN, and one record per evaluation step."""
    from test_distributed import torchrun

    train_dir, val_dir = make_folder(tmp_path / "train", 16, 0), make_folder(tmp_path / "val", 4, 1)
    monitor = ["monitor.knn_every_steps=3", f"knn.train_dir={train_dir}", f"knn.val_dir={val_dir}",
               "knn.image_size=32", "knn.resize_size=32", "knn.ks=[3]", "knn.num_workers=0"]
    plain = torchrun(tiny_overrides(train_dir, tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr[-3000:]
    watched = torchrun(tiny_overrides(train_dir, tmp_path / "watched") + monitor)
    assert watched.returncode == 0, watched.stderr[-3000:]
    a, b = load_file(tmp_path / "plain" / "checkpoint.pth"), load_file(tmp_path / "watched" / "checkpoint.pth")
    assert a["world_size"] == b["world_size"] == 2 and a["step"] == b["step"] == 8  # 32 images / (4 x 2) x 2 epochs
    assert_same_teacher_and_center(a, b)
    assert [r["step"] for r in _knn_records(tmp_path / "watched")] == [0, 3, 6, 8]
    assert watched.stdout.count("[online k-NN] step 3 ") == 1  # printed by rank 0 alone
