"""Per-view rates of DINO's random augmentations, measured over many sample seeds.

DINO's ``DataAugmentationDINO`` (main_dino.py) draws, independently for every view:

    view               blur   solarize   colour jitter   grayscale   flip
    first global       1.0    0          0.8             0.2         0.5
    second global      0.1    0.2        0.8             0.2         0.5
    each local         0.5    0          0.8             0.2         0.5

The tests run the default ``CropsConfig`` (which must be that table) through the real collate
(``MultiCropCollate`` -> ``PhotometricAugment``) on images where each operation is detectable in the
output, and compare the rate of each *effect* per view with the table:

- grayscale: a colourful flat image keeps unequal channels unless grayscaled (jitter's saturation
  factor is >= 0.6, so it never removes the colour);
- solarize: a near-white flat image stays above 0.5 everywhere (brightness >= 0.6 x 0.98) unless
  solarized, which maps every value >= 0.5 to <= 0.5;
- colour jitter: a flat colour ends up exactly at one of {c, gray(c), solarize(c), solarize(gray(c))}
  unless jittered (the factors are continuous, so jitter lands elsewhere);
- blur: a random two-level pattern has exactly two output levels after any pointwise op (jitter,
  grayscale, solarize, normalisation) and many after a blur. A blur with sigma near its lower end
  (0.1 px) changes nothing in float32, so only blurs with sigma >= 0.3 are sure to show; the blur
  rate bound allows for the (0.3 - 0.1) / 1.9 of blurs below that.
- flip (geometry, ``MultiCropTransform``): a left-to-right gradient image keeps its direction in any
  crop unless the view is flipped.

Bounds: with N samples a rate has binomial standard deviation sqrt(p (1 - p) / N); every check allows
5 of them, and N = 4000 makes each swap named in the issue fail by a wide margin (e.g. 1.0 vs 0.5,
0.1 vs 0.5, solarize 0.2 on the wrong view, grayscale 0.2 vs 0, jitter 0.8 vs 0.5). The seeds are
fixed (the generator is counter-based), so the outcome is deterministic. The same samples also
check that the decisions are independent across views and across ops (a shared random number
would make the joint rates 0.2 instead of 0.04).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from ssl_distill.config import CropsConfig
from ssl_distill.data.collate import MultiCropCollate
from ssl_distill.data.photometric import PhotometricAugment
from ssl_distill.data.rng import sample_seed
from ssl_distill.data.views import MultiCropTransform

N = 4000
K_SIGMA = 5.0
FLAT_SIZE = 2  # flat images: every op but the blur is per pixel, and the blur keeps a flat image flat
PATTERN_SIZE = 8  # the two-level pattern for the blur
LUMA = (0.299, 0.587, 0.114)  # PIL convert("L"), what RandomGrayscale uses

# DINO's table (main_dino.py, DataAugmentationDINO)
BLUR = {"global1": 1.0, "global2": 0.1, "local": 0.5}
SOLARIZE = {"global1": 0.0, "global2": 0.2, "local": 0.0}
JITTER, GRAYSCALE, FLIP = 0.8, 0.2, 0.5
SIGMA_RANGE = (0.1, 2.0)
SIGMA_VISIBLE = 0.3  # blurs with sigma >= this change the two-level pattern by > 1e-4


def kind(v: int, n_global: int = 2) -> str:
    return "global1" if v == 0 else "global2" if v < n_global else "local"


def assert_rate(x: np.ndarray, p: float, what: str, lo_factor: float = 1.0) -> None:
    """The rate of boolean array ``x`` is ``p`` within K_SIGMA binomial standard deviations
    (exactly 0 when p = 0). ``lo_factor`` < 1 lowers the bottom of the band to ``p * lo_factor``
    (an effect that is invisible for that share of the draws)."""
    n, rate = x.size, float(np.mean(x))
    if p == 0.0:
        assert rate == 0.0, f"{what}: rate {rate:.4f}, DINO: never"
        return
    q = p * lo_factor
    lo = q - K_SIGMA * math.sqrt(q * (1 - q) / n)
    hi = p + K_SIGMA * math.sqrt(p * (1 - p) / n)
    assert lo <= rate <= hi, f"{what}: rate {rate:.4f} outside [{lo:.4f}, {hi:.4f}] (DINO: {p})"


@pytest.fixture(scope="module")
def crops() -> CropsConfig:
    return CropsConfig()


@pytest.fixture(scope="module")
def seeds() -> list[int]:
    return [sample_seed(7, 0, i) for i in range(N)]


def run_collate(crops: CropsConfig, seeds: list[int], colour: tuple[int, int, int] | None = None,
                pattern: tuple | None = None) -> list[torch.Tensor]:
    """Every sample's views are the same flat colour (or two-level pattern); returns the
    de-normalised outputs per view, (N, 3, s, s) in [0, 1]. (The views' sizes do not matter to
    the photometric ops; small ones keep the test fast.)"""
    if colour is not None:
        img = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, FLAT_SIZE, FLAT_SIZE).contiguous()
    else:
        img = pattern_image(pattern)
    views = [img] * (crops.n_global + crops.n_local)
    samples = [{"image": views, "label": 0, "index": i, "seed": seed} for i, seed in enumerate(seeds)]
    out = MultiCropCollate(crops)(samples)["crops"]
    mean = torch.tensor(crops.mean).view(1, 3, 1, 1)
    std = torch.tensor(crops.std).view(1, 3, 1, 1)
    return [x * std + mean for x in out]


def pattern_image(levels: tuple) -> torch.Tensor:
    """uint8 (3, PATTERN_SIZE, PATTERN_SIZE): a fixed random mix of two levels (or two colours)."""
    mask = torch.from_numpy(np.random.default_rng(0).integers(0, 2, (PATTERN_SIZE, PATTERN_SIZE)).astype(bool))
    lo, hi = (torch.tensor(np.broadcast_to(level, 3).copy(), dtype=torch.uint8).view(3, 1, 1) for level in levels)
    return torch.where(mask, hi, lo).contiguous()


def gray(c: np.ndarray) -> np.ndarray:
    return np.full(3, float(np.dot(LUMA, c)))


def solarize(c: np.ndarray) -> np.ndarray:
    return np.where(c >= 0.5, 1.0 - c, c)


@pytest.fixture(scope="module")
def effects(crops, seeds) -> dict[str, np.ndarray]:
    """Per effect, a bool array (views, N): did the op visibly happen to that sample's view."""
    gray_views = run_collate(crops, seeds, colour=(200, 80, 30))
    is_gray = [((y.amax(1) - y.amin(1)).amax((1, 2)) < 1e-4).numpy() for y in gray_views]

    bright_views = run_collate(crops, seeds, colour=(250, 250, 250))
    is_solarized = [(y.amax((1, 2, 3)) < 0.5).numpy() for y in bright_views]

    c = np.array([150, 100, 50]) / 255.0
    candidates = torch.tensor(np.stack([c, gray(c), solarize(c), solarize(gray(c))]), dtype=torch.float32)
    flat_views = run_collate(crops, seeds, colour=(150, 100, 50))
    is_jittered, jitter_visible = [], []
    for y in flat_views:
        colour = y.mean((2, 3))  # (N, 3)
        dist = (colour[:, None, :] - candidates[None]).abs().amax(-1).amin(-1)
        is_jittered.append((dist > 2e-3).numpy())
        # once grayscaled only the luma is left, which jitter may leave (nearly) unchanged
        jitter_visible.append(((colour.amax(1) - colour.amin(1)) > 1e-4).numpy())

    pattern_views = run_collate(crops, seeds, pattern=(40, 200))
    is_blurred = []
    for y in pattern_views:
        values = y[:, 0].flatten(1).sort(dim=1).values
        levels = (values.diff(dim=1) > 1e-4).sum(1) + 1
        is_blurred.append((levels > 2).numpy())
    return {k: np.stack(v) for k, v in
            (("gray", is_gray), ("solarize", is_solarized), ("jitter", is_jittered),
                                         ("jitter_visible", jitter_visible), ("blur", is_blurred))}


