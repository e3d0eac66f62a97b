"""Image folder scanning, RGB loading, corrupt-file substitution, bad-image accounting."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_distill.data import folder as folder_module
from ssl_distill.data.folder import (
    IMAGE_EXTENSIONS,
    BadImageCounter,
    BadImageWarning,
    DataError,
    ImageFolderDataset,
    load_rgb,
    scan_image_folder,
)


def _png_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes | None = None, color: tuple[int, int, int] = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(color=color) if data is None else data)
    return path


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    root = tmp_path / "messy"
    _write(root / "cat" / "a.JPG")
    _write(root / "cat" / "sub" / "deep" / "b.Png")
    _write(root / "dog" / "c.webp")
    _write(root / "dog" / "d.TIFF")
    _write(root / "dog" / "notes.txt", b"not an image")
    _write(root / "dog" / ".hidden.jpg")
    _write(root / ".cache" / "e.jpg")
    _write(root / "empty_class" / "readme.md", b"nothing")
    return root


def test_scan_labeled_nested_case_insensitive(messy: Path) -> None:
    with pytest.warns(UserWarning, match="empty_class"):
        files = scan_image_folder(messy, labeled=True)
    assert files.root == messy.resolve()
    assert files.classes == ["cat", "dog", "empty_class"]
    assert files.paths == ["cat/a.JPG", "cat/sub/deep/b.Png", "dog/c.webp", "dog/d.TIFF"]
    assert files.labels == [0, 0, 1, 1]
    assert files.abspath(1) == messy.resolve() / "cat" / "sub" / "deep" / "b.Png"


def test_scan_unlabeled_any_depth(messy: Path) -> None:
    _write(messy / "loose.bmp")
    files = scan_image_folder(messy, labeled=False)
    assert files.paths == ["cat/a.JPG", "cat/sub/deep/b.Png", "dog/c.webp", "dog/d.TIFF", "loose.bmp"]
    assert files.labels == [-1] * 5 and files.classes == []


def test_scan_labeled_warns_about_loose_images(messy: Path) -> None:
    (messy / "empty_class" / "readme.md").unlink()
    (messy / "empty_class").rmdir()
    _write(messy / "loose.jpeg")
    with pytest.warns(UserWarning, match="ignored"):
        files = scan_image_folder(messy, labeled=True)
    assert "loose.jpeg" not in files.paths


def _assert_names_path_and_extensions(err: pytest.ExceptionInfo[DataError], path: Path) -> None:
    msg = str(err.value)
    assert str(path.resolve()) in msg
    assert all(ext in msg for ext in IMAGE_EXTENSIONS)


def test_missing_folder_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as err:
        scan_image_folder(missing, labeled=True)
    _assert_names_path_and_extensions(err, missing)
    assert isinstance(err.value, ValueError)


def test_not_a_directory_error(tmp_path: Path) -> None:
    f = _write(tmp_path / "file.png")
    with pytest.raises(DataError, match="not a directory") as err:
        scan_image_folder(f, labeled=False)
    _assert_names_path_and_extensions(err, f)


@pytest.mark.parametrize("labeled", [True, False])
def test_empty_folder_error(tmp_path: Path, labeled: bool) -> None:
    _write(tmp_path / "sub" / "notes.txt", b"text")
    with pytest.raises(DataError, match="No .*images found") as err:
        scan_image_folder(tmp_path, labeled=labeled)
    _assert_names_path_and_extensions(err, tmp_path)


def test_labeled_without_class_folders_says_so(tmp_path: Path) -> None:
    _write(tmp_path / "a.jpg")
    _write(tmp_path / "b.png")
    with pytest.raises(DataError, match="2 images directly in it but no class subfolders") as err:
        scan_image_folder(tmp_path, labeled=True)
    _assert_names_path_and_extensions(err, tmp_path)


def test_cache_is_written_atomically_and_reused(messy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "run" / "files.json"
    with pytest.warns(UserWarning):
        first = scan_image_folder(messy, labeled=True, cache_file=cache)
    data = json.loads(cache.read_text())
    assert data["root"] == str(messy.resolve()) and data["labeled"] is True and data["paths"] == first.paths
    assert os.listdir(cache.parent) == ["files.json"]  # no temporary left behind

    _write(messy / "cat" / "new.jpg")  # not seen: the cached list is re-used
    again = scan_image_folder(messy, labeled=True, cache_file=cache)
    assert again == first

    unlabeled = scan_image_folder(messy, labeled=False, cache_file=cache)  # mode differs: rebuilt
    assert "cat/new.jpg" in unlabeled.paths and unlabeled.labels[0] == -1
    assert json.loads(cache.read_text())["labeled"] is False


def test_corrupt_cache_is_rebuilt(messy: Path, tmp_path: Path) -> None:
    cache = tmp_path / "files.json"
    cache.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable file-list cache"):
        files = scan_image_folder(messy, labeled=False, cache_file=cache)
    assert len(files) == 4 and json.loads(cache.read_text())["paths"] == files.paths


# ---------------------------------------------------------------------------------------------
# load_rgb
# ---------------------------------------------------------------------------------------------
def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def test_load_rgb_converts_modes(tmp_path: Path) -> None:
    gray = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8) * 5, mode="L")
    rgba = Image.new("RGBA", (8, 6), (200, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black pixel
    pal = gray.convert("P")
    pal_t = Image.new("P", (8, 6), 0)
    pal_t.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal_t.putpixel((1, 1), 1)
    i16 = Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16))
    cases = {
        "l.png": gray, "rgba.png": rgba, "p.png": pal, "pt.png": pal_t, "i16.png": i16,
        "la.png": gray.convert("LA"), "cmyk.jpg": Image.new("CMYK", (8, 6), (0, 255, 255, 0)),
        "one.bmp": gray.convert("1"), "f.tif": Image.fromarray(np.full((6, 8), 0.5, np.float32), mode="F"),
    }
    out = {}
    for name, img in cases.items():
        path = _save(img, tmp_path / name, **({"transparency": 0} if name == "pt.png" else {}))
        loaded = load_rgb(path)
        assert loaded.mode == "RGB" and loaded.size == (8, 6), name
        out[name] = np.asarray(loaded)
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    assert (out["i16.png"] == 255).all()  # 16-bit full scale -> 8-bit full scale, not clipped garbage
    assert (out["l.png"][..., 0] == out["l.png"][..., 2]).all() and out["l.png"][5, 7, 0] == 235
    assert tuple(out["rgba.png"][0, 0]) == (255, 255, 255)  # transparent -> white background
    assert tuple(out["rgba.png"][1, 1]) == (200, 0, 0)
    assert tuple(out["pt.png"][0, 0]) == (255, 255, 255) and tuple(out["pt.png"][1, 1]) == (0, 255, 0)
    assert abs(int(out["f.tif"][0, 0, 0]) - 128) <= 1  # float in [0, 1] scaled to 8 bits
    assert out["cmyk.jpg"][0, 0, 0] > 200 and out["cmyk.jpg"][0, 0, 1] < 60


def test_load_rgb_real_photos(photo_folder: Path) -> None:
    files = scan_image_folder(photo_folder, labeled=True)
    assert files.classes == ["animal", "object"] and len(files) == 7
    for i in range(len(files)):
        img = load_rgb(files.abspath(i))
        assert img.mode == "RGB" and min(img.size) >= 48


# ---------------------------------------------------------------------------------------------
# Dataset, corrupt files
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def with_corrupt(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    good = _png_bytes(size=(40, 30))
    _write(root / "a" / "0_good.png", color=(255, 0, 0))
    _write(root / "a" / "1_truncated.png", good[: len(good) // 2])
    _write(root / "b" / "2_good.png", color=(0, 255, 0))
    _write(root / "b" / "3_random.jpg", np.random.default_rng(0).bytes(500))
    _write(root / "b" / "4_zero.png", b"")
    return root


def test_corrupt_file_is_substituted_with_warning(with_corrupt: Path) -> None:
    files = scan_image_folder(with_corrupt, labeled=True)
    ds = ImageFolderDataset(files, transform=None)
    with pytest.warns(BadImageWarning, match="1_truncated.png") as rec:
        sample = ds[1]
    assert len(rec) == 1 and str(with_corrupt / "a" / "1_truncated.png") in str(rec[0].message)
    assert sample["bad"] == 1 and sample["index"] == 1
    assert sample["label"] == 1  # label of the substitute actually returned (b/2_good.png)
    assert np.asarray(sample["image"])[0, 0].tolist() == [0, 255, 0]

    with pytest.warns(BadImageWarning) as rec:  # two unreadable in a row, wraps to index 0
        sample = ds[3]
    assert sample["bad"] == 1 and np.asarray(sample["image"])[0, 0].tolist() == [255, 0, 0]  # one sample substituted
    assert "3_random.jpg" in str(rec[0].message) and "4_zero.png" in str(rec[1].message)
    with pytest.warns(BadImageWarning):  # an epoch counts each unreadable file once: 3 of the 5
        assert sum(ds[i]["bad"] for i in range(len(ds))) == 3

    clean = ds[0]
    assert clean["bad"] == 0 and clean["seed"] == 0 and clean["label"] == 0


def test_all_corrupt_raises(tmp_path: Path) -> None:
    _write(tmp_path / "x.png", b"garbage")
    _write(tmp_path / "y.png", b"garbage")
    ds = ImageFolderDataset(scan_image_folder(tmp_path, labeled=False), transform=None)
    with pytest.warns(BadImageWarning), pytest.raises(DataError, match="consecutive unreadable"):
        ds[0]


def test_decoded_images_kept_in_memory_byte_for_byte(photo_folder: Path, with_corrupt: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    files = scan_image_folder(photo_folder, labeled=True)
    plain = ImageFolderDataset(files, transform=None)
    cached = ImageFolderDataset(files, transform=None, cache_bytes=1 << 30)
    first = [cached[i]["image"] for i in range(len(files))]
    assert cached.decoded is not None and len(cached.decoded) == len(files)
    opened: list[str] = []
    monkeypatch.setattr(folder_module, "load_rgb", lambda path: opened.append(str(path)))
    again = [cached[i] for i in range(len(files))]
    assert opened == []  # the second epoch reads no file
    for i, sample in enumerate(again):
        want = load_rgb(files.abspath(i))
        assert sample["image"].mode == "RGB" and sample["image"].size == want.size
        assert np.array_equal(np.asarray(sample["image"]), np.asarray(want))
        assert np.array_equal(np.asarray(first[i]), np.asarray(want))
        assert sample["label"] == plain.files.labels[i]
    edited = again[0]["image"]
    edited.putpixel((0, 0), (1, 2, 3))  # an in-place edit copies first: the kept pixels stay
    assert np.array_equal(np.asarray(cached[0]["image"]), np.asarray(load_rgb(files.abspath(0))))
    monkeypatch.undo()

    # the budget: images are kept while they fit, then no more (no eviction)
    sizes = [load_rgb(files.abspath(i)).size for i in range(len(files))]
    budget = sizes[0][0] * sizes[0][1] * 3 + 1
    small = ImageFolderDataset(files, transform=None, cache_bytes=budget)
    for i in range(len(files)):
        small[i]
    assert small.decoded is not None and len(small.decoded) == 1 and small.decoded.held <= budget
    assert ImageFolderDataset(files, transform=None).decoded is None  # cache_bytes 0: none

    # an unreadable file is never kept: it warns again each time, its substitute is kept under its own index
    ds = ImageFolderDataset(scan_image_folder(with_corrupt, labeled=True), transform=None, cache_bytes=1 << 20)
    for _ in range(2):
        with pytest.warns(BadImageWarning, match="1_truncated.png"):
            assert ds[1]["bad"] == 1
    assert ds.decoded is not None and ds.decoded.get(1) is None and ds.decoded.get(2) is not None


def test_dataset_passes_seed_to_transform(photo_folder: Path) -> None:
    seen: list[int] = []

    def transform(img: Image.Image, seed: int) -> tuple[int, int]:
        seen.append(seed)
        return img.size

    ds = ImageFolderDataset(scan_image_folder(photo_folder, labeled=True), transform)
    assert ds[(2, 12345)]["seed"] == 12345 and ds[4]["seed"] == 4
    assert seen == [12345, 4]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_bad_image_counter() -> None:
    counter = BadImageCounter()
    counter.update(1, 50)
    counter.update(0, 50)  # 1 / 100 = 1% is not above the threshold
    assert (counter.bad, counter.seen) == (1, 100)
    with pytest.raises(DataError, match=r"2 of 110 .*1\.82% > threshold 1\.00%"):
        counter.update(1, 10)

    small = BadImageCounter()
    small.update(1, 10)  # 10% but fewer than 100 seen: no verdict yet
    with pytest.raises(DataError, match="1 of 10"):
        small.finalize()
    BadImageCounter().finalize()  # nothing seen: fine
