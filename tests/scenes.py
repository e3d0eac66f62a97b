"""Synthetic object-discovery datasets with known boxes, in Pascal VOC and COCO layouts.

A scene is a real texture from scikit-image's sample data (``brick.png``, ``grass.png``,
``gravel.png``), tinted, with one or more objects pasted on it: an ellipse, rectangle or triangle
filled with a crop of a colour photo (``chelsea.png``, ``coffee.png``, ``astronaut.png``...) or of
another tinted texture. Each object's box is the tight box of its pixel mask.

Box convention here (and in ``ssl_distill.eval.corloc``): ``[x0, y0, x1, y1]`` in pixel-edge
coordinates (a box covering pixel columns 3..9 has ``x0 = 3, x1 = 10``). VOC files store 1-based
inclusive pixel indices (``xmin = x0 + 1, xmax = x1``); COCO stores ``[x0, y0, x1 - x0, y1 - y0]``.

Used by tests/test_corloc.py, tests/test_discover.py and benchmarks/bench_ncut.py (which imports
this file by path).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image

SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"
TEXTURES = ("brick.png", "grass.png", "gravel.png")
PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "ihc.png", "motorcycle_left.png")
SHAPES = ("ellipse", "rectangle", "triangle")


@dataclass
class Scene:
    """One generated image and its objects."""

    image: np.ndarray  # (H, W, 3) uint8
    boxes: np.ndarray  # (K, 4) int64, [x0, y0, x1, y1] pixel edges
    masks: np.ndarray  # (K, H, W) bool, visible pixels of each object
    name: str = ""


@functools.lru_cache(maxsize=None)
def _load(name: str) -> np.ndarray:
    """A scikit-image sample as float32 in [0, 1], (H, W) for gray, (H, W, 3) for colour."""
    img = Image.open(SKIMAGE_DATA / name)
    img = img.convert("L") if img.mode in ("L", "I", "I;16") else img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


def _crop(src: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random (h, w) crop of ``src``, resized up first when ``src`` is too small."""
    sh, sw = src.shape[:2]
    if sh < h or sw < w:
        f = max(h / sh, w / sw) * 1.01
        mode = "L" if src.ndim == 2 else "RGB"
        pil = Image.fromarray((src * 255).astype(np.uint8), mode=mode)
        pil = pil.resize((int(np.ceil(sw * f)), int(np.ceil(sh * f))), Image.BILINEAR)
        src = np.asarray(pil, dtype=np.float32) / 255.0
        sh, sw = src.shape[:2]
    y = int(rng.integers(0, sh - h + 1))
    x = int(rng.integers(0, sw - w + 1))
    return src[y : y + h, x : x + w]


def _tinted_texture(h: int, w: int, rng: np.random.Generator, exclude: str | None = None) -> tuple[np.ndarray, str]:
    names = [t for t in TEXTURES if t != exclude]
    name = names[int(rng.integers(len(names)))]
    gray = _crop(_load(name), h, w, rng)
    tint = rng.uniform(0.25, 1.0, size=3).astype(np.float32)
    return np.clip(gray[..., None] * tint * 1.2, 0, 1), name


def _shape_mask(shape: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if shape == "ellipse":
        cy, cx = (h - 1) / 2, (w - 1) / 2
        return ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1.0
    if shape == "rectangle":
        return np.ones((h, w), dtype=bool)
    # triangle: apex at a random top position, base on the bottom row
    apex = rng.uniform(0.2, 0.8) * (w - 1)
    t = yy / max(h - 1, 1)
    left = apex * (1 - t)
    right = apex + (w - 1 - apex) * t
    return (xx >= left - 0.5) & (xx <= right + 0.5)


def make_scene(rng: np.random.Generator, height: int, width: int, n_objects: int = 1,
               min_frac: float = 0.25, max_frac: float = 0.55) -> Scene:
    """One scene of ``height`` x ``width`` with ``n_objects`` objects (side = min_frac..max_frac of the image).

    Objects are placed without overlapping when possible (50 tries each), so every box is fully visible.
    """
    bg, bg_name = _tinted_texture(height, width, rng)
    img = bg.copy()
    occupied = np.zeros((height, width), dtype=bool)
    boxes, masks = [], []
    for _ in range(n_objects):
        for _try in range(50):
            oh = int(rng.uniform(min_frac, max_frac) * height)
            ow = int(rng.uniform(min_frac, max_frac) * width)
            oh, ow = max(oh, 4), max(ow, 4)
            y0 = int(rng.integers(0, height - oh + 1))
            x0 = int(rng.integers(0, width - ow + 1))
            if not occupied[y0 : y0 + oh, x0 : x0 + ow].any():
                break
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        local = _shape_mask(shape, oh, ow, rng)
        if rng.random() < 0.6:
            fill = _crop(_load(PHOTOS[int(rng.integers(len(PHOTOS)))]), oh, ow, rng)
        else:
            fill, _ = _tinted_texture(oh, ow, rng, exclude=bg_name)
        region = img[y0 : y0 + oh, x0 : x0 + ow]
        region[local] = fill[local]
        mask = np.zeros((height, width), dtype=bool)
        mask[y0 : y0 + oh, x0 : x0 + ow] = local
        occupied |= mask
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        masks.append(mask)
    image = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return Scene(image=image, boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
                 masks=np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool))


