"""Write unlabeled training scenes (PNG) for DINO pretraining on the generated scene kind.

Scenes come from ``tests/scenes.py`` (tinted scikit-image textures with pasted photo / texture objects),
the generator behind ``benchmarks/bench_ncut.py``'s evaluation set. The evaluation set uses generator
seed ``1000 + --seed`` (i.e. 1000 by default); this script refuses seeds in 1000..1999, so training
scenes never repeat evaluation scenes (they still share the same few source textures and photos, by
construction of the generator).

With ``--fmnist-p P`` (default 0.5) a scene also gets, with probability P, one Fashion-MNIST training
item (upscaled, tinted or texture-filled, pasted where it does not cover another object), so the
model is pretrained on "Fashion-MNIST scenes" while the scene kind of the evaluation set stays
covered. No boxes or labels are written.

    python benchmarks/make_scene_folder.py data/scenes_train --n 3000 --size 112 160 --seed 5000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import scenes  # noqa: E402  (tests/scenes.py)


def paste_fmnist(scene: scenes.Scene, items: np.ndarray, rng: np.random.Generator,
                 min_frac: float = 0.3, max_frac: float = 0.6) -> bool:
    """Paste one Fashion-MNIST item on ``scene.image`` away from its objects; False when no room."""
    h, w = scene.image.shape[:2]
    occupied = scene.masks.any(axis=0) if len(scene.masks) else np.zeros((h, w), bool)
    item = items[int(rng.integers(len(items)))]
    for _try in range(30):
        side = max(int(rng.uniform(min_frac, max_frac) * min(h, w)), 8)
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
        big = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
        mask = big > 0.12
        if mask.sum() < 16:
            return False
        if not (occupied[y0 : y0 + side, x0 : x0 + side] & mask).any():
            break
    else:
        return False
    if rng.random() < 0.5:  # the item's own shading, tinted
        tint = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
        fill = np.clip(big[..., None] * tint * 1.3, 0, 1)
    else:  # filled with a tinted texture, shaded by the item
        tex, _ = scenes._tinted_texture(side, side, rng)
        fill = tex * (0.5 + 0.5 * big[..., None])
    region = scene.image[y0 : y0 + side, x0 : x0 + side]
    region[mask] = np.clip(np.rint(fill[mask] * 255), 0, 255).astype(np.uint8)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--size", type=int, nargs=2, default=(112, 160), metavar=("MIN", "MAX"),
                    help="each side drawn in MIN..MAX (equal values: square scenes)")
    ap.add_argument("--max-objects", type=int, default=2)
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--fmnist-p", type=float, default=0.5, help="probability of an extra Fashion-MNIST item per scene")
    args = ap.parse_args()
    if 1000 <= args.seed < 2000:
        sys.exit("seeds 1000..1999 generate bench_ncut's evaluation scenes; pick another --seed")

    items = None
    if args.fmnist_p > 0:
        from ssl_distill.data.fashion_mnist import load_fashion_mnist_arrays

        items, _ = load_fashion_mnist_arrays(split="train")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    t0, n_fm = time.perf_counter(), 0
    for i in range(args.n):
        h, w = (int(rng.integers(args.size[0], args.size[1] + 1)) for _ in range(2))
        k = int(rng.integers(1, args.max_objects + 1))
        scene = scenes.make_scene(rng, h, w, k)
        if items is not None and rng.random() < args.fmnist_p:
            n_fm += paste_fmnist(scene, items, rng)
        Image.fromarray(scene.image).save(out / f"scene_{i:05d}.png")
    print(f"wrote {args.n} scenes ({n_fm} with a Fashion-MNIST item) to {out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
