"""Per-box features (eval/box_features.py: extract_box_features) and ``ssl-distill object-knn`` (eval/object_knn.py).

A tiny random-init ViT (vit_tiny, 2 blocks, patch 8, 32 px) on a small scene set made from hand-drawn
bar sources (tests/test_scenes.py).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scenes import tiny_checkpoint
from test_scenes import write_bar_source

from ssl_distill.checkpoints import FORMAT, atomic_save, load_backbone
from ssl_distill.config import config_to_dict, load_config
from ssl_distill.data.boxes import patch_mask_from_boxes, read_boxes
from ssl_distill.data.scenes import SceneSettings, build_scene_benchmark
from ssl_distill.eval.box_features import (
    boxes_to_view,
    crop_tensor,
    extract_box_features,
    native_crop_tensor,
    scene_tensor,
)
from ssl_distill.eval.features import ImageSettings
from ssl_distill.eval.object_knn import NO_OBJ_TOKEN
from ssl_distill.models import ViTBackbone, spec_from_config
from ssl_distill.weighted_knn import knn_classify

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
HAS_OBJ = "obj_token" in inspect.signature(ViTBackbone).parameters  # the MODEL helper's [OBJ] token


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("objknn")
    src = write_bar_source(root / "src", per_class=40)
    build_scene_benchmark(root / "scenes", src, n_train=30, n_test=15, settings=SceneSettings(size=32), seed=0)
    return root / "scenes"


def _tiny_cfg():
    return load_config(ROOT / "configs" / "dino_tiny_fmnist.yaml",
                       ["model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32",
                        "data.crops.global_size=32", "data.crops.local_size=16"])


def _odis_checkpoint(path: Path) -> Path:
    """Our checkpoint format holding a random-init backbone built with obj_token=True."""
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    state = {f"backbone.{k}": v for k, v in ViTBackbone(spec_from_config(cfg), obj_token=True).state_dict().items()}
    atomic_save({"format": FORMAT, "config": config_to_dict(cfg), "teacher": state, "student": state}, path)
    return path


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ssl_distill.cli", *argv], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


def test_boxes_to_view_and_patch_masks_by_hand():
    """A (W, H) = (32, 64) image viewed at 16 x 16: x scales by 1/2, y by 1/4."""
    view = boxes_to_view(torch.tensor([[8.0, 4.0, 24.0, 20.0], [0.0, 0.0, 32.0, 64.0]]), 32, 64, 16)
    assert view.tolist() == [[4.0, 1.0, 12.0, 5.0], [0.0, 0.0, 16.0, 16.0]]
    mask = patch_mask_from_boxes(view, 16, 16, 8)  # 2 x 2 grid: x 4..12 touches both columns, y 1..5 the top row
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]


def test_native_crop_keeps_the_scene_scale_on_black_by_hand():
    """A (W, H) = (64, 32) image viewed at 16 x 16 (x by 1/4, y by 1/2): the white box [8, 4, 24, 20] (16 x 16
    pixels) becomes 4 x 8 pixels, centred at column 6, row 4 of a black canvas; at the image's own size the
    box's pixels are copied as they are."""
    arr = np.full((32, 64, 3), 90, np.uint8)
    arr[4:20, 8:24] = 255
    img = Image.fromarray(arr)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    expect = torch.zeros(3, 16, 16)
    expect[:, 4:12, 6:10] = 1.0
    torch.testing.assert_close(native_crop_tensor(img, [8.2, 4.0, 23.9, 20.0], 16, MEAN, STD), (expect - mean) / std)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # viewed at its own size: copied, not resampled
    expect = torch.zeros(3, 32, 32)
    expect[:, 12:19, 11:21] = torch.from_numpy(pixels[5:12, 3:13].astype(np.float32)).permute(2, 0, 1) / 255
    got = native_crop_tensor(Image.fromarray(pixels), [3, 5, 13, 12], 32, MEAN, STD)  # 10 x 7, centred
    torch.testing.assert_close(got, (expect - mean) / std)


