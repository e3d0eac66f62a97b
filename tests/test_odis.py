"""ODIS end to end: object-aware crops from a boxes file, the [OBJ] term with the iBOT patch term, an
interrupted run resuming bit-identically, evaluation from the command line, and the label-free loop
(boxes written by ``ssl-distill discover`` feeding an ODIS run)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from ssl_distill.checkpoints import load_file
from ssl_distill.config import load_config
from ssl_distill.engine.train import train

from test_end_to_end import CONFIG, make_folder, tiny_overrides

ODIS = ["odis.weight=1", "dino.weight=0", "ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0,0.3]",
        "masking.pred_ratio_var=[0,0.2]"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl_distill.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A labeled scene benchmark made by the command line from a two-class folder: (train images, boxes, root)."""
    base = tmp_path_factory.mktemp("odis")
    source = make_folder(base / "objects", 20, seed=3)
    out = cli("make-scenes", str(source), str(base / "scenes"), "--n-train", "24", "--n-test", "12", "--size", "64")
    assert out.returncode == 0, out.stderr
    return base / "scenes" / "train", base / "scenes" / "train" / "boxes.json", base / "scenes"


@pytest.mark.slow
def test_odis_trains_stops_resumes_bit_identically_and_evaluates(scenes, tmp_path):
    images, boxes, root = scenes
    ov = ODIS + [f"data.boxes={boxes}"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(load_config(CONFIG, tiny_overrides(images, full) + ov))["step"] == 12
    assert train(load_config(CONFIG, tiny_overrides(images, part) + ov + ["run.stop_at_step=7"]))["step"] == 7
    assert train(load_config(CONFIG, tiny_overrides(images, part) + ov))["step"] == 12
    a, b = load_file(full / "checkpoint.pth"), load_file(part / "checkpoint.pth")
    assert set(a["loss"]) == {"obj_center", "patch_center"}  # no [CLS] term: dino.weight=0
    for key in a["teacher"]:
        assert torch.equal(a["teacher"][key], b["teacher"][key]), key
    for key in a["loss"]:
        assert torch.equal(a["loss"][key], b["loss"][key]), key
    assert {"backbone.obj_token", "backbone.obj_pos_embed", "backbone.masked_embed"} <= set(a["student"])
    log = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    counts = [r for r in log if r.get("kind") == "boxes"]
    assert counts[0]["images_with_boxes"] == 24
    assert counts[0]["boxes"] == len(json.loads(boxes.read_text())["annotations"])
    steps = [r for r in log if "kind" not in r]
    assert all(math.isfinite(r["obj"]) and 0 < r["obj_valid_pairs"] <= 1 for r in steps)
    assert any(r["mask_ratio"] > 0 for r in steps)
    # evaluation from the command line: object-level k-NN with the [OBJ] token, box crops and whole scenes,
    # and discovery (CorLoc) on the test scenes
    out = cli("object-knn", str(full), "--scenes", str(root), "--mode", "all")
    assert out.returncode == 0, out.stderr
    result = json.loads((full / "object_knn.json").read_text())
    assert result["modes"] == ["obj", "crop", "crop_native", "scene"] and result["n_test"] > 12  # 1-4 objects per test scene
    assert all(0 <= result["accuracy"][m]["top1"] <= 100 for m in result["modes"])
    out = cli("discover", str(full), "--coco", str(root / "test" / "boxes.json"), "--images", str(root / "test"),
              "--out", str(tmp_path / "disc"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "disc" / "boxes.json").is_file()


@pytest.mark.slow
def test_the_label_free_loop_trains_odis_on_discovered_boxes(scenes, tmp_path):
    """DINO on the scenes -> ssl-distill discover writes boxes.json -> ODIS trains on those boxes."""
    images, _, _ = scenes
    dino = tmp_path / "dino"
    train(load_config(CONFIG, tiny_overrides(images, dino) + ["optim.epochs=1"]))
    out = cli("discover", str(dino), "--images", str(images), "--out", str(tmp_path / "found"))
    assert out.returncode == 0, out.stderr
    found = tmp_path / "found" / "boxes.json"
    odis = tmp_path / "odis"
    last = train(load_config(CONFIG, tiny_overrides(images, odis) + ODIS + [f"data.boxes={found}", "optim.epochs=1",
                                                                             f"model.init_from={dino}"]))
    assert last["step"] == 6 and math.isfinite(last["obj"])
    ckpt = load_file(odis / "checkpoint.pth")
    # the run started from the DINO run's teacher: [OBJ] began as its [CLS]; training moved both
    assert ckpt["student"]["backbone.obj_token"].shape == ckpt["student"]["backbone.vit.cls_token"].shape
    counts = [json.loads(line) for line in (odis / "log.jsonl").read_text().splitlines() if '"boxes"' in line]
    assert counts[0]["images_with_boxes"] > 0


def test_without_the_cls_term_the_cls_head_is_skipped_and_obj_is_unchanged():
    from ssl_distill.models import BackboneSpec, DINOHead, MultiCropModel, ViTBackbone

    torch.manual_seed(0)
    backbone = ViTBackbone(BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2), obj_token=True)
    model = MultiCropModel(backbone, DINOHead(192, 40, hidden_dim=32, bottleneck_dim=16, use_bn=True)).eval()
    crops = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    obj_masks = [torch.rand(3, 16) < 0.5, torch.rand(3, 16) < 0.5, torch.ones(3, 4, dtype=torch.bool)]
    with torch.no_grad():
        full = model(crops, obj_masks=obj_masks)
        lean = model(crops, obj_masks=obj_masks, cls_head=False)
    assert "cls" not in lean and torch.equal(lean["obj"], full["obj"]) and torch.equal(lean["cls_feat"], full["cls_feat"])