def test_default_config_is_dinos_table(crops):
    assert (crops.n_global, crops.blur_p, crops.solarize_p) == (2, (BLUR["global1"], BLUR["global2"], BLUR["local"]),
                                                                 SOLARIZE["global2"])
    assert (crops.jitter_p, crops.grayscale_p, crops.flip_p) == (JITTER, GRAYSCALE, FLIP)
    assert tuple(crops.jitter) == (0.4, 0.4, 0.2, 0.1) and tuple(crops.blur_sigma) == SIGMA_RANGE


def test_grayscale_rate_per_view(effects):
    for v, x in enumerate(effects["gray"]):
        assert_rate(x, GRAYSCALE, f"grayscale, view {v}")


def test_solarize_rate_per_view(effects):
    for v, x in enumerate(effects["solarize"]):
        assert_rate(x, SOLARIZE[kind(v)], f"solarize, view {v} ({kind(v)})")


def test_jitter_rate_per_view(effects):
    for v, (x, visible) in enumerate(zip(effects["jitter"], effects["jitter_visible"])):
        assert_rate(x[visible], JITTER, f"colour jitter, view {v} (samples not grayscaled)")


def test_blur_rate_per_view(effects):
    visible = (SIGMA_RANGE[1] - SIGMA_VISIBLE) / (SIGMA_RANGE[1] - SIGMA_RANGE[0])
    for v, x in enumerate(effects["blur"]):
        assert_rate(x, BLUR[kind(v)], f"blur, view {v} ({kind(v)})", lo_factor=visible)
    assert_rate(effects["blur"][2:], BLUR["local"], "blur, local views together", lo_factor=visible)


