"""Settings that would silently do nothing are refused in one sentence before anything is written, and a
monitor that a step did not compute is left out of the log line instead of logged as 0.0."""
from __future__ import annotations

import json

import pytest

from ssl_distill.config import load_config
from ssl_distill.data.boxes import BoxesWarning
from ssl_distill.data.loader import build_train_loader
from ssl_distill.engine.train import Trainer

import test_bad_input
from test_bad_input import cli_error
from test_end_to_end import CONFIG, make_folder, tiny_overrides

IBOT = ["ibot.weight=1", "masking.shape=block"]
ATTMASK = ["ibot.weight=1", "masking.attmask=high"]
ODIS = ["odis.weight=1", "data.boxes=boxes.json"]


@pytest.mark.parametrize("overrides, expect", [
    (ATTMASK + ["masking.masking_prob=0"], "masking.masking_prob=0 masks no view, so the patch term of "
                                           "masking.attmask=high would never train"),
    (IBOT + ["masking.masking_prob=0"], "masking.masking_prob=0.0 applies to AttMask's masks only, and "
                                        "masking.attmask=none"),
    (["masking.masking_prob=0.2"], "masking.masking_prob=0.2 applies to AttMask's masks only"),  # DINO
    (IBOT + ["masking.pred_start_epoch=3"], r"masking.pred_start_epoch=3.0 leaves no epoch of the run to mask "
                                            r"\(optim.epochs=3.0; masks from the data start at a whole epoch\)"),
    (IBOT + ["masking.pred_start_epoch=2.5"], "pred_start_epoch=2.5 leaves no epoch"),  # sample epochs 0, 1, 2
    (ATTMASK + ["masking.pred_start_epoch=5", "optim.epochs=4.5"], "pred_start_epoch=5.0 leaves no epoch"),
    (["masking.pred_start_epoch=1"], "masking.pred_start_epoch=1.0 delays the patch masks, but nothing masks"),
    (ODIS + ["data.crops.object_aware_local=true", "data.crops.n_local=0"],
     "object_aware_local=true draws the local crops around the target object, but data.crops.n_local=0"),
])
def test_settings_that_would_do_nothing_are_refused_before_anything_is_written(overrides, expect, tmp_path, capsys):
    test_bad_input.test_out_of_range_values_name_the_key_and_write_nothing(overrides, expect, tmp_path, capsys)


def test_the_same_settings_where_they_act_are_accepted():
    load_config(CONFIG, ATTMASK + ["masking.masking_prob=1", "masking.pred_start_epoch=2.9"])
    load_config(CONFIG, IBOT + ["masking.pred_start_epoch=1.5"])  # masks from epoch 2 of 3
    load_config(CONFIG, ODIS + ["data.crops.object_aware_local=true", "data.crops.n_local=1"])


def test_odis_boxes_that_all_fall_outside_their_images_are_refused_leaving_no_run(tmp_path, capsys):
    images = make_folder(tmp_path / "train", 4, 0)  # 32 x 32 images
    names = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    boxes = {"images": [{"id": i, "file_name": n, "width": 32, "height": 32} for i, n in enumerate(names)],
             "annotations": [{"id": i, "image_id": i, "category_id": 1,
                              "bbox": [40, 2, 8, 8] if i % 2 else [4, 4, 0, 6]} for i in range(len(names))],
             "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    out = tmp_path / "run"
    with pytest.warns(BoxesWarning) as warned:  # one warning per kind of dropped box, then the error
        err = cli_error(["train", str(CONFIG), *tiny_overrides(images, out), "odis.weight=1",
                         f"data.boxes={tmp_path / 'boxes.json'}"], capsys)
    assert len(warned) == 2
    assert err == (f"error: boxes file {tmp_path / 'boxes.json'} leaves no box to train on (8 images listed, 4 boxes "
                   "outside their image, 4 of zero width or height): the object term would be 0 for the whole run; "
                   "give each box in its image's pixels, as COCO's [x, y, width, height]")
    assert not out.exists()


def test_with_the_whole_image_fallback_boxes_that_all_fall_outside_still_train_every_image(tmp_path):
    """odis.no_box=whole_image gives every image without a box an [OBJ] term on every patch, so a boxes file
    that keeps no box is not a run whose object term would be 0."""
    images = make_folder(tmp_path / "train", 4, 0)
    names = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    boxes = {"images": [{"id": i, "file_name": n, "width": 32, "height": 32} for i, n in enumerate(names)],
             "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [40, 2, 8, 8]}
                             for i in range(len(names))],
             "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    cfg = load_config(CONFIG, [*tiny_overrides(images, tmp_path / "run"), "odis.weight=1", "odis.no_box=whole_image",
                               f"data.boxes={tmp_path / 'boxes.json'}"])
    with pytest.warns(BoxesWarning):
        loader, _ = build_train_loader(cfg, None)
    batch = next(iter(loader))
    assert batch["obj_valid"].all() and all(m.all() for m in batch["obj_masks"])


def test_a_monitor_no_step_computed_is_left_out_of_the_log_line(tmp_path):
    """AttMask from epoch 0.5 of 4-step epochs: steps 0 and 1 mask nothing, steps 2 and 3 mask every view.
    The line of steps 0-2 holds the patch teacher's monitors of step 2 alone; with the patch teacher the
    only one watched (no [CLS] term), the collapse monitor skips a window without them."""
    images = make_folder(tmp_path / "train", 8, 0)
    late_masks = ATTMASK + ["masking.masking_prob=1", "masking.pred_start_epoch=0.5", "dino.weight=0",
                            "run.precision=fp32"]
    out = tmp_path / "run"
    trainer = Trainer(load_config(CONFIG, tiny_overrides(images, out) + late_masks +
                                  ["run.log_every=3", "run.stop_at_step=4"]))
    assert trainer.iters_per_epoch == 4 and trainer.watched[0] == "patch_teacher_entropy"
    steps: list[dict[str, float]] = []
    real_step = trainer.train_step

    def recorded(*args, **kwargs):
        steps.append(real_step(*args, **kwargs))
        return steps[-1]

    trainer.train_step = recorded
    trainer.fit()
    monitors = ("patch_teacher_entropy", "patch_teacher_kl_uniform")
    assert [r["mask_ratio"] > 0 for r in steps] == [False, False, True, True]
    assert [all(k in r for k in monitors) for r in steps] == [False, False, True, True]
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 4]
    for k in monitors:  # the mean over the steps that computed it: step 2's value, not diluted by two zeros
        assert lines[0][k] == steps[2][k] and lines[1][k] == steps[3][k]
    assert lines[0]["mask_ratio"] == pytest.approx(steps[2]["mask_ratio"] / 3)  # a measured 0 still counts

    # a line whose steps all masked nothing: the measured mask ratio and patch term (0), no monitor
    early = tmp_path / "early"
    cfg = load_config(CONFIG, tiny_overrides(images, early) + late_masks + ["run.log_every=2", "run.stop_at_step=2"])
    assert Trainer(cfg).fit()["step"] == 2
    (line,) = [json.loads(line) for line in (early / "log.jsonl").read_text().splitlines()]
    assert line["mask_ratio"] == 0 and line["patch"] == 0 and not any(k in line for k in monitors)
