"""Image folders (labeled or not), robust RGB loading, and a dataset that survives corrupt files.

Layouts
-------
- labeled:   ``root/<class>/**/<image>``; class index = position of the class folder name in the
  sorted list of first-level folders (like torchvision's ``ImageFolder``).
- unlabeled: every image anywhere below ``root``; labels are ``-1``.

Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.jpg`` resource forks) are
skipped. Symlinked folders are followed.

Corrupt files
-------------
``ImageFolderDataset`` never silently loads truncated images: an unreadable file is reported with
a :class:`BadImageWarning` naming it, the next readable file is used instead and the sample's
``"bad"`` field counts the files skipped. :class:`BadImageCounter` turns a high rate of such
substitutions into a :class:`DataError`.
"""
from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch.utils.data
from PIL import Image

from ..atomic import atomic_write
from ..errors import DataError  # defined without torch, for the command line; re-exported here

if TYPE_CHECKING:
    from .boxes import BoxesFile

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_CACHE_VERSION = 2  # 2: symbolic links followed without repeats
# Consecutive unreadable files tolerated while looking for a substitute before giving up.
MAX_CONSECUTIVE_BAD = 50
# Errors that mean "this file is not a readable image" (as opposed to a bug in our code).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # PIL raises it for some broken PNG/GIF headers
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


class BadImageWarning(UserWarning):
    """An image file could not be decoded and another file was substituted."""


def _extensions_text() -> str:
    return ", ".join(IMAGE_EXTENSIONS) + " (case-insensitive)"


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name ending with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class FileList:
    """The images of one folder.

    Attributes:
        root: absolute folder the paths are relative to.
        paths: image paths relative to ``root``, posix separators, sorted.
        labels: class index per path (same length), ``-1`` when unlabeled.
        classes: class names (index -> name); empty when unlabeled.
    """

    root: Path
    paths: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def abspath(self, i: int) -> Path:
        """Absolute path of image ``i``."""
        return self.root / self.paths[i]

    def to_json(self, labeled: bool) -> dict[str, Any]:
        return {
            "version": _CACHE_VERSION,
            "root": str(self.root),
            "labeled": labeled,
            "paths": self.paths,
            "labels": self.labels,
            "classes": self.classes,
        }


def _inode(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of what ``path`` points to, following links; None if it does not resolve."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _walk_images(folder: Path, relative_to: Path, seen: set[tuple[int, int]] | None = None) -> list[str]:
    """Relative posix paths of all images below ``folder`` (any depth, hidden entries skipped).

    Symbolic links are followed, and each real directory and file is listed once, under the first
    path that reaches it in sorted order: a link loop, or two links to one folder, cannot repeat
    images. ``seen`` ((device, inode) pairs, see :func:`_inode`) carries that across calls; a
    folder in it is not entered through links, but ``folder`` itself is always walked (class folders).
    """
    seen = set() if seen is None else seen
    found: list[str] = []

    def first_visit(path: str) -> bool:
        key = _inode(path)
        if key is None or key in seen:  # None: a dangling link, nothing to list
            return False
        seen.add(key)
        return True

    first_visit(str(folder))
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".") and first_visit(os.path.join(dirpath, d))]
        base = Path(dirpath)
        for name in sorted(filenames):
            if is_image_file(name) and first_visit(os.path.join(dirpath, name)):
                found.append((base / name).relative_to(relative_to).as_posix())
    return found


