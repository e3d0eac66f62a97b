"""Normalized-cut discovery: the cut on hand-built graphs, the flip and component rules, boxes with
padding, the Lanczos solver against the dense reference, outputs and the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from scenes import make_scenes, tiny_checkpoint, write_coco, write_voc
from ssl_distill.eval.corloc import read_coco
from ssl_distill.eval.discover import (
    EPS,
    GAP_TOL,
    DegenerateGraphWarning,
    affinity,
    bipartition,
    default_dinoseg_head,
    dino_seg,
    discover_image,
    discover_images,
    largest_component,
    main,
    mask_box,
    ncut,
    prepare_image,
    second_eigenpairs,
    second_eigenvector,
    seed_component,
    write_coco_boxes,
)
from ssl_distill.eval.model import load_model
from ssl_distill.models import BackboneSpec, ViTBackbone
from ssl_distill.models.inspect import cls_attention_maps, last_block_heads


def two_cluster_graph(grid: tuple[int, int], fg: np.ndarray, eps: float = EPS) -> np.ndarray:
    """W = 1 inside each cluster (foreground tokens / the rest), eps across."""
    lab = fg.ravel()
    return np.where(lab[:, None] == lab[None, :], 1.0, eps)


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_two_clusters_known_answer(method):
    h, w = 12, 15  # 180 tokens: small enough for the dense solve, Lanczos forced
    fg = np.zeros((h, w), dtype=bool)
    fg[3:7, 4:10] = True  # 24 tokens: the smaller cluster
    W = two_cluster_graph((h, w), fg)
    lam, x = second_eigenvector(W, method)
    n1, n2 = fg.sum(), (~fg).sum()
    d1, d2 = n1 + EPS * n2, n2 + EPS * n1
    # piecewise-constant eigenvector, eigenvalue eps (n2 / d1 + n1 / d2), D-normalised
    assert lam == pytest.approx(EPS * (n2 / d1 + n1 / d2), rel=1e-6)
    d = W.sum(1)
    assert x @ (d * x) == pytest.approx(1.0)
    res = ncut(W, (h, w), 8, (h * 8, w * 8), method)
    # a simple lambda_2: not degenerate; lambda_3 = 1 (the only other eigenvalue of a two-block graph)
    assert res.degenerate is None and res.lambda3 == pytest.approx(1.0, abs=1e-6)
    # the seed (largest |x|) lies in the smaller-volume cluster, which becomes the foreground
    np.testing.assert_array_equal(res.bipartition, fg)
    np.testing.assert_array_equal(res.mask, fg)
    assert fg[res.seed] and res.box == (4 * 8, 3 * 8, 10 * 8, 7 * 8)
    assert res.eigenvector[fg].min() > res.eigenvector[~fg].max()  # oriented: foreground high


def test_flip_rule():
    x = np.array([-5.0, 1.0, 1.0, 1.0, 2.0])  # mean 0; the largest |x| is below the mean
    part, seed, xo = bipartition(x)
    assert seed == 0 and part.tolist() == [True, False, False, False, False]
    np.testing.assert_array_equal(xo, -x)
    part2, seed2, xo2 = bipartition(-x)  # the sign of the eigenvector does not matter
    assert seed2 == 0 and part2.tolist() == part.tolist()
    np.testing.assert_array_equal(xo2, xo)
    part3, seed3, xo3 = bipartition(np.array([0.0, 0.1, 0.2, 3.0]))  # seed already foreground: no flip
    assert seed3 == 3 and part3.tolist() == [False, False, False, True]
    np.testing.assert_array_equal(xo3, [0.0, 0.1, 0.2, 3.0])


def test_ties_are_decided_as_in_exact_arithmetic():
    # an eigenvector localised on two lone tokens, +a and -a, every other entry at the mean (0): the
    # seed is the first of the tied |x| (argmax's rule), the tokens at the mean are background, and
    # neither the sign of x nor rounding noise changes the answer
    x = np.zeros(12)
    x[3], x[8] = 0.25, -0.25
    for sign in (1.0, -1.0):
        part, seed, xo = bipartition(sign * x)
        assert seed == 3 and part.tolist() == [i == 3 for i in range(12)] and xo[3] > 0
    noise = np.random.default_rng(0).normal(0.0, 1e-15, 12)
    for trial in range(20):
        noisy = (x + np.roll(noise, trial)) * (1.0 if trial % 2 else -1.0)
        part, seed, _ = bipartition(noisy)
        assert seed == 3 and part.tolist() == [i == 3 for i in range(12)]
    # without ties, TokenCut's rule unchanged: complement when the seed is below the mean
    y = np.array([-5.0, 1.0, 1.0 + 1e-6, 1.0, 2.0])
    part, seed, _ = bipartition(y)
    assert seed == 0 and part.tolist() == [True, False, False, False, False]


def test_component_rule_is_four_connected():
    fg = np.array([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0],  # touches the first blob only at a corner: a separate component
        [0, 0, 1, 0, 0],
        [1, 0, 0, 0, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(seed_component(fg, (0, 0)), np.isin(np.arange(25).reshape(5, 5), [0, 1, 5, 6]))
    np.testing.assert_array_equal(seed_component(fg, (3, 2)), np.isin(np.arange(25).reshape(5, 5), [12, 13, 17]))
    assert seed_component(fg, (4, 4)).sum() == 1
    with pytest.raises(ValueError, match="not in the foreground"):
        seed_component(fg, (0, 4))


def test_cut_keeps_only_the_seed_component():
    # foreground cluster made of two separate blobs with identical features: the box covers the seed's blob only
    h, w = 10, 10
    fg = np.zeros((h, w), dtype=bool)
    fg[1:3, 1:3] = True  # 4 tokens
    fg[6:9, 5:9] = True  # 12 tokens
    W = two_cluster_graph((h, w), fg)
    res = ncut(W, (h, w), 16, (160, 160))
    np.testing.assert_array_equal(res.bipartition, fg)
    assert res.mask.sum() in (4, 12) and res.mask.sum() < fg.sum()
    assert res.box in ((16, 16, 48, 48), (80, 96, 144, 144))


def test_box_scaling_with_padding():
    # a 37 x 30 image at patch 8 is padded to 40 x 32: a 5 x 4 grid; the last row/column is part padding
    x, size = prepare_image(Image.new("RGB", (37, 30), (200, 10, 30)), 8)
    assert x.shape == (1, 3, 32, 40) and size == (30, 37)
    assert torch.all(x[..., 30:, :] == 0) and torch.all(x[..., :, 37:] == 0) and torch.all(x[..., :30, :37] != 0)
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:3] = True
    assert mask_box(mask, 8, size) == (8, 8, 24, 24)
    mask[3, 4] = True  # the bottom-right token: its box edge is clipped to the unpadded image
    assert mask_box(mask, 8, size) == (8, 8, 37, 30)
    W = two_cluster_graph((4, 5), mask)
    res = ncut(W, (4, 5), 8, size)
    assert res.pixel_mask().shape == (30, 37)


def test_lanczos_matches_the_dense_generalized_solve():
    """Noisy 3-cluster key sets (288 tokens), thresholded like real keys: same eigenvalue and partition."""
    rng = np.random.default_rng(0)
    for trial in range(3):
        h, w = 16, 18
        labels = np.zeros((h, w), dtype=int)
        labels[rng.integers(0, 6):rng.integers(9, 15), rng.integers(0, 6):rng.integers(9, 16)] = 1
        labels[:, : rng.integers(2, 6)] = 2
        centers = rng.standard_normal((3, 32))
        keys = centers[labels.ravel()] + rng.normal(0, 0.9, (h * w, 32))
        W = affinity(torch.from_numpy(keys).float())
        assert set(np.unique(W)) == {EPS, 1.0}
        d = W.sum(1)
        vals, vecs = scipy.linalg.eigh(np.diag(d) - W, np.diag(d), subset_by_index=[1, 2])
        lam, x, lam3 = second_eigenpairs(W, "lanczos")
        assert lam == pytest.approx(vals[0], rel=1e-8, abs=1e-10)
        assert lam3 == pytest.approx(vals[1], rel=1e-8, abs=1e-10) and lam3 - lam > GAP_TOL
        assert abs(x @ (d * vecs[:, 0])) == pytest.approx(1.0, abs=1e-8)  # same vector up to sign
        a, b = ncut(W, (h, w), 8, (160, 160), "lanczos"), ncut(W, (h, w), 8, (160, 160), "dense")
        assert a.degenerate is None and b.degenerate is None
        np.testing.assert_array_equal(a.bipartition, b.bipartition)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.box == b.box


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_constant_graph_keeps_the_whole_image(method):
    # all pairs above tau: every vector orthogonal to 1 is an eigenvector, no cut exists
    with pytest.warns(DegenerateGraphWarning, match="constant graph"):
        res = ncut(np.ones((12, 12)), (3, 4), 8, (20, 30), method)
    assert res.degenerate == "constant graph"
    assert res.mask.all() and res.bipartition.all() and res.box == (0, 0, 30, 20)
    assert not res.eigenvector.any() and res.eigenvalue == res.lambda3 == 1.0


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_repeated_second_eigenvalue_keeps_the_whole_image(method):
    # three equal, mutually dissimilar clusters: lambda_2 = lambda_3 = 3 eps / (1 + 2 eps), a 2-D eigenspace;
    # any split of it is as good as another, so the cut is undefined
    h, w = 12, 15
    labels = np.repeat([0, 1, 2], h * w // 3)
    W = np.where(labels[:, None] == labels[None, :], 1.0, EPS)
    lam, _, lam3 = second_eigenpairs(W, method)
    assert lam == pytest.approx(3 * EPS * 60 / (60 + 120 * EPS), rel=1e-6) and abs(lam3 - lam) <= GAP_TOL
    with pytest.warns(DegenerateGraphWarning, match="repeated eigenvalue"):
        res = ncut(W, (h, w), 8, (h * 8 - 3, w * 8 - 5), method)
    assert res.degenerate == "repeated eigenvalue"
    assert res.mask.all() and res.box == (0, 0, w * 8 - 5, h * 8 - 3) and not res.eigenvector.any()
    # break the symmetry (one cluster a token smaller): a unique cut again, both solvers agree
    labels[0] = 1
    W = np.where(labels[:, None] == labels[None, :], 1.0, EPS)
    a, b = ncut(W, (h, w), 8, (h * 8, w * 8), "lanczos"), ncut(W, (h, w), 8, (h * 8, w * 8), "dense")
    assert a.degenerate is None and b.degenerate is None and a.lambda3 - a.eigenvalue > GAP_TOL
    np.testing.assert_array_equal(a.bipartition, b.bipartition)


def test_nearly_constant_graph_is_cut():
    # all ones but two tokens dissimilar to a handful of others (as random-init ViT graphs often are):
    # not degenerate, and the cut separates what differs; both solvers agree
    h, w = 16, 18
    W = np.ones((h * w, h * w))
    for t in (40, 41):
        W[t, 100:106] = W[100:106, t] = EPS
    a, b = ncut(W, (h, w), 8, (h * 8, w * 8), "lanczos"), ncut(W, (h, w), 8, (h * 8, w * 8), "dense")
    assert a.degenerate is None and b.degenerate is None
    np.testing.assert_array_equal(a.bipartition, b.bipartition)
    assert not a.bipartition.all()


def test_discover_images_marks_degenerate_images(tmp_path, capsys):
    # a uniform image through a random-init ViT: every key pair is above tau (constant graph)
    torch.manual_seed(0)
    bb = ViTBackbone(BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2)).eval()
    Image.new("RGB", (48, 40), (128, 128, 128)).save(tmp_path / "flat.png")
    Image.fromarray(make_scenes(1, seed=5, size=(70, 90))[0].image).save(tmp_path / "scene.png")
    res = discover_images(bb, tmp_path, ["flat.png", "scene.png"], tmp_path / "out")
    assert res["degenerate"] == {"flat.png": "constant graph"}
    assert res["boxes"]["flat.png"] == [0, 0, 48, 40]
    assert "1 of 2 images have no unique normalized cut" in capsys.readouterr().err
    data = json.loads((tmp_path / "out" / "boxes.json").read_text())
    assert [a["ncut_degenerate"] for a in data["annotations"]] == ["constant graph", None]
    assert data["info"]["n_degenerate"] == 1


def test_discover_image_and_coco_boxes_file(tmp_path):
    torch.manual_seed(0)
    bb = ViTBackbone(BackboneSpec(arch="vit_tiny", patch_size=8, img_size=32, depth=2)).eval()
    scene = make_scenes(1, seed=5, size=(70, 90))[0]
    res = discover_image(bb, Image.fromarray(scene.image))
    hp, wp = -(-scene.image.shape[0] // 8), -(-scene.image.shape[1] // 8)
    assert res.mask.shape == (hp, wp) and res.eigenvector.shape == (hp, wp) and res.mask[res.seed]
    x0, y0, x1, y1 = res.box
    assert 0 <= x0 < x1 <= scene.image.shape[1] and 0 <= y0 < y1 <= scene.image.shape[0]
    assert {"features", "affinity", "solve"} <= set(res.timings)
    path = write_coco_boxes(tmp_path / "boxes.json", [
        {"file_name": "sub/a.jpg", "width": 90, "height": 70, "box": res.box, "ncut_eigenvalue": res.eigenvalue},
        {"file_name": "b.png", "width": 10, "height": 10, "box": (1, 2, 5, 9)},
    ])
    data = json.loads(path.read_text())
    assert [im["file_name"] for im in data["images"]] == ["sub/a.jpg", "b.png"]
    assert data["annotations"][1] == {"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 2, 4, 7], "area": 28,
                                      "iscrowd": 0}
    assert "ncut_eigenvalue" in data["annotations"][0]
    np.testing.assert_array_equal(read_coco(path)["b.png"].boxes, [[1, 2, 5, 9]])  # readable as ground truth


@pytest.mark.parametrize("layout", ["voc", "coco"])
def test_command_line_on_a_scene_dataset(tmp_path, layout, capsys):
    ck = tiny_checkpoint(tmp_path / "run" / "checkpoint.pth")
    sc = make_scenes(3, seed=7, size=(50, 70), max_objects=2)
    out = tmp_path / "out"
    if layout == "voc":
        root = write_voc(tmp_path / "voc", sc)
        args = [str(tmp_path / "run"), "--voc", str(root)]
    else:
        images, js = write_coco(tmp_path / "coco", sc)
        args = [str(ck), "--coco", str(js), "--images", str(images)]
    assert main(args + ["--out", str(out), "--masks", "--heatmaps", "--random-init"]) == 0
    printed = capsys.readouterr().out
    assert "3 boxes ->" in printed and "CorLoc" in printed
    boxes = json.loads((out / "boxes.json").read_text())
    names = [im["file_name"] for im in boxes["images"]]
    assert len(names) == 3 and len(boxes["annotations"]) == 3
    result = json.loads((out / "corloc.json").read_text())
    assert result["n_images"] == 3 and result["which"] == "random_init" and result["precision"] == "fp32"
    # CorLoc recomputed here from the written boxes and the scenes' true boxes (pixel edges)
    best = {}
    for name, s, ann in zip(names, sc, boxes["annotations"]):
        x, y, w, h = ann["bbox"]
        ious = []
        for x0, y0, x1, y1 in s.boxes:
            inter = max(0, min(x + w, x1) - max(x, x0)) * max(0, min(y + h, y1) - max(y, y0))
            ious.append(inter / (w * h + (x1 - x0) * (y1 - y0) - inter))
        best[name] = max(ious)
    assert result["best_iou"] == pytest.approx(best)
    assert result["n_hits"] == sum(v >= 0.5 for v in best.values()) and result["corloc"] == result["n_hits"] / 3
    for name, s in zip(names, sc):
        stem = name.rsplit(".", 1)[0]
        mask = np.asarray(Image.open(out / "masks" / f"{stem}.png"))
        assert mask.shape == s.image.shape[:2] and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
        heat = Image.open(out / "heatmaps" / f"{stem}.png")
        assert heat.size == (s.image.shape[1], s.image.shape[0]) and heat.mode == "RGB"
    # a plain folder without ground truth works too and the output defaults to the run directory
    folder = tmp_path / "voc" / "JPEGImages" if layout == "voc" else tmp_path / "coco" / "images"
    assert main([str(tmp_path / "run"), "--images", str(folder), "--limit", "1"]) == 0
    assert len(json.loads((tmp_path / "run" / "discover" / "boxes.json").read_text())["images"]) == 1
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing"), "--images", str(folder)])
    assert "missing" in capsys.readouterr().err



def test_a_folder_of_unreadable_files_is_an_error_and_keeps_the_earlier_boxes(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "run" / "checkpoint.pth")
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(make_scenes(1, seed=5, size=(40, 48))[0].image).save(folder / "scene.png")
    out = tmp_path / "out"
    assert main([str(ck), "--images", str(folder), "--out", str(out), "--random-init"]) == 0
    before = (out / "boxes.json").read_bytes()
    (folder / "scene.png").write_bytes(b"\x89PNG truncated")  # the same folder, its one image now broken
    with pytest.raises(SystemExit) as stop:
        main([str(ck), "--images", str(folder), "--out", str(out), "--random-init"])
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert f"error: none of the 1 image(s) could be read (the first: {folder / 'scene.png'}:" in err
    assert "Traceback" not in err and (out / "boxes.json").read_bytes() == before


# ---------------------------------------------------------------------- DINO-seg
def lost_dino_seg_box(attention: np.ndarray, patch: int) -> list[int]:
    """LOST's DINO-seg on one (h, w) map, written out from the paper's recipe: renormalise, sort ascending,
    keep the patches whose cumulative mass exceeds 1 - 0.6, label 4-connected components (scipy's default
    structure), box the largest non-background one, in pixels (no clipping)."""
    h, w = attention.shape
    a = torch.as_tensor(attention, dtype=torch.float64).reshape(-1)
    val, idx = torch.sort(a / a.sum())
    keep_sorted = torch.cumsum(val, 0) > 1 - 0.6
    keep = torch.zeros_like(keep_sorted)
    keep[idx] = keep_sorted
    labels, n = scipy.ndimage.label(keep.reshape(h, w).numpy())
    sizes = [int((labels == c).sum()) for c in range(1, n + 1)]
    rows, cols = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return [cols.min() * patch, rows.min() * patch, (cols.max() + 1) * patch, (rows.max() + 1) * patch]


def test_dino_seg_keeps_sixty_percent_and_boxes_the_largest_component():
    # 5 x 6 map: a 3-patch blob of 0.15 each (0.45), one far patch of 0.2, 26 patches sharing 0.35
    m = np.full((5, 6), 0.35 / 26)
    m[1, 1:4] = 0.15
    m[4, 5] = 0.2
    res = dino_seg(m[None], 8, (40, 48), head=0)
    # 0.2 + 0.45 = 0.65 >= 0.6 and 0.45 alone < 0.6: both blobs kept, nothing else
    expected_kept = np.zeros((5, 6), dtype=bool)
    expected_kept[1, 1:4] = expected_kept[4, 5] = True
    np.testing.assert_array_equal(res.kept, expected_kept)
    np.testing.assert_array_equal(res.mask, expected_kept & (np.arange(5)[:, None] == 1))
    assert res.box == (8, 8, 32, 16) and res.coco_bbox() == [8, 8, 24, 8]
    assert res.box_fields() == {"dinoseg_head": 0, "dinoseg_component_mass": pytest.approx(0.45)}
    assert res.pixel_mask().sum() == 3 * 64 and res.degenerate is None


def test_dino_seg_single_component_is_the_object_not_the_background():
    # one kept blob: LOST's code (range(max label)) would box the background here; we box the blob
    m = np.full((6, 6), 0.1 / 32)
    m[2:4, 2:4] = 0.9 / 4
    res = dino_seg(m[None], 4, (24, 24), head=0)
    assert res.box == (8, 8, 16, 16)


def test_dino_seg_matches_losts_recipe_on_random_maps():
    rng = np.random.default_rng(0)
    for trial in range(20):
        maps = rng.gamma(0.3, size=(3, 7, 9))
        maps /= maps.sum(axis=(1, 2), keepdims=True)
        for head in range(3):
            res = dino_seg(maps, 16, (7 * 16, 9 * 16), head=head)
            assert list(res.box) == lost_dino_seg_box(maps[head], 16), (trial, head)
        res = dino_seg(maps, 16, (7 * 16, 9 * 16), head="mean")
        assert list(res.box) == lost_dino_seg_box(maps.mean(0), 16)
        np.testing.assert_allclose(res.attention, maps.mean(0))


def test_dino_seg_head_errors_and_largest_component_tie():
    with pytest.raises(ValueError, match="the model has 3 heads"):
        dino_seg(np.ones((3, 2, 2)) / 4, 8, (16, 16), head=3)
    kept = np.array([[1, 0, 1], [1, 0, 1]], dtype=bool)  # two components of 2: the first in scan order
    np.testing.assert_array_equal(largest_component(kept), [[1, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="no patch is kept"):
        largest_component(np.zeros((2, 2), dtype=bool))


def test_dino_seg_on_a_model_and_the_command_line(tmp_path, capsys):
    ck = tiny_checkpoint(tmp_path / "run" / "checkpoint.pth")
    sc = make_scenes(3, seed=7, size=(50, 70), max_objects=2)
    images, js = write_coco(tmp_path / "coco", sc)
    bb, _ = load_model(ck)
    img = Image.open(images / json.loads(js.read_text())["images"][0]["file_name"])
    res = discover_image(bb, img, dinoseg_head="mean")
    x, _ = prepare_image(img, bb.patch_size)
    maps = cls_attention_maps(bb, x)[0].numpy()  # the map the box must come from: the heads' mean
    np.testing.assert_allclose(res.attention, maps.mean(0), rtol=1e-5, atol=1e-7)
    assert list(res.box) == [min(v, lim) for v, lim in zip(lost_dino_seg_box(maps.mean(0), bb.patch_size),
                                                           (img.width, img.height) * 2)]
    out = tmp_path / "out"
    assert main([str(ck), "--coco", str(js), "--images", str(images), "--out", str(out), "--dinoseg",
                 "--dinoseg-head", "0", "--heatmaps"]) == 0
    assert "CorLoc" in capsys.readouterr().out
    boxes = json.loads((out / "boxes.json").read_text())
    assert boxes["info"]["method"] == "dinoseg" and boxes["info"]["head"] == 0
    assert all(a["dinoseg_head"] == 0 and 0 < a["dinoseg_component_mass"] <= 1 for a in boxes["annotations"])
    result = json.loads((out / "corloc.json").read_text())
    assert result["method"] == "dinoseg" and result["n_images"] == 3
    n_heads = last_block_heads(bb)
    with pytest.raises(SystemExit):
        main([str(ck), "--images", str(images), "--dinoseg", "--dinoseg-head", str(n_heads)])
    assert f"--dinoseg-head {n_heads} does not exist: the model has {n_heads} heads" in capsys.readouterr().err
    assert not (tmp_path / "run" / "discover_dinoseg").exists()  # refused before anything is written
    with pytest.raises(SystemExit):
        main([str(ck), "--images", str(images), "--dinoseg", "--dinoseg-head", "first"])
    assert "expected a head index or 'mean'" in capsys.readouterr().err


def test_dino_seg_defaults_to_a_head_the_model_has(tmp_path, capsys):
    """LOST's head 4 where the model has it; the heads' mean on a ViT-tiny (3 heads), said once."""
    assert default_dinoseg_head(6) == 4 and default_dinoseg_head(12) == 4
    assert default_dinoseg_head(4) == default_dinoseg_head(3) == "mean"
    maps = np.random.default_rng(0).random((3, 4, 5))
    maps /= maps.sum(axis=(1, 2), keepdims=True)
    assert dino_seg(maps, 8, (32, 40)).head == "mean"
    ck = tiny_checkpoint(tmp_path / "run" / "checkpoint.pth")
    images, js = write_coco(tmp_path / "coco", make_scenes(2, seed=7, size=(40, 56), max_objects=1))
    assert main([str(ck), "--coco", str(js), "--images", str(images), "--out", str(tmp_path / "out"), "--dinoseg"]) == 0
    assert "note: the model has 3 heads, so DINO-seg boxes the mean of their maps" in capsys.readouterr().out
    boxes = json.loads((tmp_path / "out" / "boxes.json").read_text())
    assert boxes["info"]["head"] == "mean" and {a["dinoseg_head"] for a in boxes["annotations"]} == {"mean"}
