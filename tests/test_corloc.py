"""CorLoc: IoU, the VOC and COCO readers (coordinate conventions) and the measure itself."""
from __future__ import annotations

import json

import numpy as np
import pytest

from scenes import make_scenes, write_coco, write_voc
from ssl_distill.eval.corloc import AnnotationError, box_iou, corloc, main, read_boxes_json, read_coco, read_voc


def test_box_iou_known_values():
    assert box_iou([0, 0, 10, 10], [[0, 0, 10, 10]])[0] == 1.0
    assert box_iou([0, 0, 10, 10], [[10, 0, 20, 10]])[0] == 0.0  # touching edges share no area
    assert box_iou([0, 0, 10, 10], [[5, 0, 15, 10]])[0] == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [[2, 2, 8, 8]])[0] == pytest.approx(36 / 100)
    m = box_iou(np.array([[0, 0, 10, 10], [0, 0, 0, 0]]), np.array([[0, 0, 10, 10], [0, 0, 5, 10]]))
    np.testing.assert_allclose(m, [[1.0, 0.5], [0.0, 0.0]])  # a degenerate box has IoU 0, not nan


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """5 scenes (1-2 objects each) written in both layouts."""
    base = tmp_path_factory.mktemp("corloc")
    sc = make_scenes(5, seed=3, size=(40, 64), max_objects=2)
    voc = write_voc(base / "voc", sc)
    _, coco = write_coco(base / "coco", sc)
    return sc, voc, coco


def test_readers_round_trip_the_generated_boxes(tiny):
    sc, voc, coco = tiny
    gv, gc = read_voc(voc), read_coco(coco)
    assert sorted(gv) == [f"{s.name}.jpg" for s in sc] and sorted(gc) == [f"{s.name}.png" for s in sc]
    for s in sc:
        # VOC stores 1-based inclusive pixels (xmin = x0 + 1, xmax = x1): the reader undoes exactly that
        np.testing.assert_array_equal(gv[f"{s.name}.jpg"].boxes, s.boxes)
        np.testing.assert_array_equal(gc[f"{s.name}.png"].boxes, s.boxes)
        assert gv[f"{s.name}.jpg"].width == s.image.shape[1] and gc[f"{s.name}.png"].height == s.image.shape[0]
    # a split lists a subset; a missing split or folder says which file it wanted
    (voc / "ImageSets" / "Main" / "val.txt").write_text(f"{sc[1].name}\n")
    assert list(read_voc(voc, "val")) == [f"{sc[1].name}.jpg"]
    with pytest.raises(AnnotationError, match="test.txt"):
        read_voc(voc, "test")
    with pytest.raises(AnnotationError, match="Annotations"):
        read_voc(voc / "JPEGImages")


def test_voc_whole_image_box_convention(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>50</width><height>40</height></size>"
        "<object><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>50</xmax><ymax>40</ymax></bndbox></object>"
        "</annotation>")
    gt = read_voc(tmp_path, split=None)["a.jpg"]
    np.testing.assert_array_equal(gt.boxes, [[0, 0, 50, 40]])  # xmin=1..xmax=W covers the whole width
    assert gt.difficult.tolist() == [True]
    assert corloc({"a.jpg": [0, 0, 50, 40]}, {"a.jpg": gt}, skip_difficult=True).n_images == 0


def _shifted(box: np.ndarray, frac: float) -> np.ndarray:
    """The box moved right by ``frac`` of its width (IoU = (1 - frac) / (1 + frac))."""
    w = box[2] - box[0]
    return box + np.array([frac * w, 0, frac * w, 0])


@pytest.mark.parametrize("layout", ["voc", "coco"])
def test_corloc_on_a_tiny_dataset(tiny, layout):
    sc, voc, coco = tiny
    gt = read_voc(voc) if layout == "voc" else read_coco(coco)
    ext = ".jpg" if layout == "voc" else ".png"
    preds = {}
    # scene 0: exact first box (hit); scene 1: shifted by 1/4 width, IoU 0.6 (hit); scene 2: shifted by
    # 1/2 width, IoU 1/3 (miss); scene 3: the *last* gt box (hit: any gt box counts); scene 4: no prediction.
    preds[sc[0].name + ext] = sc[0].boxes[0].astype(float)
    preds[sc[1].name + ext] = _shifted(sc[1].boxes[0].astype(float), 0.25)
    preds[sc[2].name + ext] = _shifted(sc[2].boxes[0].astype(float), 0.5)
    preds[sc[3].name + ext] = np.stack([sc[3].boxes[-1], [0, 0, 1, 1]]).astype(float)  # only the first is used
    res = corloc(preds, gt)
    assert res.n_images == 5 and res.n_hits == 3 and res.corloc == pytest.approx(0.6)
    assert res.missing == [sc[4].name + ext]
    assert res.best_iou[sc[1].name + ext] == pytest.approx(0.6)
    assert not res.hits[sc[2].name + ext] and res.hits[sc[3].name + ext]
    # the threshold is inclusive (IoU >= 0.5): a shift of 1/3 width gives IoU exactly 0.5
    box = np.array([0.0, 0.0, 30.0, 10.0])
    one = {"x": type(gt[sc[0].name + ext])("x", box[None], np.zeros(1, bool))}
    assert corloc({"x": _shifted(box, 1 / 3)}, one).n_hits == 1
    assert corloc({"x": _shifted(box, 0.34)}, one).n_hits == 0