def _scan(root: Path, labeled: bool) -> FileList:
    if not root.exists():
        raise DataError(f"Image folder {root} does not exist (expected images with extensions {_extensions_text()}).")
    if not root.is_dir():
        raise DataError(f"Image folder {root} is not a directory (expected images with extensions {_extensions_text()}).")
    if not labeled:
        paths = sorted(_walk_images(root, root))
        if not paths:
            raise DataError(f"No images found under {root} (searched all subfolders; accepted extensions: {_extensions_text()}).")
        return FileList(root=root, paths=paths, labels=[-1] * len(paths), classes=[])

    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    loose = [e.name for e in os.scandir(root) if e.is_file() and is_image_file(e.name)]
    pairs: list[tuple[str, int]] = []
    empty: list[str] = []
    # every class folder (and the root) belongs to itself: links into them from elsewhere add nothing
    seen = {key for key in map(_inode, [root, *(root / name for name in classes)]) if key is not None}
    for index, name in enumerate(classes):
        found = _walk_images(root / name, root, seen)
        if not found:
            empty.append(name)
        pairs.extend((p, index) for p in found)
    if not pairs:
        if loose:
            detail = (f"found {len(loose)} images directly in it but no class subfolders; arrange them as "
                      f"{root}/<class>/<image> or scan it as unlabeled")
        elif classes:
            detail = f"its {len(classes)} class subfolders contain no images"
        else:
            detail = "it has no class subfolders and no images"
        raise DataError(f"No labeled images found under {root}: {detail} (accepted extensions: {_extensions_text()}).")
    if loose:
        warnings.warn(f"{len(loose)} images directly in labeled folder {root} are ignored (not in a class subfolder).",
                      stacklevel=3)
    if empty:
        warnings.warn(f"Class folders without images under {root} (kept as classes so indices stay stable): "
                      f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}", stacklevel=3)
    pairs.sort()
    return FileList(root=root, paths=[p for p, _ in pairs], labels=[lab for _, lab in pairs], classes=classes)


def _read_cache(cache_file: Path, root: Path, labeled: bool) -> FileList | None:
    try:
        data = json.loads(cache_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        warnings.warn(f"Ignoring unreadable file-list cache {cache_file}: {err}", stacklevel=3)
        return None
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
        return None
    if data.get("root") != str(root) or data.get("labeled") != labeled:
        return None
    paths, labels, classes = data.get("paths"), data.get("labels"), data.get("classes")
    if not (isinstance(paths, list) and isinstance(labels, list) and isinstance(classes, list)) or len(paths) != len(labels):
        return None
    return FileList(root=root, paths=paths, labels=labels, classes=classes)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data))


def scan_image_folder(root: str | os.PathLike[str], labeled: bool, cache_file: Path | None = None) -> FileList:
    """List the images of a folder (see module docstring for the layouts).

    Args:
        root: the folder.
        labeled: class subfolders (True) or any images at any depth (False).
        cache_file: optional JSON file: re-used when it was written for the same absolute root and
            mode, otherwise (re)written atomically after the scan.

    Raises:
        DataError: missing folder, not a directory, or no images (message names the absolute path
            and the accepted extensions).
    """
    root_abs = Path(root).expanduser().resolve()
    if cache_file is not None:
        cached = _read_cache(Path(cache_file), root_abs, labeled)
        if cached is not None and root_abs.is_dir():
            return cached
    files = _scan(root_abs, labeled)
    if cache_file is not None:
        _write_json_atomic(Path(cache_file), files.to_json(labeled))
    return files


