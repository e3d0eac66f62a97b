"""Images as ``discover`` and ``visualize`` read them: files under a progress bar, unreadable ones reported and
skipped, and the optional shrink to a longest side.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image
from tqdm import tqdm

__all__ = ["readable_images", "shrink"]


def readable_images(paths: Sequence[Path], desc: str,
                    progress: bool | None = None) -> Iterator[tuple[int, Image.Image]]:
    """(index into ``paths``, RGB image) of every readable file, under a progress bar (``progress`` None: shown
    on a terminal); an unreadable file gets a warning on stderr and is skipped.

    When not one of ``paths`` could be read, the iteration ends in a :class:`DataError` instead: the caller
    writes its outputs after the last image, so a folder of broken files leaves no empty result behind (and
    none in place of an earlier one).
    """
    from ssl_distill.data.folder import _DECODE_ERRORS, DataError, load_rgb

    bar = tqdm(paths, desc=desc, unit="img", disable=(not sys.stderr.isatty()) if progress is None else not progress)
    first_error = None
    read = 0
    for i, path in enumerate(bar):
        try:
            img = load_rgb(path)
        except _DECODE_ERRORS as e:
            print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr)
            first_error = first_error or f"{path}: {e}"
            continue
        read += 1
        yield i, img
    if paths and not read:
        raise DataError(f"none of the {len(paths)} image(s) could be read (the first: {first_error}); "
                        "nothing was written")


def shrink(img: Image.Image, max_side: int | None) -> Image.Image:
    """``img`` in RGB, resized (bicubic, aspect kept) so that its longer side is at most ``max_side`` (None:
    as it is)."""
    img = img.convert("RGB")
    if max_side is not None and max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BICUBIC)
    return img
