"""A labeled multi-object scene benchmark: objects from a labeled image folder pasted on real backgrounds.

ODIS (Hızlı, Yıldız, Marttinen 2025, "Object-level Self-Distillation for Vision Pretraining") argues that
image-level self-distillation gives the student contradictory targets on scenes with several objects, and
evaluates object features by k-NN "with masks at inference time". This module writes the scenes that test
it here (issue 11): ``OUT/train`` and ``OUT/test`` image folders, each with a COCO ``boxes.json`` naming every
object's class, from any labeled folder ``SRC/<class>/<image>`` (default: the Fashion-MNIST train folder).

One scene (``size`` x ``size`` px, RGB):

1. background: with probability 1/2 a crop of a real texture (scikit-image's ``brick``, ``grass``, ``gravel``,
   grayscale, tinted with a random colour), otherwise a crop of a photo (``astronaut``, ``coffee``,
   ``chelsea``, ``rocket``, ``motorcycle_left``; the grayscale ``camera`` tinted); the crop's side is
   ``background_scale`` (default 25-100%) of the source's shorter side, resized (bilinear) to the scene.
   With ``background="black"`` (``--background black``) the scene starts all black instead, no random
   draw: with ``--no-tint`` this is Fashion-MNIST's own setting (gray items on black), so shape features
   learned on single items transfer and no background tells one scene from another;
2. ``k`` objects, ``k`` uniform in ``min_objects..max_objects``, pasted one after another (later ones on
   top): the source image is resized (bilinear, aspect kept) so that its longer side is
   ``U(min_scale, max_scale) * size`` and placed at a uniform position fully inside the scene. What is
   pasted (a hard mask, no blending, so every box is exact):

   - grayscale sources (mode ``L``, or RGB with equal channels), e.g. Fashion-MNIST's items on black:
     near-black is transparent (value ``<= dark_threshold``, default 0.12 of full scale, as the
     earlier unlabeled scene script); the item's own shading times a random tint (channels
     ``U(0.35, 1) * 1.3``, clipped) fills its pixels;
   - sources with an alpha channel: pixels with alpha > 1/2, in their own colours;
   - other colour sources: the whole resized rectangle, in its own colours;

   with ``tint=False`` (``--no-tint``) neither grayscale items nor grayscale backgrounds are tinted: they
   keep their gray values. With ``--no-tint --background-scale 1 1`` a background is one of the nine
   sources nearly whole, so it no longer tells one scene from another (the "plain" variant of the README's
   scene tables): the items are what differs;
3. the overlap rule: a placement is accepted only if, after it, every object already in the scene keeps
   at least ``1 - max_overlap`` of its pasted pixels visible (default ``max_overlap`` 0.2: objects may
   touch and overlap a little, each stays mostly visible). Up to ``tries`` (scale, position) draws per
   object; an object that finds no placement is dropped and counted (``dropped`` in the summary), the
   first object always fits. A source whose mask keeps fewer than ``min_pixels`` pixels at the drawn
   scale (an almost black item) is replaced by the next source.

Each object's box is the tight box ``[x0, y0, x1, y1]`` (pixel edges) of its *visible* pixels in the final
scene (COCO's modal box; at most ``max_overlap`` of the object is hidden, so it is almost the whole
extent); COCO stores ``bbox = [x0, y0, x1 - x0, y1 - y0]`` and ``area`` = visible pixel count.

Splits: the source images are shuffled (seeded) and split in two disjoint pools, in proportion to
``n_train`` and ``n_test``; test scenes take their objects only from the test pool, so no test object is
a source image seen in train. Within a pool each source is used once before any is used again. Every
annotation records its source (``source``: path relative to SRC) so this can be checked.

Reproducible: the same SRC file list, arguments and ``seed`` give byte-identical folders (one numpy
``Generator`` per split, seeded from ``(seed, split)``).

    ssl-distill make-scenes [SRC] OUT [--n-train 2000] [--n-test 1000] [--size 96] [--seed 0] [--no-tint]
        [--background-scale 0.25 1] [--background natural|black] [--min-objects 1] [--max-objects 4]
        [--min-scale 0.3] [--max-scale 0.6] [--max-overlap 0.2]
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..atomic import atomic_write
from ..errors import DataError

__all__ = [
    "BOXES_FILE",
    "Backgrounds",
    "PHOTOS",
    "TEXTURES",
    "Scene",
    "SceneSettings",
    "SourceObject",
    "build_scene_benchmark",
    "default_source",
    "generate_scene",
    "load_source_object",
    "split_sources",
]

TEXTURES: tuple[str, ...] = ("brick.png", "grass.png", "gravel.png")
PHOTOS: tuple[str, ...] = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                           "camera.png")
BOXES_FILE = "boxes.json"
GENERATOR = "ssl-distill make-scenes"
SPLITS: tuple[str, ...] = ("train", "test")
DEFAULT_FMNIST = Path("data/fmnist")
BACKGROUNDS: tuple[str, ...] = ("natural", "black")


@dataclass(frozen=True)
class SceneSettings:
    """What one scene looks like (see the module docstring)."""

    size: int = 96
    min_objects: int = 1
    max_objects: int = 4
    min_scale: float = 0.3  # longer side of an object / scene side
    max_scale: float = 0.6
    max_overlap: float = 0.2  # largest share of an object's pasted pixels later objects may hide
    dark_threshold: float = 0.12  # grayscale sources: values <= this (of full scale) are transparent
    min_pixels: int = 16  # fewer pasted pixels: the source is skipped
    tries: int = 30  # (scale, position) draws per object
    tint: bool = True  # grayscale items and backgrounds get a random colour; False: they stay gray
    background_scale: tuple[float, float] = (0.25, 1.0)  # background crop side / the source's shorter side
    background: str = "natural"  # natural: a texture or photo crop | black: all black (Fashion-MNIST's own)

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"scene size must be >= 8 px, got {self.size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")
        if not 0 <= self.max_overlap < 1:
            raise ValueError(f"max_overlap must be in [0, 1), got {self.max_overlap}")
        if not 0 <= self.dark_threshold < 1:
            raise ValueError(f"dark_threshold must be in [0, 1), got {self.dark_threshold}")
        if self.tries < 1 or self.min_pixels < 1:
            raise ValueError("tries and min_pixels must be >= 1")
        lo, hi = self.background_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"need 0 < background_scale[0] <= background_scale[1] <= 1, got {lo}, {hi}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {self.background!r}")


@dataclass
class Scene:
    """One generated scene.

    ``masks[j]`` holds object ``j``'s *visible* pixels; ``boxes[j]`` is their tight box; ``background`` is
    the scene before any object was pasted (``image == background`` outside the union of the masks).
    """

    image: np.ndarray  # (S, S, 3) uint8
    background: np.ndarray  # (S, S, 3) uint8
    boxes: np.ndarray  # (K, 4) int64 [x0, y0, x1, y1], pixel edges
    labels: np.ndarray  # (K,) int64 class index of the source folder
    masks: np.ndarray  # (K, S, S) bool, visible pixels
    pasted: np.ndarray  # (K,) int64 pixels pasted per object (before later objects covered some)
    sources: list[int] = field(default_factory=list)  # index into the source list, per object
    dropped: int = 0  # objects drawn but not placed (overlap rule)


@dataclass
class SourceObject:
    """A source image ready to paste: ``value`` in [0, 1] and ``alpha`` (opaque where True), full resolution."""

    rgb: np.ndarray  # (h, w, 3) float32 in [0, 1]; for grayscale sources the gray value in each channel
    gray: bool  # grayscale source: tinted when pasted, near-black transparent
    alpha: np.ndarray | None  # (h, w) float32 in [0, 1] for sources with an alpha channel


# ----------------------------------------------------------------------------------------------- sources
def _skimage_data() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise DataError("make-scenes needs scikit-image's sample images (textures and photos): "
                        "pip install scikit-image")
    return Path(spec.origin).parent / "data"


class Backgrounds:
    """The texture and photo images, loaded once as PIL images."""

    def __init__(self) -> None:
        root = _skimage_data()
        missing = [n for n in TEXTURES + PHOTOS if not (root / n).is_file()]
        if missing:
            raise DataError(f"scikit-image sample images missing from {root}: {', '.join(missing)}")
        self.textures = [Image.open(root / n).convert("L") for n in TEXTURES]
        self.photos = []
        for n in PHOTOS:
            img = Image.open(root / n)
            self.photos.append(img.convert("L") if img.mode in ("L", "I", "I;16") else img.convert("RGB"))

    def draw(self, rng: np.random.Generator, size: int, scale: tuple[float, float], tint: bool) -> np.ndarray:
        """(size, size, 3) float32 in [0, 1]: a texture crop or a photo crop (grayscale ones tinted if ``tint``).

        The crop's side is ``U(*scale)`` times the source's shorter side, at a uniform position.
        """
        pool = self.textures if rng.random() < 0.5 else self.photos
        src = pool[int(rng.integers(len(pool)))]
        w, h = src.size
        side = int(rng.uniform(*scale) * min(w, h))
        side = max(side, min(size, w, h), 1)
        x0 = int(rng.integers(0, w - side + 1))
        y0 = int(rng.integers(0, h - side + 1))
        crop = src.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
        arr = np.asarray(crop, dtype=np.float32) / 255.0
        return _coloured(arr, rng, tint, low=0.25, gain=1.2) if arr.ndim == 2 else arr


def _coloured(gray: np.ndarray, rng: np.random.Generator, tint: bool, low: float, gain: float) -> np.ndarray:
    """(h, w, 3) float32 of a gray (h, w) array in [0, 1]: times a random colour (channels ``U(low, 1) * gain``,
    clipped) when ``tint``, else its gray value in each channel (no random draw)."""
    if not tint:
        return np.repeat(gray[..., None], 3, axis=2)
    colour = rng.uniform(low, 1.0, size=3).astype(np.float32)
    return np.clip(gray[..., None] * colour * gain, 0.0, 1.0)


def load_source_object(path: str | os.PathLike[str]) -> SourceObject:
    """Read one source image; the pasting rule depends on its kind (module docstring, step 2)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
                rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
                return SourceObject(rgb=rgba[..., :3], gray=False, alpha=rgba[..., 3])
            if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(img, dtype=np.float32)
                arr = arr / 65535.0 if arr.max() > 255 else arr / 255.0
                gray = np.clip(arr, 0.0, 1.0)
                return SourceObject(rgb=np.repeat(gray[..., None], 3, axis=2), gray=True, alpha=None)
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read source image {path}: {e}") from e
    gray = mode == "L" or bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))
    return SourceObject(rgb=rgb, gray=gray, alpha=None)


