"""Images/s of the multi-crop pipeline: DINO's per-image PIL transforms vs our batched pipeline.

Configurations:
  (a) ViT-S default crops (2 x 224 + 10 x 96) on scikit-image photos (400-740 px wide);
  (b) Fashion-MNIST demo-like crops (2 x 28 + 6 x 14) on real Fashion-MNIST images.

Pipelines:
  baseline  DINO's DataAugmentationDINO: a torchvision Compose of PIL transforms per view
            (RandomResizedCrop, flip, ColorJitter p=0.8, grayscale, PIL GaussianBlur, solarize,
            ToTensor, Normalize), then the views stacked;
  ours      MultiCropTransform (per-sample geometry) + MultiCropCollate (batched photometry);
  ours-geom the same with photometric=False (the floor when photometry runs on the GPU);
  ours+mask ours with iBOT's block masks of the global views in the batch (masking.shape=block,
            ratio 0.3; patch 16 for (a), 7 for (b)).

(c) is the demo itself (configs/dinov2_style_tiny_fmnist.yaml: 2 x 28 + 4 x 14, patch 7, batch 64, no
worker): ours with block masks off vs on, best of 3 alternating runs, and the masks alone.

``--gram`` measures instead the DINOv3 ViT-S/16 recipe's batch preparation (configs/dinov3_vits16_scratch.yaml:
2 x 224 + 8 x 96, block masks, and the two 448-px Gram-teacher crops per image) through the training loader,
serial (``data.num_workers: 0``, decoded images in memory), in an epoch before the Gram term's first step (no
Gram crops rendered: the first 83% of that recipe's run) and in one from it on; median ms per batch of
``--batch`` photos over 3 epochs of each, alternating.

Modes: "1 proc" = transform + collate in this process on decoded in-memory images, one torch
thread; "loader w=1" = DataLoader with 1 worker reading the files from disk (decoding included).

    python benchmarks/bench_data.py [--images-a 96] [--images-b 1024] [--batch 32] [--gram]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from ssl_distill.hardware import hardware_line

from ssl_distill.config import CropsConfig, MaskingConfig, load_config
from ssl_distill.data.collate import MultiCropCollate
from ssl_distill.data.fashion_mnist import DEFAULT_SOURCE, build_fashion_mnist_folders
from ssl_distill.data.folder import FileList, ImageFolderDataset, load_rgb, scan_image_folder
from ssl_distill.data.masking import BatchMasking, build_masking
from ssl_distill.data.rng import sample_seed
from ssl_distill.data.views import MultiCropTransform
from ssl_distill.demo import DEFAULT_CONFIG

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]


# ----------------------------------------------------------------------------------------------
# Baseline: DINO's per-image PIL pipeline (Caron et al. 2021, main_dino.py), written from the paper
# ----------------------------------------------------------------------------------------------
class _PILBlur:
    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class _PILSolarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


class BaselineDINO:
    """``(img, seed) -> list[Tensor]``: one torchvision Compose of PIL transforms per view."""

    def __init__(self, c: CropsConfig) -> None:
        flip_jitter_gray = [
            T.RandomHorizontalFlip(p=c.flip_p),
            T.RandomApply([T.ColorJitter(*c.jitter)], p=c.jitter_p),
            T.RandomGrayscale(p=c.grayscale_p),
        ]
        norm = [T.ToTensor(), T.Normalize(c.mean, c.std)]
        bicubic = T.InterpolationMode.BICUBIC

        def view(size: int, scale: tuple[float, float], blur_p: float, sol_p: float) -> T.Compose:
            extra = [_PILSolarize(sol_p)] if sol_p > 0 else []
            return T.Compose([T.RandomResizedCrop(size, scale=scale, ratio=c.ratio, interpolation=bicubic),
                              *flip_jitter_gray, _PILBlur(blur_p, c.blur_sigma), *extra, *norm])

        self.views = [view(c.global_size, c.global_scale, c.blur_p[0], 0.0),
                      view(c.global_size, c.global_scale, c.blur_p[1], c.solarize_p)]
        self.views = self.views[: c.n_global]
        self.views += [view(c.local_size, c.local_scale, c.blur_p[2], 0.0)] * c.n_local

    def __call__(self, img: Image.Image, seed: int) -> list[torch.Tensor]:
        return [v(img) for v in self.views]


def baseline_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    n_views = len(samples[0]["image"])
    return {"crops": [torch.stack([s["image"][v] for s in samples]) for v in range(n_views)],
            "label": torch.tensor([s["label"] for s in samples]), "bad": sum(s["bad"] for s in samples)}


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def rate_in_process(images: list[Image.Image], transform: Callable, collate: Callable, n: int, batch: int) -> float:
    """Images/s of transform + collate on in-memory images (after one warm-up batch)."""
    def run(count: int, offset: int) -> None:
        for start in range(0, count, batch):
            samples = [{"image": transform(images[(offset + i) % len(images)], offset + i), "label": 0, "index": i,
                        "bad": 0, "seed": offset + i} for i in range(start, min(start + batch, count))]
            collate(samples)

    run(batch, 10**6)
    t0 = time.perf_counter()
    run(n, 0)
    return n / (time.perf_counter() - t0)


def rate_loader(files: FileList, transform: Callable, collate: Callable, n: int, batch: int) -> float:
    """Images/s through a DataLoader with one worker (files decoded in the worker)."""
    ds = ImageFolderDataset(files, transform)
    items = [(i % len(files), i) for i in range(n + 2 * batch)]
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=items, collate_fn=collate, num_workers=1,
                                         prefetch_factor=4, drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up and first batch are not counted
    next(it)
    t0 = time.perf_counter()
    count = sum(len(b["label"]) for b in it)
    return count / (time.perf_counter() - t0)


def bench(name: str, crops: CropsConfig, images: list[Image.Image], files: FileList, n: int, batch: int,
          rows: list[tuple[str, str, str, float]], patch: int) -> float:
    """Appends (crops, pipeline, mode, images/s) rows; returns the block masks' own cost in us/img."""
    masks = build_masking(MaskingConfig(shape="block"), crops.global_size, patch, crops.n_global)
    pipelines = {
        "baseline": (BaselineDINO(crops), baseline_collate),
        "ours": (MultiCropTransform(crops), MultiCropCollate(crops)),
        "ours-geom": (MultiCropTransform(crops), MultiCropCollate(crops, photometric=False)),
        "ours+mask": (MultiCropTransform(crops), MultiCropCollate(crops, masking=masks)),
    }
    for pname, (transform, collate) in pipelines.items():
        rows.append((name, pname, "1 proc", rate_in_process(images, transform, collate, n, batch)))
        print(f"  {name:8s} {pname:10s} 1 proc      {rows[-1][3]:8.1f} img/s", flush=True)
    for pname in ("baseline", "ours", "ours+mask"):
        transform, collate = pipelines[pname]
        rows.append((name, pname, "loader w=1", rate_loader(files, transform, collate, n, batch)))
        print(f"  {name:8s} {pname:10s} loader w=1  {rows[-1][3]:8.1f} img/s", flush=True)
    return mask_us_per_image(masks, max(n, 512), batch)


