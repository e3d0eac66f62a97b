"""Attention maps of a ViT, as figures a person wants to look at.

For each image: the last block's CLS -> patch attention of every head (each map sums to one over
the patches), optionally thresholded to the smallest set of patches that holds ``threshold`` of the
attention mass (0.6 in DINO's figures), upsampled to the image; a 3-component PCA of the patch
features shown as RGB; optionally attention rollout across all blocks (Abnar & Zuidema 2020).

Outputs per image, in ``<out>/<image stem>/``:

- ``grid.png``: the image, all heads' masks overlaid in colour, the PCA, the rollout (if asked),
  then for each head its attention map and the image with that head's mask;
- ``head_<i>.png``: one head, its heat map blended over the image beside the image with the mask;
- ``pca.png`` and ``rollout.png``;
- ``maps.npz``: the raw maps (attention (heads, h, w), masks, pca, rollout).

Images are used at their own size (or shrunk with ``--max-side``) and cropped at the bottom and
right to a multiple of the patch size, as DINO's ``visualize_attention.py`` does. The weights are
computed by :mod:`ssl_distill.models.inspect` only when asked; the model itself is not changed.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from ssl_distill.cli_args import visualize_arguments as add_arguments  # options: torch-free
from ssl_distill.cli_args import parse_tool_arguments
from ssl_distill.errors import run_command
from ssl_distill.models.inspect import inspect_forward

from .drawing import blend, colorize, head_colors, overlay_mask, threshold_mass, upsample

__all__ = [
    "AttentionMaps",
    "add_arguments",
    "compute_maps",
    "pca_rgb",
    "render",
    "visualize_images",
]


# ----------------------------------------------------------------------------------- maps
def pca_rgb(features: Tensor | np.ndarray) -> np.ndarray:
    """(h, w, D) patch features -> (h, w, 3) in [0, 1]: the first three principal components.

    Each component is scaled to [0, 1] by its 1st and 99th percentiles (clipped outside); its sign is
    chosen so that its largest-magnitude value is positive (a deterministic colouring).
    """
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    h, w, d = f.shape
    x = f.reshape(h * w, d)
    x = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(3, vh.shape[0])
    proj = x @ vh[:k].T  # (N, k)
    peak = proj.abs().argmax(dim=0)
    proj = proj * torch.sign(proj[peak, torch.arange(k)])
    # scale each component by its 1st-99th percentiles (a few outlier patches would wash out the rest)
    lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
    proj = ((proj - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))).clamp(0, 1)
    if k < 3:
        proj = torch.cat([proj, torch.zeros(h * w, 3 - k, dtype=proj.dtype)], dim=1)
    return proj.reshape(h, w, 3).float().numpy()


@dataclass
class AttentionMaps:
    """Everything one figure shows. Token maps are (h, w) over the patch grid of ``image``."""

    image: np.ndarray  # (H, W, 3) uint8, H and W multiples of patch_size
    patch_size: int
    attention: np.ndarray  # (heads, h, w) float32, each head sums to one
    masks: np.ndarray | None  # (heads, h, w) bool, or None without threshold
    threshold: float | None
    pca: np.ndarray | None  # (h, w, 3) in [0, 1]
    rollout: np.ndarray | None  # (h, w) float32, sums to one

    @property
    def num_heads(self) -> int:
        return self.attention.shape[0]

    def upsample(self, m: np.ndarray) -> np.ndarray:
        """A token map (h, w[, c]) -> pixel map (H, W[, c]) by nearest upsampling (one block per patch)."""
        return upsample(m, self.patch_size)


def _crop_to_patches(img: Image.Image, patch_size: int, max_side: int | None) -> Image.Image:
    img = img.convert("RGB")
    if max_side is not None and max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BICUBIC)
    w, h = img.width // patch_size * patch_size, img.height // patch_size * patch_size
    if w == 0 or h == 0:
        raise ValueError(f"image {img.width}x{img.height} is smaller than one {patch_size}px patch")
    return img.crop((0, 0, w, h))


@torch.no_grad()
def compute_maps(backbone: nn.Module, img: Image.Image, mean: Sequence[float], std: Sequence[float],
                 threshold: float | None = 0.6, pca: bool = True, rollout: bool = False,
                 head_fusion: str = "mean", discard_ratio: float = 0.0, max_side: int | None = None,
                 device: torch.device | str = "cpu") -> AttentionMaps:
    """The maps of one image (see the module docstring)."""
    p = int(backbone.patch_size)
    img = _crop_to_patches(img, p, max_side)
    arr = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1) / 255.0
    x = ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None].to(device)
    seen = inspect_forward(backbone, x, rollout, head_fusion, discard_ratio)  # one forward pass for everything
    attn = seen.last.cls_attention()[0].float().cpu().numpy()
    masks = threshold_mass(attn, threshold) if threshold else None
    feats = None
    if pca:
        tokens = seen.tokens["patch"][0].float().cpu()
        feats = pca_rgb(tokens.reshape(arr.shape[0] // p, arr.shape[1] // p, -1))
    roll = seen.rollout[0].float().cpu().numpy() if seen.rollout is not None else None
    return AttentionMaps(image=arr, patch_size=p, attention=attn, masks=masks, threshold=threshold if threshold else None,
                         pca=feats, rollout=roll)


def render(maps: AttentionMaps, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``grid.png``, ``head_<i>.png``, ``pca.png``, ``rollout.png`` and ``maps.npz`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    img = maps.image
    n = maps.num_heads
    colors = head_colors(n)
    heats = [colorize(maps.upsample(a)) for a in maps.attention]
    up_masks = [maps.upsample(m) for m in maps.masks] if maps.masks is not None else None

    # one PNG per head: heat map over the image | image with the head's mask
    for i in range(n):
        left = blend(img, heats[i])
        right = overlay_mask(img, up_masks[i], colors[i]) if up_masks is not None else heats[i]
        gap = np.full((img.shape[0], 4, 3), 255, dtype=np.uint8)
        path = out / f"head_{i}.png"
        Image.fromarray(np.concatenate([left, gap, right], axis=1)).save(path)
        written.append(path)
    pca_img = (maps.upsample(maps.pca) * 255).round().astype(np.uint8) if maps.pca is not None else None
    if pca_img is not None:
        Image.fromarray(pca_img).save(out / "pca.png")
        written.append(out / "pca.png")
    roll_img = colorize(maps.upsample(maps.rollout)) if maps.rollout is not None else None
    if roll_img is not None:
        Image.fromarray(blend(img, roll_img)).save(out / "rollout.png")
        written.append(out / "rollout.png")

    # the grid: a summary row, then per row of heads their maps and their masks
    combined = img.copy()
    if up_masks is not None:
        for i in range(n):
            combined = overlay_mask(combined, up_masks[i], colors[i], alpha=0.35)
    summary: list[tuple[np.ndarray, str]] = [(img, "image")]
    if up_masks is not None:
        summary.append((combined, f"all heads, {100 * maps.threshold:.0f}% mass"))
    summary.append((blend(img, colorize(maps.upsample(maps.attention.mean(0)))), "mean over heads"))
    if pca_img is not None:
        summary.append((pca_img, "PCA of patch features"))
    if roll_img is not None:
        summary.append((blend(img, roll_img), "attention rollout"))
    ncols = max(len(summary), min(n, 6))
    head_rows = -(-n // ncols)
    rows_per_head = 2 if up_masks is not None else 1
    nrows = 1 + head_rows * rows_per_head
    aspect = img.shape[0] / img.shape[1]
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * aspect * nrows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, (picture, label) in enumerate(summary):
        axes[0, j].imshow(picture)
        axes[0, j].set_title(label, fontsize=9)
    for i in range(n):
        r, c = 1 + (i // ncols) * rows_per_head, i % ncols
        axes[r, c].imshow(heats[i])
        axes[r, c].set_title(f"head {i}", fontsize=9, color=tuple(colors[i] / 255))
        if up_masks is not None:
            axes[r + 1, c].imshow(overlay_mask(img, up_masks[i], colors[i]))
            kept = float(maps.masks[i].mean())
            axes[r + 1, c].set_title(f"head {i}: {100 * kept:.0f}% of patches", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "grid.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.insert(0, path)

    arrays = {"attention": maps.attention}
    if maps.masks is not None:
        arrays["masks"] = maps.masks
    if maps.pca is not None:
        arrays["pca"] = maps.pca
    if maps.rollout is not None:
        arrays["rollout"] = maps.rollout
    np.savez_compressed(out / "maps.npz", **arrays)
    written.append(out / "maps.npz")
    return written


# ----------------------------------------------------------------------------------- batch mode
def _image_list(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(absolute path, output sub-folder name) for image files and every image below folders."""
    from ssl_distill.data.folder import DataError, scan_image_folder

    found: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = scan_image_folder(p, labeled=False)
            found.extend((files.root / rel, str(Path(rel).with_suffix(""))) for rel in files.paths)
        elif p.is_file():
            found.append((p, p.stem))
        else:
            raise DataError(f"{p} is neither an image file nor a folder")
    return found