def require_folder(path: str | os.PathLike[str], named: str, fix: str) -> None:
    """DataError when ``path`` is not an existing folder, its message starting with ``named`` (the key or option
    that gave it: ``"knn.train_dir=data/train (from the run's config)"``) and ending with ``fix``."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        where = "" if folder.resolve() == Path(path) else f"{folder.resolve()} "
        raise DataError(f"{named}: {where}{'is not a folder' if folder.exists() else 'does not exist'}; {fix}")


def _to_uint8_gray(img: Image.Image) -> Image.Image:
    """High-bit-depth / float single-channel modes (I;16*, I, F) -> 8-bit L.

    16-bit ranges are scaled (65535 -> 255); other integer or float data is scaled by its own
    min/max unless it already lies in [0, 255] (integers) or [0, 1] (floats).
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    elif img.mode == "F" and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr = arr * 255.0
    elif arr.size and (arr.min() < 0.0 or arr.max() > 255.0):
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB.

    Transparent images (RGBA, LA, La, RGBa, PA, P or L/RGB with a ``transparency`` entry) are
    composited onto a WHITE background (torchvision's plain ``convert("RGB")`` would expose
    whatever colour the transparent pixels happen to store, often black). 16-bit and float
    grayscale is rescaled to 8 bits (see :func:`_to_uint8_gray`). CMYK, YCbCr, 1, L, P... use PIL's
    own conversion.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _to_uint8_gray(img).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Open, fully decode and convert an image to RGB (see :func:`to_rgb` for the conversions).

    Truncated files raise (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left untouched). Multi-frame
    files give their first frame. EXIF orientation is not applied (as in torchvision/DINO).

    Raises:
        OSError, SyntaxError, ValueError...: whatever PIL raises for an unreadable file.
    """
    with Image.open(path) as img:
        img.load()
        rgb = to_rgb(img)
        if rgb is img:
            rgb = img.copy()
    return rgb


def _unreadable(path: str | os.PathLike[str], err: BaseException, hint: str) -> DataError:
    return DataError(f"unreadable image {path} ({type(err).__name__}: {err}){'; ' + hint if hint else ''}")


def decoded_image(path: str | os.PathLike[str], hint: str = "", mode: str = "RGB") -> Image.Image:
    """The image at ``path``, fully decoded, converted to ``mode`` (PIL's ``convert``); an unreadable file raises
    a :class:`DataError` naming it, followed by ``hint`` (what the user can do), instead of PIL's exception."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except _DECODE_ERRORS as err:
        raise _unreadable(path, err, hint) from err


def image_size(path: str | os.PathLike[str], hint: str = "") -> tuple[int, int]:
    """(width, height) of the image at ``path`` from its header; an unreadable file raises as
    :func:`decoded_image` does."""
    try:
        with Image.open(path) as img:
            return img.size
    except _DECODE_ERRORS as err:
        raise _unreadable(path, err, hint) from err


class DecodedImages:
    """Decoded RGB images kept in memory, first come first kept, until ``budget_bytes`` are held (no eviction).

    A small folder (Fashion-MNIST's 60,000 images: 141 MB as RGB) is then read and decoded once per run instead
    of once per epoch: on the demo that was an eighth of a batch's preparation (issue 28's profile). A large
    folder keeps a fixed part and costs at most the budget. Each process (a DataLoader worker) holds its own.
    The pixels returned are the decoded ones, byte for byte; an unreadable file is never kept.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = int(budget_bytes)
        self.held = 0
        self._images: dict[int, tuple[tuple[int, int], bytes]] = {}

    def __len__(self) -> int:
        return len(self._images)

    def get(self, index: int) -> Image.Image | None:
        """The image of file ``index`` (read-only pixels; PIL copies before any in-place edit), or None."""
        kept = self._images.get(index)
        if kept is None:
            return None
        return Image.frombuffer("RGB", kept[0], kept[1], "raw", "RGB", 0, 1)

    def put(self, index: int, img: Image.Image) -> None:
        """Keep RGB ``img`` as file ``index``'s pixels if the budget allows."""
        size = img.width * img.height * 3
        if index not in self._images and self.held + size <= self.budget:
            self._images[index] = (img.size, img.tobytes())
            self.held += size


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images of a :class:`FileList`, with per-sample seeds and corrupt-file substitution.

    ``dataset[item]`` with ``item`` an ``int`` index, an ``(index, seed)`` or an ``(index, seed,
    epoch)`` tuple (as yielded by :class:`ssl_distill.data.sampler.EpochSampler`; a bare int uses
    ``seed = index``) returns::

        {"image": transform(img, seed) (or the PIL image when transform is None),
         "label": int   # label of the file actually returned (a substitute's label if substituted)
         "index": int   # the requested index
         "bad":   int   # unreadable files skipped for this sample (0 normally)
         "seed":  int   # the seed given to the transform (the batched collate needs it)
         "epoch": int}  # only when the item carries one (the batch masks need it)

    An item that carries its epoch gives it to the transform too, ``transform(img, seed, epoch=epoch)`` (the
    training transforms render the Gram-teacher crops from a given epoch on).

    With ``boxes`` (a :class:`~ssl_distill.data.boxes.BoxesFile` of this folder) the transform is
    called as ``transform(img, seed, boxes_xyxy)`` with the boxes of the file actually returned,
    and must return a dict with ``"image"`` and any further keys, which join the sample (e.g.
    :class:`~ssl_distill.data.object_crops.ObjectMultiCropTransform`'s ``"obj_masks"``, ``"obj_valid"``).
    ``cache_bytes`` > 0 keeps decoded images in memory up to that size (:class:`DecodedImages`).
    """

    def __init__(self, files: FileList, transform: Callable[..., Any] | None, boxes: BoxesFile | None = None,
                 cache_bytes: int = 0) -> None:
        if len(files) == 0:
            raise DataError(f"Empty file list for {files.root}.")
        if boxes is not None and transform is None:
            raise ValueError("ImageFolderDataset with boxes needs a transform that takes them")
        self.files = files
        self.transform = transform
        self.boxes = boxes  # its .report holds the boxes file's counts for the log
        self.decoded = DecodedImages(cache_bytes) if cache_bytes > 0 else None

    @property
    def classes(self) -> list[str]:
        return self.files.classes

    def __len__(self) -> int:
        return len(self.files)

    def _load_with_fallback(self, index: int) -> tuple[Image.Image, int, int]:
        """(image, index of the file used, 1 when file ``index`` was unreadable and another one substituted, else
        0: one count per substituted sample, however many unreadable files follow it)."""
        n = len(self.files)
        attempts = min(n, MAX_CONSECUTIVE_BAD)
        for bad in range(attempts):
            current = (index + bad) % n
            if self.decoded is not None and (kept := self.decoded.get(current)) is not None:
                return kept, current, min(bad, 1)
            path = self.files.abspath(current)
            try:
                img = load_rgb(path)
                if self.decoded is not None:
                    self.decoded.put(current, img)
                return img, current, min(bad, 1)
            except _DECODE_ERRORS as err:
                warnings.warn(f"Unreadable image {path}: {type(err).__name__}: {err}; "
                              f"substituting the next file (index {(current + 1) % n}).", BadImageWarning, stacklevel=2)
        raise DataError(f"{attempts} consecutive unreadable images starting at {self.files.abspath(index)} "
                        f"(folder {self.files.root}); the data looks broken.")

    def __getitem__(self, item: int | tuple[int, int] | tuple[int, int, int]) -> dict[str, Any]:
        if isinstance(item, tuple):
            index, seed = int(item[0]), int(item[1])
        else:
            index = int(item)
            seed = index
        if not 0 <= index < len(self.files):
            raise IndexError(f"index {index} out of range for {len(self.files)} images")
        img, used, bad = self._load_with_fallback(index)
        epoch = int(item[2]) if isinstance(item, tuple) and len(item) > 2 else None
        when = {} if epoch is None else {"epoch": epoch}  # the training transforms' Gram crops depend on it
        extra: dict[str, Any] = {}
        if self.boxes is not None:
            extra = dict(self.transform(img, seed, self.boxes.boxes_for(self.files.paths[used])[0], **when))
            image = extra.pop("image")
        else:
            image = self.transform(img, seed, **when) if self.transform is not None else img
        return {"image": image, "label": int(self.files.labels[used]), "index": index, "bad": bad, "seed": seed,
                **extra, **when}


#: what :class:`BadImageCounter` tells a training run to do about its unreadable images
TRAINING_ADVICE = ("replace or repair them (the run keeps its file list, so deleting one does not help) or raise "
                   "data.max_bad_fraction, then run the same command to resume from the last checkpoint.")
#: the same for an evaluation, which scans its folders afresh
EVAL_ADVICE = "replace, repair or delete them, then run the same command again."


class BadImageCounter:
    """Counts substituted (unreadable) images and fails when there are too many.

    Call :meth:`update` with each batch's ``bad`` sum and batch size; it raises once at least
    ``min_seen`` samples were seen and ``bad / seen > max_bad_fraction``. :meth:`finalize` applies
    the same check whatever the count (end of an epoch or of an evaluation pass).
    """

    def __init__(self, max_bad_fraction: float = 0.01, min_seen: int = 100, advice: str = TRAINING_ADVICE) -> None:
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen
        self.advice = advice
        self.bad = 0
        self.seen = 0

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def _check(self) -> None:
        if self.seen and self.fraction > self.max_bad_fraction:
            raise DataError(f"{self.bad} of {self.seen} images were unreadable and substituted "
                            f"({self.fraction:.2%} > threshold {self.max_bad_fraction:.2%}); "
                            f"the BadImageWarning messages name the files: {self.advice}")

    def update(self, n_bad: int, n_seen: int) -> None:
        self.bad += int(n_bad)
        self.seen += int(n_seen)
        if self.seen >= self.min_seen:
            self._check()

    def finalize(self) -> None:
        self._check()
