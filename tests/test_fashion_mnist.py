"""Fashion-MNIST IDX reading and the image-folder export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_distill.data.fashion_mnist import (
    CLASSES,
    DEFAULT_SOURCE,
    MARKER,
    build_fashion_mnist_folders,
    load_fashion_mnist_arrays,
    main,
)
from ssl_distill.data.folder import DataError, scan_image_folder

pytestmark = pytest.mark.skipif(not (DEFAULT_SOURCE / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="needs `apt-get install -y dataset-fashion-mnist`")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fashion_mnist_folders(tmp_path_factory.mktemp("fm") / "out", limit_per_class=5)


def test_arrays() -> None:
    images, labels = load_fashion_mnist_arrays(DEFAULT_SOURCE, "val")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10
    with pytest.raises(ValueError):
        load_fashion_mnist_arrays(DEFAULT_SOURCE, "dev")


def test_build_counts_names_sizes(built: Path) -> None:
    info = json.loads((built / MARKER).read_text())
    assert info["splits"]["train"]["count"] == info["splits"]["val"]["count"] == 50
    for split in ("train", "val"):
        assert sorted(p.name for p in (built / split).iterdir()) == sorted(CLASSES)
        for cls in CLASSES:
            pngs = sorted((built / split / cls).iterdir())
            assert len(pngs) == 5 and all(p.suffix == ".png" and len(p.stem) == 5 for p in pngs)
        with Image.open(next((built / split / "Bag").iterdir())) as img:
            assert img.size == (28, 28) and img.mode == "L"
    files = scan_image_folder(built / "train", labeled=True)
    assert files.classes == sorted(CLASSES) and len(files) == 50


@pytest.mark.parametrize("split", ["train", "val"])
def test_pngs_match_arrays(built: Path, split: str) -> None:
    images, labels = load_fashion_mnist_arrays(DEFAULT_SOURCE, split)
    for cls_index, cls in enumerate(CLASSES):
        first5 = np.flatnonzero(labels == cls_index)[:5]
        pngs = sorted((built / split / cls).iterdir())
        assert [int(p.stem) for p in pngs] == first5.tolist()
        for p in pngs:
            assert np.array_equal(np.asarray(Image.open(p)), images[int(p.stem)])


def test_idempotent_and_rebuilds_on_new_limit(tmp_path: Path) -> None:
    out = build_fashion_mnist_folders(tmp_path / "fm", limit_per_class=2)
    marker = out / MARKER
    stamp = marker.stat().st_mtime_ns
    some_png = next((out / "train" / "Coat").iterdir())
    png_stamp = some_png.stat().st_mtime_ns
    assert build_fashion_mnist_folders(tmp_path / "fm", limit_per_class=2) == out
    assert marker.stat().st_mtime_ns == stamp and some_png.stat().st_mtime_ns == png_stamp  # nothing rewritten

    build_fashion_mnist_folders(tmp_path / "fm", limit_per_class=3)  # different request: replaced
    assert len(list((out / "val" / "Coat").iterdir())) == 3
    assert json.loads(marker.read_text())["limit_per_class"] == 3

    next((out / "val" / "Coat").iterdir()).unlink()  # incomplete output: rebuilt
    build_fashion_mnist_folders(tmp_path / "fm", limit_per_class=3)
    assert len(list((out / "val" / "Coat").iterdir())) == 3


def test_foreign_content_is_not_deleted(tmp_path: Path) -> None:
    (tmp_path / "train" / "mine").mkdir(parents=True)
    (tmp_path / "train" / "mine" / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not written by"):
        build_fashion_mnist_folders(tmp_path, limit_per_class=1)
    assert (tmp_path / "train" / "mine" / "keep.txt").read_text() == "precious"


def test_missing_source_explains_apt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        build_fashion_mnist_folders(tmp_path / "out", source_dir=tmp_path / "nothing")


def test_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "m"), "--limit-per-class", "1"]) == 0
    assert "train: 10, val: 10" in capsys.readouterr().out
    assert main([str(tmp_path / "m2"), "--source-dir", str(tmp_path / "none")]) == 1
    assert "apt-get" in capsys.readouterr().err
