"""Object-aware multi-crop views (ODIS): targets, geometry, masks, validity, batches, reproducibility.

Most tests here hold the target rule from before the switch, ``odis.target_box=largest`` (:func:`largest_rule`);
the authors' rule (a box sampled first, the default) and the fallback for images without a box are in
tests/test_odis_switches.py."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from ssl_distill.config import CropsConfig, MaskingConfig, config_from_dict
from ssl_distill.data.boxes import patch_mask_from_boxes, read_boxes
from ssl_distill.data.collate import MultiCropCollate
from ssl_distill.data.folder import BadImageWarning, ImageFolderDataset, load_rgb, scan_image_folder
from ssl_distill.data.loader import build_train_loader
from ssl_distill.data.masking import build_masking
from ssl_distill.data.object_crops import ObjectMultiCropTransform, boxes_in_view, visible_fraction
from ssl_distill.data.rng import counter_uniforms, sample_seed
from ssl_distill.data.views import CropBox, MultiCropTransform, random_resized_crop_box

P = 8  # patch size
CROPS = CropsConfig(n_global=2, global_size=32, n_local=3, local_size=16)
AWARE = dataclasses.replace(CROPS, object_aware_local=True)
OBJECT = np.array([250, 10, 250], dtype=np.int16)  # magenta: target colour in the painted images
OTHER = np.array([10, 250, 250], dtype=np.int16)  # cyan: a second object


def largest_rule(crops: CropsConfig, patch_size: int) -> ObjectMultiCropTransform:
    """Object-aware views with the target rule from before the switch: the largest box of the first crop."""
    return ObjectMultiCropTransform(crops, patch_size, target_box="largest")


def _scene(width: int, height: int, boxes: list[tuple[int, int, int, int]], seed: int = 0) -> Image.Image:
    """Gray noise (R = G = B in [90, 160]) with box k painted OBJECT (k = 0) or OTHER (k >= 1)."""
    rng = np.random.default_rng(seed)
    gray = rng.integers(90, 161, (height, width, 1))
    arr = np.repeat(gray, 3, axis=2).astype(np.uint8)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        arr[y0:y1, x0:x1] = OBJECT if k == 0 else OTHER
    return Image.fromarray(arr)


# ------------------------------------------------------------------------------------ geometry
def test_boxes_in_view_hand_computed() -> None:
    crop = CropBox(top=10, left=20, height=40, width=20, flip=False)
    flipped = dataclasses.replace(crop, flip=True)
    # x -> (x - 20) * 32 / 20, y -> (y - 10) * 32 / 40, clipped to the crop first; flip: x -> 32 - x
    got = boxes_in_view(np.array([21.0, 10.0, 26.0, 30.0]), [crop, flipped], [32, 32])
    np.testing.assert_allclose(got, [[1.6, 0.0, 9.6, 16.0], [22.4, 0.0, 30.4, 16.0]], rtol=0, atol=1e-12)
    got = boxes_in_view(np.array([25.0, 20.0, 35.0, 60.0]), [crop, CropBox(0, 0, 64, 64, False)], [32, 16])
    assert got.tolist() == [[8.0, 8.0, 24.0, 32.0], [6.25, 5.0, 8.75, 15.0]]  # y1 = 60 clipped to 50
    outside = boxes_in_view(np.array([0.0, 0.0, 5.0, 5.0]), [crop], [32])[0]
    assert outside[2] - outside[0] == 0 and outside[3] - outside[1] == 0
    assert visible_fraction(np.array([[25.0, 20.0, 35.0, 60.0], [0, 0, 5, 5]]), crop).tolist() == [10 * 30 / 800, 0.0]


def _margin(crop: CropBox, size: int) -> float:
    """Output pixels PIL's bicubic resize may smear a box edge over (2 input pixels, or 2 output pixels)."""
    return 2.0 * max(1.0, size / crop.width, size / crop.height) + 0.75


