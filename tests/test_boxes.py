"""Boxes files (COCO-style, as `ssl-distill discover` writes them) and box -> patch masks."""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_distill.config import ConfigError, load_config
from ssl_distill.data.boxes import BoxesWarning, patch_mask_from_boxes, read_boxes
from ssl_distill.errors import AnnotationError
from ssl_distill.eval.discover import write_coco_boxes


# ------------------------------------------------------------------------------------ patch masks
def _cells(mask: torch.Tensor) -> list[int]:
    return torch.nonzero(mask).flatten().tolist()


def test_patch_mask_hand_computed_cases() -> None:
    # 32 x 32 view, 8-pixel patches: a 4 x 4 grid, patch (i, j) is index 4 i + j
    boxes = torch.tensor([
        [8.0, 8.0, 16.0, 16.0],  # edges on patch borders: exactly patch (1, 1)
        [7.5, 8.0, 16.0, 16.5],  # half a pixel into column 0 and into row 2
        [9.0, 9.0, 10.0, 10.0],  # strictly inside patch (1, 1)
        [8.0, 8.0, 8.0, 20.0],  # zero width
        [12.0, 12.0, 4.0, 20.0],  # negative width
        [0.0, 0.0, 32.0, 32.0],  # the whole view
        [-5.0, -5.0, 40.0, 40.0],  # beyond the view: every patch
        [24.0, 0.0, 32.0, 8.0],  # the top-right patch
        [0.0, 24.0, 8.000001, 32.0],  # bottom-left, reaching a hair into column 1
    ])
    m = patch_mask_from_boxes(boxes, 32, 32, 8)
    assert m.shape == (9, 16) and m.dtype == torch.bool
    assert _cells(m[0]) == [5]
    assert _cells(m[1]) == [4, 5, 8, 9]
    assert _cells(m[2]) == [5]
    assert _cells(m[3]) == [] and _cells(m[4]) == []
    assert _cells(m[5]) == list(range(16)) and _cells(m[6]) == list(range(16))
    assert _cells(m[7]) == [3]
    assert _cells(m[8]) == [12, 13]


def test_patch_mask_rectangular_and_partial_grid() -> None:
    # height 16, width 24, p 8: a 2 x 3 grid
    m = patch_mask_from_boxes(torch.tensor([[16, 0, 24, 8], [0, 8, 1, 16], [7, 7, 17, 9]]), 16, 24, 8)
    assert m.shape == (3, 6)
    assert _cells(m[0]) == [2] and _cells(m[1]) == [3] and _cells(m[2]) == [0, 1, 2, 3, 4, 5]
    # 20 x 20 with p 8: a 2 x 2 grid; pixels 16..19 belong to no patch
    m = patch_mask_from_boxes(torch.tensor([[17.0, 17.0, 20.0, 20.0], [15.0, 0.0, 20.0, 1.0]]), 20, 20, 8)
    assert _cells(m[0]) == [] and _cells(m[1]) == [1]
    assert patch_mask_from_boxes(torch.zeros(0, 4), 32, 32, 8).shape == (0, 16)
    with pytest.raises(ValueError, match="boxes must be"):
        patch_mask_from_boxes(torch.zeros(4), 32, 32, 8)


