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
    on a terminal); an unreadable file gets a warning on stderr and is skipped."""
    from ssl_distill.data.folder import _DECODE_ERRORS, load_rgb

    bar = tqdm(paths, desc=desc, unit="img", disable=(not sys.stderr.isatty()) if progress is None else not progress)
    for i, path in enumerate(bar):
        try:
            img = load_rgb(path)
        except _DECODE_ERRORS as e:
            print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr)
            continue
        yield i, img


def shrink(img: Image.Image, max_side: int | None) -> Image.Image:
    """``img`` in RGB, resized (bicubic, aspect kept) so that its longer side is at most ``max_side`` (None:
    as it is)."""
    img = img.convert("RGB")
    if max_side is not None and max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BICUBIC)
    return img
