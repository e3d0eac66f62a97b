"""A training step waits for the device once: the finiteness check of its loss (AttMask once more, for the
copy of the teacher's attention its masks are drawn from). Logged values stay on the device until the
logging step reads a whole window at once, and a log line holds the same numbers as before.

The waits are counted on the CPU, where none costs anything, by what would wait on a GPU: reading a
tensor's value on the host (``item``, ``float``, ``int``, ``bool``, ``tolist``, ``numpy``, ``cpu``) and
ops whose output size depends on the values (``nonzero``, a boolean index, ``masked_select``). Not
counted: calls made by ``ssl_distill/data`` (host-side code on the loader's tensors, which are host tensors
on every device: the masks' positions are counted there) and the optimizer reading its step counts
(torch keeps them on the host for its default AdamW; the fused AdamW a CUDA run uses keeps them on the GPU
and reads none).
"""
from __future__ import annotations

import collections
import json
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from ssl_distill.config import load_config
from ssl_distill.engine.train import Trainer, train

from test_end_to_end import CONFIG, make_folder, tiny_overrides

IBOT = ["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0.3]", "masking.pred_ratio_var=[0.2]"]
RECIPES = {
    "dino": [],
    "ibot": IBOT,
    "attmask": ["ibot.weight=1", "masking.attmask=high", "masking.pred_ratio=[0.3]", "masking.pred_ratio_var=[0.2]"],
    "dinov2": IBOT + ["dino.centering=sinkhorn_knopp", "ibot.centering=sinkhorn_knopp", "ibot.shared_head=false",
                      "ibot.patch_out_dim=64", "dino.koleo_weight=0.1", "model.use_bn_in_head=false"],
    "odis": IBOT + ["odis.weight=1", "dino.weight=0"],
}
READS = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
         torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
         torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select, torch.masked_select}
PACKAGE = Path(__file__).resolve().parents[1] / "ssl_distill"


class CountWaits(TorchFunctionMode):
    """Counts, by call site, what would wait for a GPU (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        # (call site, the tensor read): held, so that no tensor made later (an optimizer state created in the
        # counted step) can take a freed one's id and hide its read
        self.calls: list[tuple[str, torch.Tensor]] = []

    def waits(self, host_tensors: set[int]) -> dict[str, int]:
        """The calls by site, leaving out those on ``host_tensors`` (ids of tensors on the host on every device)."""
        return dict(collections.Counter(site for site, tensor in self.calls if id(tensor) not in host_tensors))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        boolean_index = func is torch.Tensor.__getitem__ and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if func in READS or boolean_index:
            ours = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(str(PACKAGE))]
            if ours and not ours[-1].filename.startswith(str(PACKAGE / "data")):
                name = "boolean index" if boolean_index else func.__name__
                self.calls.append((f"{name} at {Path(ours[-1].filename).name}:{ours[-1].lineno}", args[0]))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A two-class folder of 32 x 32 images and a COCO boxes file of it (one box per image)."""
    root = make_folder(tmp_path_factory.mktemp("syncs") / "train", 6, 0)
    images = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    boxes = root.parent / "boxes.json"
    boxes.write_text(json.dumps({
        "images": [{"id": i, "file_name": name, "width": 32, "height": 32} for i, name in enumerate(images)],
        "annotations": [{"id": i, "image_id": i, "bbox": [6, 6, 20, 20]} for i in range(len(images))]}))
    return root, boxes


def trainer_for(name: str, data, out: Path) -> Trainer:
    root, boxes = data
    extra = [f"data.boxes={boxes}"] if name == "odis" else []
    return Trainer(load_config(CONFIG, tiny_overrides(root, out) + RECIPES[name] + extra + ["run.log_every=100"]))


@pytest.mark.parametrize("name, expected", [("dino", 1), ("ibot", 1), ("attmask", 2), ("dinov2", 1), ("odis", 1)])
def test_a_step_that_does_not_log_waits_for_the_device_once(name, expected, data, tmp_path):
    trainer = trainer_for(name, data, tmp_path / "run")
    trainer.sampler.set_epoch(0)
    batches = iter(trainer.loader)
    crops, *rest = trainer.step_inputs(next(batches))
    trainer.train_step(crops, 0, *rest)
    crops, *rest = trainer.step_inputs(next(batches))
    with CountWaits() as counter:
        record = trainer.train_step(crops, 1, *rest)
    waits = counter.waits({id(s["step"]) for s in trainer.optimizer.state.values()})
    assert sum(waits.values()) == expected, waits
    assert any(site.startswith("item at train.py") for site in waits), waits  # the finiteness check
    if name == "attmask":
        assert any(site.startswith("cpu at masks.py") for site in waits), waits  # the attention's copy
    pending = record.pending()
    assert pending and isinstance(record["loss"], float), "the terms should still be on the device"
    assert isinstance(record[pending[0]], float) and not record.pending()  # reading one reads them all


def test_the_log_line_is_the_mean_of_the_steps_values(data, tmp_path):
    """Each logged value is the mean of the values the steps computed (read at the logging step), schedule
    values are the last step's, and a patch monitor no step measured is left out."""
    out = tmp_path / "run"
    records = []
    trainer = trainer_for("ibot", data, out)
    real_step = trainer.train_step

    def step(*args, **kwargs):
        records.append(real_step(*args, **kwargs))
        return records[-1]

    trainer.train_step = step
    trainer.cfg.run.log_every = 3
    trainer.fit()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 3 * 2]  # 12 images / batch 4 = 3 steps an epoch, 2 epochs
    for line, window in zip(log, (records[:3], records[3:])):
        for key in ("loss", "dino", "patch", "mask_ratio", "teacher_entropy"):
            assert line[key] == pytest.approx(sum(r[key] for r in window) / 3, rel=1e-12), key
        for key in ("lr", "wd", "momentum", "teacher_temp", "patch_teacher_temp"):  # the schedule: the last step's
            assert line[key] == window[-1][key], key
        assert "patch_teacher_rows" not in line and "teacher_rows" not in line


def test_a_non_finite_loss_still_names_the_step_terms_lr_and_temperature(data, tmp_path):
    trainer = trainer_for("ibot", data, tmp_path / "run")
    trainer.sampler.set_epoch(0)
    crops, *rest = trainer.step_inputs(next(iter(trainer.loader)))
    crops[0] = crops[0] * float("nan")
    with pytest.raises(Exception, match=r"non-finite loss at step 0: dino=nan, patch=nan \(lr=.*teacher_temp="):
        trainer.train_step(crops, 0, *rest)


def test_training_reads_no_record_before_its_logging_step(data, tmp_path, monkeypatch):
    """fit() reads each step's terms once, at the logging steps, a window at a time."""
    from ssl_distill.engine import records

    reads = []
    real = records.read_values
    monkeypatch.setattr(records, "read_values", lambda tensors: reads.append(len(tensors)) or real(tensors))
    root, _ = data
    train(load_config(CONFIG, tiny_overrides(root, tmp_path / "run") + RECIPES["ibot"] + ["run.log_every=2"]))
    # 6 steps logged at 2, 3 (the epoch's end), 4 and 6: windows of 2, 1, 1 and 2 steps
    per_step = reads[0] // 2
    assert reads == [2 * per_step, per_step, per_step, 2 * per_step]
