"""Online k-NN: the teacher's backbone evaluated with the faiss k-NN while training runs.

The ``monitor`` config section turns it on (:class:`ssl_distill.config.MonitorConfig`). At the steps
of :func:`evaluation_steps`, rank 0 extracts CLS features of a fixed, seeded subset of a labeled
train folder and of a val folder (the run's ``knn`` folders by default), classifies the val subset
with DINO's weighted k-NN (k values and temperature from the ``knn`` section) and appends one record
to ``log.jsonl`` (and TensorBoard)::

    {"kind": "knn", "step": s, "epoch": s / iterations_per_epoch, "time": unix seconds,
     "knn_top1_k20": %, "knn_top5_k20": %, ... (every k of knn.ks), "knn_seconds": cost,
     "knn_n_train": N, "knn_n_val": M, "knn_precision": "bf16"}

and prints one line with the accuracy and the cost. The other ranks wait at a barrier.

Training is not disturbed: every RNG state (torch, CUDA, numpy, Python) is saved before and restored
after an evaluation, the teacher's train / eval modes and attention-kernel choice are restored, the
training loader is not touched, and nothing but the subsets' file lists stays in memory between
evaluations (features depend on the weights, so they are never cached). A run with online k-NN ends
with a teacher bit-identical to one without (tested). An evaluation happens once per step number:
the ``knn`` records already in ``log.jsonl`` are skipped after a resume.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..checkpoints import rng_state, set_rng_state
from ..runtime import resolve_precision
from ..config import Config, ConfigError, MonitorConfig
from ..eval_constants import untrained_cls_note
from ..data.folder import DataError, FileList, ImageFolderDataset, require_folder, scan_image_folder
from ..data.eval_transform import EvalTransform, collate_eval
from . import distributed as du
from .monitor import JsonlLogger

__all__ = ["OnlineKnn", "evaluation_steps", "seeded_subset"]


def evaluation_steps(monitor: MonitorConfig, iters_per_epoch: int, total_steps: int) -> set[int]:
    """The step counts (steps done) after which online k-NN runs; empty when it is off.

    Multiples of ``knn_every_steps``, or the steps nearest to multiples of ``knn_every_epochs`` epochs
    (``n * every * iters_per_epoch`` rounded, halves up), up to ``total_steps``; plus ``total_steps`` itself (the
    trained model) and 0 with ``knn_at_start`` (the random-init point of the curve).
    """
    if not monitor.knn_on:
        return set()
    if monitor.knn_every_steps > 0:
        steps = set(range(monitor.knn_every_steps, total_steps + 1, monitor.knn_every_steps))
    else:
        interval = monitor.knn_every_epochs * iters_per_epoch
        count = int(math.floor(total_steps / interval + 1e-9))
        steps = {max(1, math.floor(n * interval + 0.5)) for n in range(1, count + 1)}  # nearest, halves up
    steps = {s for s in steps if s <= total_steps} | {total_steps}
    if monitor.knn_at_start:
        steps.add(0)
    return steps


def seeded_subset(files: FileList, size: int, seed: int) -> FileList:
    """``size`` images of ``files`` drawn without replacement with ``seed`` (all of them when ``size`` is
    0 or at least the folder's size), kept in folder order; draws from a private generator."""
    if size <= 0 or size >= len(files):
        return files
    keep = np.sort(np.random.default_rng(seed).choice(len(files), size=size, replace=False))
    return FileList(files.root, [files.paths[i] for i in keep], [files.labels[i] for i in keep], list(files.classes))


@contextlib.contextmanager
def _untouched(module: nn.Module) -> Iterator[None]:
    """Restores every RNG state, and ``module``'s train / eval flags and attention-kernel choice
    (``fused_attn``), whatever the block does to them."""
    rngs = rng_state()
    modes = [(m, m.training) for m in module.modules()]
    fused = [(m, m.fused_attn) for m in module.modules() if hasattr(m, "fused_attn")]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for m, flag in fused:
            m.fused_attn = flag
        set_rng_state(rngs)


class OnlineKnn:
    """Evaluates ``backbone`` (the teacher's) at the steps of :func:`evaluation_steps`.

    Build it once per run, after the log exists; call :meth:`maybe_evaluate` on every rank after each
    step's bookkeeping (and once before the first step). Rank 0 scans both folders here, so a missing
    folder stops the run before it trains; the subsets' file lists are kept (a few MiB at most).
    """

    def __init__(self, cfg: Config, out_dir: Path, iters_per_epoch: int, total_steps: int,
                 device: torch.device, logger: JsonlLogger | None) -> None:
        mo, knn = cfg.monitor, cfg.knn
        self.cfg, self.device, self.logger = cfg, device, logger
        self.precision = resolve_precision(device, mo.knn_precision)  # auto: bf16 where it is faster
        self.iters_per_epoch = iters_per_epoch
        self.steps = evaluation_steps(mo, iters_per_epoch, total_steps)
        self.done: set[int] = set()
        self.seconds = 0.0  # spent evaluating in this process
        self.started = time.perf_counter()
        self.first_step: int | None = None  # the step this process started at (its first call)
        self.subsets: tuple[FileList, FileList] | None = None
        if not self.steps or not du.is_main():
            return
        if mo.knn_precision == "fp16" and device.type != "cuda":
            raise ConfigError("monitor.knn_precision=fp16 needs CUDA; use bf16 (or fp32) on CPU")
        train_dir, val_dir = mo.knn_train_dir or knn.train_dir, mo.knn_val_dir or knn.val_dir
        for split, folder in (("train", train_dir), ("val", val_dir)):
            key = f"monitor.knn_{split}_dir" if getattr(mo, f"knn_{split}_dir") else f"knn.{split}_dir"
            require_folder(folder, f"{key}={folder} (the online k-NN's {split} folder)",
                           f"set {key} to a labeled folder (<class>/<image>), or turn online k-NN off with "
                           "monitor.knn_every_epochs=0 monitor.knn_every_steps=0")
        if knn.image_size % cfg.model.patch_size:
            raise ConfigError(f"knn.image_size={knn.image_size} (the online k-NN's crop) is not a multiple of "
                              f"model.patch_size={cfg.model.patch_size}; give a multiple, or turn online k-NN off "
                              "with monitor.knn_every_epochs=0 monitor.knn_every_steps=0")
        train = scan_image_folder(train_dir, labeled=True, cache_file=out_dir / "knn_train_filelist.json")
        val = scan_image_folder(val_dir, labeled=True, cache_file=out_dir / "knn_val_filelist.json")
        if train.classes != val.classes:
            raise DataError(f"online k-NN: train folder {train.root} and val folder {val.root} have different "
                            f"classes: {sorted(set(train.classes) ^ set(val.classes))}")
        self.subsets = (seeded_subset(train, mo.knn_train_size, mo.knn_seed),
                        seeded_subset(val, mo.knn_val_size, mo.knn_seed + 1))
        self.done = _logged_steps(out_dir / "log.jsonl")
        if note := untrained_cls_note(cfg, mo.knn_layout):
            tqdm.write(f"warning: online k-NN: {note} (monitor.knn_layout=obj)")

    def maybe_evaluate(self, step: int, backbone: nn.Module) -> float:
        """Evaluate after ``step`` steps if it is an evaluation step not yet logged; returns the seconds
        spent here (0 otherwise), which the caller keeps out of its images/s figure. All ranks call it."""
        if self.first_step is None:
            self.first_step = step
        if step not in self.steps:
            return 0.0
        t0 = time.perf_counter()
        if du.is_main() and step not in self.done:
            record = self.evaluate(step, backbone)
            if self.logger is not None:
                self.logger.log(record)
            self.done.add(step)
            self.seconds += record["knn_seconds"]
            tqdm.write(self.summary(record))
        du.barrier()
        return time.perf_counter() - t0

    def evaluate(self, step: int, backbone: nn.Module) -> dict[str, Any]:
        """One evaluation of ``backbone``'s ``monitor.knn_layout`` features ([CLS], or [OBJ] over every patch) on
        the two subsets; returns the log record (``knn_layout`` in it unless the features are [CLS]'s)."""
        from ..models.frozen_features import FeatureExtractor, FeatureSpec, extract_features, prepare_inference
        from ..weighted_knn import knn_classify

        assert self.subsets is not None, "only rank 0 evaluates"
        knn, crops = self.cfg.knn, self.cfg.data.crops
        transform = EvalTransform(knn.image_size, knn.resize_size, tuple(crops.mean), tuple(crops.std))
        t0 = time.perf_counter()
        with _untouched(backbone):
            layout = FeatureSpec(self.cfg.monitor.knn_layout)
            model, amp = prepare_inference(FeatureExtractor(backbone, layout), self.precision, self.device)
            feats = []
            for files in self.subsets:
                loader = torch.utils.data.DataLoader(
                    ImageFolderDataset(files, transform), batch_size=knn.batch_size, shuffle=False,
                    num_workers=knn.num_workers, collate_fn=collate_eval, generator=torch.Generator())
                feats.append(extract_features(model, loader, self.device, amp))
            del model
            (train_x, train_y), (val_x, val_y) = feats
            res = knn_classify(train_x, train_y, val_x, val_y, ks=knn.ks, temperature=knn.temperature,
                               num_classes=len(self.subsets[0].classes))
        record: dict[str, Any] = {"kind": "knn", "step": step, "epoch": step / self.iters_per_epoch}
        if layout.layout != "cls":
            record["knn_layout"] = layout.layout
        for name, acc in res.items():  # "k=20" -> knn_top1_k20, knn_top5_k20
            k = name.split("=", 1)[1]
            record[f"knn_top1_k{k}"] = acc["top1"]
            record[f"knn_top5_k{k}"] = acc["top5"]
        record.update(knn_seconds=time.perf_counter() - t0, knn_n_train=int(train_x.shape[0]),
                      knn_n_val=int(val_x.shape[0]), knn_precision=self.precision, time=time.time())
        return record

    def summary(self, record: dict[str, Any]) -> str:
        """One line: the step, the accuracy at k=20 (else the first k), the subset sizes and the cost."""
        keys = [k for k in record if k.startswith("knn_top1_k")]
        key = "knn_top1_k20" if "knn_top1_k20" in record else keys[0]
        text = (f"[online k-NN] step {record['step']} (epoch {record['epoch']:.2f}): top-1 {record[key]:.2f}% "
                f"(k={key.rsplit('k', 1)[1]}; {record['knn_n_train']} train / {record['knn_n_val']} val images, "
                f"{record['knn_precision']}) in {record['knn_seconds']:.1f} s")
        if record["step"] != self.first_step:  # once this process has trained: the share of its time
            share = 100 * self.seconds / max(time.perf_counter() - self.started, 1e-9)
            text += f"; online k-NN so far {self.seconds:.1f} s = {share:.1f}% of this process's time"
        return text


def _logged_steps(log: Path) -> set[int]:
    """Steps of the ``"kind": "knn"`` records already in ``log`` (a resumed run skips them)."""
    if not log.is_file():
        return set()
    steps = set()
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(rec, dict) and rec.get("kind") == "knn" and "step" in rec:
            steps.add(int(rec["step"]))
    return steps
