"""The ``obj`` feature layout (ODIS's [OBJ] token as an image-level feature) in knn, the linear probe's logreg
mode, the online k-NN and the report, and the warning when a layout reads an untrained [CLS]."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssl_distill.checkpoints import FORMAT, atomic_save
from ssl_distill.config import ConfigError, config_to_dict, load_config
from ssl_distill.engine.build import build_model
from ssl_distill.models import BackboneSpec, ObjAttention, build_backbone
from ssl_distill.eval_constants import untrained_cls_note
from ssl_distill.models.frozen_features import FeatureExtractor, FeatureSpec

from test_knn import KNN_OVERRIDES, _three_class_folders

ROOT = Path(__file__).resolve().parents[1]


def hand_masked_obj(bb, x: torch.Tensor, obj_mask: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n * D): the [OBJ] rows of the last n blocks, from an attention mask written out here: [OBJ] reads
    itself and its object's patches; every other query reads every key (the authors' pattern)."""
    h, _, _ = bb._embed(x)  # the blocks' input tokens [CLS, OBJ, patches]; its own mask is not used
    b, t, _ = h.shape
    mask = torch.zeros(b, 1, t, t)
    mask[:, 0, 1, 0] = float("-inf")  # [OBJ] does not read [CLS]
    mask[:, 0, 1, 2:] = torch.where(obj_mask, 0.0, float("-inf"))
    rows = []
    for k, blk in enumerate(bb.vit.blocks):
        h = blk(h, attn_mask=mask)
        if k >= bb.depth - n:
            rows.append(bb.vit.norm(h)[:, 1])
    return torch.cat(rows, dim=1)


@pytest.mark.parametrize("n", [1, 2])
def test_obj_layout_equals_a_hand_masked_forward(n: int) -> None:
    torch.manual_seed(0)
    bb = build_backbone(BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2), obj_token=True).eval()
    bb.set_fused_attn(False)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    box = torch.zeros(3, 4, 4, dtype=torch.bool)
    box[:, 1:3, 0:2] = True  # a box on the 4 x 4 patch grid
    ext = FeatureExtractor(bb, FeatureSpec("obj", n))
    assert ext.dim == 192 * n
    with torch.no_grad():
        torch.testing.assert_close(ext(x, box.flatten(1)), hand_masked_obj(bb, x, box.flatten(1), n),
                                   rtol=1e-5, atol=1e-5)
        every = torch.ones(3, 16, dtype=torch.bool)  # no mask: [OBJ] reads every patch
        torch.testing.assert_close(ext(x), hand_masked_obj(bb, x, every, n), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="obj feature layout"):
        FeatureExtractor(bb, FeatureSpec("cls"))(x, every)
    with pytest.raises(ValueError, match=r"\[OBJ\] token"):
        FeatureExtractor(build_backbone(bb.spec), FeatureSpec("obj"))(x)


def _run(tmp_path: Path, recipe: str, *overrides: str) -> Path:
    cfg = load_config(ROOT / "configs" / recipe, [
        "model.depth=2", "model.patch_size=8", "model.img_size=16", "model.out_dim=32", "model.hidden_dim=16",
        "model.bottleneck_dim=8", "data.crops.global_size=16", "data.crops.local_size=8",
        f"knn.train_dir={tmp_path / 'train'}", f"knn.val_dir={tmp_path / 'val'}", *overrides])
    torch.manual_seed(0)
    run = tmp_path / recipe.split(".")[0]
    atomic_save({"format": FORMAT, "teacher": build_model(cfg, 0.0).state_dict(),
                 "student": build_model(cfg, 0.0).state_dict(), "config": config_to_dict(cfg)}, run / "checkpoint.pth")
    return run


def test_knn_and_linear_read_obj_and_warn_on_an_untrained_cls(tmp_path: Path, capsys) -> None:
    from ssl_distill.eval.knn import knn_on_checkpoint
    from ssl_distill.eval.linear import linear_on_checkpoint

    _three_class_folders(tmp_path)
    odis = _run(tmp_path, "odis_tiny_scenes.yaml", "data.boxes=boxes.json")
    res = knn_on_checkpoint(odis, overrides=KNN_OVERRIDES)  # [CLS]: no loss of the run trained it
    warning = capsys.readouterr().out
    assert warning.count("warning:") == 1 and "(dino.weight=0)" in warning and "--layout obj" in warning
    res = knn_on_checkpoint(odis, overrides=KNN_OVERRIDES, features=FeatureSpec("obj"))
    assert res["features"] == "obj" and "warning" not in capsys.readouterr().out
    lin = linear_on_checkpoint(odis, mode="logreg", cs=[1.0], layout="obj", holdout=0.25,
                               opts=_opts())
    assert lin["layout"] == "obj" and "warning" not in capsys.readouterr().out
    dino = _run(tmp_path, "dino_tiny_fmnist.yaml")  # a [CLS] its run trained: nothing to say
    knn_on_checkpoint(dino, overrides=KNN_OVERRIDES)
    assert "warning" not in capsys.readouterr().out
    # a model without [OBJ]: the obj layout reads one initialised from its [CLS]
    assert knn_on_checkpoint(dino, overrides=KNN_OVERRIDES, features=FeatureSpec("obj"))["features"] == "obj"


