"""Multi-process logs hold the global batch's figures (issue 27, item 13): 1 process x batch 2B and 2 gloo
processes x batch B log the same loss terms, collapse monitors and unreadable-image count, at every logging
step, although the two ranks mask different numbers of patches and hold different numbers of valid [OBJ]
views."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssl_distill.config import load_config
from ssl_distill.engine.train import Trainer

from gloo import spawn_gloo
from test_end_to_end import CONFIG, make_folder, tiny_overrides

IBOT = ["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0.2,0.4]", "masking.pred_ratio_var=[0.1,0.1]"]
RECIPES = {"ibot": IBOT, "odis": IBOT + ["odis.weight=1", "dino.weight=0"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """32 images, one of them unreadable, and a boxes file with one box per image, half of them small (so
    that some views miss it)."""
    root = make_folder(tmp_path_factory.mktemp("global_log") / "train", 16, 0)
    (root / "vertical" / "005.png").write_bytes(b"not a png")
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    boxes = root.parent / "boxes.json"
    boxes.write_text(json.dumps({
        "images": [{"id": i, "file_name": name, "width": 32, "height": 32} for i, name in enumerate(images)],
        "annotations": [{"id": i, "image_id": i, "bbox": [4, 4, 24, 24] if i % 2 else [20, 2, 8, 8]}
                        for i in range(len(images))]}))
    return root, boxes


def overrides(name: str, data, out: Path, batch_size: int) -> list[str]:
    """fp32, no drop-path, no BatchNorm: with augmentations and masks a function of (seed, epoch, index) the
    two runs train alike, so their logs must agree."""
    root, boxes = data
    extra = [f"data.boxes={boxes}"] if name == "odis" else []
    return tiny_overrides(root, out) + RECIPES[name] + extra + [
        "run.precision=fp32", "model.drop_path_rate=0.0", "model.use_bn_in_head=false", f"data.batch_size={batch_size}",
        "run.log_every=2", "run.checkpoint_every=100", "data.max_bad_fraction=0.2"]


def _train(rank: int, world: int, name: str, data, out: Path) -> None:
    Trainer(load_config(CONFIG, overrides(name, data, out, 4)), device=torch.device("cpu")).fit()


def read_log(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("name, monitors", [
    ("ibot", ("teacher_entropy", "teacher_kl_uniform", "patch_teacher_entropy", "patch_teacher_kl_uniform")),
    ("odis", ("obj_teacher_entropy", "obj_teacher_kl_uniform", "patch_teacher_entropy", "patch_teacher_kl_uniform")),
])
def test_two_processes_log_what_one_process_with_their_whole_batch_logs(name, monitors, data, tmp_path):
    Trainer(load_config(CONFIG, overrides(name, data, tmp_path / "one", 8))).fit()
    spawn_gloo(_train, name, data, tmp_path / "two")
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [2, 4, 6, 8]  # 32 images / 8 a step, 2 epochs
    for a, b in zip(one, two):
        assert set(a) == set(b)
        for key in ("loss", "patch", "mask_ratio", *monitors, *(("obj", "obj_valid_pairs") if name == "odis" else ())):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key, a[key], b[key])
        assert b["bad_images"] == a["bad_images"]  # every rank's
    assert one[-1]["bad_images"] == 2  # the unreadable file, once an epoch
