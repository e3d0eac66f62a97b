"""Attention maps of a ViT, as figures a person wants to look at.

For each image: the last block's CLS -> patch attention of every head (each map sums to one over
the patches), optionally thresholded to the smallest set of patches that holds ``threshold`` of the
attention mass (0.6 in DINO's figures), upsampled to the image; a 3-component PCA of the patch
features shown as RGB; the norms of the last block's patch outputs before the final LayerNorm, with the
high-norm outliers of Darcet et al. 2024 ("Vision Transformers Need Registers") outlined (norm above
:data:`OUTLIER_FACTOR` x the image's median patch norm: the paper's outliers sit far above the bulk, e.g. a
cut at norm 150 for DINOv2 ViT-g); optionally attention rollout across all blocks (Abnar & Zuidema 2020).

Register (storage-token) models (DINOv2 ``_reg4``, DINOv3), which the official repos draw nothing for:
a panel per register showing which patches its query reads, and one showing how much each patch's query
reads it; the caption says how the last block's attention splits between [CLS], registers and patches
(the [CLS] query's, and the patch queries' on average), and each head's title the share of its [CLS]
attention that the registers take before the map is renormalised over the patches. Registers and [OBJ]
never enter a patch map: every map is exactly the h x w patch grid.

Outputs per image, in ``<out>/<image stem>/``:

- ``grid.png``: the image, all heads' masks overlaid in colour, the mean map, the PCA, the patch norms,
  the rollout (if asked), then for each head its attention map and the image with that head's mask,
  then the registers' panels;
- ``head_<i>.png``: one head, its heat map blended over the image beside the image with the mask;
- ``pca.png``, ``norms.png`` and ``rollout.png``;
- ``maps.npz``: the raw maps (attention (heads, h, w), masks, pca, rollout, patch_norms, outliers,
  cls_mass (heads, 3) and patch_mass (3,) on [CLS / OBJ, registers, patches], and for register models
  reg_reads / reg_read_by (registers, h, w)).

PCA: fitted on the patches that are not outliers (a few huge tokens would otherwise take the first
components), all patches projected; the outliers are outlined in the PCA panel too.

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

from ssl_distill.cli_args import visualize_arguments as add_arguments  # options: torch-free
from ssl_distill.cli_args import tool_main
from ssl_distill.errors import DataError
from ssl_distill.models.inspect import inspect_forward

from .drawing import blend, colorize, head_colors, overlay_mask, threshold_mass, upsample
from .images import readable_images, shrink

__all__ = [
    "OUTLIER_FACTOR",
    "AttentionMaps",
    "ImageTooSmallError",
    "add_arguments",
    "compute_maps",
    "pca_rgb",
    "render",
    "visualize_images",
]


OUTLIER_FACTOR = 2.0  # a patch is a high-norm outlier above this multiple of the image's median patch norm
# the share of attention on [CLS, OBJ] / registers / patches, as cls_mass and patch_mass order it
_MASS_PARTS = ("itself", "registers", "patches")


# ----------------------------------------------------------------------------------- maps
def pca_rgb(features: Tensor | np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """(h, w, D) patch features -> (h, w, 3) in [0, 1]: the first three principal components.

    ``exclude`` (h, w) bool: patches left out of the fit (centring, components, colour scaling) but
    projected like the rest (high-norm outliers); ignored when fewer than 2 patches would remain.
    Each component is scaled to [0, 1] by its 1st and 99th percentiles (clipped outside); its sign is
    chosen so that its largest-magnitude value is positive (a deterministic colouring).
    """
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    h, w, d = f.shape
    x = f.reshape(h * w, d)
    fit = torch.ones(h * w, dtype=torch.bool)
    if exclude is not None and int((~torch.as_tensor(exclude)).sum()) >= 2:
        fit = ~torch.as_tensor(exclude, dtype=torch.bool).reshape(h * w)
    x = x - x[fit].mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x[fit], full_matrices=False)
    k = min(3, vh.shape[0])
    proj = x @ vh[:k].T  # (N, k)
    peak = proj[fit].abs().argmax(dim=0)
    proj = proj * torch.sign(proj[fit][peak, torch.arange(k)])
    # scale each component by its 1st-99th percentiles (a few outlier patches would wash out the rest)
    lo, hi = torch.quantile(proj[fit], 0.01, dim=0), torch.quantile(proj[fit], 0.99, dim=0)
    proj = ((proj - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))).clamp(0, 1)
    if k < 3:
        proj = torch.cat([proj, torch.zeros(h * w, 3 - k, dtype=proj.dtype)], dim=1)
    return proj.reshape(h, w, 3).float().numpy()


def high_norm_patches(norms: np.ndarray, factor: float = OUTLIER_FACTOR) -> np.ndarray:
    """(h, w) patch norms -> (h, w) bool: the patches above ``factor`` x the median norm."""
    norms = np.asarray(norms, dtype=np.float64)
    return norms > factor * float(np.median(norms))


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
    patch_norms: np.ndarray  # (h, w) float32: the last block's patch outputs' norms before the final norm
    outliers: np.ndarray  # (h, w) bool: high_norm_patches(patch_norms)
    cls_mass: np.ndarray  # (heads, 3): the [CLS] query's attention on [CLS / OBJ], registers, patches
    patch_mass: np.ndarray  # (3,): the patch queries' (mean over patches and heads), same parts
    reg_reads: np.ndarray  # (registers, h, w): each register query's attention over the patches (mean of heads)
    reg_read_by: np.ndarray  # (registers, h, w): each patch query's attention on each register (mean of heads)

    @property
    def num_heads(self) -> int:
        return self.attention.shape[0]

    @property
    def num_registers(self) -> int:
        return self.reg_reads.shape[0]

    def caption(self) -> str:
        """Where the last block's attention goes (mean over heads) and how many patches are high-norm outliers."""
        cls, patch = self.cls_mass.mean(axis=0), self.patch_mass
        share = ", ".join(f"{100 * v:.0f}% to {name}" for v, name in zip(cls, _MASS_PARTS)
                          if name != "registers" or self.num_registers)
        text = f"last block, mean over heads: [CLS] attends {share}"
        if self.num_registers:
            text += f"; patches give {100 * patch[1]:.0f}% of their attention to the {self.num_registers} registers"
        n = int(self.outliers.sum())
        return text + f"\n{n} high-norm patch{'' if n == 1 else 'es'} (norm > {OUTLIER_FACTOR:g} x median)"

    def upsample(self, m: np.ndarray) -> np.ndarray:
        """A token map (h, w[, c]) -> pixel map (H, W[, c]) by nearest upsampling (one block per patch)."""
        return upsample(m, self.patch_size)