def mask_us_per_image(masks: BatchMasking, n: int, batch: int) -> float:
    """Microseconds per image to draw the masks of all global views, in batches (best of 3)."""
    seeds = [sample_seed(0, 0, i) for i in range(n)]
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            masks(seeds[start : start + batch])
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def bench_demo_masks(images: list[Image.Image], n: int) -> str:
    """The demo's pipeline with iBOT block masks off / on (best of 3, alternating), and the masks alone."""
    cfg = load_config(DEFAULT_CONFIG)
    crops, batch, masking = cfg.data.crops, cfg.data.batch_size, dataclasses.replace(cfg.masking, shape="block")
    masks = build_masking(masking, crops.global_size, cfg.model.patch_size, crops.n_global)
    transform = MultiCropTransform(crops)
    collates = {"off": MultiCropCollate(crops), "on": MultiCropCollate(crops, masking=masks)}
    best = {k: 0.0 for k in collates}
    for _ in range(3):
        for k, collate in collates.items():
            best[k] = max(best[k], rate_in_process(images, transform, collate, n, batch))
    alone_us = mask_us_per_image(masks, n, batch)
    grid = crops.global_size // cfg.model.patch_size
    views = f"{crops.n_global}x{crops.global_size} + {crops.n_local}x{crops.local_size}"
    return (f"(c) demo ({DEFAULT_CONFIG.name}: {views}, "
            f"patch {cfg.model.patch_size}, batch {batch}, 1 proc): masks off {best['off']:.1f} img/s, block masks on "
            f"{best['on']:.1f} img/s ({100 * (best['on'] / best['off'] - 1):+.1f}%); the masks alone "
            f"{alone_us:.1f} us/img ({crops.n_global} views of {grid}x{grid} patches, ratio {masking.pred_ratio[0]})")


def copy_photos(dst: Path, copies: int) -> Path:
    """A folder ``dst`` of ``copies`` copies of the :data:`PHOTOS` scikit-image ships (no download)."""
    skimage_data = Path(__import__("skimage").__file__).parent / "data"
    dst.mkdir()
    for k in range(copies):
        for name in PHOTOS:
            shutil.copy(skimage_data / name, dst / (name if k == 0 else f"{k}_{name}"))
    return dst


