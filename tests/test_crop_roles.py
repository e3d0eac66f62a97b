"""Crops grouped by role as well as size: with ``data.crops.local_size == global_size`` the global views
still form their own forward when they carry the patch masks (the local views are never masked), so every
masked recipe trains with equal sizes; a local size above the global one is allowed, with a note."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ssl_distill.config import config_notes, load_config
from ssl_distill.engine.train import train
from ssl_distill.models import BackboneSpec, DINOHead, MultiCropModel, ViTBackbone, group_by_resolution

from scenes import make_scenes, write_coco
from test_end_to_end import ROOT, make_folder, tiny_overrides

TINY = BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2)
def test_global_views_form_their_own_group_when_they_carry_masks():
    """data.crops.local_size == global_size: the masks belong to the global views, and a local view of
    their size must neither take a mask row nor break the forward (it used to end in a reshape error)."""
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(4)]  # 2 global + 2 local views, one size
    assert group_by_resolution(crops) == [(0, 4)]  # by size alone, as DINO's MultiCropWrapper
    assert group_by_resolution(crops, first=2) == [(0, 2), (2, 4)]  # by role as well
    mixed = crops[:2] + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    assert group_by_resolution(mixed, first=2) == group_by_resolution(mixed) == [(0, 2), (2, 4)]
    torch.manual_seed(0)
    model = MultiCropModel(ViTBackbone(TINY, mask_token=True), DINOHead(192, 50, hidden_dim=32, bottleneck_dim=16))
    model = model.eval()
    with torch.no_grad():
        model.backbone.masked_embed.normal_()  # a mask token unlike zero, so that masking shows
        masks = torch.rand(4, 16, generator=g) < 0.4  # (2 global views x 2 images, 16 patches)
        out = model(crops, masks=masks, patches="masked", n_global=2)
        globals_ = model.backbone.forward_tokens(torch.cat(crops[:2]), mask=masks)
        locals_ = model.backbone(torch.cat(crops[2:]))  # no mask token
        torch.testing.assert_close(out["cls_feat"], torch.cat([globals_["cls"], locals_]))
        torch.testing.assert_close(out["patch_masked"], model.head(globals_["patch"][masks]))
        # a DINO step (nothing role-specific) keeps the one forward of every same-size crop
        torch.testing.assert_close(model(crops, n_global=2)["cls_feat"], model(crops)["cls_feat"])
    with pytest.raises(ValueError, match="masks has 4 rows for the 4 crop"):
        model(crops, masks=masks, patches="masked")  # without n_global the first group holds the locals too


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(a two-class image folder, eight 64 x 64 scenes with their COCO boxes)."""
    base = tmp_path_factory.mktemp("crop_roles")
    return make_folder(base / "train", 6, 0), write_coco(base / "scenes", make_scenes(8, seed=0, size=64))


@pytest.mark.parametrize("recipe", ["ibot_tiny_fmnist.yaml", "attmask_tiny_fmnist.yaml",
                                    "dinov2_style_tiny_fmnist.yaml", "odis_tiny_scenes.yaml"])
def test_every_masked_recipe_trains_with_local_views_of_the_global_size(recipe, folders, tmp_path):
    images, (scenes, boxes) = folders
    out = tmp_path / "run"
    extra = [f"data.boxes={boxes}"] if "odis" in recipe else []
    overrides = tiny_overrides(scenes if extra else images, out) + extra + [
        "data.crops.local_size=32", "run.stop_at_step=2", "run.log_every=1"]
    assert train(load_config(ROOT / "configs" / recipe, overrides))["step"] == 2
    steps = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "kind" not in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["patch"]) for r in steps)
    assert any(r["mask_ratio"] > 0 for r in steps)


def test_local_views_larger_than_the_global_ones_get_a_note(folders, tmp_path, capsys):
    images, _ = folders
    recipe, base = ROOT / "configs" / "ibot_tiny_fmnist.yaml", tiny_overrides(images, tmp_path / "run")
    assert config_notes(load_config(recipe, base + ["data.crops.local_size=32"])) == []
    bigger = load_config(recipe, base + ["data.crops.local_size=48", "run.stop_at_step=1"])
    assert config_notes(bigger) == ["data.crops.local_size=48 is larger than global_size=32: the local views (small "
                                    "crops of the image) are usually the smaller ones (DINO: 96 and 224)"]
    assert train(bigger)["step"] == 1  # allowed: it trains
    assert "note: data.crops.local_size=48 is larger than global_size=32" in capsys.readouterr().out