def _resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    """Bilinear resize of a float (h0, w0[, c]) array in [0, 1] (through 8-bit PIL images)."""
    u8 = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(u8).resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0


def _render(obj: SourceObject, longer: int, rng: np.random.Generator,
            settings: SceneSettings) -> tuple[np.ndarray, np.ndarray]:
    """(fill (h, w, 3) float32, opaque mask (h, w) bool) of ``obj`` scaled so its longer side is ``longer``."""
    h0, w0 = obj.rgb.shape[:2]
    f = longer / max(h0, w0)
    w, h = max(1, round(w0 * f)), max(1, round(h0 * f))
    if obj.gray:
        value = _resize(obj.rgb[..., 0], w, h)
        mask = value > settings.dark_threshold
        return _coloured(value, rng, settings.tint, low=0.35, gain=1.3), mask
    fill = _resize(obj.rgb, w, h)
    if obj.alpha is not None:
        return fill, _resize(obj.alpha, w, h) > 0.5
    return fill, np.ones((h, w), dtype=bool)


# ------------------------------------------------------------------------------------------------ scenes
def generate_scene(rng: np.random.Generator, settings: SceneSettings, backgrounds: Backgrounds | None,
                   next_source: Callable[[], tuple[int, SourceObject, int]]) -> Scene:
    """One scene; ``next_source()`` returns (source index, object, class index) of the next source to paste.

    ``backgrounds`` may be None with ``settings.background == "black"`` (nothing to draw from)."""
    s = settings.size
    if settings.background == "black":
        bg = np.zeros((s, s, 3), dtype=np.float32)
    elif backgrounds is None:
        raise ValueError("a natural background needs the Backgrounds images")
    else:
        bg = backgrounds.draw(rng, s, settings.background_scale, settings.tint)
    img = bg.copy()
    owner = np.full((s, s), -1, dtype=np.int64)  # index of the topmost object at each pixel
    pasted: list[int] = []
    labels: list[int] = []
    sources: list[int] = []
    k = int(rng.integers(settings.min_objects, settings.max_objects + 1))
    dropped = 0
    for _ in range(k):
        placed = False
        src_index, obj, label = next_source()
        for _try in range(settings.tries):
            longer = max(2, int(rng.uniform(settings.min_scale, settings.max_scale) * s))
            fill, mask = _render(obj, longer, rng, settings)
            n_px = int(mask.sum())
            if n_px < settings.min_pixels:  # an (almost) empty item at this scale: the next source
                src_index, obj, label = next_source()
                continue
            h, w = mask.shape
            y0 = int(rng.integers(0, s - h + 1))
            x0 = int(rng.integers(0, s - w + 1))
            under = owner[y0 : y0 + h, x0 : x0 + w][mask]
            if pasted:
                hidden = np.bincount(under[under >= 0], minlength=len(pasted))
                visible = np.bincount(owner[owner >= 0], minlength=len(pasted))
                if np.any(visible - hidden < (1.0 - settings.max_overlap) * np.asarray(pasted)):
                    continue
            region = img[y0 : y0 + h, x0 : x0 + w]
            region[mask] = fill[mask]
            owner[y0 : y0 + h, x0 : x0 + w][mask] = len(pasted)
            pasted.append(n_px)
            labels.append(label)
            sources.append(src_index)
            placed = True
            break
        dropped += not placed
    if not pasted:
        raise DataError("no source object could be pasted (every source drawn was almost empty at this scale); "
                        "check the source folder or raise --min-scale")
    masks = np.stack([owner == j for j in range(len(pasted))])
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    to_u8 = lambda a: np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)  # noqa: E731
    return Scene(image=to_u8(img), background=to_u8(bg), boxes=np.asarray(boxes, dtype=np.int64),
                 labels=np.asarray(labels, dtype=np.int64), masks=masks, pasted=np.asarray(pasted, dtype=np.int64),
                 sources=sources, dropped=dropped)


