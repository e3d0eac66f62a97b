"""Shared fixtures: a tiny labeled folder of real photos (scikit-image's sample files)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"
PHOTOS = {
    "animal": ["chelsea.png", "astronaut.png"],
    "object": ["coffee.png", "rocket.jpg", "motorcycle_left.png"],
}


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/<class>/<photo>`` with 5 real photos in 2 classes, plus one small generated image
    per class in a nested folder (``root/<class>/extra/gen.png``, 64x48)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for cls, names in PHOTOS.items():
        (root / cls / "extra").mkdir(parents=True)
        for name in names:
            shutil.copy(SKIMAGE_DATA / name, root / cls / name)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / cls / "extra" / "gen.png")
    return root
