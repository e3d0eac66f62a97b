"""The labeled scene benchmark (``ssl-distill make-scenes``, ssl_distill/data/scenes.py).

Sources here are hand-made so that the pixels tell the truth: class ``tall`` is a white vertical bar on
black, class ``wide`` the same bar lying down, class ``rgba`` a red disc on a transparent background. A
pasted object's box can then be checked against the scene's pixels, and its class against its shape.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_distill.cli import build_parser, run
from ssl_distill.data.scenes import (
    SceneSettings,
    Backgrounds,
    build_scene_benchmark,
    generate_scene,
    load_source_object,
    split_sources,
)
from ssl_distill.errors import DataError


def write_bar_source(root: Path, per_class: int = 30) -> Path:
    """``root/tall`` and ``root/wide``: 16x16 grayscale images, black except a white 4 x 12 bar (rows
    2..13, columns c..c+3 for tall; transposed for wide), each image with a different bar position or
    gray level so that every file is distinct."""
    for cls in ("tall", "wide"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            a = np.zeros((16, 16), np.uint8)
            c = 2 + i % 10
            a[2:14, c : c + 4] = 160 + i
            Image.fromarray(a if cls == "tall" else a.T.copy(), mode="L").save(root / cls / f"{i:03d}.png")
    return root


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.fixture(scope="module")
def bars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bar_source(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def bench(bars: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench") / "scenes"
    summary = build_scene_benchmark(out, bars, n_train=60, n_test=30, settings=SceneSettings(size=48), seed=3)
    return out, summary


def test_generated_scene_pixels_masks_and_boxes(bars: Path):
    """Outside the objects the scene is the background; each object's pixels differ from it; every box is
    the tight box of the object's visible pixels; the overlap rule holds; bars keep their orientation."""
    settings = SceneSettings(size=48)
    rng = np.random.default_rng(0)
    paths = sorted(bars.rglob("*.png"))
    labels = [0 if p.parent.name == "tall" else 1 for p in paths]
    order = iter(rng.permutation(len(paths)).tolist() * 10)

    def next_source():
        i = next(order)
        return i, load_source_object(paths[i]), labels[i]

    backgrounds = Backgrounds()
    seen_counts = set()
    for _ in range(40):
        sc = generate_scene(rng, settings, backgrounds, next_source)
        k = len(sc.labels)
        seen_counts.add(k)
        assert 1 <= k <= 4 and sc.masks.shape == (k, 48, 48) and sc.boxes.shape == (k, 4)
        union = sc.masks.any(axis=0)
        assert np.array_equal(sc.image[~union], sc.background[~union])
        assert not np.logical_and(sc.masks[:, None], sc.masks[None]).sum(axis=(2, 3))[~np.eye(k, dtype=bool)].any()
        changed = (sc.image != sc.background).any(axis=-1)
        for j in range(k):
            assert sc.boxes[j].tolist() == _bbox(sc.masks[j])
            assert changed[sc.masks[j]].mean() > 0.99  # pasted pixels are new colours (up to coincidences)
            assert sc.masks[j].sum() >= 0.8 * sc.pasted[j]  # max_overlap 0.2
            if sc.masks[j].sum() == sc.pasted[j]:  # fully visible: the bar's orientation shows its class
                x0, y0, x1, y1 = sc.boxes[j].tolist()
                assert (y1 - y0 > x1 - x0) == (sc.labels[j] == 0)
        if k == 1:  # hand check from the pixels alone: the changed pixels' tight box is the box
            assert _bbox(changed) == sc.boxes[0].tolist()
    assert seen_counts == {1, 2, 3, 4}