def test_patch_mask_equals_pixel_painting_on_integer_boxes() -> None:
    """Integer boxes: a patch is in the mask iff one of its pixels lies in the painted box."""
    rng = np.random.default_rng(0)
    h, w, p = 24, 40, 8
    xs = np.sort(rng.integers(-4, w + 5, (300, 2)), axis=1)
    ys = np.sort(rng.integers(-4, h + 5, (300, 2)), axis=1)
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)
    got = patch_mask_from_boxes(torch.from_numpy(boxes).float(), h, w, p).numpy()
    for box, row in zip(boxes, got):
        pixels = np.zeros((h, w), dtype=bool)
        x0, y0, x1, y1 = np.clip(box, 0, [w, h, w, h])
        pixels[y0:y1, x0:x1] = True
        want = pixels.reshape(h // p, p, w // p, p).any(axis=(1, 3)).reshape(-1)
        assert np.array_equal(row, want), box


# ------------------------------------------------------------------------------------ reading
@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "scenes"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(root / "a.png")
    Image.new("RGB", (30, 20)).save(root / "sub" / "b.png")
    Image.new("RGB", (10, 10)).save(root / "c.png")
    return root


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    """Any warning inside fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _write(path: Path, images: list, annotations: list, **extra) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations, **extra}))
    return path


def test_reads_the_discover_writer_unchanged(folder: Path, tmp_path: Path) -> None:
    entries = [{"file_name": "a.png", "width": 64, "height": 48, "box": (8, 16, 40, 48), "ncut_eigenvalue": 0.25,
                "ncut_degenerate": None},
               {"file_name": "sub/b.png", "width": 30, "height": 20, "box": (0, 0, 30, 20), "ncut_eigenvalue": 0.5,
                "ncut_degenerate": "constant graph"}]
    path = write_coco_boxes(tmp_path / "out" / "boxes.json", entries, {"tau": 0.2})
    with _no_warnings():
        bf = read_boxes(path, folder, paths=["a.png", "sub/b.png", "c.png"])
    xyxy, cats = bf.boxes_for("a.png")
    assert xyxy.dtype == np.float32 and xyxy.tolist() == [[8, 16, 40, 48]] and cats.tolist() == [1]
    assert bf.boxes_for("sub/b.png")[0].tolist() == [[0, 0, 30, 20]]
    assert bf.boxes_for("c.png")[0].shape == (0, 4) and bf.boxes_for("c.png")[1].dtype == np.int64
    assert bf.categories == {1: "object"}
    assert bf.report == {"images": 2, "images_with_boxes": 2, "boxes": 2, "boxes_clipped": 0, "boxes_outside": 0,
                         "boxes_degenerate": 0, "folder_images": 3, "folder_images_without_boxes": 1}
    assert "2 boxes on 2 of 3 folder images" in bf.summary()


def test_hand_written_coco_several_boxes_categories_and_sizes_from_headers(folder: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "b.json",
                  [{"id": 7, "file_name": "./sub//b.png"},
                   {"id": "x", "file_name": "a.png", "width": 64, "height": 48}],
                  [{"image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 5},
                   {"image_id": 7, "bbox": [10.5, 0, 19.5, 20]},
                   {"image_id": "x", "bbox": [0, 0, 64, 48], "category_id": 2}],
                  categories=[{"id": 5, "name": "shoe"}, {"id": 2, "name": "bag"}])
    with _no_warnings():
        bf = read_boxes(path, folder)  # no folder list: files are checked on disk; b.png's size from its header
    xyxy, cats = bf.boxes_for("sub/b.png")
    assert xyxy.tolist() == [[1, 2, 4, 6], [10.5, 0, 30, 20]] and cats.tolist() == [5, -1]
    assert bf.boxes_for("a.png")[1].tolist() == [2]
    assert bf.categories == {5: "shoe", 2: "bag"} and len(bf) == 2
    assert "folder_images" not in bf.report


def test_missing_images_are_an_error_naming_them(folder: Path, tmp_path: Path) -> None:
    images = [{"id": i, "file_name": n} for i, n in enumerate(["a.png", "gone1.png", "sub/gone2.png", "c.png"])]
    path = _write(tmp_path / "b.json", images, [])
    with pytest.raises(AnnotationError, match=r"names 2 of its 4 images that are not in .*: gone1.png, sub/gone2.png"):
        read_boxes(path, folder)
    with pytest.raises(AnnotationError, match=r"names 3 of its 4 images .*gone1.png, sub/gone2.png, c.png"):
        read_boxes(path, folder, paths=["a.png"])  # c.png exists on disk but is not in the folder's list
    many = [{"id": i, "file_name": f"x{i}.png"} for i in range(9)]
    listed = r"names 9 of its 9 images .*x0.png, x1.png, x2.png, x3.png, x4.png, \.\.\."
    with pytest.raises(AnnotationError, match=listed):
        read_boxes(_write(tmp_path / "m.json", many, []), folder)


def test_outside_and_degenerate_boxes_are_clipped_or_dropped_and_counted(folder: Path, tmp_path: Path) -> None:
    anns = [
        {"image_id": 1, "bbox": [-0.5, 0, 65, 48.5]},  # within the 1-pixel tolerance: clipped silently
        {"image_id": 1, "bbox": [50, 40, 30, 30]},  # beyond the image: clipped to [50, 40, 64, 48]
        {"image_id": 1, "bbox": [-10, -10, 5, 5]},  # entirely outside: dropped
        {"image_id": 1, "bbox": [70, 0, 5, 5]},  # entirely outside: dropped
        {"image_id": 1, "bbox": [3, 3, 0, 5]},  # zero width: dropped
        {"image_id": 2, "bbox": [3, 3, 5, -1]},  # negative height: dropped
    ]
    path = _write(tmp_path / "b.json", [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                                        {"id": 2, "file_name": "c.png"}], anns)
    with pytest.warns(BoxesWarning) as record:
        bf = read_boxes(path, folder, paths=["a.png", "c.png", "sub/b.png"])
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert ("1 boxes reach more than 1 pixel beyond their image and were clipped to it: a.png (annotations[1])"
            in messages[0])
    assert "2 boxes lie entirely outside their image and were dropped: a.png (annotations[2]), a.png (annotations[3])" \
        in messages[1]
    assert "2 boxes have non-positive width or height and were dropped: a.png (annotations[4]), " \
           "c.png (annotations[5])" in messages[2]
    assert bf.boxes_for("a.png")[0].tolist() == [[0, 0, 64, 48], [50, 40, 64, 48]]
    assert bf.boxes_for("c.png")[0].shape == (0, 4)
    assert bf.report == {"images": 2, "images_with_boxes": 1, "boxes": 2, "boxes_clipped": 1, "boxes_outside": 2,
                         "boxes_degenerate": 2, "folder_images": 3, "folder_images_without_boxes": 2}
    assert "2 boxes on 1 of 3 folder images (2 named); 1 clipped to their image, 4 dropped" in bf.summary()


@pytest.mark.parametrize("images, annotations, expect", [
    ([{"id": 1, "file_name": "a.png"}], [{"image_id": 2, "bbox": [0, 0, 1, 1]}], "refers to image_id 2"),
    ([{"id": 1, "file_name": "a.png"}], [{"image_id": 1, "bbox": [0, 0, 1]}], r"annotations\[0\] .*expected 4 finite"),
    ([{"id": 1, "file_name": "a.png"}], [{"image_id": 1, "bbox": [0, 0, "1", 1]}], "expected 4 finite numbers"),
    ([{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "c.png"}], [], "image id 1 appears twice"),
    ([{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "./a.png"}], [], "image a.png appears twice"),
    ([{"id": 1}], [], r"images\[0\] has no 'file_name'"),
    ([{"id": 1, "file_name": "a.png", "width": 0, "height": 4}], [], "both must be positive numbers"),
])
def test_malformed_files_are_errors_naming_the_entry(folder: Path, tmp_path: Path, images, annotations, expect) -> None:
    with pytest.raises(AnnotationError, match=expect):
        read_boxes(_write(tmp_path / "b.json", images, annotations), folder)


def test_unreadable_or_non_coco_file(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match="does not exist"):
        read_boxes(tmp_path / "nope.json", folder)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="cannot read boxes file"):
        read_boxes(tmp_path / "bad.json", folder)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(AnnotationError, match="not COCO-style"):
        read_boxes(tmp_path / "list.json", folder)


def test_config_keys_and_their_checks() -> None:
    cfg = load_config(None, ["data.boxes=x/boxes.json", "data.crops.object_aware_local=true", "odis.weight=1"])
    assert cfg.data.boxes == "x/boxes.json" and cfg.data.crops.object_aware_local
    default = load_config(None)
    assert default.data.boxes is None and default.data.crops.min_object_cover == 0.04
    assert default.data.crops.object_aware_local is False
    with pytest.raises(ConfigError, match="object_aware_local=true draws local crops around boxes, but data.boxes is"):
        load_config(None, ["data.crops.object_aware_local=true"])
    with pytest.raises(ConfigError, match=r"data.crops.min_object_cover=0.0 is out of range"):
        load_config(None, ["data.crops.min_object_cover=0"])
    with pytest.raises(ConfigError, match=r"data.crops.min_object_cover=1.5 is out of range"):
        load_config(None, ["data.crops.min_object_cover=1.5"])
    with pytest.raises(ConfigError, match="data.boxes is an empty string"):
        load_config(None, ["data.boxes=' '"])