def visualize_images(backbone: nn.Module, inputs: Sequence[str | Path], out_dir: str | Path,
                     mean: Sequence[float], std: Sequence[float], threshold: float | None = 0.6,
                     pca: bool = True, rollout: bool = False, head_fusion: str = "mean",
                     discard_ratio: float = 0.0, max_side: int | None = None, device: torch.device | str = "cpu",
                     title: str = "", progress: bool | None = None) -> list[Path]:
    """Figures for image files and folders (batch mode, with a progress bar); returns the grid PNGs."""
    from ssl_distill.data.folder import _DECODE_ERRORS, load_rgb

    items = _image_list(inputs)
    grids: list[Path] = []
    bar = tqdm(items, desc="visualize", unit="img", disable=(not sys.stderr.isatty()) if progress is None else not progress)
    for path, name in bar:
        try:
            img = load_rgb(path)
        except _DECODE_ERRORS as e:
            print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr)
            continue
        maps = compute_maps(backbone, img, mean, std, threshold, pca, rollout, head_fusion, discard_ratio, max_side, device)
        grids.append(render(maps, Path(out_dir) / name, title=f"{title}  {path.name}".strip())[0])
    return grids


# ----------------------------------------------------------------------------------- command line
def run(args: argparse.Namespace) -> int:
    from ssl_distill.runtime import resolve_device

    from .model import load_model
    from .results import default_output

    device = resolve_device(args.device, key="--device")
    model = load_model(args.checkpoint, args.which, random_init=args.random_init, device=device)
    backbone = model.backbone
    mean, std = model.normalization
    out = Path(args.out) if args.out else default_output(args.checkpoint, "attention", args.random_init, suffix="")
    label = f"{Path(args.checkpoint).name} ({'random init' if args.random_init else args.which})"
    grids = visualize_images(backbone, args.images, out, mean, std, args.threshold or None, not args.no_pca,
                             args.rollout, args.head_fusion, args.discard_ratio, args.max_side, device, label)
    for g in grids:
        print(g)
    print(f"{len(grids)} figure(s) in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ssl_distill.eval.visualize``: the same as ``ssl-distill visualize`` (one error handler)."""
    return run_command(run, parse_tool_arguments("visualize", add_arguments, argv))


if __name__ == "__main__":
    raise SystemExit(main())