def test_near_black_is_transparent_and_rgba_uses_alpha(tmp_path: Path):
    """A 16 x 16 gray source with a 4 x 12 bar at columns 6..9, rows 2..13, pasted at scale 1: only the bar's
    pixels (plus at most the bilinear fringe above the threshold) are pasted. An RGBA disc pastes its alpha."""
    a = np.zeros((16, 16), np.uint8)
    a[2:14, 6:10] = 200
    Image.fromarray(a, mode="L").save(tmp_path / "bar.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    yy, xx = np.mgrid[:16, :16]
    disc = (yy - 7.5) ** 2 + (xx - 7.5) ** 2 <= 25
    rgba[disc] = (255, 0, 0, 255)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "disc.png")
    objs = [load_source_object(tmp_path / "bar.png"), load_source_object(tmp_path / "disc.png")]
    assert objs[0].gray and objs[0].alpha is None and not objs[1].gray and objs[1].alpha is not None
    settings = SceneSettings(size=16, min_scale=1.0, max_scale=1.0, max_objects=1)
    for obj, expect in zip(objs, ([6, 2, 10, 14], _bbox(disc))):
        sc = generate_scene(np.random.default_rng(1), settings, Backgrounds(), lambda o=obj: (0, o, 0))
        assert sc.boxes[0].tolist() == expect  # scale 1: the resize is the identity, the box is exact
        assert sc.pasted[0] == (48 if obj.gray else int(disc.sum()))


