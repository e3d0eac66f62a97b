"""iBOT's masks from the data side: block / random shapes, ratio draws, keying, batch wiring, config."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from ssl_distill.config import ConfigError, MaskingConfig, config_from_dict, load_config
from ssl_distill.data.collate import MultiCropCollate
from ssl_distill.data.folder import ImageFolderDataset, scan_image_folder
from ssl_distill.data.loader import build_train_loader
from ssl_distill.data.masking import (
    BatchMasking,
    MaskingGenerator,
    build_masking,
    ibot_min_block_patches,
)
from ssl_distill.data.rng import Stream, counter_uniforms, sample_seed, uniform_stream
from ssl_distill.data.sampler import EpochSampler
from ssl_distill.data.views import MultiCropTransform

BLOCK = MaskingConfig(shape="block")
RANDOM = MaskingConfig(shape="random")


# ---------------------------------------------------------------------------------------------
# The official block loop (iBOT loader.py ImageFolderMask.__getitem__, BEiT masking_generator.py),
# written as literally as read, driven by a fake `random` module that replays given uniforms.
# ---------------------------------------------------------------------------------------------
class _Replay:
    """``random.uniform`` / ``random.randint`` on a sequence of given uniforms."""

    def __init__(self, draw: Callable[[], float]) -> None:
        self.draw = draw

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.draw()

    def randint(self, a: int, b: int) -> int:
        return a + int(self.draw() * (b - a + 1))


def _official_block_mask(H: int, W: int, high: float, random: _Replay, log_aspect_ratio: tuple[float, float],
                         low: int | None = None, max_num_patches: float | None = None) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask_count = 0
    while mask_count < high:
        max_mask_patches = high - mask_count
        if max_num_patches is not None:  # BEiT only
            max_mask_patches = min(max_mask_patches, max_num_patches)
        delta = 0
        for attempt in range(10):
            lo = (min(H, W) // 3) ** 2 if low is None else low
            target_area = random.uniform(lo, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < W and h < H:
                top = random.randint(0, H - h)
                left = random.randint(0, W - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        if delta == 0:
            break
        else:
            mask_count += delta
    return mask


@pytest.mark.parametrize("H, W, ratios, low, cap", [
    (14, 14, (0.1, 0.3, 0.45), None, None),   # ViT-S/16 at 224: iBOT's setting
    (4, 4, (0.3, 0.5), None, None),           # the Fashion-MNIST demo: 28 px, patch 7
    (12, 9, (0.2, 0.4), 4, 10),               # BEiT's generator: min 4 patches, a largest-block cap
])
def test_block_masks_equal_the_official_loop_on_the_same_draws(H, W, ratios, low, cap) -> None:
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    gen = MaskingGenerator(H, W, low, cap, 0.3)
    for seed in range(150):
        for ratio in ratios:
            high = ratio * H * W
            ours = gen(high, uniform_stream(seed, 9, 0))
            theirs = _official_block_mask(H, W, high, _Replay(uniform_stream(seed, 9, 0)), log_aspect, low, cap)
            assert np.array_equal(ours, theirs), (seed, ratio)


def test_ibot_min_block_is_a_third_of_the_grid_squared() -> None:
    assert ibot_min_block_patches(14, 14) == 16 and ibot_min_block_patches(4, 4) == 1
    assert MaskingGenerator(14, 14).min_num_patches == 16 and MaskingGenerator(14, 14).max_num_patches is None


# ---------------------------------------------------------------------------------------------
# Block masks
# ---------------------------------------------------------------------------------------------
def test_block_count_never_exceeds_the_target_and_comes_close() -> None:
    m = BatchMasking(MaskingConfig(shape="block", pred_ratio=(0.3,)), 14, 2)
    counts = torch.cat(m(list(range(600)))).sum(dim=1).double()
    target = 0.3 * 14 * 14  # 58.8
    assert counts.max() <= math.floor(target)
    assert counts.mean() >= 0.95 * target  # BEiT's loop may stop short; measured 97% of the target
    assert counts.min() >= 0.5 * target


def test_single_blocks_are_rectangles_with_bounded_aspect_and_area() -> None:
    gen = MaskingGenerator(64, 64)  # large grid: little rounding
    ratios, budget = [], 900.0
    for seed in range(400):
        mask = np.zeros((64, 64), dtype=bool)
        added = gen.block(mask, budget, uniform_stream(seed, 9, 1))
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        h, w = len(rows), len(cols)
        assert added == mask.sum() == h * w > 0  # one solid rectangle
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        assert ibot_min_block_patches(64, 64) * 0.6 <= h * w <= budget
        # h = round(sqrt(s a)), w = round(sqrt(s / a)) with a in [0.3, 1/0.3]: bounds up to rounding
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3
        ratios.append(h / w)
    log_r = np.log(ratios)
    assert abs(float(np.mean(log_r > 0)) - 0.5) < 0.1  # log-uniform: as many tall as wide blocks
    assert log_r.max() > math.log(2.5) and log_r.min() < -math.log(2.5)  # the whole range is used


def test_masks_keyed_by_sample_seed_independent_of_the_batch() -> None:
    seeds = [sample_seed(0, 3, i) for i in range(12)]
    for cfg in (BLOCK, RANDOM):
        m = BatchMasking(cfg, 14, 2)
        full = m(seeds)
        assert len(full) == 2 and all(x.shape == (12, 196) and x.dtype == torch.bool for x in full)
        alone = m(seeds[5:6])
        shuffled = m(seeds[::-1])
        for g in range(2):
            assert torch.equal(alone[g][0], full[g][5])
            assert torch.equal(shuffled[g].flip(0), full[g])
            assert torch.equal(BatchMasking(cfg, 14, 2)(seeds)[g], full[g])  # reproducible
        assert not torch.equal(full[0], full[1])  # the two views differ
        other_epoch = m([sample_seed(0, 4, i) for i in range(12)])
        assert not torch.equal(other_epoch[0], full[0])


# ---------------------------------------------------------------------------------------------
# Random masks and ratios
# ---------------------------------------------------------------------------------------------
def test_random_masks_have_exactly_int_ratio_n_patches() -> None:
    cfg = MaskingConfig(shape="random", pred_ratio=(0.1, 0.3, 0.5), pred_ratio_var=(0.05, 0.1, 0.0))
    m = BatchMasking(cfg, 14, 2)
    seeds = list(range(400))
    masks, ratios = m(seeds), m.ratios(seeds)
    for g in range(2):
        expected = (ratios[:, g] * 14 * 14).astype(np.int64)  # iBOT: int(pred_ratio * H * W) ones
        assert np.array_equal(masks[g].sum(dim=1).numpy(), expected)
    hits = torch.cat(m(list(range(3000)))).double().mean(dim=0)  # every position equally likely
    assert (hits - hits.mean()).abs().max() < 0.05


def test_pred_ratio_entries_and_variation() -> None:
    cfg = MaskingConfig(shape="block", pred_ratio=(0.0, 0.3, 0.7), pred_ratio_var=(0.0, 0.1, 0.05))
    r = BatchMasking(cfg, 14, 2).ratios(list(range(20000)))  # (B, 2)
    entry = np.where(r == 0, 0, np.where(r < 0.5, 1, 2))
    assert (r[entry == 1] >= 0.2).all() and (r[entry == 1] <= 0.4).all()
    assert (r[entry == 2] >= 0.65).all() and (r[entry == 2] <= 0.75).all()
    for g in range(2):
        freq = np.bincount(entry[:, g], minlength=3) / len(entry)
        assert np.abs(freq - 1 / 3).max() < 0.015  # one entry uniformly per view
    both = np.bincount(3 * entry[:, 0] + entry[:, 1], minlength=9) / len(entry)
    assert np.abs(both - 1 / 9).max() < 0.012  # the two views choose independently
    middle = r[entry == 1]  # uniform on [0.2, 0.4]
    assert abs(middle.mean() - 0.3) < 0.003 and abs(middle.std() - 0.2 / math.sqrt(12)) < 0.003
    assert middle.min() < 0.202 and middle.max() > 0.398
    fixed = BatchMasking(MaskingConfig(shape="block", pred_ratio=(0.3, 0.4), pred_ratio_var=(0.0,)), 14, 1)
    assert set(np.unique(fixed.ratios(list(range(200))))) == {0.3, 0.4}  # var 0: the ratio itself


def test_nothing_masked_before_pred_start_epoch() -> None:
    cfg = MaskingConfig(shape="block", pred_start_epoch=2)
    m = BatchMasking(cfg, 14, 2)
    seeds = list(range(50))
    for epoch, masked in ((0, False), (1, False), (2, True), (5, True)):
        out = m(seeds, [epoch] * 50)
        assert all(bool(x.any(dim=1).all()) == masked and bool(x.any()) == masked for x in out)
    with pytest.raises(ValueError, match="epoch"):
        m(seeds)
    for shape in ("random", "block"):  # random too; and the epoch only gates, it does not re-key
        gated = BatchMasking(MaskingConfig(shape=shape, pred_start_epoch=1), 14, 2)
        assert not any(x.any() for x in gated(seeds, [0] * 50))
        assert all(torch.equal(a, b) for a, b in zip(gated(seeds, [3] * 50), BatchMasking(
            MaskingConfig(shape=shape), 14, 2)(seeds)))


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------
def _cfg(folder: Path, shape: str, workers: int = 0, **masking: object):
    return config_from_dict({
        "run": {"seed": 3},
        "data": {"train_dir": str(folder), "batch_size": 3, "num_workers": workers,
                 "crops": {"n_global": 2, "global_size": 32, "n_local": 2, "local_size": 16}},
        "model": {"patch_size": 8},
        "masking": {"shape": shape, **masking},
    })


def _epoch_batches(cfg, epoch: int) -> list[dict]:
    loader, sampler = build_train_loader(cfg, None)
    sampler.set_epoch(epoch)
    return list(loader)


def test_loader_adds_masks_and_leaves_the_crops_alone(photo_folder: Path) -> None:
    plain = _epoch_batches(_cfg(photo_folder, "none"), 1)
    masked = _epoch_batches(_cfg(photo_folder, "block", pred_ratio=[0.4]), 1)
    assert len(plain) == len(masked) == 2
    for a, b in zip(plain, masked):
        assert "masks" not in a
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["seed"], b["seed"])
        assert len(a["crops"]) == len(b["crops"]) == 4
        for x, y in zip(a["crops"], b["crops"]):  # bit-identical crops, masks or not
            assert torch.equal(x, y)
        assert len(b["masks"]) == 2  # global views only
        assert all(m.shape == (3, 16) and m.dtype == torch.bool for m in b["masks"])
        # the same masks as drawn directly from (seed, epoch, index)
        seeds = [sample_seed(3, 1, int(i)) for i in b["index"]]
        direct = build_masking(MaskingConfig(shape="block", pred_ratio=(0.4,)), 32, 8, 2)(seeds)
        assert all(torch.equal(m, d) for m, d in zip(b["masks"], direct))
        assert all(m.sum(dim=1).le(int(0.4 * 16)).all() and m.any(dim=1).all() for m in b["masks"])


def test_loader_masks_do_not_depend_on_workers_and_see_the_epoch(photo_folder: Path) -> None:
    cfg0, cfg1 = (_cfg(photo_folder, "random", w, pred_start_epoch=1) for w in (0, 1))
    for epoch in (0, 1):
        a, b = _epoch_batches(cfg0, epoch), _epoch_batches(cfg1, epoch)
        for x, y in zip(a, b):
            assert all(torch.equal(m, n) for m, n in zip(x["masks"], y["masks"]))
            assert bool(torch.stack(x["masks"]).any()) == (epoch >= 1)


def test_dataset_passes_the_epoch_only_when_given(photo_folder: Path) -> None:
    files = scan_image_folder(photo_folder, labeled=False)
    ds = ImageFolderDataset(files, None)
    assert "epoch" not in ds[(1, 5)] and ds[(1, 5, 7)]["epoch"] == 7
    s = EpochSampler(len(files), seed=2, batch_size=2, with_epoch=True)
    s.set_epoch(4)
    assert all(e == 4 and seed == sample_seed(2, 4, i) for i, seed, e in s)
    assert all(len(item) == 2 for item in EpochSampler(len(files), seed=2, batch_size=2))


def test_collate_without_masking_has_no_masks_key(photo_folder: Path) -> None:
    files = scan_image_folder(photo_folder, labeled=False)
    crops = _cfg(photo_folder, "none").data.crops
    ds = ImageFolderDataset(files, MultiCropTransform(crops))
    samples = [ds[(i, 10 + i, 0)] for i in range(3)]
    assert "masks" not in MultiCropCollate(crops)(samples)
    assert build_masking(MaskingConfig(), 32, 8, 2) is None


def test_mask_streams_are_not_the_crop_streams() -> None:
    crop_streams = {Stream.GEOMETRY, Stream.PHOTOMETRIC, Stream.SAMPLER}
    mask_streams = {Stream.MASK_RATIO, Stream.MASK_SHAPE}
    assert len(mask_streams) == 2 and not mask_streams & crop_streams  # masks uncorrelated with the crops
    seeds = [sample_seed(0, 0, i) for i in range(4)]
    crops = [counter_uniforms(seeds, s, 0, 8) for s in crop_streams]
    masks = [counter_uniforms(seeds, s, 0, 8) for s in mask_streams]
    assert not any(np.array_equal(c, m) for c in crops for m in masks)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expect", [
    (["masking.pred_ratio=[1.0]"], r"masking.pred_ratio\[0\]=1.0 is out of range: expected 0 <= pred_ratio\[0\] < 1; "
                                   "a ratio is the fraction of a global view's patches to mask"),
    (["masking.pred_ratio=[0.3, -0.1]"], r"masking.pred_ratio\[1\]=-0.1 is out of range"),
    (["masking.pred_ratio=[0.3]", "masking.pred_ratio_var=[0.4]"], r"draws ratios in \[-0.1, 0.7\], outside \[0, 1\)"),
    (["masking.pred_ratio=[0.8]", "masking.pred_ratio_var=[0.2]"], r"draws ratios in \[0.6, 1\], outside \[0, 1\)"),
    (["masking.pred_ratio=[0, 0.3]", "masking.pred_ratio_var=[0, 0.1, 0.1]"], "3 entries for 2 pred_ratio entries"),
    (["masking.pred_ratio=[]"], "masking.pred_ratio is empty"),
    (["masking.shape=rand"], "masking.shape must be none, block or random"),
    (["masking.pred_aspect_ratio=[3, 0.3]"], "must not exceed"),
    (["masking.pred_start_epoch=-1"], "masking.pred_start_epoch=-1.0 is out of range"),
    (["masking.min_block_patches=0"], "masking.min_block_patches=0 is out of range"),
])
def test_config_refuses_bad_masking(overrides, expect) -> None:
    with pytest.raises(ConfigError, match=expect):
        load_config("configs/dino_tiny_fmnist.yaml", overrides)


def test_config_accepts_ibot_recipes() -> None:
    cfg = load_config("configs/dino_tiny_fmnist.yaml",
                      ["masking.pred_ratio=[0, 0.3]", "masking.pred_ratio_var=[0, 0.2]"])
    assert cfg.masking.pred_ratio == (0.0, 0.3) and cfg.masking.pred_ratio_var == (0.0, 0.2)
    one_var = load_config("configs/dino_tiny_fmnist.yaml", ["masking.pred_ratio=[0.2, 0.4]",
                                                            "masking.pred_ratio_var=[0.1]"]).masking
    assert BatchMasking(dataclasses.replace(one_var, shape="random"), 4, 1).vars_.tolist() == [0.1, 0.1]
    default = load_config("configs/dino_tiny_fmnist.yaml").masking
    assert default.shape == "none" and default.pred_ratio == (0.3,) and default.pred_aspect_ratio == (0.3, 1 / 0.3)