def split_sources(n_sources: int, n_train: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    """Disjoint source pools ``{"train": idx, "test": idx}`` (a seeded permutation cut in proportion)."""
    if n_sources < 2:
        raise DataError(f"need at least 2 source images to make disjoint train / test objects, got {n_sources}")
    perm = np.random.default_rng([seed, 7]).permutation(n_sources)
    n_test_pool = int(round(n_sources * n_test / max(n_train + n_test, 1)))
    n_test_pool = min(max(n_test_pool, 1 if n_test else 0), n_sources - (1 if n_train else 0))
    return {"test": np.sort(perm[:n_test_pool]), "train": np.sort(perm[n_test_pool:])}


class _Pool:
    """Cycles through a shuffled pool of source indices (each once before any repeats)."""

    def __init__(self, pool: np.ndarray, rng: np.random.Generator, paths: Sequence[str], labels: Sequence[int]) -> None:
        self.pool, self.rng, self.paths, self.labels = pool, rng, paths, labels
        self.order: list[int] = []
        self.drawn = 0

    def __call__(self) -> tuple[int, SourceObject, int]:
        if not self.order:
            self.order = self.rng.permutation(self.pool).tolist()[::-1]
        i = int(self.order.pop())
        self.drawn += 1
        return i, load_source_object(self.paths[i]), int(self.labels[i])


def default_source() -> Path:
    """``data/fmnist/train``, written from the Debian package first when absent (as ``ssl-distill demo``)."""
    train = DEFAULT_FMNIST / "train"
    if not train.is_dir():
        from .fashion_mnist import build_fashion_mnist_folders

        build_fashion_mnist_folders(DEFAULT_FMNIST)
    return train


def _is_ours(folder: Path) -> bool:
    """An existing split folder written by this generator (safe to replace)."""
    try:
        info = json.loads((folder / BOXES_FILE).read_text()).get("info", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(info, dict) and info.get("generator") == GENERATOR


def _write_split(folder: Path, scenes: list[tuple[str, Scene]], classes: Sequence[str], source_paths: Sequence[str],
                 info: dict[str, Any]) -> None:
    folder.mkdir(parents=True)
    images, annotations = [], []
    for image_id, (name, sc) in enumerate(scenes, start=1):
        Image.fromarray(sc.image).save(folder / name, compress_level=1)
        images.append({"id": image_id, "file_name": name, "width": int(sc.image.shape[1]),
                       "height": int(sc.image.shape[0])})
        for box, label, mask, src in zip(sc.boxes.tolist(), sc.labels.tolist(), sc.masks, sc.sources):
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(mask.sum()), "iscrowd": 0,
                                "source": source_paths[src]})
    data = {"info": info, "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)]}
    (folder / BOXES_FILE).write_text(json.dumps(data, indent=0))


def build_scene_benchmark(out: str | os.PathLike[str], src: str | os.PathLike[str] | None = None, *,
                          n_train: int = 2000, n_test: int = 1000, settings: SceneSettings = SceneSettings(),
                          seed: int = 0) -> dict[str, Any]:
    """Write ``out/train`` and ``out/test`` scene folders with their ``boxes.json`` (module docstring).

    Args:
        out: destination; split folders written by an earlier call are replaced, foreign ones refused.
        src: labeled folder ``<class>/<image>``; None: the Fashion-MNIST train folder (built if absent).
        n_train, n_test: scenes per split (``n_test`` may be 0).
        settings: scene size, object counts, scales, overlap rule.
        seed: everything random derives from it.

    Returns:
        summary: per split the scene, object and dropped-object counts, objects per class, sources used,
        and ``seconds`` / ``scenes_per_s``.
    """
    from .folder import scan_image_folder

    if n_train < 1 or n_test < 0:
        raise ValueError(f"need n_train >= 1 and n_test >= 0, got {n_train}, {n_test}")
    src_path = default_source() if src is None else Path(src)
    files = scan_image_folder(src_path, labeled=True)
    out_path = Path(out).expanduser().resolve()
    for split in SPLITS:
        target = out_path / split
        if target.exists() and not _is_ours(target):
            raise DataError(f"{target} exists and was not written by make-scenes; remove it or choose another OUT")
    t0 = time.perf_counter()
    backgrounds = Backgrounds() if settings.background == "natural" else None
    paths = [os.path.join(files.root, rel) for rel in files.paths]
    pools = split_sources(len(files), n_train, n_test, seed)
    counts = {"train": n_train, "test": n_test}
    out_path.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"out": str(out_path), "source": str(files.root), "classes": list(files.classes),
                               "settings": asdict(settings), "seed": seed, "splits": {}}
    n_total = 0
    for split_id, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, split_id])
        pool = _Pool(pools[split], rng, paths, files.labels)
        scenes = [(f"scene_{i:05d}.png", generate_scene(rng, settings, backgrounds, pool)) for i in range(counts[split])]
        n_total += len(scenes)
        objects = np.concatenate([sc.labels for _, sc in scenes]) if scenes else np.zeros(0, np.int64)
        used = sorted({s for _, sc in scenes for s in sc.sources})
        stats = {"scenes": len(scenes), "objects": int(objects.size),
                 "dropped": int(sum(sc.dropped for _, sc in scenes)),
                 "per_class": np.bincount(objects, minlength=len(files.classes)).tolist(),
                 "objects_per_scene": np.bincount([len(sc.labels) for _, sc in scenes],
                                                  minlength=settings.max_objects + 1).tolist(),
                 "pool": int(len(pools[split])), "sources_used": len(used), "sources_drawn": pool.drawn}
        info = {"generator": GENERATOR, "split": split, "source": str(files.root), "seed": seed,
                "settings": asdict(settings), "n_source_pool": int(len(pools[split]))}
        target = out_path / split
        with atomic_write(target) as tmp:
            _write_split(tmp, scenes, files.classes, files.paths, info)
            if target.exists():
                shutil.rmtree(target)
        summary["splits"][split] = stats
    seconds = time.perf_counter() - t0
    summary.update(seconds=seconds, scenes_per_s=n_total / max(seconds, 1e-9))
    return summary