@pytest.mark.parametrize("crops", [CROPS, AWARE])
def test_painted_box_lands_where_the_view_box_and_mask_say(crops: CropsConfig) -> None:
    """Crop, resize and flip move the box exactly: the painted object's pixels sit inside the view box
    (up to the bicubic filter's reach), the background outside it, and object pixels only on mask patches."""
    boxes = [(9, 30, 31, 52), (40, 4, 60, 20)]  # off-centre, so a wrong flip or offset shows
    img = _scene(72, 60, boxes)
    t = largest_rule(crops, P)
    checked = wrong = 0
    for seed in range(60):
        views = t.draw(72, 60, seed, np.array(boxes, dtype=np.float32))
        out = t(img, seed, np.array(boxes, dtype=np.float32))
        assert all(torch.equal(a, b) for a, b in zip(out["image"], t.plain.render(img, views.crops)))
        colour = OBJECT if views.target == 0 else OTHER
        for v, (view, crop, vb) in enumerate(zip(out["image"], views.crops, views.view_boxes)):
            if not out["obj_valid"][v]:
                continue
            size = view.shape[-1]
            arr = view.permute(1, 2, 0).numpy().astype(np.int16)
            centre = np.arange(size) + 0.5
            m = _margin(crop, size)
            inside_x = (centre > vb[0] + m) & (centre < vb[2] - m)
            inside_y = (centre > vb[1] + m) & (centre < vb[3] - m)
            outside_x = (centre < vb[0] - m) | (centre > vb[2] + m)
            outside_y = (centre < vb[1] - m) | (centre > vb[3] + m)
            inside = inside_y[:, None] & inside_x[None, :]
            outside = outside_y[:, None] | outside_x[None, :]
            assert np.abs(arr[inside] - colour).max(initial=0) <= 3, (seed, v)
            is_target = np.abs(arr - colour).max(axis=2) <= 3
            assert not (is_target & outside).any(), (seed, v)
            checked += int(inside.sum())
            if crop.flip:  # the same view box without its mirroring puts object pixels outside it (when off-centre)
                nx0, nx1 = size - vb[2], size - vb[0]
                unflipped_out = outside_y[:, None] | ((centre < nx0 - m) | (centre > nx1 + m))[None, :]
                wrong += bool((is_target & unflipped_out).any())
            # object pixels only on the view's mask patches (where the mask is the box)
            mask = out["obj_masks"][v].reshape(size // P, size // P)
            if v < crops.n_global or crops.object_aware_local:
                on_patches = np.kron(mask.numpy(), np.ones((P, P), dtype=bool))
                assert not (is_target & ~on_patches).any(), (seed, v)
                want = patch_mask_from_boxes(torch.from_numpy(vb[None]), size, size, P)[0]
                assert torch.equal(out["obj_masks"][v], want)
            else:
                assert bool(mask.all())
    assert checked > 3000  # the interior test saw plenty of pixels
    assert wrong > 0  # the test notices a box that ignores the flip


# ------------------------------------------------------------------------------------ the draws
def _shown(view: torch.Tensor, target: int) -> float:
    """Fraction of a view's pixels nearer the painted target colour than the gray background (channel
    difference past half-way: R - G for magenta, G - R for cyan; gray has R = G)."""
    arr = view.numpy().astype(np.int16)
    diff = arr[0] - arr[1] if target == 0 else arr[1] - arr[0]
    return float((diff > 120).mean())


def _global_rate(t: ObjectMultiCropTransform, img: Image.Image, boxes: np.ndarray, target: int, n: int = 500) -> float:
    """Fraction of seeds whose two global views both show the painted target on >= 3% of their pixels."""
    hits = 0
    for i in range(n):
        out = t(img, sample_seed(7, 0, i), boxes)
        hits += min(_shown(v, target) for v in out["image"][: CROPS.n_global]) >= 0.03
    return hits / n


@pytest.mark.parametrize("boxes", [[(4, 44, 18, 58)], [(6, 30, 26, 50), (36, 4, 60, 24)]])
def test_both_global_views_keep_the_target_in_95_percent_of_draws(boxes: list[tuple[int, int, int, int]]) -> None:
    img = _scene(64, 64, boxes)
    b = np.array(boxes, dtype=np.float32)
    t = largest_rule(CROPS, P)
    paired = [t.draw(64, 64, sample_seed(7, 0, i), b) for i in range(500)]
    assert np.mean([v.paired for v in paired]) >= 0.99
    if len(boxes) == 1:
        aware = _global_rate(t, img, b, 0)
        plain = _global_rate(t, img, np.zeros((0, 4)), 0)  # no boxes: the plain crops
        assert aware >= 0.95 and plain < 0.6, (aware, plain)  # a small object near a corner: plain crops lose it
    else:  # the painted colour of each sample's own target
        for target in (0, 1):
            seeds = [i for i, v in enumerate(paired) if v.target == target]
            assert len(seeds) > 50
            ok = 0
            for i in seeds:
                out = t(img, sample_seed(7, 0, i), b)
                ok += min(_shown(v, target) for v in out["image"][:2]) >= 0.03
            assert ok / len(seeds) >= 0.95


def test_target_is_the_largest_visible_box_of_the_first_crop_and_every_global_contains_it() -> None:
    boxes = np.array([[0, 0, 40, 40], [30, 30, 64, 64], [5, 50, 20, 62]], dtype=np.float64)
    t = largest_rule(dataclasses.replace(CROPS, n_global=3), P)
    targets = set()
    for seed in range(300):
        v = t.draw(64, 64, seed, boxes)
        assert v.paired
        frac = visible_fraction(boxes, v.crops[0])
        assert v.target == int(np.argmax(frac)) and frac[v.target] >= 0.04
        for g in range(3):
            assert visible_fraction(boxes[v.target : v.target + 1], v.crops[g])[0] >= 0.04
        targets.add(v.target)
    assert len(targets) >= 2  # the target changes with the first crop


def test_first_tries_are_the_plain_draws() -> None:
    """A box covering the whole image qualifies at once: exactly the plain crops, all valid."""
    for crops in (CROPS, AWARE):
        t, plain = largest_rule(crops, P), MultiCropTransform(crops)
        for seed in range(20):
            v = t.draw(50, 40, seed, np.array([[0, 0, 50, 40]]))
            assert v.crops == plain.geometry(50, 40, seed) and v.valid.all() and v.target == 0


def test_without_a_pair_the_views_are_plain_and_invalid() -> None:
    img = _scene(64, 64, [(30, 30, 31, 31)])
    for crops in (CROPS, AWARE):
        t, plain = largest_rule(crops, P), MultiCropTransform(crops)
        for boxes in (np.zeros((0, 4)), np.array([[30, 30, 31, 31]]), np.array([[70, 70, 90, 90]]), None):
            for seed in (1, 2, 3):
                out = t(img, seed, boxes)
                assert all(torch.equal(a, b) for a, b in zip(out["image"], plain(img, seed)))
                assert not out["obj_valid"].any()
                sizes = [32, 32, 16, 16, 16]
                assert all(m.all() and m.shape == ((s // P) ** 2,) for m, s in zip(out["obj_masks"], sizes))


def test_validity_and_masks_of_local_views() -> None:
    boxes = np.array([[8, 20, 30, 44], [40, 2, 62, 30]], dtype=np.float64)
    plain_t, aware_t = largest_rule(CROPS, P), largest_rule(AWARE, P)
    img = _scene(64, 64, [tuple(map(int, b)) for b in boxes])
    checked = 0
    for seed in range(200):
        a = plain_t.draw(64, 64, seed, boxes)
        out = plain_t(img, seed, boxes)
        # without object-aware locals: the plain locals, valid iff the pair is, [OBJ] sees them whole
        assert a.crops[2:] == MultiCropTransform(CROPS).geometry(64, 64, seed)[2:]
        assert out["obj_valid"].tolist() == [a.paired] * 5
        assert all(bool(m.all()) for m in out["obj_masks"][2:])
        b = aware_t.draw(64, 64, seed, boxes)
        out = aware_t(img, seed, boxes)
        assert b.crops[:2] == a.crops[:2] and b.target == a.target  # globals do not depend on the local setting
        if not b.paired:
            continue
        area = (b.view_boxes[:, 2] - b.view_boxes[:, 0]) * (b.view_boxes[:, 3] - b.view_boxes[:, 1])
        cover = area / np.array([32, 32, 16, 16, 16]) ** 2
        assert b.valid.tolist() == (cover >= 0.04).tolist()  # valid iff the view contains the target
        assert b.valid[2:].tolist() == sorted(b.valid[2:].tolist(), reverse=True)  # accepted first, top-ups last
        for v in range(5):
            size = 32 if v < 2 else 16
            want = (patch_mask_from_boxes(torch.from_numpy(b.view_boxes[v : v + 1]), size, size, P)[0]
                    if b.valid[v] else torch.ones((size // P) ** 2, dtype=torch.bool))
            assert torch.equal(out["obj_masks"][v], want)
        checked += 1
    assert checked > 150


def test_object_aware_locals_top_up_with_rejected_draws() -> None:
    """A target in a corner and tiny local crops: many local draws miss it; the top-ups are rejected draws, invalid."""
    crops = dataclasses.replace(AWARE, local_scale=(0.02, 0.03), n_local=4)
    t = largest_rule(crops, P)
    boxes = np.array([[0, 0, 24, 24]], dtype=np.float64)
    topped = some_valid = 0
    for seed in range(100):
        v = t.draw(96, 96, seed, boxes)
        assert v.paired
        n_valid = int(v.valid[2:].sum())
        assert v.valid[2:].tolist() == [True] * n_valid + [False] * (4 - n_valid)
        for crop in v.crops[2 + n_valid :]:
            assert visible_fraction(boxes, crop)[0] < 0.04
        assert len(set(v.crops[2:])) == 4  # no draw used twice
        topped += n_valid < 4
        some_valid += n_valid > 0
    assert topped > 20 and some_valid > 80  # 60 and 93 of 100 when written


# ------------------------------------------------------------------------------------ randomness
def test_reproducible_from_seed_epoch_index() -> None:
    boxes = np.array([[6, 30, 26, 50], [36, 4, 60, 24]], dtype=np.float32)
    img = _scene(64, 64, [(6, 30, 26, 50), (36, 4, 60, 24)])
    t = largest_rule(AWARE, P)
    for epoch, index in [(0, 0), (3, 17)]:
        s = sample_seed(5, epoch, index)
        a, b = t(img, s, boxes), largest_rule(AWARE, P)(img, s, boxes)
        assert all(torch.equal(x, y) for x, y in zip(a["image"], b["image"]))
        assert all(torch.equal(x, y) for x, y in zip(a["obj_masks"], b["obj_masks"]))
        assert torch.equal(a["obj_valid"], b["obj_valid"])
    draws = {tuple(t.draw(64, 64, sample_seed(5, e, 17), boxes).crops) for e in range(6)}
    assert len(draws) == 6  # another epoch, other views


def test_extra_draws_use_their_own_stream() -> None:
    """Further tries read stream 6, never the plain views' (1), photometric (2) or mask (4, 5) streams."""
    seed = 123
    t = largest_rule(CROPS, P)
    first = t.plain.geometry(64, 64, seed)[0]
    u0 = counter_uniforms([seed], 1, 0, 41)[0]
    assert (first.top, first.left, first.height, first.width) == random_resized_crop_box(64, 64, CROPS.global_scale,
                                                                                         CROPS.ratio, u0)
    tries = list(t._candidates(64, 64, seed, 0, [first], 0, 10))
    assert len(tries) == 10 and tries[0] == first
    for k in range(1, 10):  # try k of the first global view: stream 6, key k
        u = counter_uniforms([seed], 6, k, 41)[0]
        crop = tries[k]
        assert (crop.top, crop.left, crop.height, crop.width) == random_resized_crop_box(
            64, 64, CROPS.global_scale, CROPS.ratio, u)
        assert crop.flip == (u[40] < CROPS.flip_p)


# ------------------------------------------------------------------------------------ batches
def _old_transform(crops: CropsConfig, img: Image.Image, seed: int) -> list[torch.Tensor]:
    """MultiCropTransform.__call__ as it was before object-aware cropping (the reference)."""
    views = []
    uniforms = counter_uniforms([seed], 1, range(crops.n_global + crops.n_local), 41)[0]
    for v, u in enumerate(uniforms):
        is_global = v < crops.n_global
        size = crops.global_size if is_global else crops.local_size
        scale = crops.global_scale if is_global else crops.local_scale
        top, left, h, w = random_resized_crop_box(img.width, img.height, scale, crops.ratio, u)
        view = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if u[40] < crops.flip_p:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        views.append(torch.from_numpy(np.array(view, dtype=np.uint8)).permute(2, 0, 1))
    return views


def _noise_images() -> list[Image.Image]:
    rng = np.random.default_rng(123)
    sizes = [(48, 64), (80, 80), (70, 50), (33, 97)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _digest(batch: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        for t in (batch[k] if isinstance(batch[k], list) else [batch[k]]):
            h.update(k.encode())
            h.update(t.numpy().tobytes() if isinstance(t, torch.Tensor) else repr(t).encode())
    return h.hexdigest()


def test_runs_without_boxes_give_the_batches_of_before() -> None:
    ims = _noise_images()
    t = MultiCropTransform(CROPS)
    for i, img in enumerate(ims):
        for seed in (sample_seed(0, 3, i), 99):
            assert all(torch.equal(a, b) for a, b in zip(t(img, seed), _old_transform(CROPS, img, seed)))
    masking = build_masking(MaskingConfig(shape="block", pred_ratio=(0.3,), pred_ratio_var=(0.1,)), 32, 8, 2)
    samples = [{"image": t(ims[i % 4], sample_seed(0, 3, i)), "label": -1, "index": i, "bad": 0,
                "seed": sample_seed(0, 3, i), "epoch": 3} for i in range(8)]
    batch = MultiCropCollate(CROPS, photometric=False, masking=masking)(samples)
    assert "obj_masks" not in batch and "obj_valid" not in batch
    if PIL.__version__ == "13.0.0":  # the bytes of this PIL's bicubic filter, recorded before the change
        assert _digest(batch) == "f885232b98970ca7fadae526557bad9ae0984c7fb2e74d0499e26f7dfea9f9ce"


def test_collate_stacks_object_masks_and_keeps_the_crops() -> None:
    ims = _noise_images()
    boxes = [np.array([[0, 0, 30, 30]]), np.zeros((0, 4)), np.array([[10, 10, 40, 60], [0, 0, 5, 5]]),
             np.array([[20, 5, 60, 30]])]
    t, plain = largest_rule(AWARE, P), MultiCropTransform(AWARE)
    seeds = [sample_seed(1, 0, i) for i in range(4)]
    obj = [{**t(ims[i], s, boxes[i]), "label": -1, "index": i, "bad": 0, "seed": s} for i, s in enumerate(seeds)]
    views = [t.draw(ims[i].width, ims[i].height, s, boxes[i]) for i, s in enumerate(seeds)]
    batch = MultiCropCollate(AWARE)(obj)
    assert [tuple(m.shape) for m in batch["obj_masks"]] == [(4, 16)] * 2 + [(4, 4)] * 3
    assert all(m.dtype == torch.bool for m in batch["obj_masks"])
    assert batch["obj_valid"].shape == (4, 5) and batch["obj_valid"].dtype == torch.bool
    assert batch["obj_valid"].tolist() == [v.valid.tolist() for v in views]
    assert not batch["obj_valid"][1].any()  # no boxes
    for v in range(5):
        assert all(torch.equal(batch["obj_masks"][v][b], obj[b]["obj_masks"][v]) for b in range(4))
    # the photometric part sees the same uint8 views whatever produced them
    same = [{"image": s["image"], "label": -1, "index": s["index"], "bad": 0, "seed": s["seed"]} for s in obj]
    assert all(torch.equal(a, b) for a, b in zip(batch["crops"], MultiCropCollate(AWARE)(same)["crops"]))
    # a sample without boxes keeps its plain views
    assert all(torch.equal(a, b) for a, b in zip(obj[1]["image"], plain(ims[1], seeds[1])))
    with pytest.raises(ValueError, match="1 of 2 samples carry object masks"):
        MultiCropCollate(AWARE)([obj[0], same[1]])


def _boxes_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    boxes = {"a.png": (4, 8, 30, 40), "b.png": (20, 10, 60, 50), "sub/c.png": (0, 0, 48, 48), "d.png": None,
             "e.png": (30, 2, 50, 20), "f.png": (5, 5, 25, 25)}
    images, anns = [], []
    for i, (name, box) in enumerate(boxes.items(), start=1):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        _scene(64, 56, [box] if box else [], seed=i).save(root / name)
        if box:
            images.append({"id": i, "file_name": name, "width": 64, "height": 56})
            anns.append({"id": i, "image_id": i, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    (root.parent / "boxes.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root.parent / "boxes.json"


def _cfg(folder: Path, boxes: Path | None, workers: int = 0, aware: bool = False):
    return config_from_dict({
        "run": {"seed": 3},
        "data": {"train_dir": str(folder), "batch_size": 3, "num_workers": workers,
                 "boxes": None if boxes is None else str(boxes),
                 "crops": {"n_global": 2, "global_size": 32, "n_local": 2, "local_size": 16,
                           "object_aware_local": aware}},
        "model": {"patch_size": 8},
    })


def test_loader_with_boxes(tmp_path: Path) -> None:
    folder = tmp_path / "scenes"
    boxes_file = _boxes_folder(folder)
    runs = []
    for boxes, aware in ((None, False), (boxes_file, False), (boxes_file, True), (boxes_file, True)):
        loader, sampler = build_train_loader(_cfg(folder, boxes, aware=aware), None)
        sampler.set_epoch(2)
        runs.append((loader, list(loader)))
    (plain_loader, plain), (_, obj), (aware_loader, aware), (_, again) = runs
    assert plain_loader.dataset.boxes is None and all("obj_masks" not in b for b in plain)
    assert aware_loader.dataset.boxes.report["folder_images_without_boxes"] == 1
    assert len(obj) == len(plain) == 2
    for p_b, o_b, a_b, a2 in zip(plain, obj, aware, again):
        assert torch.equal(p_b["index"], o_b["index"]) and torch.equal(o_b["seed"], a_b["seed"])
        assert [tuple(m.shape) for m in o_b["obj_masks"]] == [(3, 16), (3, 16), (3, 4), (3, 4)]
        assert o_b["obj_valid"].shape == (3, 4)
        # the batch equals the samples drawn directly from (seed, epoch, index)
        files = aware_loader.dataset.files
        for b, index in enumerate(o_b["index"].tolist()):
            s = sample_seed(3, 2, index)
            img = load_rgb(files.abspath(index))
            want = ObjectMultiCropTransform(_cfg(folder, boxes_file).data.crops, 8)(  # the default rule, as the loader
                img, s, aware_loader.dataset.boxes.boxes_for(files.paths[index])[0])
            assert o_b["obj_valid"][b].tolist() == want["obj_valid"].tolist()
            assert all(torch.equal(m[b], w) for m, w in zip(o_b["obj_masks"], want["obj_masks"]))
        assert all(torch.equal(x, y) for x, y in zip(a_b["crops"], a2["crops"]))  # reproducible
        assert all(torch.equal(x, y) for x, y in zip(a_b["obj_masks"], a2["obj_masks"]))
    seen_d = [b["obj_valid"][i] for b in obj for i, ix in enumerate(b["index"].tolist())
              if runs[1][0].dataset.files.paths[ix] == "d.png"]
    assert all(not v.any() for v in seen_d)
    # a worker process draws the same batches
    loader, sampler = build_train_loader(_cfg(folder, boxes_file, workers=1, aware=True), None)
    sampler.set_epoch(2)
    for a_b, w_b in zip(aware, loader):
        assert all(torch.equal(x, y) for x, y in zip(a_b["crops"], w_b["crops"]))
        assert all(torch.equal(x, y) for x, y in zip(a_b["obj_masks"], w_b["obj_masks"]))
        assert torch.equal(a_b["obj_valid"], w_b["obj_valid"])


def test_substituted_images_bring_their_own_boxes(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a_bad.png").write_bytes(b"not a png")
    _scene(40, 40, [(0, 0, 40, 40)]).save(folder / "b_good.png")
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "b_good.png"}],
                                "annotations": [{"image_id": 1, "bbox": [0, 0, 40, 40]}]}))
    files = scan_image_folder(folder, labeled=False)
    bf = read_boxes(path, folder, paths=files.paths)
    ds = ImageFolderDataset(files, largest_rule(CROPS, P), boxes=bf)
    with pytest.warns(BadImageWarning):
        sample = ds[(0, 11)]  # a_bad.png is unreadable: b_good.png and its whole-image box stand in
    assert sample["bad"] == 1 and sample["obj_valid"].all()
    with pytest.raises(ValueError, match="needs a transform"):
        ImageFolderDataset(files, None, boxes=bf)