def make_scenes(n: int, seed: int = 0, size: int | tuple[int, int] = (96, 160),
                max_objects: int = 1) -> list[Scene]:
    """``n`` scenes named ``scene_0000``...; ``size`` is a fixed side (square images) or a (min, max)
    range for each side independently; each scene has 1..``max_objects`` objects."""
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(n):
        if isinstance(size, int):
            h = w = size
        else:
            h, w = (int(rng.integers(size[0], size[1] + 1)) for _ in range(2))
        k = int(rng.integers(1, max_objects + 1))
        scene = make_scene(rng, h, w, k)
        scene.name = f"scene_{i:04d}"
        scenes.append(scene)
    return scenes


def write_voc(root: str | Path, scenes: list[Scene], split: str = "trainval", ext: str = ".jpg") -> Path:
    """Pascal VOC layout: ``JPEGImages/<name><ext>``, ``Annotations/<name>.xml``, ``ImageSets/Main/<split>.txt``."""
    root = Path(root)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for s in scenes:
        Image.fromarray(s.image).save(root / "JPEGImages" / f"{s.name}{ext}", quality=95)
        ann = ET.Element("annotation")
        ET.SubElement(ann, "folder").text = "VOC"
        ET.SubElement(ann, "filename").text = f"{s.name}{ext}"
        size = ET.SubElement(ann, "size")
        ET.SubElement(size, "width").text = str(s.image.shape[1])
        ET.SubElement(size, "height").text = str(s.image.shape[0])
        ET.SubElement(size, "depth").text = "3"
        for x0, y0, x1, y1 in s.boxes.tolist():
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = "thing"
            ET.SubElement(obj, "pose").text = "Unspecified"
            ET.SubElement(obj, "truncated").text = "0"
            ET.SubElement(obj, "difficult").text = "0"
            bb = ET.SubElement(obj, "bndbox")
            for key, val in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
                ET.SubElement(bb, key).text = str(val)
        ET.ElementTree(ann).write(root / "Annotations" / f"{s.name}.xml")
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{s.name}\n" for s in scenes))
    return root


def write_coco(root: str | Path, scenes: list[Scene], subdir: str = "images") -> tuple[Path, Path]:
    """COCO layout: images in ``root/<subdir>/`` (file_name relative to it), boxes in ``root/annotations.json``.

    Returns (image folder, JSON path).
    """
    root = Path(root)
    image_dir = root / subdir
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, s in enumerate(scenes):
        file_name = f"{s.name}.png"
        Image.fromarray(s.image).save(image_dir / file_name)
        images.append({"id": i + 1, "file_name": file_name, "height": int(s.image.shape[0]), "width": int(s.image.shape[1])})
        for x0, y0, x1, y1 in s.boxes.tolist():
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    data = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    path = root / "annotations.json"
    path.write_text(json.dumps(data))
    return image_dir, path


def tiny_checkpoint(path: str | Path, arch: str = "vit_tiny", depth: int = 2, patch_size: int = 8,
                    seed: int = 0) -> Path:
    """A randomly initialised backbone saved in our checkpoint format (what ``load_backbone`` reads):
    ``format``, ``config`` and ``teacher`` / ``student`` state dicts with the ``backbone.`` prefix."""
    import torch

    from ssl_distill.checkpoints import FORMAT, atomic_save
    from ssl_distill.config import config_to_dict, load_config
    from ssl_distill.models import ViTBackbone, spec_from_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "dino_tiny_fmnist.yaml",
                      [f"model.arch={arch}", f"model.depth={depth}", f"model.patch_size={patch_size}",
                       f"model.img_size={4 * patch_size}", f"data.crops.global_size={4 * patch_size}",
                       f"data.crops.local_size={2 * patch_size}", f"run.seed={seed}"])
    torch.manual_seed(seed)
    state = {f"backbone.{k}": v for k, v in ViTBackbone(spec_from_config(cfg)).state_dict().items()}
    atomic_save({"format": FORMAT, "config": config_to_dict(cfg), "teacher": state, "student": state}, path)
    return Path(path)
