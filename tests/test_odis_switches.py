"""ODIS's data switches: the target box sampled first (``odis.target_box=sample``, the project page) or the
largest box of the first crop (``largest``, the rule before the switch); images without a box
(``odis.no_box``: none | whole_image); object-aware local crops in the scene recipe."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_distill.config import ConfigError, CropsConfig, load_config
from ssl_distill.data.object_crops import ObjectMultiCropTransform
from ssl_distill.data.views import MultiCropTransform

P = 8
# global crops that keep >= 90% of the image: every box below stays visible, so every sample pairs
CROPS = CropsConfig(n_global=2, global_size=32, global_scale=(0.9, 1.0), n_local=2, local_size=16)
# a 64 x 64 image: one large box and three small ones, each covering >= 4% of any such crop
BOXES = np.array([[0, 0, 40, 40], [40, 0, 64, 24], [0, 40, 24, 64], [40, 40, 64, 64]], dtype=np.float32)


def targets(rule: str, n: int = 2000) -> np.ndarray:
    t = ObjectMultiCropTransform(CROPS, P, target_box=rule)
    return np.array([t.draw(64, 64, seed, BOXES).target for seed in range(n)])


def test_sampled_target_is_uniform_over_the_boxes_on_a_fixed_seed() -> None:
    got = targets("sample")
    assert (got >= 0).all()  # every sample paired: the frequencies are the rule's own
    freq = np.bincount(got, minlength=4) / len(got)
    # 2000 draws of a uniform choice among 4: sd of each frequency 0.0097; 3.5 sd
    assert np.abs(freq - 0.25).max() < 0.034, freq
    assert np.array_equal(got, targets("sample"))  # a function of the seed alone


def test_largest_rule_takes_the_largest_visible_box_every_time() -> None:
    got = targets("largest")
    assert (got == 0).all()


def test_sampled_target_is_in_every_global_view() -> None:
    t = ObjectMultiCropTransform(CROPS, P)  # the default: sample
    for seed in range(50):
        views = t.draw(64, 64, seed, BOXES)
        x0, y0, x1, y1 = BOXES[views.target]
        for crop in views.crops[:2]:
            iw = min(x1, crop.left + crop.width) - max(x0, crop.left)
            ih = min(y1, crop.top + crop.height) - max(y0, crop.top)
            assert iw * ih / (crop.width * crop.height) >= CROPS.min_object_cover


@pytest.mark.parametrize("no_box", ["none", "whole_image"])
def test_images_without_a_box_get_plain_views_and_the_fallback(no_box: str) -> None:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    t = ObjectMultiCropTransform(CROPS, P, no_box=no_box)
    out = t(img, 5, np.zeros((0, 4)))
    plain = MultiCropTransform(CROPS)(img, 5)
    assert all(torch.equal(a, b) for a, b in zip(out["image"], plain))  # the plain views either way
    assert [m.shape for m in out["obj_masks"]] == [(16,), (16,), (4,), (4,)]
    assert all(m.all() for m in out["obj_masks"])  # [OBJ] sees every patch
    assert out["obj_valid"].tolist() == [no_box == "whole_image"] * 4  # the object term counts them or not
    # an image with boxes is untouched by the fallback
    boxed = [ObjectMultiCropTransform(CROPS, P, no_box=nb)(img, 5, np.array([[4, 4, 40, 40]])) for nb in ("none",
                                                                                                       "whole_image")]
    assert boxed[0]["obj_valid"].tolist() == boxed[1]["obj_valid"].tolist()
    assert all(torch.equal(a, b) for a, b in zip(boxed[0]["obj_masks"], boxed[1]["obj_masks"]))


def test_the_switches_are_checked_and_the_scene_recipe_crops_locals_around_the_object() -> None:
    base = ["odis.weight=1", "data.boxes=b.json"]
    cfg = load_config(None, base)
    assert (cfg.odis.target_box, cfg.odis.no_box) == ("sample", "none")
    with pytest.raises(ConfigError, match="odis.target_box must be sample"):
        load_config(None, [*base, "odis.target_box=biggest"])
    with pytest.raises(ConfigError, match="odis.no_box must be none"):
        load_config(None, [*base, "odis.no_box=all"])
    with pytest.raises(ValueError, match="target_box"):
        ObjectMultiCropTransform(CROPS, P, target_box="first")
    assert load_config("configs/odis_tiny_scenes.yaml").data.crops.object_aware_local
