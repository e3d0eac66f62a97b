"""Fashion-MNIST (Xiao et al. 2017) as image folders, for the CPU demo and tests.

Reads the four IDX gzip files of the Debian package ``dataset-fashion-mnist`` and writes
``out_dir/train/<class>/<idx:05d>.png`` and ``out_dir/val/<class>/<idx:05d>.png`` (28x28 grayscale;
``idx`` is the image's index in its split file; val is the official test split).

    python -m ssl_distill.data.fashion_mnist OUT_DIR [--limit-per-class N]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_distill.atomic import atomic_write
from ssl_distill.data.folder import DataError

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES: tuple[str, ...] = ("T-shirt_top", "Trouser", "Pullover", "Dress", "Coat",
                            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot")
SPLITS: dict[str, str] = {"train": "train", "val": "t10k"}  # output folder -> IDX file prefix
MARKER = "fashion_mnist.json"
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049
_PNG_NAME = re.compile(r"^\d{5}\.png$")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Decode one gzip IDX file (big-endian header: magic, then one uint32 per dimension)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"Cannot read Fashion-MNIST file {path}: {err}") from err
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(f"{path} is not an IDX file of the expected kind (magic {found}, expected {magic}).")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"{path}: header says {dims} ({expected} bytes) but {len(raw) - offset} bytes follow.")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist_arrays(source_dir: str | os.PathLike[str] = DEFAULT_SOURCE,
                              split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one split.

    Args:
        source_dir: folder with the four ``*-idx?-ubyte.gz`` files.
        split: ``"train"`` (60000) or ``"val"`` / ``"test"`` (the 10000 t10k images).

    Returns:
        (uint8 array (N, 28, 28), int64 labels (N,)).

    Raises:
        DataError: missing files (with the apt command that installs them) or malformed files.
    """
    prefix = {"train": "train", "val": "t10k", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'val' (or 'test'), got {split!r}")
    src = Path(source_dir)
    images_path = src / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = src / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
                        f"`apt-get install -y dataset-fashion-mnist` (files go to {DEFAULT_SOURCE}) "
                        "or pass the folder holding the four *-ubyte.gz files.")
    images = _read_idx(images_path, _IMAGE_MAGIC)
    labels = _read_idx(labels_path, _LABEL_MAGIC).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match.")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"Fashion-MNIST {split}: labels outside 0..{len(CLASSES) - 1}.")
    return images, labels


def _selection(labels: np.ndarray, limit_per_class: int | None) -> np.ndarray:
    """Indices kept: all, or the first ``limit_per_class`` of each class (in file order)."""
    if limit_per_class is None:
        return np.arange(len(labels))
    keep = [np.flatnonzero(labels == c)[:limit_per_class] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(keep))


def _is_our_split_dir(path: Path) -> bool:
    """True when ``path`` only holds class folders of ours with NNNNN.png files (safe to delete)."""
    for entry in path.iterdir():
        if not entry.is_dir() or entry.name not in CLASSES:
            return False
        if any(not f.is_file() or not _PNG_NAME.match(f.name) for f in entry.iterdir()):
            return False
    return True


def _write_split(out: Path, images: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> None:
    for name in CLASSES:
        (out / name).mkdir(parents=True, exist_ok=True)
    for i in keep.tolist():
        Image.fromarray(images[i], mode="L").save(out / CLASSES[labels[i]] / f"{i:05d}.png", compress_level=1)


def _marker_matches(out_dir: Path, limit_per_class: int | None) -> bool:
    """The marker exists for this request and every class folder holds the recorded count."""
    try:
        found = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(found, dict) or found.get("classes") != list(CLASSES):
        return False
    if found.get("limit_per_class") != limit_per_class or set(found.get("splits", {})) != set(SPLITS):
        return False
    for split, info in found["splits"].items():
        counts = [len(os.listdir(out_dir / split / c)) if (out_dir / split / c).is_dir() else -1 for c in CLASSES]
        if counts != info["per_class"]:
            return False
    return True


def build_fashion_mnist_folders(out_dir: str | os.PathLike[str], source_dir: str | os.PathLike[str] = DEFAULT_SOURCE,
                                limit_per_class: int | None = None) -> Path:
    """Write Fashion-MNIST as labeled PNG folders (see module docstring); idempotent.

    A marker file ``out_dir/fashion_mnist.json`` records the per-class counts; when it matches the
    request and the folders hold those counts, nothing is done. Otherwise split folders written by
    an earlier call are replaced (folders with foreign content are never deleted: DataError).

    Args:
        out_dir: destination (created).
        source_dir: folder with the four IDX gzip files.
        limit_per_class: keep only the first N images of each class per split (None: all).

    Returns:
        ``out_dir`` as an absolute Path.
    """
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"limit_per_class must be >= 1 or None, got {limit_per_class}")
    out = Path(out_dir).expanduser().resolve()
    if _marker_matches(out, limit_per_class):
        return out
    data = {split: load_fashion_mnist_arrays(source_dir, split) for split in SPLITS}
    keeps = {split: _selection(labels, limit_per_class) for split, (_, labels) in data.items()}
    expected = {
        "dataset": "fashion-mnist",
        "classes": list(CLASSES),
        "limit_per_class": limit_per_class,
        "splits": {split: {"count": int(len(keep)),
                           "per_class": np.bincount(data[split][1][keep], minlength=len(CLASSES)).tolist()}
                   for split, keep in keeps.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    for split, (images, labels) in data.items():
        target = out / split
        if target.exists():
            if not target.is_dir() or not _is_our_split_dir(target):
                raise DataError(f"{target} exists and holds files not written by build_fashion_mnist_folders; "
                                "remove it or choose another output folder.")
            shutil.rmtree(target)
        with atomic_write(target) as tmp:
            _write_split(tmp, images, labels, keeps[split])
    with atomic_write(out / MARKER) as tmp:
        tmp.write_text(json.dumps(expected, indent=1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_distill.data.fashion_mnist",
                                     description="Write Fashion-MNIST as train/ and val/ image folders.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--source-dir", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--limit-per-class", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        out = build_fashion_mnist_folders(args.out_dir, args.source_dir, args.limit_per_class)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    info = json.loads((out / MARKER).read_text())
    counts = ", ".join(f"{s}: {v['count']}" for s, v in info["splits"].items())
    print(f"Fashion-MNIST folders in {out} ({counts})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