def _opts():
    from ssl_distill.eval.linear import ExtractOptions

    return ExtractOptions(image_size=16, resize_size=16, num_workers=0, cache_dir="", precision="fp32")


def test_the_untrained_cls_note_and_the_online_knn_layout_key() -> None:
    base = ["odis.weight=1", "data.boxes=b.json", "dino.weight=0", "ibot.weight=1", "masking.shape=block"]
    cfg = load_config(None, base)
    assert "the cls+mean@2 features read the [CLS] token" in untrained_cls_note(cfg, FeatureSpec("cls+mean", 2).name())
    assert untrained_cls_note(cfg, "obj") is None and untrained_cls_note(cfg, "mean") is None
    assert untrained_cls_note(load_config(None, []), "cls") is None  # DINO trains its [CLS]
    assert load_config(None, [*base, "monitor.knn_layout=obj"]).monitor.knn_layout == "obj"
    with pytest.raises(ConfigError, match="monitor.knn_layout=obj reads the \\[OBJ\\] token"):
        load_config(None, ["monitor.knn_layout=obj"])
    with pytest.raises(ConfigError, match="monitor.knn_layout must be cls or obj"):
        load_config(None, ["monitor.knn_layout=patch"])
    assert ObjAttention.from_config(cfg).patches_read_obj


