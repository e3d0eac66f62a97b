"""Gram anchoring in training: the config's refusals, the schedules, the Gram crops, the Gram teacher
(snapshot, refreshes, file), and tiny runs that train, stop, resume and log the monitor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_distill.config import ConfigError, load_config
from ssl_distill.engine.schedules import Schedules, warmup_cosine_constant
from test_end_to_end import CONFIG

LIVE = ["gram.weight=1", "gram.ema_teacher=true"]
FROZEN = ["gram.weight=1", "gram.it_load_ema_teacher=0", "data.crops.gram_size=56"]


@pytest.mark.parametrize("overrides, match", [
    (["gram.weight=1"], "needs a Gram teacher"),
    ([*LIVE, "data.crops.gram_size=56"], "data.crops.gram_size=56 would render crops nobody reads"),
    (["gram.weight=1", "gram.it_load_ema_teacher=0"], "a frozen Gram teacher reads its own crops"),
    ([*FROZEN, "data.crops.gram_size=50"], "gram_size=50 is not a multiple of model.patch_size=7"),
    ([*FROZEN, "gram.ckpt=run"], "gram.ckpt=run and gram.it_load_ema_teacher=0 both say where"),
    ([*LIVE, "gram.update_frequency=10"], "gram.ema_teacher=true uses the EMA teacher itself"),
    ([*FROZEN, "gram.max_updates=3"], "gram.max_updates=3 says when Gram teacher refreshes happen"),
    ([*FROZEN, "gram.it_first_update=5", "gram.max_updates=3"], "it_first_update=5, gram.max_updates=3 say"),
    ([*FROZEN, "gram.update_frequency=5", "gram.max_updates=0"], "gram.max_updates=0 is out of range"),
    (["gram.weight=1", "gram.it_load_ema_teacher=10", "gram.start_step=5", "data.crops.gram_size=56"],
     "takes the Gram teacher after gram.start_step=5"),
    ([*LIVE, "gram.remove_neg=true", "gram.remove_only_teacher_neg=true"], "choose one"),
    ([*LIVE, "data.crops.global_size=7", "data.crops.local_size=7"], "gives one patch: its Gram matrix is always"),
    ([*LIVE, "gram.dino_local_weight=0.5", "dino.weight=0", "ibot.weight=1", "masking.shape=block"],
     "reweights the DINO term's local-crop pairs, but the run has none"),
    (["data.crops.gram_size=56"], "sets up Gram anchoring, but gram.weight=0 turns its term off"),
    (["gram.ema_teacher=true", "gram.update_frequency=5"], "set up Gram anchoring, but gram.weight=0"),
])
def test_configs_that_cannot_work_are_refused_with_a_reason(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIG, overrides)


def test_working_gram_configs_load():
    load_config(CONFIG, LIVE)
    load_config(CONFIG, [*FROZEN, "gram.update_frequency=5", "gram.it_first_update=10", "gram.max_updates=3",
                         "gram.dino_local_weight=0.5", "gram.start_step=4", "gram.ramp_steps=3"])
    load_config(CONFIG, ["gram.weight=2", "gram.ckpt=some/run", "data.crops.gram_size=28"])


def test_ramp_is_dinov3s_linear_warmup_cosine_decay():
    def official(start, peak, end, warmup, total, cosine):  # dinov3/train/cosine_lr_scheduler.py, written out
        linear = np.linspace(start, peak, warmup, endpoint=False)
        c = (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2
        return np.concatenate([linear, (peak - end) * c + end, np.full(total - cosine - warmup, end)])

    for args in [(0.0, 0.0, 2.0, 10, 30, 5), (1.0, 1.0, 0.5, 3, 8, 4), (0.0, 0.0, 1.5, 0, 6, 0)]:
        start, peak, end, warmup, total, cosine = args
        assert np.array_equal(warmup_cosine_constant(start, peak, end, warmup, cosine, total),
                              official(start, peak, end, warmup, total, cosine))
    # a ramp past the run's end is cut there
    assert np.array_equal(warmup_cosine_constant(0.0, 0.0, 1.0, 4, 10, 6), official(0.0, 0.0, 1.0, 4, 14, 10)[:6])


def test_schedules_hold_the_gram_weight_and_the_dino_local_weight():
    cfg = load_config(CONFIG, [*LIVE, "gram.weight=2", "gram.start_step=5", "gram.ramp_steps=5",
                               "gram.dino_local_weight=0.5", "optim.epochs=2"])
    sched = Schedules.from_config(cfg, iters_per_epoch=10, world=1)
    w, local = sched.gram_weight, sched.dino_local_weight
    assert len(w) == len(local) == 20
    assert (w[:6] == 0).all() and w[9] == 2.0 and (w[9:] == 2.0).all()  # the ramp's first value is its start
    assert np.all(np.diff(w[5:10]) > 0) and w[7] == pytest.approx(1.0)  # half-way up the cosine
    assert (local[:6] == 1.0).all() and (local[9:] == 0.5).all() and local[7] == pytest.approx(0.75)
    plain = Schedules.from_config(load_config(CONFIG), iters_per_epoch=10, world=1)
    assert (plain.gram_weight == 0).all() and (plain.dino_local_weight == 1.0).all()  # exactly 1: DINO unchanged


# ---------------------------------------------------------------------------------------------- Gram crops
def _batch(crops_cfg, photos, transform=None, photometric=True):
    """One collated batch of the photos (seed = 100 + index), through the training views (or ``transform``)."""
    from PIL import Image

    from ssl_distill.data.collate import MultiCropCollate
    from ssl_distill.data.views import MultiCropTransform

    transform = transform or MultiCropTransform(crops_cfg)
    samples = []
    for i, path in enumerate(photos):
        img = Image.open(path).convert("RGB")
        out = transform(img, 100 + i) if not isinstance(transform, tuple) else transform[0](img, 100 + i, transform[1])
        extra = out if isinstance(out, dict) else {"image": out}
        samples.append({"label": 0, "index": i, "bad": 0, "seed": 100 + i, **extra})
    return MultiCropCollate(crops_cfg, photometric=photometric)(samples)


def _photos(photo_folder):
    return sorted(p for p in photo_folder.rglob("*") if p.suffix in (".png", ".jpg") and "extra" not in p.parts)


def test_gram_crops_leave_the_views_unchanged_and_share_their_geometry_and_photometry(photo_folder):
    import dataclasses

    from ssl_distill.config import CropsConfig

    photos = _photos(photo_folder)
    plain = CropsConfig(global_size=32, local_size=16, n_local=2)
    without = _batch(plain, photos)
    assert "gram_crops" not in without
    # same size, distortions on: exactly the global views (same box, flip and photometric draws)
    same = _batch(dataclasses.replace(plain, gram_size=32, gram_no_distortions=False), photos)
    assert all(a.equal(b) for a, b in zip(same["crops"], without["crops"]))  # the views did not move
    assert len(same["gram_crops"]) == 2 and all(g.equal(c) for g, c in zip(same["gram_crops"], without["crops"]))
    # no distortions: the global views' pixels, only normalised
    raw = _batch(plain, photos, photometric=False)["crops"]
    clean = _batch(dataclasses.replace(plain, gram_size=32), photos)["gram_crops"]
    mean, std = torch.tensor(plain.mean).view(1, 3, 1, 1), torch.tensor(plain.std).view(1, 3, 1, 1)
    for g, u8 in zip(clean, raw[:2]):
        torch.testing.assert_close(g, (u8.float() / 255 - mean) / std, rtol=0, atol=1e-6)
    # twice the size: the same box and flip at 64 px, which downsampled is the 32-px view
    big = _batch(dataclasses.replace(plain, gram_size=64), photos, photometric=False)["gram_crops"]
    for g, u8 in zip(big, raw[:2]):
        assert g.shape[-2:] == (64, 64)
        down = torch.nn.functional.interpolate(g.float(), size=(32, 32), mode="area")
        assert (down - u8.float()).abs().mean() < 6  # of 255; a mirrored or moved crop differs by far more
        assert (down.flip(-1) - u8.float()).abs().mean() > 12


def test_gram_crops_follow_the_object_aware_global_views(photo_folder):
    import dataclasses

    from ssl_distill.config import CropsConfig
    from ssl_distill.data.object_crops import ObjectMultiCropTransform

    photos = _photos(photo_folder)
    crops = CropsConfig(global_size=32, local_size=16, n_local=2)
    boxes = np.array([[10.0, 10.0, 200.0, 200.0]])
    gram = dataclasses.replace(crops, gram_size=32, gram_no_distortions=False)
    without = _batch(crops, photos, (ObjectMultiCropTransform(crops, 8), boxes))
    batch = _batch(gram, photos, (ObjectMultiCropTransform(gram, 8), boxes))
    assert batch["obj_valid"].any() and len(batch["obj_masks"]) == 4
    assert all(g.equal(c) for g, c in zip(batch["gram_crops"], without["crops"]))
