"""Unsupervised single-object discovery: a normalized cut on ViT keys (TokenCut), or DINO-seg.

TokenCut (Wang et al., "Self-Supervised Transformers for Unsupervised Object Discovery using
Normalized Cut", CVPR 2022), step by step:

1. features: the keys of the last attention block, all heads concatenated, prefix tokens (CLS,
   registers, [OBJ]) dropped (on a RoPE model, DINOv3, the keys before the rotation: the rotated ones would
   make the graph partly encode the patches' distance, see :mod:`ssl_distill.models.inspect`); each image at its native resolution, normalised, zero-padded at the bottom
   and right to a multiple of the patch size (zero = the mean colour after normalisation);
2. graph: cosine similarity of the L2-normalised keys, ``W_ij = 1`` where it is > tau (0.2), else
   eps (1e-5); ``D = diag(W 1)``;
3. the eigenvector ``x`` of the second-smallest eigenvalue of ``(D - W) x = lambda D x``;
4. bipartition ``x > mean(x)``; the seed is the token with the largest ``|x|``; the partition (and
   ``x``) is flipped so the seed is foreground (ties, up to rounding, decided as exact arithmetic
   would: see :func:`bipartition`);
5. the object is the 4-connected component of the foreground that contains the seed; its box in
   patch units is scaled by the patch size and clipped to the unpadded image.

Degenerate graphs
-----------------
The cut is only defined when ``lambda_2`` is a simple eigenvalue. Two cases are not:

* a constant ``W`` (every pair of keys has cosine > tau, so ``W`` is all ones): ``D - W = n (I - 11^T / n)``,
  every non-trivial eigenvalue is 1 and every vector orthogonal to ``1`` is an eigenvector. Every
  bipartition has the same normalized-cut value; a dense solver returns whatever vector LAPACK's
  rounding produces. This happens with randomly initialised ViTs, whose last-block keys share a
  dominant common direction (see ``benchmarks/bench_ncut.py``), on low-contrast images;
* a repeated ``lambda_2`` (``lambda_3 - lambda_2 <= GAP_TOL``; e.g. two identical, mutually
  dissimilar clusters): the eigenvector is any vector of a >= 2-dimensional eigenspace.

There is no cut to report in either case, so :func:`ncut` returns a defined result: no split,
the whole (unpadded) image as the object (``bipartition`` and ``mask`` all true, ``eigenvector``
zero), ``degenerate`` set to the reason, and a :class:`DegenerateGraphWarning`. Both solvers
return ``lambda_3`` (the second eigenpair the dense ``subset_by_index=[1, 2]`` solve computes anyway;
one more Ritz pair for Lanczos), so the test is the same whichever solver runs.

The eigen-solver
----------------
The reference is scipy's dense generalized solve ``eigh(D - W, D, subset_by_index=[1, 2])`` (what
the TokenCut code runs): O(N^3) with a memory-bound tridiagonalisation, 5-20 s of CPU time for
the 3,600 tokens of a 480 x 480 image at patch 8 on this machine's 2 cores. Only one eigenpair is needed, and
the problem becomes a standard symmetric one with ``y = D^(1/2) x``::

    (D - W) x = lambda D x   <=>   A y = (1 - lambda) y,   A = D^(-1/2) W D^(-1/2).

``A``'s largest eigenvalue is 1 with the known eigenvector ``u = D^(1/2) 1 / |D^(1/2) 1|`` (the
trivial cut). Deflating it, ``A' = A - 2 u u^T`` moves that pair to -1, the bottom of A's spectrum
(which lies in [-1, 1]), so the wanted vector is the *largest* eigenvector of ``A'``: one extremal
eigenpair of a symmetric matrix, found by implicitly restarted Lanczos (ARPACK through
``scipy.sparse.linalg.eigsh``, deterministic start vector orthogonal to ``u``). Each iteration is
one dense mat-vec (N^2 multiply-adds, ~3.5 ms at N = 3,600 in float64 here). ``k = 2``: the next
pair (``lambda_3``) is what tells a unique cut from a repeated ``lambda_2`` (see "Degenerate
graphs"); it costs about 31 mat-vecs instead of 21 for ``k = 1`` on ViT graphs.

Why not the alternatives: a dense standard solve (torch/LAPACK ``eigh``, even batched or in
float32) still tridiagonalises the whole matrix, 15-70 s here; LOBPCG would also do, but without a
good preconditioner it spends more mat-vec work than Lanczos on one extremal pair. The
mat-vecs run in float64: they are memory-bound, so float64 costs ~0.1 s, and it keeps the
eigenvector exact where it matters, when the gap between the second and third eigenvalues is
small (eigenvector error ~ solver tolerance / gap) and a float32 iteration could land on a
different partition. The similarity itself is computed in float32 (then thresholded), as in
TokenCut. With ``method="auto"`` (the default) small graphs (N <= 256) use the dense reference
directly; it is also the fallback if Lanczos does not converge.

DINO-seg (``--dinoseg``)
------------------------
The "DINO-seg" baseline of the LOST and TokenCut CorLoc tables (Simeoni et al., BMVC 2021): a box
around the attention masks of DINO's figures (Caron et al. 2021). One head's last-block [CLS] -> patch attention
(renormalised over the patches), kept down to the smallest set of patches holding 60% of its mass
(DINO's threshold, as ``visualize``), and the box of the largest 4-connected component of those
patches. The head defaults to 4, LOST's and TokenCut's choice for ViT-S/16, on models that have it, and to
``mean`` on models with fewer heads (a ViT-tiny has 3); ``mean`` averages the heads' maps first (our addition,
for models without a designated head). Deliberate difference:
LOST's code sizes the components with ``range(max label)``, which skips the last component and,
with a single component, boxes the background; we take the largest component among all of them.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.linalg
import scipy.ndimage
import scipy.sparse.linalg
import torch
from PIL import Image
from torch import Tensor, nn

from ssl_distill.atomic import atomic_write
from ssl_distill.cli_args import discover_arguments as add_arguments  # options: torch-free
from ssl_distill.cli_args import tool_main
from ssl_distill.eval_constants import DINOSEG_HEAD, DINOSEG_MASS, EPS, TAU
from ssl_distill.models.inspect import (
    cls_attention_maps,
    last_block_heads,
    last_block_keys,
    pad_to_patch_multiple,
)

from .drawing import colorize, threshold_mass, upsample
from .images import readable_images, shrink

__all__ = [
    "DENSE_BELOW",
    "DINOSEG_HEAD",
    "DINOSEG_MASS",
    "EPS",
    "GAP_TOL",
    "TAU",
    "TIE_RTOL",
    "DegenerateGraphWarning",
    "DinoSegResult",
    "NCutResult",
    "add_arguments",
    "affinity",
    "bipartition",
    "check_dinoseg_head",
    "default_dinoseg_head",
    "discover_image",
    "discover_images",
    "dino_seg",
    "largest_component",
    "mask_box",
    "ncut",
    "prepare_image",
    "second_eigenpairs",
    "second_eigenvector",
    "seed_component",
    "write_coco_boxes",
]

# Graphs up to this many tokens use the dense generalized solve (it is then as fast as Lanczos).
DENSE_BELOW = 256
# lambda_3 - lambda_2 at or below this: lambda_2 is repeated, the cut is not unique. Generalized eigenvalues
# lie in [0, 2]; Lanczos resolves them to ~1e-10 (tol), and on ViT graphs the real gaps seen are >= 1e-3.
GAP_TOL = 1e-9
# Relative tolerance below which eigenvector entries count as tied (seed choice, entries at the mean): far above
# the solvers' rounding (~1e-13 relative here) and far below any difference that carries information.
TIE_RTOL = 1e-7
# scipy.ndimage.label's neighbourhood for the 4-connected components both methods box
_FOUR_CONNECTED = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------- the cut
class DegenerateGraphWarning(UserWarning):
    """The graph has no unique normalized cut (constant ``W`` or repeated ``lambda_2``): whole image kept."""


def affinity(keys: Tensor | np.ndarray, tau: float = TAU, eps: float = EPS) -> np.ndarray:
    """(N, d) features -> (N, N) float64 ``W``: 1 where the cosine similarity is > tau, else eps.

    The similarity is computed in float32 (as TokenCut does) and thresholded.
    """
    f = torch.as_tensor(keys).float()
    f = torch.nn.functional.normalize(f, dim=-1)
    sim = (f @ f.T).numpy()
    return np.where(sim > tau, 1.0, eps)


def _dense_generalized(w: np.ndarray, d: np.ndarray) -> tuple[float, np.ndarray, float]:
    vals, vecs = scipy.linalg.eigh(np.diag(d) - w, np.diag(d), subset_by_index=[1, 2])
    return float(vals[0]), vecs[:, 0], float(vals[1])


def second_eigenvector(w: np.ndarray, method: str = "auto", tol: float = 1e-10) -> tuple[float, np.ndarray]:
    """``(lambda_2, x)`` of :func:`second_eigenpairs` (the cut's eigenpair)."""
    lam, x, _ = second_eigenpairs(w, method, tol)
    return lam, x


def second_eigenpairs(w: np.ndarray, method: str = "auto", tol: float = 1e-10) -> tuple[float, np.ndarray, float]:
    """The second-smallest eigenpair of ``(D - W) x = lambda D x`` for a symmetric non-negative ``W``,
    and the third-smallest eigenvalue (to tell whether the second is simple).

    Args:
        w: (N, N) affinities (float64 recommended; not modified).
        method: ``lanczos`` (deflated standard form, see the module docstring), ``dense``
            (scipy's generalized ``eigh(D - W, D, subset_by_index=[1, 2])``, the reference) or
            ``auto`` (dense up to :data:`DENSE_BELOW` tokens, Lanczos above).
        tol: Lanczos relative tolerance on the eigenvalue.

    Returns:
        (lambda_2, x, lambda_3) with ``x`` (N,) float64, D-normalised (``x^T D x = 1``) like scipy's;
        its sign is arbitrary (the cut fixes it with the seed). When ``lambda_3 - lambda_2 <= GAP_TOL``
        ``x`` is one arbitrary vector of a repeated eigenvalue's eigenspace.
    """
    w = np.asarray(w, dtype=np.float64)
    n = w.shape[0]
    if w.ndim != 2 or w.shape[1] != n:
        raise ValueError(f"affinity must be square, got {w.shape}")
    if n < 3:
        raise ValueError(f"a normalized cut needs at least 3 tokens, got {n}")
    d = w.sum(axis=1)
    if np.any(d <= 0):
        raise ValueError("every token needs a positive degree (use eps > 0)")
    if method not in ("auto", "lanczos", "dense"):
        raise ValueError(f"method must be 'auto', 'lanczos' or 'dense', got {method!r}")
    if method == "dense" or (method == "auto" and n <= DENSE_BELOW):
        return _dense_generalized(w, d)
    s = 1.0 / np.sqrt(d)
    u = np.sqrt(d)
    u /= np.linalg.norm(u)

    def matvec(v: np.ndarray) -> np.ndarray:  # A' v = D^-1/2 W D^-1/2 v - 2 u (u . v), W never copied
        v = v.ravel()
        return s * (w @ (s * v)) - 2.0 * u * (u @ v)

    op = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(n)
    v0 -= u * (u @ v0)
    try:
        # The two largest eigenpairs of A' (lambda_2 and lambda_3); 30 Lanczos vectors per restart: on
        # ViT-S/8 graphs (3,600 tokens) ARPACK converges to 1e-10 within the first cycle (31 mat-vecs;
        # 20 vectors need a restart for the second pair, ~38); harder spectra restart.
        mu, y = scipy.sparse.linalg.eigsh(op, k=2, which="LA", v0=v0, tol=tol, ncv=min(n - 1, 30), maxiter=50 * n)
    except scipy.sparse.linalg.ArpackNoConvergence:
        return _dense_generalized(w, d)
    top = int(np.argmax(mu))
    x = y[:, top] * s
    x /= math.sqrt(float(x @ (d * x)))
    return float(1.0 - mu[top]), x, float(1.0 - mu[1 - top])


def bipartition(x: np.ndarray, rtol: float = TIE_RTOL) -> tuple[np.ndarray, int, np.ndarray]:
    """TokenCut's split of the eigenvector: (foreground (N,) bool, seed index, oriented x).

    Foreground is ``x > mean(x)``; the seed is ``argmax |x|``; if the seed falls in the background
    the partition is complemented and ``x`` negated, so the seed is always foreground and the
    returned ``x`` is high on the foreground.

    Ties are decided as exact arithmetic would, not by rounding noise (values within ``rtol`` of
    the largest, relatively, are ties):

    * the seed: among the entries tied for the largest ``|x|``, the first (``np.argmax``'s rule for
      exact ties). Eigenvectors made of ``+a`` and ``-a`` on two tokens do occur (two lone tokens of
      equal degree), and without this the solver's last bits would pick the seed and so the side;
    * entries equal to the mean belong to neither side; they go to the background. With exact ties
      TokenCut's ``complement if the seed is background`` would put them in the foreground for one
      sign of ``x`` and in the background for the other, so the result would depend on the
      eigenvector's arbitrary sign; and with rounding, on its last bits (hundreds of tokens can sit
      at the mean when ``x`` is localised on a few tokens).

    Without ties (every real-valued eigenvector of a generic graph) this is TokenCut's rule exactly.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    ax = np.abs(x)
    seed = int(np.flatnonzero(ax >= ax.max() * (1.0 - rtol))[0])
    mean = float(x.mean())
    if x[seed] < mean:  # orient: the seed's side is high
        x, mean = -x, -mean
    spread = float(np.abs(x - mean).max())
    part = x > mean + rtol * spread
    part[seed] = True
    return part, seed, x


def seed_component(foreground: np.ndarray, seed: tuple[int, int]) -> np.ndarray:
    """The 4-connected component of the (h, w) ``foreground`` that contains ``seed`` (row, col)."""
    labels, _ = scipy.ndimage.label(foreground, structure=_FOUR_CONNECTED)
    lab = labels[seed]
    if lab == 0:
        raise ValueError(f"seed {seed} is not in the foreground")
    return labels == lab


def mask_box(mask: np.ndarray, patch_size: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Box [x0, y0, x1, y1] (pixel edges) of an (h, w) token mask, clipped to the unpadded image.

    Token (r, c) covers pixels [c p, (c + 1) p) x [r p, (r + 1) p) of the padded image; the padding
    lies at the bottom and right, so only x1 / y1 can exceed the image (``image_size`` = (H, W)).
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("empty mask has no box")
    height, width = image_size
    x0, y0 = int(cols.min()) * patch_size, int(rows.min()) * patch_size
    x1, y1 = (int(cols.max()) + 1) * patch_size, (int(rows.max()) + 1) * patch_size
    return min(x0, width), min(y0, height), min(x1, width), min(y1, height)


class _TokenBox:
    """What a discovery result with ``box``, ``mask`` (h, w), ``image_size`` and ``patch_size`` can say."""

    box: tuple[int, int, int, int]
    mask: np.ndarray
    image_size: tuple[int, int]
    patch_size: int

    def pixel_mask(self) -> np.ndarray:
        """The object mask at pixel resolution, (H, W) bool (nearest upsampling, padding removed)."""
        return upsample(self.mask, self.patch_size)[: self.image_size[0], : self.image_size[1]]

    def coco_bbox(self) -> list[int]:
        x0, y0, x1, y1 = self.box
        return [x0, y0, x1 - x0, y1 - y0]


@dataclass
class NCutResult(_TokenBox):
    """The outcome of one cut. Token maps are (h, w) over the padded patch grid."""

    box: tuple[int, int, int, int]  # [x0, y0, x1, y1] pixels of the unpadded image
    eigenvalue: float  # second-smallest generalized eigenvalue
    eigenvector: np.ndarray  # (h, w) float64, oriented so the foreground is high
    bipartition: np.ndarray  # (h, w) bool, after the flip rule
    mask: np.ndarray  # (h, w) bool, the seed's 4-connected component
    seed: tuple[int, int]  # (row, col)
    image_size: tuple[int, int]  # (H, W) unpadded
    patch_size: int
    timings: dict[str, float] = field(default_factory=dict)
    lambda3: float = float("nan")  # third-smallest generalized eigenvalue
    degenerate: str | None = None  # why there is no unique cut ("constant graph", "repeated eigenvalue"), else None

    def heat_map(self) -> np.ndarray:
        """(h, w) map the box came from: the oriented eigenvector."""
        return self.eigenvector

    def box_fields(self) -> dict[str, Any]:
        """Per-box fields for the boxes file."""
        return {"ncut_eigenvalue": self.eigenvalue, "ncut_degenerate": self.degenerate}


def ncut(w: np.ndarray, grid: tuple[int, int], patch_size: int, image_size: tuple[int, int],
         method: str = "auto") -> NCutResult:
    """Cut a token graph ``w`` (N = h * w tokens in row-major grid order) and box the seed's object.

    A graph without a unique cut (constant ``w``, or ``lambda_3 - lambda_2 <= GAP_TOL``) gives the whole
    image, ``degenerate`` set to the reason, and a :class:`DegenerateGraphWarning`.
    """
    h, wd = grid
    if w.shape[0] != h * wd:
        raise ValueError(f"affinity has {w.shape[0]} tokens but the grid {h}x{wd} has {h * wd}")
    t0 = time.perf_counter()
    degenerate = None
    if w.min() == w.max():
        # Every pair equally similar: D - W = n (I - 11^T / n), every non-trivial eigenvalue is 1 and
        # any vector orthogonal to 1 is an eigenvector: there is no cut.
        lam = lam3 = 1.0
        degenerate = "constant graph"
    else:
        lam, x, lam3 = second_eigenpairs(w, method)
        if lam3 - lam <= GAP_TOL:
            degenerate = "repeated eigenvalue"
    if degenerate is None:
        part, seed, x = bipartition(x)
    else:  # no unique cut: the defined answer is no split, the whole image (see the module docstring)
        warnings.warn(f"normalized cut: {degenerate} (lambda_2 {lam:.3g}, lambda_3 {lam3:.3g}); no unique cut, "
                      "keeping the whole image", DegenerateGraphWarning, stacklevel=2)
        x, part, seed = np.zeros(h * wd), np.ones(h * wd, dtype=bool), 0
    t1 = time.perf_counter()
    seed_rc = (seed // wd, seed % wd)
    part2 = part.reshape(h, wd)
    comp = seed_component(part2, seed_rc)
    box = mask_box(comp, patch_size, image_size)
    return NCutResult(box=box, eigenvalue=lam, eigenvector=x.reshape(h, wd), bipartition=part2, mask=comp,
                      seed=seed_rc, image_size=image_size, patch_size=patch_size,
                      timings={"solve": t1 - t0, "post": time.perf_counter() - t1}, lambda3=lam3,
                      degenerate=degenerate)


@dataclass
class DinoSegResult(_TokenBox):
    """The outcome of DINO-seg on one image. Token maps are (h, w) over the padded patch grid."""

    box: tuple[int, int, int, int]  # [x0, y0, x1, y1] pixels of the unpadded image
    attention: np.ndarray  # (h, w) float64, the head's (or the heads' mean) [CLS] -> patch map, sums to one
    kept: np.ndarray  # (h, w) bool, the smallest set of patches holding ``mass`` of the attention
    mask: np.ndarray  # (h, w) bool, the largest 4-connected component of ``kept``
    image_size: tuple[int, int]  # (H, W) unpadded
    patch_size: int
    head: int | str
    mass: float = DINOSEG_MASS
    timings: dict[str, float] = field(default_factory=dict)
    degenerate: ClassVar[None] = None  # every attention map has a box (read like NCutResult's)

    def heat_map(self) -> np.ndarray:
        """(h, w) map the box came from: the attention."""
        return self.attention

    def box_fields(self) -> dict[str, Any]:
        """Per-box fields for the boxes file: the head, and the share of the attention inside the box's component."""
        return {"dinoseg_head": self.head, "dinoseg_component_mass": float(self.attention[self.mask].sum())}


def largest_component(kept: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of an (h, w) bool map (the first in scan order on a tie)."""
    labels, n = scipy.ndimage.label(kept, structure=_FOUR_CONNECTED)
    if n == 0:
        raise ValueError("no patch is kept: nothing to box")
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return labels == 1 + int(np.argmax(sizes))


def check_dinoseg_head(head: int | str, n_heads: int, name: str = "DINO-seg head") -> None:
    """ValueError unless ``head`` is ``"mean"`` or one of the model's ``n_heads`` head indices."""
    if head != "mean" and not (isinstance(head, int) and 0 <= head < n_heads):
        raise ValueError(f"{name} {head!r} does not exist: the model has {n_heads} heads "
                         f"(0-{n_heads - 1}); give one of them or 'mean'")


def default_dinoseg_head(n_heads: int) -> int | str:
    """DINO-seg's head for a model with ``n_heads`` heads: LOST's :data:`DINOSEG_HEAD` where the model has it,
    else ``"mean"`` of the heads."""
    return DINOSEG_HEAD if n_heads > DINOSEG_HEAD else "mean"


def dino_seg(attention: np.ndarray, patch_size: int, image_size: tuple[int, int], head: int | str | None = None,
             mass: float = DINOSEG_MASS) -> DinoSegResult:
    """DINO-seg's box from the last block's [CLS] -> patch attention (module docstring).

    Args:
        attention: (heads, h, w) maps, each summing to one over the patches (``cls_attention``).
        head: the head whose map is boxed, or ``"mean"`` for the mean of the heads' maps; None:
            :func:`default_dinoseg_head`.
        mass: share of the map's mass the kept patches hold (DINO's 0.6).
    """
    attention = np.asarray(attention, dtype=np.float64)
    head = default_dinoseg_head(attention.shape[0]) if head is None else head
    check_dinoseg_head(head, attention.shape[0])
    m = attention.mean(axis=0) if head == "mean" else attention[head]
    kept = threshold_mass(m, mass)
    comp = largest_component(kept)
    return DinoSegResult(box=mask_box(comp, patch_size, image_size), attention=m, kept=kept, mask=comp,
                         image_size=image_size, patch_size=patch_size, head=head, mass=mass)


# ----------------------------------------------------------------------------------- images and models
def prepare_image(img: Image.Image, patch_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD, max_side: int | None = None) -> tuple[Tensor, tuple[int, int]]:
    """PIL image -> ((1, 3, Hp, Wp) normalised, zero-padded tensor, (H, W) before padding).

    ``max_side`` optionally shrinks images whose longer side exceeds it (aspect kept); by default
    the native resolution is used.
    """
    img = shrink(img, max_side)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    x = ((arr - m) / s)[None]
    return pad_to_patch_multiple(x, patch_size), (img.height, img.width)


def discover_image(backbone: nn.Module, img: Image.Image, tau: float = TAU, eps: float = EPS,
                   method: str = "auto", mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, max_side: int | None = None,
                   device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                   dinoseg_head: int | str | None = None) -> NCutResult | DinoSegResult:
    """Features (last-block keys) + normalized cut + box for one PIL image; with ``dinoseg_head``,
    DINO-seg's box from that head's [CLS] attention instead (an int, or ``"mean"``)."""
    device = torch.device(device)
    p = int(backbone.patch_size)
    t0 = time.perf_counter()
    x, size = prepare_image(img, p, mean, std, max_side)
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                                                 enabled=amp_dtype is not None):
        if dinoseg_head is not None:
            attention = cls_attention_maps(backbone, x.to(device))[0].float().cpu().numpy()
        else:
            keys = last_block_keys(backbone, x.to(device))[0].float().cpu()
    t1 = time.perf_counter()
    if dinoseg_head is not None:
        seg = dino_seg(attention, p, size, dinoseg_head)
        seg.timings = {"features": t1 - t0, "post": time.perf_counter() - t1}
        return seg
    w = affinity(keys, tau, eps)
    t2 = time.perf_counter()
    res = ncut(w, grid, p, size, method)
    res.timings.update({"features": t1 - t0, "affinity": t2 - t1})
    return res


# ----------------------------------------------------------------------------------- outputs
def write_coco_boxes(path: str | Path, entries: Iterable[dict[str, Any]], info: dict[str, Any] | None = None) -> Path:
    """Write discovered boxes as a COCO-style JSON (the format object-level pretraining reads).

    Each entry: ``file_name`` (relative to the image folder), ``width``, ``height``, ``box``
    [x0, y0, x1, y1] (pixels) and optional extra per-box fields (e.g. ``ncut_eigenvalue``). Images
    get ids 1..n in order, each with one annotation (``bbox`` [x, y, w, h], ``category_id`` 1).
    """
    images, annotations = [], []
    for i, e in enumerate(entries, start=1):
        images.append({"id": i, "file_name": e["file_name"], "width": int(e["width"]), "height": int(e["height"])})
        x0, y0, x1, y1 = (int(v) for v in e["box"])
        ann = {"id": i, "image_id": i, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
               "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
        ann.update({k: v for k, v in e.items() if k not in ("file_name", "width", "height", "box")})
        annotations.append(ann)
    data = {"info": info or {}, "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "object"}]}
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
    return path


def _png_name(file_name: str) -> str:
    return str(Path(file_name).with_suffix(".png"))


def save_mask(res: NCutResult | DinoSegResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(res.pixel_mask().astype(np.uint8) * 255).save(path)


def save_heatmap(res: NCutResult | DinoSegResult, path: Path) -> None:
    """The map the box came from (the oriented eigenvector, or DINO-seg's attention), upsampled to the
    image and colour-mapped."""
    big = upsample(res.heat_map(), res.patch_size)[: res.image_size[0], : res.image_size[1]]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(colorize(big, "inferno")).save(path)


def discover_images(backbone: nn.Module, image_dir: str | Path, file_names: Sequence[str], out_dir: str | Path,
                    tau: float = TAU, eps: float = EPS, method: str = "auto",
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    masks: bool = False, heatmaps: bool = False, max_side: int | None = None,
                    device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                    info: dict[str, Any] | None = None, progress: bool | None = None,
                    dinoseg_head: int | str | None = None) -> dict[str, Any]:
    """Discover one object per image; write ``out_dir/boxes.json`` (+ ``masks/``, ``heatmaps/`` PNGs).
    TokenCut by default; DINO-seg with ``dinoseg_head`` (see :func:`discover_image`).

    Returns ``{"boxes": {file_name: [x0, y0, x1, y1]}, "boxes_file": path, "seconds": ...,
    "images_per_s": ..., "degenerate": {file_name: reason}, "how": the method and its parameters}``.
    Unreadable images are reported on stderr and skipped. Images whose graph has no unique cut keep the
    whole image as their box, are marked ``ncut_degenerate`` in the boxes file, and are listed once on
    stderr (not one warning each).
    """
    image_dir, out_dir = Path(image_dir), Path(out_dir)
    entries, boxes, degenerate = [], {}, {}
    t0 = time.perf_counter()
    for i, img in readable_images([image_dir / name for name in file_names], "discover", progress):
        name = file_names[i]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateGraphWarning)  # summarised below
            res = discover_image(backbone, img, tau, eps, method, mean, std, max_side, device, amp_dtype,
                                 dinoseg_head)
        if res.degenerate:
            degenerate[name] = res.degenerate
        if max_side is not None and (img.height, img.width) != res.image_size:  # box back to the original pixels
            res.box = _rescaled_box(res.box, res.image_size, img.size)
        boxes[name] = list(res.box)
        entries.append({"file_name": name, "width": img.width, "height": img.height, "box": res.box,
                        **res.box_fields()})
        if masks:
            save_mask(res, out_dir / "masks" / _png_name(name))
        if heatmaps:
            save_heatmap(res, out_dir / "heatmaps" / _png_name(name))
    seconds = time.perf_counter() - t0
    if degenerate:
        _warn_degenerate(list(degenerate), len(entries))
    how = ({"method": "tokencut", "tau": tau, "eps": eps, "solver": method} if dinoseg_head is None
           else {"method": "dinoseg", "head": dinoseg_head, "mass": DINOSEG_MASS})
    path = write_coco_boxes(out_dir / "boxes.json", entries, {**(info or {}), **how, "n_degenerate": len(degenerate)})
    return {"boxes": boxes, "boxes_file": str(path), "seconds": seconds, "how": how,
            "images_per_s": len(entries) / seconds if seconds > 0 else float("nan"), "degenerate": degenerate}


def _rescaled_box(box: tuple[int, int, int, int], shrunk: tuple[int, int],
                  size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box on the image shrunk to ``shrunk`` (H, W), back in the pixels of the original (W, H) ``size``."""
    width, height = size
    fx, fy = width / shrunk[1], height / shrunk[0]
    x0, y0, x1, y1 = box
    return round(x0 * fx), round(y0 * fy), min(round(x1 * fx), width), min(round(y1 * fy), height)


def _warn_degenerate(names: list[str], n_images: int) -> None:
    """One line on stderr for the images without a unique cut (the first five named)."""
    listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    print(f"warning: {len(names)} of {n_images} images have no unique normalized cut (constant graph "
          f"or repeated eigenvalue); their box is the whole image, marked ncut_degenerate: {listed}",
          file=sys.stderr)


# ----------------------------------------------------------------------------------- command line
def run(args: argparse.Namespace) -> int:
    from ssl_distill.atomic import check_output_folder
    from ssl_distill.data.folder import scan_image_folder
    from ssl_distill.runtime import resolve_device

    from .corloc import corloc, read_ground_truth
    from .model import load_model
    from .results import default_output

    name = "discover_dinoseg" if args.dinoseg else "discover"
    out = Path(args.out) if args.out else default_output(args.checkpoint, name, args.random_init, suffix="")
    check_output_folder(out, "--out")  # before any image is read or model loaded
    gt = None
    if args.voc or args.coco:
        gt = read_ground_truth(args.voc, args.coco, args.split)
    if args.images:
        image_dir = Path(args.images)
    elif args.voc:
        image_dir = Path(args.voc) / "JPEGImages"
    else:
        raise SystemExit("error: give --images (the folder the file names are relative to)")
    if gt is not None:
        names = sorted(gt)
    else:
        names = scan_image_folder(image_dir, labeled=False).paths
    if args.limit:
        names = names[: args.limit]
        if gt is not None:
            gt = {n: gt[n] for n in names}
    device = resolve_device(args.device, key="--device")
    model = load_model(args.checkpoint, args.which, random_init=args.random_init, device=device)
    backbone = model.backbone
    dinoseg_head = _dinoseg_head(args.dinoseg_head, last_block_heads(backbone)) if args.dinoseg else None
    if hasattr(backbone, "set_fused_attn"):
        backbone.set_fused_attn(True)  # inference only: the fused kernel is the fastest forward here
    mean, std = model.normalization
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    info = {"checkpoint": str(model.loaded.file), "which": "random_init" if args.random_init else args.which,
            "image_dir": str(image_dir), "precision": args.precision}
    res = discover_images(backbone, image_dir, names, out, args.tau, args.eps, args.solver, mean, std,
                          args.masks, args.heatmaps, args.max_side, device, amp, info, dinoseg_head=dinoseg_head)
    print(f"{len(res['boxes'])} boxes -> {res['boxes_file']} ({res['images_per_s']:.2f} images/s)")
    if gt is not None:
        cl = corloc(res["boxes"], gt)
        (out / "corloc.json").write_text(json.dumps({**cl.as_dict(), **info, **res["how"],
                                                     "n_degenerate": len(res["degenerate"])}, indent=1))
        print(f"CorLoc {100 * cl.corloc:.2f}% ({cl.n_hits}/{cl.n_images} images) -> {out / 'corloc.json'}")
    return 0


def _dinoseg_head(given: int | str | None, n_heads: int) -> int | str:
    """The head ``--dinoseg-head`` names, refused before any image is read when the model lacks it; without the
    option :func:`default_dinoseg_head`, with a note when that is not LOST's head."""
    if given is not None:
        check_dinoseg_head(given, n_heads, "--dinoseg-head")
        return given
    head = default_dinoseg_head(n_heads)
    if head == "mean":
        print(f"note: the model has {n_heads} heads, so DINO-seg boxes the mean of their maps (LOST's head "
              f"{DINOSEG_HEAD} is not there; --dinoseg-head picks one)")
    return head


main = tool_main("discover", add_arguments, run)  # python -m ssl_distill.eval.discover


if __name__ == "__main__":
    raise SystemExit(main())