def test_online_knn_reads_obj_and_the_report_says_which(tmp_path: Path) -> None:
    from ssl_distill.engine.online_knn import OnlineKnn
    from ssl_distill.report.runs import read_run

    _three_class_folders(tmp_path)
    common = ["odis.weight=1", "data.boxes=b.json", "model.depth=2", "model.patch_size=8", "model.img_size=16",
              "monitor.knn_every_steps=1", "monitor.knn_train_size=0", "monitor.knn_val_size=0",
              "monitor.knn_precision=fp32", f"knn.train_dir={tmp_path / 'train'}", f"knn.val_dir={tmp_path / 'val'}",
              *KNN_OVERRIDES]
    records = {}
    for layout in ("cls", "obj"):
        cfg = load_config(ROOT / "configs" / "odis_tiny_scenes.yaml", [*common, f"monitor.knn_layout={layout}"])
        out = tmp_path / layout
        out.mkdir()
        knn = OnlineKnn(cfg, out, iters_per_epoch=1, total_steps=1, device=torch.device("cpu"), logger=None)
        torch.manual_seed(0)
        backbone = build_model(cfg, 0.0).backbone
        records[layout] = knn.evaluate(1, backbone)
        (out / "config.yaml").write_text(json.dumps(config_to_dict(cfg)))
        (out / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n" + json.dumps(records[layout]))
    assert "knn_layout" not in records["cls"] and records["obj"]["knn_layout"] == "obj"
    assert any("online k-NN" in n and "monitor.knn_layout=obj" in n for n in read_run(tmp_path / "cls").notes)
    assert not any("knn_layout" in n for n in read_run(tmp_path / "obj").notes)


def test_the_eval_view_moves_boxes_with_its_resize_and_centre_crop() -> None:
    """(W, H) = (40, 20) viewed at 16 (resize 16): shorter side 20 -> 16, so 32 x 16, crop left 8, top 0; the box
    [10, 5, 30, 15] scales by 0.8 to [8, 4, 24, 12], shifts to [0, 4, 16, 12]; one reaching out is clipped."""
    from ssl_distill.data.eval_transform import EvalTransform

    view = EvalTransform(16, 16)
    assert view.geometry(40, 20) == (32, 16, 8, 0)
    moved = view.boxes_to_view(torch.tensor([[10.0, 5.0, 30.0, 15.0], [0.0, 0.0, 40.0, 20.0]]), 40, 20)
    assert moved.tolist() == [[0.0, 4.0, 16.0, 12.0], [0.0, 0.0, 16.0, 16.0]]


def _boxes_file(split_dir: Path) -> list[bool]:
    """A COCO boxes.json in ``split_dir``: the left half of every image but each third, which gets none; returns
    which images (folder order) have a box."""
    images, annotations, boxed = [], [], []
    for i, path in enumerate(sorted(p.relative_to(split_dir).as_posix() for p in split_dir.rglob("*.png"))):
        images.append({"id": i, "file_name": path, "width": 16, "height": 16})
        boxed.append(i % 3 != 2)
        if boxed[-1]:
            annotations.append({"id": i, "image_id": i, "bbox": [0, 0, 8, 16], "category_id": 1})
    (split_dir / "boxes.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return boxed


def test_knn_and_linear_obj_read_each_images_boxes(tmp_path: Path) -> None:
    """``--boxes``: each image's [OBJ] reads the patches of its box (the left column of the 2 x 2 grid), images
    without one read every patch (counted), features equal a hand-masked forward; other layouts are refused."""
    from PIL import Image

    from ssl_distill.data.eval_transform import EvalTransform
    from ssl_distill.data.folder import scan_image_folder
    from ssl_distill.errors import AnnotationError
    from ssl_distill.eval.features import ImageSettings, extract_folder, view_box_masks
    from ssl_distill.eval.knn import knn_on_checkpoint
    from ssl_distill.eval.linear import linear_on_checkpoint
    from ssl_distill.eval.model import load_model

    _three_class_folders(tmp_path)
    boxed = {split: _boxes_file(tmp_path / split) for split in ("train", "val")}
    odis = _run(tmp_path, "odis_tiny_scenes.yaml", "data.boxes=boxes.json")
    files = scan_image_folder(tmp_path / "val", labeled=True)
    settings = ImageSettings(16, 16)
    masks, every_patch = view_box_masks(files, "boxes.json", settings, 8)
    left = torch.tensor([True, False, True, False])  # patches (0, 0) and (1, 0)
    assert every_patch == boxed["val"].count(False)
    assert all(torch.equal(m, left if b else torch.ones(4, dtype=torch.bool)) for m, b in zip(masks, boxed["val"]))

    model = load_model(odis, "teacher", obj_token=True)
    bb = model.backbone.eval()
    bb.set_fused_attn(False)
    settings = ImageSettings(16, 16, *model.normalization)
    got = extract_folder(FeatureExtractor(bb, FeatureSpec("obj")), files, settings, num_workers=0, boxes="boxes.json")
    view = EvalTransform(16, 16, *model.normalization)
    x = torch.stack([view(Image.open(files.abspath(i))) for i in range(len(files))])
    with torch.no_grad():
        torch.testing.assert_close(got.features, hand_masked_obj(bb, x, masks, 1), rtol=1e-5, atol=1e-5)
    assert got.meta["images_reading_every_patch"] == every_patch and got.meta["boxes"]["file"].endswith("boxes.json")

    res = knn_on_checkpoint(odis, overrides=KNN_OVERRIDES, features=FeatureSpec("obj"), boxes="boxes.json")
    assert res["boxes"] == "boxes.json"
    assert res["images_reading_every_patch"] == {s: boxed[s].count(False) for s in ("train", "val")}
    lin = linear_on_checkpoint(odis, mode="logreg", cs=[1.0], layout="obj", holdout=0.25, opts=_opts(),
                               boxes="boxes.json")
    assert lin["boxes"] == "boxes.json" and lin["features"]["test"]["images_reading_every_patch"] == every_patch
    with pytest.raises(AnnotationError, match=r"boxes file .*nope\.json does not exist \(--boxes names"):
        knn_on_checkpoint(odis, overrides=KNN_OVERRIDES, features=FeatureSpec("obj"), boxes="nope.json")
    with pytest.raises(ValueError, match="obj layout"):
        knn_on_checkpoint(odis, overrides=KNN_OVERRIDES, boxes="boxes.json")
    with pytest.raises(ValueError, match="--mode logreg --layout obj"):
        linear_on_checkpoint(odis, mode="fast", opts=_opts(), boxes="boxes.json")
    # an unreadable boxed image reads every patch (the extraction substitutes it and counts it) instead of a
    # traceback from its size
    assert boxed["val"][0]
    Path(files.abspath(0)).write_bytes(b"\x89PNG cut short")
    masks, every_patch = view_box_masks(files, "boxes.json", ImageSettings(16, 16), 8)
    assert every_patch == boxed["val"].count(False) + 1 and masks[0].all()
