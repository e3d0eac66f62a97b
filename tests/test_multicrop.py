"""Multi-crop views (geometry + batched photometry), eval transform, epoch sampler, loader."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ssl_distill.config import CropsConfig
from ssl_distill.data.collate import MultiCropCollate
from ssl_distill.data.eval_transform import EvalTransform, collate_eval
from ssl_distill.data.folder import ImageFolderDataset, load_rgb, scan_image_folder
from ssl_distill.data.photometric import (
    PhotometricAugment,
    adjust_brightness_,
    adjust_contrast_,
    adjust_hue_,
    adjust_saturation_,
    gaussian_blur,
    gaussian_kernels,
)
from ssl_distill.data.rng import counter_uniforms, sample_seed
from ssl_distill.data.sampler import EpochSampler
from ssl_distill.data.views import MultiCropTransform, random_resized_crop_box

SMALL = CropsConfig(n_global=2, global_size=32, n_local=3, local_size=16)
MEAN = torch.tensor(SMALL.mean).view(1, 3, 1, 1)
STD = torch.tensor(SMALL.std).view(1, 3, 1, 1)
# No randomness at all: whole image, no flip, no photometric op.
IDENTITY = dataclasses.replace(SMALL, global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                               jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


@pytest.fixture(scope="module")
def images(photo_folder: Path) -> list[Image.Image]:
    files = scan_image_folder(photo_folder, labeled=True)
    return [load_rgb(files.abspath(i)) for i in range(len(files))]


def _samples(images: list[Image.Image], crops: CropsConfig, seeds: list[int]) -> list[dict]:
    t = MultiCropTransform(crops)
    return [{"image": t(images[i % len(images)], s), "label": i % 2, "index": i, "bad": i % 2, "seed": s}
            for i, s in enumerate(seeds)]


def _batch(images: list[Image.Image], crops: CropsConfig, seeds: list[int]) -> dict:
    return MultiCropCollate(crops)(_samples(images, crops, seeds))


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


def test_views_shapes_count_order(images: list[Image.Image]) -> None:
    views = MultiCropTransform(SMALL)(images[0], 7)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.uint8 for v in views)
    batch = _batch(images, SMALL, [1, 2, 3, 4])
    assert [tuple(c.shape) for c in batch["crops"]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in batch["crops"])
    assert batch["label"].tolist() == [0, 1, 0, 1] and batch["label"].dtype == torch.long
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["seed"].tolist() == [1, 2, 3, 4]
    assert batch["bad"] == 2


def test_no_local_views(images: list[Image.Image]) -> None:
    crops = dataclasses.replace(SMALL, n_local=0)
    batch = _batch(images, crops, [5, 6])
    assert [tuple(c.shape) for c in batch["crops"]] == [(2, 3, 32, 32)] * 2


def test_deterministic_and_independent_of_batch(images: list[Image.Image]) -> None:
    seeds = [11, 22, 33, 44, 55, 66, 77]
    a = _batch(images, SMALL, seeds)
    b = _batch(images, SMALL, seeds)
    for x, y in zip(a["crops"], b["crops"]):
        assert torch.equal(x, y)
    # Sample 3 alone (same image, same seed) gives the very same crops as inside the batch.
    t, collate = MultiCropTransform(SMALL), MultiCropCollate(SMALL)
    alone = collate([{"image": t(images[3], 44), "label": 0, "index": 3, "bad": 0, "seed": 44}])
    for x, y in zip(a["crops"], alone["crops"]):
        assert torch.equal(x[3], y[0])
    # Reordered batch: same per-sample outputs.
    rev = collate(list(reversed(_samples(images, SMALL, seeds))))
    for x, y in zip(a["crops"], rev["crops"]):
        assert torch.equal(x, y.flip(0))


def test_views_of_one_size_batched_together_bit_for_bit(images: list[Image.Image]) -> None:
    # PhotometricAugment runs the views of one size as one batch; each view equals its own run (DINO's
    # probabilities: blur on the first global, solarize on the second, jitter, grayscale)
    augment = PhotometricAugment(SMALL)
    seeds = [3, 1 << 40, 17, 99, 5, 2024, 7, 8, 9]
    views = [torch.stack([v for i in range(len(seeds)) for v in [MultiCropTransform(SMALL)(images[i % len(images)],
                                                                                            seeds[i])[k]]])
             for k in range(len(augment.views))]
    together = augment(views, seeds)
    for v, u8 in enumerate(views):
        assert torch.equal(together[v], augment.view(u8, seeds, v))
    assert not torch.equal(together[2], together[3])  # two local views: each its own parameters


def test_different_seeds_differ(images: list[Image.Image]) -> None:
    batch = _batch([images[0]], SMALL, [1, 2])
    for c in batch["crops"]:
        assert not torch.allclose(c[0], c[1])
    t = MultiCropTransform(SMALL)
    assert not all(torch.equal(x, y) for x, y in zip(t(images[0], 1), t(images[0], 2)))


def _plain(img: Image.Image, size: int, box: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    arr = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1)[None] - MEAN) / STD


def test_identity_config_is_plain_resize_and_normalize(images: list[Image.Image]) -> None:
    square = images[0].crop((0, 0, 300, 300))
    wide = images[3]  # 600x400: ratio (1, 1) forces torchvision's fallback, a central square crop
    w, h = wide.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    assert box == (100, 0, 500, 400)
    batch = _batch([square, wide], IDENTITY, [3, 9])
    for v, c in enumerate(batch["crops"]):
        size = 32 if v < 2 else 16
        torch.testing.assert_close(c[0], _plain(square, size)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(c[1], _plain(wide, size, box)[0], atol=1e-5, rtol=0)
        # resize(box=...) may use pixels just outside the box as filter support; away from the left
        # and right edges it equals crop-then-resize.
        inner = _plain(wide.crop(box), size)[0][..., 2:-2]
        torch.testing.assert_close(c[1][..., 2:-2], inner, atol=1e-5, rtol=0)
    # Normalization: un-normalized values are the uint8 pixels / 255.
    raw = _unnormalize(batch["crops"][0]) * 255.0
    torch.testing.assert_close(raw, raw.round(), atol=1e-3, rtol=0)
    assert raw.min() >= -1e-3 and raw.max() <= 255.001


def test_flip_p_one_mirrors(images: list[Image.Image]) -> None:
    flipped = _batch([images[1]], dataclasses.replace(IDENTITY, flip_p=1.0), [0])
    plain = _batch([images[1]], IDENTITY, [0])
    for x, y in zip(flipped["crops"], plain["crops"]):
        assert torch.equal(x, y.flip(-1))


def test_tiny_blur_is_identity(images: list[Image.Image]) -> None:
    blur = dataclasses.replace(IDENTITY, blur_p=(1.0, 1.0, 1.0), blur_sigma=(0.01, 0.01))
    for x, y in zip(_batch(images, blur, [1, 2])["crops"], _batch(images, IDENTITY, [1, 2])["crops"]):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_gaussian_blur_matches_convolution() -> None:
    x = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 1.0, 2.0])
    out = gaussian_blur(x, sigma, radius=6)
    for b in range(3):
        k = gaussian_kernels(sigma[b : b + 1], 6)[0]
        assert abs(float(k.sum()) - 1.0) < 1e-6 and (k[: 6 - math.ceil(3 * float(sigma[b]))] == 0).all()
        padded = F.pad(x[b : b + 1], (6, 6, 6, 6), mode="replicate")
        ref = F.conv2d(padded, k.view(1, 1, 1, 13).repeat(3, 1, 1, 1), groups=3)
        ref = F.conv2d(ref, k.view(1, 1, 13, 1).repeat(3, 1, 1, 1), groups=3)
        torch.testing.assert_close(out[b], ref[0], atol=1e-5, rtol=0)
    assert out[2].std() < x[2].std() / 3 and out[0].std() < x[0].std()


def test_solarize_only_second_global_view(images: list[Image.Image]) -> None:
    sol = dataclasses.replace(IDENTITY, solarize_p=1.0)
    seeds = list(range(6))
    a, b = _batch(images, sol, seeds)["crops"], _batch(images, IDENTITY, seeds)["crops"]
    for v, (x, y) in enumerate(zip(a, b)):
        if v == 1:
            y01 = _unnormalize(y)
            expected = torch.where(y01 >= 0.5, 1.0 - y01, y01)
            torch.testing.assert_close(_unnormalize(x), expected, atol=1e-5, rtol=0)
            assert _unnormalize(x).max() <= 0.5 + 1e-6 and not torch.allclose(x, y)
        else:
            assert torch.equal(x, y)


def test_solarize_rate_on_second_global_view(images: list[Image.Image]) -> None:
    sol = dataclasses.replace(IDENTITY, solarize_p=0.2, n_local=0)
    small = images[0].resize((64, 64))  # the same image every time, max value > 0.5
    batch = _batch([small], sol, list(range(400)))
    g1 = _unnormalize(batch["crops"][1])
    solarized = g1.amax((1, 2, 3)) <= 0.5 + 1e-6
    assert 0.14 < float(solarized.float().mean()) < 0.26
    assert torch.equal(batch["crops"][1][~solarized], batch["crops"][1][~solarized][0:1].expand_as(batch["crops"][1][~solarized]))
    assert torch.equal(batch["crops"][0], batch["crops"][0][0:1].expand_as(batch["crops"][0]))


def test_grayscale_gives_equal_channels(images: list[Image.Image]) -> None:
    gray = dataclasses.replace(SMALL, grayscale_p=1.0)
    for c in _batch(images, gray, [1, 2, 3])["crops"]:
        x = _unnormalize(c)
        torch.testing.assert_close(x[:, 0], x[:, 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(x[:, 1], x[:, 2], atol=1e-5, rtol=0)


def test_default_augmentation_statistics(images: list[Image.Image]) -> None:
    batch = _batch([im.resize((80, 60)) for im in images], SMALL, list(range(48)))
    for c in batch["crops"]:
        x = _unnormalize(c)
        assert x.min() >= -1e-5 and x.max() <= 1 + 1e-5
    g0 = _unnormalize(batch["crops"][0])
    assert 0 < float((g0[:, 0] == g0[:, 1]).all(-1).all(-1).float().mean()) < 0.6  # some grayscale, not all


def test_jitter_ops_match_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 12, 10, generator=g)
    f = torch.tensor([0.6, 0.9, 1.2, 1.4])
    h = torch.tensor([-0.1, -0.03, 0.05, 0.1])
    for b in range(4):
        torch.testing.assert_close(adjust_hue_(x[b : b + 1].clone(), h[b : b + 1])[0], TF.adjust_hue(x[b], float(h[b])),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(adjust_brightness_(x[b : b + 1].clone(), f[b : b + 1])[0],
                                   TF.adjust_brightness(x[b], float(f[b])), atol=1e-6, rtol=0)
        # torchvision's luma weights are 0.2989/0.587/0.114, ours PIL's 0.299/0.587/0.114
        torch.testing.assert_close(adjust_contrast_(x[b : b + 1].clone(), f[b : b + 1])[0],
                                   TF.adjust_contrast(x[b], float(f[b])), atol=1e-3, rtol=0)
        torch.testing.assert_close(adjust_saturation_(x[b : b + 1].clone(), f[b : b + 1])[0],
                                   TF.adjust_saturation(x[b], float(f[b])), atol=1e-3, rtol=0)


def test_crop_area_fraction_within_scale() -> None:
    width, height = 500, 375
    tv_image = torch.zeros(3, height, width)
    torch.manual_seed(0)
    for scale in [(0.4, 1.0), (0.05, 0.4)]:
        u = counter_uniforms(np.arange(3000), stream=1, view=0, n=41)
        fracs, ratios = [], []
        for row in u:
            top, left, h, w = random_resized_crop_box(width, height, scale, (3 / 4, 4 / 3), row)
            assert 0 <= top <= height - h and 0 <= left <= width - w
            fracs.append(w * h / (width * height))
            ratios.append(w / h)
        ours = np.array(fracs)
        tol = 0.01  # integer rounding of w and h
        assert ours.min() >= scale[0] - tol and ours.max() <= scale[1] + tol
        assert min(ratios) > 0.74 and max(ratios) < 1.35
        # Same distribution as torchvision's sampler (rejected tries bias it towards small crops).
        ref = []
        for _ in range(3000):
            _, _, h, w = torchvision.transforms.RandomResizedCrop.get_params(tv_image, list(scale), [3 / 4, 4 / 3])
            ref.append(w * h / (width * height))
        ref_a = np.array(ref)
        spread = scale[1] - scale[0]
        for q in (0.1, 0.5, 0.9):
            assert abs(np.quantile(ours, q) - np.quantile(ref_a, q)) < 0.03 * spread


def test_crop_fallback_is_central() -> None:
    # A 1000x10 image can never hold a crop of ratio in [3/4, 4/3] with 40% of its area.
    top, left, h, w = random_resized_crop_box(1000, 10, (0.4, 1.0), (3 / 4, 4 / 3), np.full(41, 0.5))
    assert (h, w) == (10, 13) and top == 0 and left == (1000 - 13) // 2


# ---------------------------------------------------------------------------------------------
# Evaluation transform
# ---------------------------------------------------------------------------------------------
def test_eval_transform_and_collate(images: list[Image.Image]) -> None:
    t = EvalTransform(size=24, resize_size=28, mean=SMALL.mean, std=SMALL.std)
    img = images[3]  # coffee.png, 600 x 400
    assert img.size == (600, 400)
    out = t(img, 0)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    resized = img.resize((42, 28), Image.Resampling.BICUBIC)
    ref = np.asarray(resized.crop((9, 2, 33, 26)), dtype=np.float32) / 255.0
    torch.testing.assert_close(out, ((torch.from_numpy(ref).permute(2, 0, 1)[None] - MEAN) / STD)[0], atol=1e-5, rtol=0)
    batch = collate_eval([{"image": t(im, 0), "label": 1, "index": i, "bad": 0, "seed": 0} for i, im in enumerate(images[:3])])
    assert batch["image"].shape == (3, 3, 24, 24) and batch["index"].tolist() == [0, 1, 2] and batch["bad"] == 0
    with pytest.raises(ValueError):
        EvalTransform(size=32, resize_size=28)


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------
def _epoch(sampler: EpochSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_deterministic_and_covers_all() -> None:
    s = EpochSampler(10, seed=3, drop_last=False, batch_size=2)
    e0, e0b, e1 = _epoch(s, 0), _epoch(EpochSampler(10, seed=3, drop_last=False, batch_size=2), 0), _epoch(s, 1)
    assert e0 == e0b and e0 != e1 and len(s) == 10
    assert sorted(i for i, _ in e0) == list(range(10)) and sorted(i for i, _ in e1) == list(range(10))
    g = torch.Generator().manual_seed(3 + 1)
    assert [i for i, _ in e1] == torch.randperm(10, generator=g).tolist()
    assert all(seed == sample_seed(3, 0, i) for i, seed in e0)
    assert dict(e0)[4] != dict(e1)[4]  # a new seed for the same image in a new epoch
    assert len({seed for _, seed in e0}) == 10


def test_sampler_shards_are_disjoint() -> None:
    r0 = EpochSampler(10, seed=1, rank=0, world_size=2, batch_size=2)
    r1 = EpochSampler(10, seed=1, rank=1, world_size=2, batch_size=2)
    a, b = _epoch(r0, 2), _epoch(r1, 2)
    assert len(a) == len(b) == 5 == len(r0)
    assert set(i for i, _ in a).isdisjoint(i for i, _ in b)
    assert sorted(i for i, _ in a + b) == list(range(10))
    # Odd n: trimmed with drop_last, padded (wrapped) without; every rank gets the same count.
    assert len(EpochSampler(11, 1, 1, 2, True, batch_size=1)) == 5
    assert [len(list(EpochSampler(11, 1, r, 2, False, batch_size=1))) for r in (0, 1)] == [6, 6]


def test_sampler_start_batch_skips_batches() -> None:
    s = EpochSampler(23, seed=0, batch_size=4)
    full = list(torch.utils.data.BatchSampler(s, 4, drop_last=True))
    assert len(full) == 5 == s.batches_per_epoch
    s.set_start_batch(2)
    assert len(s) == 23 - 8
    resumed = list(torch.utils.data.BatchSampler(s, 4, drop_last=True))
    assert resumed == full[2:] and len(torch.utils.data.BatchSampler(s, 4, drop_last=True)) == 3
    s.set_epoch(1)  # a new epoch starts from its first batch
    assert s.start_batch == 0 and len(s) == 23
    with pytest.raises(ValueError):
        s.set_start_batch(6)


# ---------------------------------------------------------------------------------------------
# DataLoader
# ---------------------------------------------------------------------------------------------
def test_loader_results_do_not_depend_on_workers(photo_folder: Path) -> None:
    files = scan_image_folder(photo_folder, labeled=True)
    batches = {}
    for workers in (0, 1):  # the recipe of ssl_distill.data.loader.build_train_loader
        sampler = EpochSampler(len(files), seed=5, batch_size=3)
        loader = torch.utils.data.DataLoader(
            ImageFolderDataset(files, MultiCropTransform(SMALL)),
            batch_sampler=torch.utils.data.BatchSampler(sampler, 3, drop_last=True),
            collate_fn=MultiCropCollate(SMALL), num_workers=workers)
        sampler.set_epoch(1)
        batches[workers] = list(loader)
        assert len(batches[workers]) == len(loader) == 2
    for a, b in zip(batches[0], batches[1]):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
        for x, y in zip(a["crops"], b["crops"]):
            assert torch.equal(x, y)
    # The same samples through the dataset by hand.
    ds = ImageFolderDataset(files, MultiCropTransform(SMALL))
    first = MultiCropCollate(SMALL)([ds[item] for item in list(sampler)[:3]])
    for x, y in zip(first["crops"], batches[0][0]["crops"]):
        assert torch.equal(x, y)