def main(argv: list[str] | None = None) -> int:
    """``ssl-distill make-scenes`` (options in :func:`ssl_distill.cli_args.make_scenes_arguments`)."""
    import argparse

    from ..cli_args import make_scenes_arguments

    p = argparse.ArgumentParser(prog="ssl-distill make-scenes", description=__doc__.splitlines()[0])
    make_scenes_arguments(p)
    return run(p.parse_args(argv))


def run(args: Any) -> int:
    settings = SceneSettings(size=args.size, min_objects=args.min_objects, max_objects=args.max_objects,
                             min_scale=args.min_scale, max_scale=args.max_scale, max_overlap=args.max_overlap,
                             tint=args.tint, background_scale=tuple(args.background_scale),
                             background=args.background)
    summary = build_scene_benchmark(args.out, args.src, n_train=args.n_train, n_test=args.n_test,
                                    settings=settings, seed=args.seed)
    for split, st in summary["splits"].items():
        print(f"{split}: {st['scenes']} scenes, {st['objects']} objects ({st['dropped']} dropped by the overlap "
              f"rule), objects per scene {dict(enumerate(st['objects_per_scene']))}, "
              f"{st['sources_used']} of {st['pool']} source images used")
    print(f"wrote {summary['out']}/{{train,test}} (+ {BOXES_FILE}) from {summary['source']} "
          f"in {summary['seconds']:.1f} s ({summary['scenes_per_s']:.0f} scenes/s)")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