def test_decisions_are_independent_across_views_and_ops(effects):
    g, j = effects["gray"], effects["jitter"]
    assert_rate(g[0] & g[1], GRAYSCALE**2, "grayscale on both global views")
    assert_rate(g[2] & g[3], GRAYSCALE**2, "grayscale on two local views")
    jv = effects["jitter_visible"]
    both = jv[0] & jv[1]
    assert_rate((j[0] & j[1])[both], JITTER**2, "jitter on both global views")
    assert_rate(j[1][g[2]], JITTER, "jitter on view 1 when view 2 is grayscaled")
    assert_rate(g[1] & effects["blur"][1], GRAYSCALE * BLUR["global2"], "grayscale and blur on view 1",
                lo_factor=(SIGMA_RANGE[1] - SIGMA_VISIBLE) / (SIGMA_RANGE[1] - SIGMA_RANGE[0]))
    assert_rate(effects["solarize"][1] & g[1], SOLARIZE["global2"] * GRAYSCALE, "solarize and grayscale on view 1")
    b = effects["blur"]
    visible = (SIGMA_RANGE[1] - SIGMA_VISIBLE) / (SIGMA_RANGE[1] - SIGMA_RANGE[0])
    assert_rate(b[2] & b[3], BLUR["local"] ** 2, "blur on two local views", lo_factor=visible**2)


def test_effects_match_the_drawn_decisions(crops, seeds, effects):
    """The effects are the decisions PhotometricAugment.params draws (no op applied to other samples)."""
    aug = PhotometricAugment(crops)
    for v in range(crops.n_global + crops.n_local):
        p = aug.params(seeds, v)
        np.testing.assert_array_equal(effects["gray"][v], p.gray, err_msg=f"view {v}")
        np.testing.assert_array_equal(effects["solarize"][v], p.solarize, err_msg=f"view {v}")
        visible = effects["jitter_visible"][v]
        np.testing.assert_array_equal(effects["jitter"][v][visible], p.jitter[visible], err_msg=f"view {v}")
        assert not np.any(effects["jitter"][v] & ~p.jitter), f"view {v}: jitter effect without a jitter decision"
        blurred = effects["blur"][v]
        assert not np.any(blurred & ~p.blur), f"view {v}: blur effect without a blur decision"
        assert np.all(blurred[p.blur & (p.sigma >= SIGMA_VISIBLE)]), f"view {v}: a visible blur is missing"