def test_crop_feature_equals_cls_of_a_manual_crop_and_scene_feature_repeats(bench: Path, tmp_path: Path):
    backbone, cfg = load_backbone(tiny_checkpoint(tmp_path / "t.pth"))
    settings = ImageSettings(32, 32, MEAN, STD)
    feats = extract_box_features(backbone, bench / "test", bench / "test" / "boxes.json", ("crop", "scene"),
                                 settings, batch_size=4096)
    bf = read_boxes(bench / "test" / "boxes.json", bench / "test")
    crops, scenes, labels = [], [], []
    for name in bf.boxes:  # by hand: PIL crop of the box, bicubic resize to 32 x 32, normalize, CLS
        img = Image.open(bench / "test" / name).convert("RGB")
        xyxy, cats = bf.boxes_for(name)
        for x0, y0, x1, y1 in xyxy.astype(int).tolist():
            arr = np.asarray(img.crop((x0, y0, x1, y1)).resize((32, 32), Image.Resampling.BICUBIC), np.float32)
            crops.append((torch.from_numpy(arr).permute(2, 0, 1) / 255 - torch.tensor(MEAN)[:, None, None])
                         / torch.tensor(STD)[:, None, None])
            scenes.append(len(labels))
        labels += cats.tolist()
    with torch.inference_mode():
        manual = backbone(torch.stack(crops))
    assert feats.labels.tolist() == labels and len(labels) == bf.report["boxes"]
    assert torch.equal(feats.features["crop"], manual)
    assert torch.equal(crop_tensor(img, [x0 + 0.5, y0, x1 - 0.2, y1], 32, MEAN, STD), crops[-1])  # rounds outward
    for side in (30, 0):  # the view must be whole patches, at least one
        with pytest.raises(ValueError, match=f"crop of {side} px is not a multiple of the model's"):
            extract_box_features(backbone, bench / "test", bench / "test" / "boxes.json", ("crop",),
                                 ImageSettings(side, 32, MEAN, STD))
    scene = feats.features["scene"]
    for i in range(len(feats.file_names)):  # every box of a scene gets that scene's CLS
        rows = (feats.image_index == i).nonzero().flatten()
        x = scene_tensor(Image.open(bench / "test" / feats.file_names[i]), 32, MEAN, STD)[None]
        with torch.inference_mode():
            cls = backbone(x)[0]
        torch.testing.assert_close(scene[rows], cls.expand(len(rows), -1), rtol=1e-5, atol=1e-5)