class ImageTooSmallError(ValueError):
    """An image (after ``--max-side``) narrower or lower than one patch: no token to draw."""


def _crop_to_patches(img: Image.Image, patch_size: int, max_side: int | None) -> Image.Image:
    img = shrink(img, max_side)
    w, h = img.width // patch_size * patch_size, img.height // patch_size * patch_size
    if w == 0 or h == 0:
        raise ImageTooSmallError(f"image {img.width}x{img.height} is smaller than one {patch_size}px patch")
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
    norms = seen.patch_norms[0].float().cpu().numpy()
    outliers = high_norm_patches(norms)
    feats = None
    if pca:
        tokens = seen.tokens["patch"][0].float().cpu()
        feats = pca_rgb(tokens.reshape(arr.shape[0] // p, arr.shape[1] // p, -1), exclude=outliers)
    roll = seen.rollout[0].float().cpu().numpy() if seen.rollout is not None else None
    storage = seen.last.storage_attention()
    return AttentionMaps(image=arr, patch_size=p, attention=attn, masks=masks, threshold=threshold if threshold else None,
                         pca=feats, rollout=roll, patch_norms=norms, outliers=outliers,
                         cls_mass=storage.cls_mass[0].cpu().numpy(), patch_mass=storage.patch_mass[0].cpu().numpy(),
                         reg_reads=storage.reads[0].cpu().numpy(), reg_read_by=storage.read_by[0].cpu().numpy())


def render(maps: AttentionMaps, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write ``grid.png``, ``head_<i>.png``, ``pca.png``, ``rollout.png`` and ``maps.npz`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pictures = _Pictures.of(maps)
    written = _write_pictures(maps.image, pictures, out)
    written.insert(0, _write_grid(maps, pictures, out / "grid.png", title))
    written.append(_write_arrays(maps, out / "maps.npz"))
    return written


@dataclass
class _Pictures:
    """One image's maps as (H, W, 3) uint8 pictures: each head's heat map and, with a threshold, its (H, W)
    mask and colour; the PCA (outliers outlined), the patch norms (outliers outlined), the rollout (when
    computed), and each register's two maps blended over the image."""

    heats: list[np.ndarray]
    masks: list[np.ndarray] | None
    colors: np.ndarray
    pca: np.ndarray | None
    norms: np.ndarray
    rollout: np.ndarray | None
    reads: list[np.ndarray]
    read_by: list[np.ndarray]

    @classmethod
    def of(cls, maps: AttentionMaps) -> _Pictures:
        outliers = maps.upsample(maps.outliers)
        line = max(1, maps.patch_size // 6)
        pca = None
        if maps.pca is not None:
            pca = overlay_mask((maps.upsample(maps.pca) * 255).round().astype(np.uint8), outliers, _WHITE, 0.0, line)
        # the colour scale spans the ordinary patches; the outliers are drawn red over it
        ordinary = maps.patch_norms[~maps.outliers] if (~maps.outliers).any() else maps.patch_norms
        norms = colorize(maps.upsample(maps.patch_norms), "viridis", float(ordinary.min()), float(ordinary.max()))
        return cls(heats=[colorize(maps.upsample(a)) for a in maps.attention],
                   masks=[maps.upsample(m) for m in maps.masks] if maps.masks is not None else None,
                   colors=head_colors(maps.num_heads), pca=pca,
                   norms=overlay_mask(norms, outliers, _RED, 0.7, line),
                   rollout=colorize(maps.upsample(maps.rollout)) if maps.rollout is not None else None,
                   reads=[blend(maps.image, colorize(maps.upsample(m))) for m in maps.reg_reads],
                   read_by=[blend(maps.image, colorize(maps.upsample(m))) for m in maps.reg_read_by])


_WHITE, _RED = (255, 255, 255), (230, 30, 30)


def _write_pictures(img: np.ndarray, pictures: _Pictures, out: Path) -> list[Path]:
    """``head_<i>.png`` (heat map over the image | image with the head's mask), ``pca.png``, ``norms.png``,
    ``rollout.png``."""
    written: list[Path] = []
    for i, heat in enumerate(pictures.heats):
        right = overlay_mask(img, pictures.masks[i], pictures.colors[i]) if pictures.masks is not None else heat
        gap = np.full((img.shape[0], 4, 3), 255, dtype=np.uint8)
        path = out / f"head_{i}.png"
        Image.fromarray(np.concatenate([blend(img, heat), gap, right], axis=1)).save(path)
        written.append(path)
    for name, picture in (("pca", pictures.pca), ("norms", pictures.norms), ("rollout", pictures.rollout)):
        if picture is not None:
            Image.fromarray(picture if name != "rollout" else blend(img, picture)).save(out / f"{name}.png")
            written.append(out / f"{name}.png")
    return written


def _summary_row(maps: AttentionMaps, pictures: _Pictures) -> list[tuple[np.ndarray, str]]:
    """The grid's first row: the image, all heads' masks, the mean map, the PCA, the patch norms and the rollout
    (those there are)."""
    img = maps.image
    summary: list[tuple[np.ndarray, str]] = [(img, "image")]
    if pictures.masks is not None:
        combined = img.copy()
        for mask, color in zip(pictures.masks, pictures.colors):
            combined = overlay_mask(combined, mask, color, alpha=0.35)
        summary.append((combined, f"all heads, {100 * maps.threshold:.0f}% mass"))
    summary.append((blend(img, colorize(maps.upsample(maps.attention.mean(0)))), "mean over heads"))
    if pictures.pca is not None:
        summary.append((pictures.pca, "PCA of patch features"))
    n_out = int(maps.outliers.sum())
    summary.append((pictures.norms, f"patch norms {maps.patch_norms.min():.3g}-{maps.patch_norms.max():.3g}"
                    + (f", {n_out} outlier{'s' * (n_out > 1)} red" if n_out else "")))
    if pictures.rollout is not None:
        summary.append((blend(img, pictures.rollout), "attention rollout"))
    return summary


def _storage_panels(maps: AttentionMaps, pictures: _Pictures) -> list[list[tuple[np.ndarray, str]]]:
    """Two rows of panels for a register model: where each register's query attends among the patches
    (its share on patches in the title), and how much each patch's query attends to it (the mean share)."""
    if not maps.num_registers:
        return []
    reads = [(pic, f"reg {r} \u2192 patches ({100 * m.sum():.0f}%)")
             for r, (pic, m) in enumerate(zip(pictures.reads, maps.reg_reads))]
    read_by = [(pic, f"patches \u2192 reg {r} (mean {100 * m.mean():.1f}%)")
               for r, (pic, m) in enumerate(zip(pictures.read_by, maps.reg_read_by))]
    return [reads, read_by]


def _write_grid(maps: AttentionMaps, pictures: _Pictures, path: Path, title: str) -> Path:
    """``grid.png``: the summary row, then per row of heads their maps (and their masks), then the registers'
    panels; the caption says where the attention goes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    img, n, colors = maps.image, maps.num_heads, pictures.colors
    summary = _summary_row(maps, pictures)
    storage = _storage_panels(maps, pictures)
    ncols = max(len(summary), min(n, 6), min(maps.num_registers, 8))
    head_rows = -(-n // ncols)
    rows_per_head = 2 if pictures.masks is not None else 1
    storage_rows = [panels[i : i + ncols] for panels in storage for i in range(0, len(panels), ncols)]
    nrows = 1 + head_rows * rows_per_head + len(storage_rows)
    aspect = img.shape[0] / img.shape[1]
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.6 * aspect * nrows + 0.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, (picture, label) in enumerate(summary):
        axes[0, j].imshow(picture)
        axes[0, j].set_title(label, fontsize=9)
    for i in range(n):
        r, c = 1 + (i // ncols) * rows_per_head, i % ncols
        axes[r, c].imshow(pictures.heats[i])
        label = f"head {i}" + (f" | {100 * maps.cls_mass[i, 1]:.0f}% to registers" if maps.num_registers else "")
        axes[r, c].set_title(label, fontsize=9, color=tuple(colors[i] / 255))
        if pictures.masks is not None:
            axes[r + 1, c].imshow(overlay_mask(img, pictures.masks[i], colors[i]))
            kept = float(maps.masks[i].mean())
            axes[r + 1, c].set_title(f"head {i}: {100 * kept:.0f}% of patches", fontsize=8)
    first = 1 + head_rows * rows_per_head
    for k, row in enumerate(storage_rows):
        for j, (picture, label) in enumerate(row):
            axes[first + k, j].imshow(picture)
            axes[first + k, j].set_title(label, fontsize=8)
    heading = f"{title}\n{maps.caption()}".strip()
    fig.suptitle(heading, fontsize=9)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.16 * (heading.count("\n") + 1) + 0.04) / height))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _write_arrays(maps: AttentionMaps, path: Path) -> Path:
    """``maps.npz``: the raw maps (attention, masks, pca, rollout: those there are; the norms, outliers and
    attention shares; the registers' maps for a register model)."""
    arrays = {"attention": maps.attention, "patch_norms": maps.patch_norms, "outliers": maps.outliers,
              "cls_mass": maps.cls_mass, "patch_mass": maps.patch_mass}
    if maps.num_registers:
        arrays.update(reg_reads=maps.reg_reads, reg_read_by=maps.reg_read_by)
    if maps.masks is not None:
        arrays["masks"] = maps.masks
    if maps.pca is not None:
        arrays["pca"] = maps.pca
    if maps.rollout is not None:
        arrays["rollout"] = maps.rollout
    np.savez_compressed(path, **arrays)
    return path


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
    """Figures for image files and folders (batch mode, with a progress bar); returns the grid PNGs. An image
    smaller than one patch is named on stderr and skipped, as an unreadable one; DataError when every image
    given is too small."""
    items = _image_list(inputs)
    grids: list[Path] = []
    small: list[str] = []
    for i, img in readable_images([path for path, _ in items], "visualize", progress):
        path, name = items[i]
        try:
            maps = compute_maps(backbone, img, mean, std, threshold, pca, rollout, head_fusion, discard_ratio,
                                max_side, device)
        except ImageTooSmallError as e:
            print(f"warning: skipping {path}: {e}", file=sys.stderr)
            small.append(f"{path} ({e})")
            continue
        grids.append(render(maps, Path(out_dir) / name, title=f"{title}  {path.name}".strip())[0])
    if small and not grids:
        raise DataError(f"no image to draw: {small[0]}" + (f" and {len(small) - 1} more" if len(small) > 1 else "")
                        + (" (--max-side shrinks them further)" if max_side else ""))
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


main = tool_main("visualize", add_arguments, run)  # python -m ssl_distill.eval.visualize


if __name__ == "__main__":
    raise SystemExit(main())