def test_boxes_file_and_command_line(tiny, tmp_path, capsys):
    sc, voc, coco = tiny
    # a predictions file in the discovery format: the ground truth itself, as COCO JSON -> CorLoc 100%
    data = json.loads(coco.read_text())
    data["images"] = [dict(im, file_name=im["file_name"].replace(".png", ".jpg")) for im in data["images"]]
    pred_file = tmp_path / "boxes.json"
    pred_file.write_text(json.dumps(data))
    assert set(read_boxes_json(pred_file)) == {f"{s.name}.jpg" for s in sc}
    assert main([str(pred_file), "--voc", str(voc)]) == 0
    assert "CorLoc 100.00% (5/5 images)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope.json"), "--coco", str(coco)])
    assert "nope.json" in capsys.readouterr().err


def test_command_line_says_what_is_wrong_instead_of_a_score(tiny, tmp_path, capsys):
    """Predictions named differently from the ground truth (a 0.00% that measured nothing), an IoU threshold
    outside (0, 1], and nothing left to evaluate: one sentence each, exit code 1."""
    sc, voc, coco = tiny
    pred_file = tmp_path / "boxes.json"
    pred_file.write_text(coco.read_text())  # the scenes' boxes named *.png; VOC's images are *.jpg

    def refused(*argv: str) -> str:
        with pytest.raises(SystemExit) as stop:
            main([str(pred_file), *argv])
        assert stop.value.code == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        return err

    err = refused("--voc", str(voc))
    assert f"none of the 5 predicted file names ('{sc[0].name}.png'" in err and f"'{sc[0].name}.jpg'" in err
    assert "relative to the image folder of the ground truth (JPEGImages/ for VOC)" in err
    for iou in ("2", "0", "-0.5"):
        assert "the IoU threshold (--iou) must be in (0, 1]" in refused("--coco", str(coco), "--iou", iou)
    data = json.loads(coco.read_text())
    hard = tmp_path / "all_difficult.json"
    hard.write_text(json.dumps(dict(data, annotations=[dict(a, iscrowd=1) for a in data["annotations"]])))
    assert "every box marked difficult" in refused("--coco", str(hard), "--skip-difficult")
    with pytest.raises(AnnotationError, match="the boxes file lists no image"):
        corloc({}, read_coco(coco))
    assert main([str(pred_file), "--coco", str(coco), "--iou", "1"]) == 0  # the edge is allowed
    assert "CorLoc 100.00% (5/5 images)" in capsys.readouterr().out


@pytest.mark.parametrize("images, annotations, expect", [
    ([{"file_name": "a.png"}], [], r"images\[0\] needs an 'id' and a 'file_name'"),
    ([{"id": 1, "file_name": "a.png"}], [{"id": 7, "image_id": 1}], r"annotations\[0\] \(id 7\) has bbox None"),
    ([{"id": 1, "file_name": "a.png"}], [{"id": 7, "image_id": 1, "bbox": "x"}],
     r"annotations\[0\] \(id 7\) has bbox 'x'; expected \[x, y"),
    ([{"id": 1, "file_name": "a.png"}], [{"id": 7, "image_id": 3, "bbox": [0, 0, 1, 1]}],
     r"annotations\[0\] \(id 7\) refers to no listed image \(image_id 3\)"),
])
def test_a_malformed_coco_ground_truth_names_the_entry(images, annotations, expect, tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    with pytest.raises(AnnotationError, match=rf"gt.json: {expect}"):  # a KeyError traceback before, for some
        read_coco(path)


def test_a_voc_box_that_is_not_a_number_names_the_file_and_tag(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><object><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>3</xmax>"
        "<ymax>4</ymax></bndbox></object></annotation>")
    with pytest.raises(AnnotationError, match=r"a.xml: <xmin> holds 'a', not a number"):
        read_voc(root, split=None)