def test_split_files_counts_categories_and_disjoint_sources(bench: tuple[Path, dict], bars: Path):
    out, summary = bench
    sources = {}
    for split, n in (("train", 60), ("test", 30)):
        data = json.loads((out / split / "boxes.json").read_text())
        assert [c["name"] for c in data["categories"]] == ["tall", "wide"]
        assert [c["id"] for c in data["categories"]] == [1, 2]
        assert len(data["images"]) == n == len(list((out / split).glob("*.png")))
        per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=n + 1)[1:]
        assert per_image.min() >= 1 and per_image.max() <= 4
        assert summary["splits"][split]["objects"] == len(data["annotations"])
        names = {c["id"]: c["name"] for c in data["categories"]}
        for a in data["annotations"]:  # each box's class is its source's class folder
            assert names[a["category_id"]] == a["source"].split("/")[0]
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 48 and y + h <= 48 and a["area"] <= w * h
        sources[split] = {a["source"] for a in data["annotations"]}
        img = np.asarray(Image.open(out / split / data["images"][0]["file_name"]))
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    assert sources["train"] and sources["test"] and not sources["train"] & sources["test"]
    pools = split_sources(60, 60, 30, seed=3)
    assert len(pools["test"]) == 20 and not set(pools["train"]) & set(pools["test"])


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_deterministic_under_seed_and_replaces_its_own_output(bars: Path, tmp_path: Path):
    kw = dict(n_train=12, n_test=6, settings=SceneSettings(size=32))
    build_scene_benchmark(tmp_path / "a", bars, seed=5, **kw)
    build_scene_benchmark(tmp_path / "b", bars, seed=5, **kw)
    build_scene_benchmark(tmp_path / "c", bars, seed=6, **kw)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    build_scene_benchmark(tmp_path / "a", bars, seed=6, **kw)  # rewrites its own folders
    assert _digest(tmp_path / "a") == _digest(tmp_path / "c")
    foreign = tmp_path / "d" / "train"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not written by make-scenes"):
        build_scene_benchmark(tmp_path / "d", bars, seed=5, **kw)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_command_line(bars: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    args = build_parser().parse_args(["make-scenes", "only_out"])
    assert args.src is None and args.out == "only_out"
    assert run(["make-scenes", str(bars), str(tmp_path / "s"), "--n-train", "5", "--n-test", "3", "--size", "32",
                "--max-objects", "2", "--seed", "1"]) == 0
    assert "train: 5 scenes" in capsys.readouterr().out
    data = json.loads((tmp_path / "s" / "test" / "boxes.json").read_text())
    assert len(data["images"]) == 3 and data["info"]["settings"]["max_objects"] == 2
    assert max(np.bincount([a["image_id"] for a in data["annotations"]])) <= 2
    with pytest.raises(SystemExit):
        run(["make-scenes", str(bars), str(tmp_path / "t"), "--min-objects", "3", "--max-objects", "2"])
    assert "min_objects <= max_objects" in capsys.readouterr().err


def test_no_tint_and_background_scale(bars: Path, tmp_path: Path):
    """``tint=False``: a gray item is pasted in its own gray values (the 200-valued bar stays (200, 200, 200))
    and gray backgrounds stay gray; ``background_scale=(1, 1)``: a square source is used whole, so the gray
    backgrounds (brick, grass, gravel, camera: all 512 x 512) take at most 4 distinct values."""
    a = np.zeros((16, 16), np.uint8)
    a[2:14, 6:10] = 200
    Image.fromarray(a, mode="L").save(tmp_path / "bar.png")
    bar = load_source_object(tmp_path / "bar.png")
    settings = SceneSettings(size=16, min_scale=1.0, max_scale=1.0, max_objects=1, tint=False,
                             background_scale=(1.0, 1.0))
    rng = np.random.default_rng(0)
    backgrounds = Backgrounds()
    gray_backgrounds = set()
    for _ in range(40):
        sc = generate_scene(rng, settings, backgrounds, lambda: (0, bar, 0))
        assert sc.boxes[0].tolist() == [6, 2, 10, 14]
        assert (sc.image[2:14, 6:10] == 200).all()
        bg = sc.background
        if (bg[..., 0] == bg[..., 1]).all() and (bg[..., 1] == bg[..., 2]).all():
            gray_backgrounds.add(bg.tobytes())
    assert 2 <= len(gray_backgrounds) <= 4
    tinted = generate_scene(np.random.default_rng(0), SceneSettings(size=16, min_scale=1.0, max_scale=1.0,
                                                                    max_objects=1), backgrounds, lambda: (0, bar, 0))
    item = tinted.image[2:14, 6:10].reshape(-1, 3)
    assert not (item == 200).all() and (item == item[0]).all()  # one colour, not the gray value
    with pytest.raises(ValueError, match="background_scale"):
        SceneSettings(background_scale=(0.0, 1.0))
    assert run(["make-scenes", str(bars), str(tmp_path / "s"), "--n-train", "4", "--n-test", "2", "--size", "32",
                "--no-tint", "--background-scale", "1", "1"]) == 0
    info = json.loads((tmp_path / "s" / "train" / "boxes.json").read_text())["info"]["settings"]
    assert info["tint"] is False and info["background_scale"] == [1.0, 1.0]


def test_black_background_untinted_items_and_counts(bars: Path, tmp_path: Path):
    """``background="black"``: the scene is zero outside the items, an untinted item keeps its gray values,
    and no background image is needed (None); the command line writes it, with a fixed item count and scale."""
    a = np.zeros((16, 16), np.uint8)
    a[2:14, 6:10] = 200
    Image.fromarray(a, mode="L").save(tmp_path / "bar.png")
    bar = load_source_object(tmp_path / "bar.png")
    settings = SceneSettings(size=32, min_scale=0.5, max_scale=0.5, min_objects=2, max_objects=2, tint=False,
                             background="black", max_overlap=0.0)
    sc = generate_scene(np.random.default_rng(0), settings, None, lambda: (0, bar, 0))
    assert (sc.background == 0).all() and len(sc.labels) + sc.dropped == 2
    inside = sc.masks.any(axis=0)
    assert (sc.image[~inside] == 0).all() and (sc.image[inside] == 200).all()
    with pytest.raises(ValueError, match="background must be one of"):
        SceneSettings(background="white")
    with pytest.raises(ValueError, match="natural background"):
        generate_scene(np.random.default_rng(0), SceneSettings(size=32), None, lambda: (0, bar, 0))
    assert run(["make-scenes", str(bars), str(tmp_path / "s"), "--n-train", "6", "--n-test", "2", "--size", "48",
                "--background", "black", "--no-tint", "--min-objects", "3", "--max-objects", "3",
                "--min-scale", "0.25", "--max-scale", "0.3", "--max-overlap", "0.1"]) == 0
    data = json.loads((tmp_path / "s" / "train" / "boxes.json").read_text())
    assert data["info"]["settings"]["background"] == "black" and data["info"]["settings"]["max_overlap"] == 0.1
    img = np.asarray(Image.open(tmp_path / "s" / "train" / data["images"][0]["file_name"]))
    assert (img[..., 0] == img[..., 1]).all() and (img == 0).mean() > 0.3  # gray items on black
    assert all(a["bbox"][2] <= 0.3 * 48 + 1 and a["bbox"][3] <= 0.3 * 48 + 1 for a in data["annotations"])