def test_flip_rate_per_view(crops):
    """Horizontal flips (geometry) at rate 0.5 on every view, on a left-to-right gradient image."""
    n = 800
    crops = dataclasses.replace(crops, global_size=16, local_size=8)
    ramp = np.tile(np.linspace(0, 255, 96)[None, :, None], (64, 1, 3)).astype(np.uint8)
    img = Image.fromarray(ramp)
    transform = MultiCropTransform(crops)
    views = [transform(img, sample_seed(11, 0, i)) for i in range(n)]
    for v in range(crops.n_global + crops.n_local):
        x = torch.stack([s[v][0].float() for s in views])  # (n, s, s), red channel
        flipped = (x[:, :, -2:].mean((1, 2)) < x[:, :, :2].mean((1, 2))).numpy()
        assert_rate(flipped, FLIP, f"flip, view {v}")


def dino_chain(x: torch.Tensor, jitter: bool, order: np.ndarray, factors: np.ndarray, grayscale: bool,
               blur: bool, sigma: float, solar: bool) -> torch.Tensor:
    """DINO's per-view photometric chain on one float image (3, H, W) in [0, 1], with given draws:
    ColorJitter (its four ops in the drawn order, torchvision's functions) -> RandomGrayscale (PIL
    luma) -> GaussianBlur (kernel exp(-t^2 / 2 sigma^2) to ceil(3 sigma), edges replicated) ->
    Solarization (threshold 0.5)."""
    if jitter:
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in order:
            x = ops[op](x, float(factors[op]))
    if grayscale:
        x = (x * torch.tensor(LUMA).view(3, 1, 1)).sum(0, keepdim=True).expand(3, -1, -1)
    if blur:
        r = math.ceil(3 * sigma)
        t = torch.arange(-r, r + 1, dtype=torch.float64)
        k = torch.exp(-t**2 / (2 * sigma**2))
        k = (k / k.sum()).float()
        y = F.pad(x[None], (r, r, r, r), mode="replicate")
        y = F.conv2d(y, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
        x = F.conv2d(y, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)[0]
    if solar:
        x = torch.where(x >= 0.5, 1.0 - x, x)
    return x


def test_each_view_is_dinos_chain_in_dinos_order(crops, seeds):
    """Sample by sample, the output is jitter -> grayscale -> blur -> solarize with the drawn
    parameters, on a two-colour pattern where every op and its place in the chain shows."""
    m = 200
    colours = ((200, 80, 30), (40, 120, 220))
    out = run_collate(crops, seeds[:m], pattern=colours)
    x0 = pattern_image(colours).float() / 255.0
    aug = PhotometricAugment(crops)
    for v in (0, 1, 2):
        p = aug.params(seeds[:m], v)
        for b in range(m):
            want = dino_chain(x0, p.jitter[b], p.order[b], p.factors[b], p.gray[b], p.blur[b],
                              float(p.sigma[b]), p.solarize[b])
            torch.testing.assert_close(out[v][b], want, atol=5e-4, rtol=0, msg=lambda s: f"view {v}, sample {b}: {s}")


def test_drawn_parameters_cover_dinos_ranges(crops, seeds):
    """ColorJitter(0.4, 0.4, 0.2, 0.1) factors, blur sigma in (0.1, 2.0), all 24 jitter op orders."""
    p = PhotometricAugment(crops).params(seeds, 2)
    ranges = [(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]
    for i, (lo, hi) in enumerate(ranges):
        f = p.factors[:, i]
        assert lo <= f.min() < lo + 0.01 * (hi - lo) and hi - 0.01 * (hi - lo) < f.max() <= hi, (i, f.min(), f.max())
        assert abs(f.mean() - (lo + hi) / 2) < 0.02 * (hi - lo), (i, f.mean())
    assert SIGMA_RANGE[0] <= p.sigma.min() < 0.12 and 1.98 < p.sigma.max() <= SIGMA_RANGE[1]
    assert len({tuple(o) for o in p.order}) == 24
