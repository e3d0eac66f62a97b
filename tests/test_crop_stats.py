"""What decides whether ODIS's cropping can matter (ssl_distill/data/crop_stats.py), and the cover rules and
ablations of object-aware crops it measures (ssl_distill/data/object_crops.py: min_object_inside,
object_dominant, ablation), on cases whose numbers follow by hand."""
from __future__ import annotations

import numpy as np
import pytest

from ssl_distill.config import CropsConfig
from ssl_distill.data.crop_stats import crop_statistics
from ssl_distill.data.object_crops import ObjectMultiCropTransform, dominant_item, inside_fraction, visible_fraction
from ssl_distill.data.views import CropBox


def _crops(**kw) -> CropsConfig:
    base = dict(n_global=2, global_size=64, n_local=0, ratio=(1.0, 1.0))
    return CropsConfig(**{**base, **kw})


def test_dominant_item_and_inside_fraction():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 25, 10], [40, 40, 50, 50]], dtype=np.float64)
    crop = CropBox(top=0, left=0, height=20, width=20, flip=False)  # box 0: 100 px inside, box 1: 150, box 2: 0
    assert dominant_item(boxes, crop) == 1
    assert dominant_item(boxes[[0, 2]], crop) == 0
    assert dominant_item(boxes[[2]], crop) == -1 and dominant_item(np.zeros((0, 4)), crop) == -1
    assert inside_fraction(boxes[1].tolist(), crop) == 0.75 and inside_fraction(boxes[2].tolist(), crop) == 0.0


def test_whole_image_crops_give_exact_shares():
    """Crops of scale 1 and ratio 1 on a square image are the whole image: both views agree, nothing is
    redrawn, every sample pairs on the larger box (target_box=largest), whose 32 x 32 box is 16 of the 64
    patches of the 8 x 8 grid: mask and box cover 1/4 each."""
    images = [(64, 64, np.array([[0, 0, 32, 32], [40, 40, 48, 48]], dtype=np.float64))]
    t = ObjectMultiCropTransform(_crops(global_scale=(1.0, 1.0)), 8, target_box="largest")
    st = crop_statistics(t, images, 10, seed=0)
    assert (st.samples, st.plain_disagree, st.redrawn, st.paired, st.aware_disagree) == (10, 0.0, 0.0, 1.0, 0.0)
    assert (st.target_not_dominant, st.mask_cover, st.box_cover) == (0.0, 0.25, 0.25)
    # the small box as the only target, made dominant: no whole-image crop shows it most -> never paired
    dom = ObjectMultiCropTransform(_crops(global_scale=(1.0, 1.0), object_dominant=True), 8)
    views = dom.draw(64, 64, 0, images[0][2][[1, 0]])  # as sampled, the target could be either; force each
    assert not dom.holds([[40, 40, 48, 48], [0, 0, 32, 32]], 0, CropBox(0, 0, 64, 64, False))
    assert dom.holds([[40, 40, 48, 48], [0, 0, 32, 32]], 1, CropBox(0, 0, 64, 64, False))
    assert views.target in (-1, 1)  # a pair, when found, is on the larger box (index 1 there)


def test_two_halves_disagree_half_the_time_and_the_rules_fix_it():
    """Two equal boxes, the left and right halves; a crop of a quarter of the area (32 x 32) at a uniform
    left edge in [0, 32] shows more of the left box iff its edge is below 16: two plain crops disagree with
    probability 1/2. With object_dominant the target is the dominant item of both views of every pair."""
    images = [(64, 64, np.array([[0, 0, 32, 64], [32, 0, 64, 64]], dtype=np.float64))]
    crops = _crops(global_scale=(0.25, 0.25))
    plain = crop_statistics(ObjectMultiCropTransform(crops, 8), images, 400, seed=3)
    assert 0.42 < plain.plain_disagree < 0.58
    assert plain.target_not_dominant > 0.3  # today's rule: a 4% sliver of the target is enough
    fixed = crop_statistics(ObjectMultiCropTransform(_crops(global_scale=(0.25, 0.25), object_dominant=True), 8),
                            images, 400, seed=3)
    assert fixed.plain_disagree == plain.plain_disagree  # the plain views do not move
    assert fixed.target_not_dominant == 0.0 and fixed.paired > 0.9
    assert fixed.aware_disagree <= 1.0 - fixed.paired + 1e-9  # only samples without a pair can still disagree
    inside = ObjectMultiCropTransform(_crops(global_scale=(0.25, 0.25), min_object_inside=0.5), 8)
    for s in range(50):  # a 32 x 64 box can be at most half inside a 32 x 32 crop: every kept crop holds half
        v = inside.draw(64, 64, s, images[0][2])
        box = images[0][2][v.target].tolist() if v.paired else None
        assert not v.paired or all(inside_fraction(box, c) >= 0.5 for c in v.crops[:2])


def test_defaults_keep_todays_views_and_the_ablations():
    """min_object_inside 0 and object_dominant false draw exactly the views of before; cropping_only returns
    the views alone; masking_only keeps the plain views, valid where the target covers 4% of the view."""
    boxes = np.array([[0, 0, 32, 64], [32, 0, 64, 64]], dtype=np.float64)
    crops = _crops(global_scale=(0.25, 0.25))
    t = ObjectMultiCropTransform(crops, 8)
    masking = ObjectMultiCropTransform(crops, 8, ablation="masking_only")
    for s in range(20):
        v = masking.draw(64, 64, s, boxes)
        assert v.crops == t.plain.geometry(64, 64, s) and v.paired
        assert v.valid.tolist() == [bool(visible_fraction(boxes[[v.target]], c)[0] >= 0.04) for c in v.crops]
    from PIL import Image

    img = Image.new("RGB", (64, 64))
    out = ObjectMultiCropTransform(crops, 8, ablation="cropping_only")(img, 5, boxes)
    assert set(out) == {"image"} and len(out["image"]) == 2
    assert [x.tolist() for x in out["image"]] == [x.tolist() for x in t(img, 5, boxes)["image"]]
    with pytest.raises(ValueError, match="ablation"):
        ObjectMultiCropTransform(crops, 8, ablation="both")
    with pytest.raises(ValueError, match="min_object_inside"):
        ObjectMultiCropTransform(_crops(min_object_inside=1.5), 8)