def test_object_knn_command_crop_and_scene(bench: Path, tmp_path: Path):
    ckpt = tiny_checkpoint(tmp_path / "t.pth")
    for mode in ("crop", "crop_native", "scene"):
        out = tmp_path / f"{mode}.json"
        proc = _cli("object-knn", str(ckpt), "--scenes", str(bench), "--mode", mode, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert f"object k-NN {mode:>5} (k=20, T=0.07): top-1" in proc.stdout
        res = json.loads(out.read_text())
        n_test = len(json.loads((bench / "test" / "boxes.json").read_text())["annotations"])
        n_train = len(json.loads((bench / "train" / "boxes.json").read_text())["annotations"])
        assert res["modes"] == [mode] and list(res["accuracy"]) == [mode]
        assert (res["n_train"], res["n_test"], res["classes"], res["image_size"]) == (n_train, n_test, ["tall", "wide"], 32)
        assert res["details"][mode]["n_test_features"] == n_test and res["details"][mode]["dim"] == 192
        # the same numbers from the library: features of both splits, then knn.py's weighted vote
        backbone, cfg = load_backbone(ckpt)
        settings = ImageSettings(32, 32, tuple(cfg.data.crops.mean), tuple(cfg.data.crops.std))
        f = {s: extract_box_features(backbone, bench / s, bench / s / "boxes.json", (mode,), settings)
             for s in ("train", "test")}
        expect = knn_classify(f["train"].features[mode], f["train"].labels - 1, f["test"].features[mode],
                              f["test"].labels - 1, ks=(20,), temperature=0.07, num_classes=2)["k=20"]
        assert res["accuracy"][mode] == {"top1": expect["top1"], "top5": expect["top5"]} and expect["top5"] == 100.0
    proc = _cli("object-knn", str(ckpt), "--scenes", str(bench), "--mode", "obj", "--out", str(tmp_path / "o.json"))
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: {NO_OBJ_TOKEN}"
    proc = _cli("object-knn", str(ckpt), "--scenes", str(bench), "--out", str(tmp_path / "all.json"))
    assert proc.returncode == 0 and NO_OBJ_TOKEN in proc.stdout
    assert json.loads((tmp_path / "all.json").read_text())["modes"] == ["crop", "crop_native", "scene"]


@pytest.mark.skipif(not HAS_OBJ, reason="ViTBackbone has no [OBJ] token yet (has_obj_token): MODEL helper's part")
def test_obj_mode_uses_each_box_mask(bench: Path, tmp_path: Path):
    ckpt = _odis_checkpoint(tmp_path / "odis.pth")
    backbone, _ = load_backbone(ckpt)
    assert backbone.has_obj_token
    settings = ImageSettings(32, 32, MEAN, STD)
    feats = extract_box_features(backbone, bench / "test", bench / "test" / "boxes.json", ("obj", "scene"), settings)
    bf = read_boxes(bench / "test" / "boxes.json", bench / "test")
    for multi, name in enumerate(feats.file_names):  # a scene whose first two boxes cover different patches
        img = Image.open(bench / "test" / name)
        xyxy = torch.as_tensor(bf.boxes_for(name)[0])
        masks = patch_mask_from_boxes(boxes_to_view(xyxy, img.width, img.height, 32), 32, 32, 8)
        if len(masks) >= 2 and not torch.equal(masks[0], masks[1]):
            break
    else:
        pytest.fail("no test scene with two differently placed objects")
    x = scene_tensor(img, 32, MEAN, STD)[None].expand(len(xyxy), -1, -1, -1)
    with torch.inference_mode():
        by_hand = backbone.forward_tokens(x, obj_mask=masks)["obj"]
        unmasked = backbone.forward_tokens(x[:1])["obj"]
    rows = (feats.image_index == multi).nonzero().flatten()
    torch.testing.assert_close(feats.features["obj"][rows], by_hand, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(by_hand[0], by_hand[1])  # the mask decides what [OBJ] sees
    assert torch.equal(feats.features["scene"][rows[0]], feats.features["scene"][rows[1]])
    whole = extract_box_features(backbone, bench / "test", None, ("obj",), settings)  # no boxes: [OBJ] sees all
    assert whole.features["obj"].shape[0] == len(list((bench / "test").glob("*.png"))) and (whole.labels == -1).all()
    torch.testing.assert_close(whole.features["obj"][whole.file_names.index(name)], unmasked[0], rtol=1e-5, atol=1e-5)

    out = tmp_path / "odis.json"
    proc = _cli("object-knn", str(ckpt), "--scenes", str(bench), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["modes"] == ["obj", "crop", "crop_native", "scene"] and res["notes"] == []
    assert res["details"]["obj"]["n_test_features"] == res["n_test"] == feats.labels.numel()


def test_pixel_baseline_needs_no_model_and_matches_a_hand_computed_vote(bench: Path, tmp_path: Path):
    """``--mode pixels``: gray box crop, bicubic to 28 x 28, its mean removed, then knn.py's weighted vote."""
    out = tmp_path / "pixels.json"
    proc = _cli("object-knn", "--mode", "pixels", "--scenes", str(bench), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "object k-NN pixels (k=20, T=0.07): top-1" in proc.stdout
    res = json.loads(out.read_text())
    feats, labels = {}, {}
    for split in ("train", "test"):
        bf = read_boxes(bench / split / "boxes.json", bench / split)
        rows, cats = [], []
        for name in bf.boxes:
            img = Image.open(bench / split / name).convert("L")
            xyxy, c = bf.boxes_for(name)
            for x0, y0, x1, y1 in xyxy.astype(int).tolist():  # integer boxes: the crop is the box itself
                a = np.asarray(img.crop((x0, y0, x1, y1)).resize((28, 28), Image.Resampling.BICUBIC), np.float32)
                t = torch.from_numpy(a.reshape(-1) / 255)
                rows.append(t - t.mean())  # the same float32 arithmetic: the bars' crops tie often
            cats += [int(v) - 1 for v in c]
        feats[split], labels[split] = torch.stack(rows), torch.tensor(cats)
    expect = knn_classify(feats["train"], labels["train"], feats["test"], labels["test"], ks=(20,), temperature=0.07,
                          num_classes=2)["k=20"]
    assert res["modes"] == ["pixels"] and res["details"]["pixels"]["dim"] == 784
    assert res["accuracy"]["pixels"]["top1"] == pytest.approx(expect["top1"])
    assert (res["n_train"], res["n_test"]) == (len(labels["train"]), len(labels["test"]))
    proc = _cli("object-knn", "--scenes", str(bench))  # every other mode needs a model
    assert proc.returncode == 1 and "needs a checkpoint" in proc.stderr and "--mode pixels" in proc.stderr


def test_an_unreadable_scene_image_is_one_line_naming_it(bench: Path, tmp_path: Path):
    import shutil

    scenes = tmp_path / "scenes"
    shutil.copytree(bench, scenes)
    name = json.loads((scenes / "test" / "boxes.json").read_text())["images"][2]["file_name"]
    (scenes / "test" / name).write_bytes(b"\x89PNG cut short")
    ckpt = tiny_checkpoint(tmp_path / "t.pth")
    for argv in (("--mode", "pixels"), (str(ckpt), "--mode", "crop")):
        out = tmp_path / "res.json"
        proc = _cli("object-knn", *argv, "--scenes", str(scenes), "--out", str(out))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().startswith(f"error: unreadable image {scenes / 'test' / name} (")
        assert proc.stderr.strip().endswith("replace or repair it, or delete it and its entries from the boxes file")
        assert not out.exists()