def bench_gram_crops(batch: int, rounds: int = 3) -> None:
    """``--gram``: one batch's serial preparation by the DINOv3 ViT-S/16 recipe's loader before and from the epoch
    of the Gram term's first step (module docstring)."""
    from ssl_distill.data.loader import build_train_loader

    recipe = Path(__file__).resolve().parents[1] / "configs" / "dinov3_vits16_scratch.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        photos = copy_photos(Path(tmp) / "photos", -(-batch // len(PHOTOS)))  # at least one batch
        cfg = load_config(recipe, [f"data.train_dir={photos}", f"run.output_dir={Path(tmp) / 'run'}",
                                   f"data.batch_size={batch}", "data.num_workers=0"])
        batches_per_epoch = len(list(photos.iterdir())) // batch
        # the Gram term from epoch ``rounds`` on: epochs 0 .. rounds-1 without its crops, rounds .. 2 rounds-1 with
        loader, sampler = build_train_loader(cfg, None, gram_from_step=rounds * batches_per_epoch)
        crops = cfg.data.crops
        print(f"(d) DINOv3 ViT-S/16 recipe ({recipe.name}: {crops.n_global}x{crops.global_size} + "
              f"{crops.n_local}x{crops.local_size}, block masks, Gram crops {crops.n_global}x{crops.gram_size}), "
              f"batch {batch} (the {len(PHOTOS)} scikit-image photos, copied), loader serial (data.num_workers=0)")
        times: dict[bool, list[float]] = {False: [], True: []}
        sampler.set_epoch(0)
        next(iter(loader))  # the photos decoded once (data.cache_mb keeps them): both rows read from memory
        for r in range(rounds):
            for gram in (False, True):  # alternating
                sampler.set_epoch(r + rounds * gram)
                t0 = time.perf_counter()
                out = next(iter(loader))
                times[gram].append(time.perf_counter() - t0)
                assert ("gram_crops" in out) == gram, "the loader's Gram crops are not where the epoch says"
        without, with_gram = (statistics.median(times[g]) * 1e3 for g in (False, True))
        print(f"  without the Gram crops (before gram.start_step's epoch) {without:6.0f} ms a batch")
        print(f"  with the Gram crops (from it on)                       {with_gram:6.0f} ms a batch "
              f"({with_gram / without:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-a", type=int, default=96, help="images per measurement, ViT-S crops")
    parser.add_argument("--images-b", type=int, default=1024, help="images per measurement, Fashion-MNIST crops")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gram", action="store_true",
                        help="only the DINOv3 recipe's preparation with and without its Gram-teacher crops (--batch 8)")
    args = parser.parse_args()
    print(hardware_line())  # the machine's ceiling; the pipelines below run on one thread, as a data worker does
    torch.set_num_threads(1)
    if args.gram:
        bench_gram_crops(args.batch)
        return
    random.seed(0)
    torch.manual_seed(0)
    rows: list[tuple[str, str, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        photo_dir = copy_photos(Path(tmp) / "photos", 1)
        photos = scan_image_folder(photo_dir, labeled=False)
        images = [load_rgb(photos.abspath(i)) for i in range(len(photos))]
        print(f"(a) ViT-S crops 2x224 + 10x96 on {len(images)} scikit-image photos "
              f"({', '.join(f'{w}x{h}' for w, h in (im.size for im in images))}), batch {args.batch}")
        mask_us = {}
        mask_us["vits"] = bench("vits", CropsConfig(), images, photos, args.images_a, args.batch, rows, patch=16)

        fm_root = build_fashion_mnist_folders(Path(tmp) / "fmnist", DEFAULT_SOURCE, limit_per_class=100)
        fm_files = scan_image_folder(fm_root / "train", labeled=True)
        fm_images = [load_rgb(fm_files.abspath(i)) for i in range(len(fm_files))]
        fm_crops = CropsConfig(global_size=28, local_size=14, n_local=6)
        print(f"(b) Fashion-MNIST crops 2x28 + 6x14 on {len(fm_images)} training images, batch {args.batch * 4}")
        mask_us["fmnist"] = bench("fmnist", fm_crops, fm_images, fm_files, args.images_b, args.batch * 4, rows, patch=7)
        demo_line = bench_demo_masks(fm_images, args.images_b)
        print(demo_line, flush=True)

    rate = {(c, p, m): r for c, p, m, r in rows}
    for c in ("vits", "fmnist"):
        floor = 1e3 / rate[(c, "ours-geom", "1 proc")]
        base_ms = 1e3 / rate[(c, "baseline", "1 proc")] - floor
        ours_ms = 1e3 / rate[(c, "ours", "1 proc")] - floor
        print(f"{c}: geometry (crop+resize+flip, ours-geom) {floor:.2f} ms/img, taken as equal in both; photometric ops "
              f"baseline {base_ms:.2f} vs ours {ours_ms:.2f} ms/img ({base_ms / ours_ms:.1f}x)")
        share = mask_us[c] * rate[(c, "ours", "1 proc")] / 1e4
        print(f"{c}: iBOT block masks alone {mask_us[c]:.1f} us/img, {share:.1f}% of ours (1 proc)")
    print(demo_line)
    print("\n| crops  | pipeline  | mode       | images/s | vs baseline |")
    print("|--------|-----------|------------|---------:|------------:|")
    base = {(c, m): r for c, p, m, r in rows if p == "baseline"}
    for c, p, m, r in rows:
        print(f"| {c:6s} | {p:9s} | {m:10s} | {r:8.1f} | {r / base[(c, m)]:10.1f}x |")


if __name__ == "__main__":
    main()
