"""Reading a run directory for the report: its log, config and evaluation results, whatever is there.

Torch-free (json and yaml only). A run still going is read as it stands (a half-written last log
line is skipped); a run written by an older version lacks some fields, and each missing one becomes
a note instead of an error.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import config_from_dict
from ..errors import ConfigError, DataError
from ..eval_constants import untrained_cls_note

__all__ = ["EXPECTED", "GRAM_MONITORS", "NOT_LOSS_TERMS", "TEACHER_PREFIXES", "RunData", "read_run",
           "wall_clock_seconds"]

#: fields of a training record the figure draws, and what they show (for the notes)
EXPECTED: dict[str, str] = {
    "loss": "loss", "teacher_entropy": "teacher entropy", "teacher_kl_uniform": "KL to uniform",
    "lr": "learning rate", "wd": "weight decay", "momentum": "EMA momentum", "teacher_temp": "teacher temperature",
    "images_per_s": "images/s", "time": "wall-clock time",
}
#: key prefixes of the teachers whose collapse monitors a run may log (``<prefix>teacher_entropy``,
#: ``<prefix>teacher_kl_uniform``): the image-level teacher, ODIS's [OBJ] teacher, iBOT's patch teacher
TEACHER_PREFIXES = ("", "obj_", "patch_")
#: Gram anchoring's monitors: the mean cosine similarity of two patches of one view, student and Gram teacher
GRAM_MONITORS = ("gram_student_patch_sim", "gram_teacher_patch_sim")
#: numeric fields of a training record that are not loss terms (every other number is one: dino, patch, koleo ...)
NOT_LOSS_TERMS = frozenset({
    "step", "epoch", "lr", "wd", "momentum", "teacher_temp", "patch_teacher_temp", "images_per_s", "bad_images",
    "time", "mask_ratio", "requeues", "obj_valid_pairs",
    *(f"{prefix}teacher_{monitor}" for prefix in TEACHER_PREFIXES for monitor in ("entropy", "kl_uniform")),
    *GRAM_MONITORS, "gram_weight", "dino_local_weight",
})
# a pause longer than this many times the run's typical seconds per step (and 5 minutes) is time the
# run was not running (between an interrupt and its resume); the wall-clock axis leaves it out
_GAP_FACTOR, _GAP_MIN_S = 10.0, 300.0


@dataclass
class RunData:
    """What the report knows about one run directory.

    ``train``: training records (one per logged step, the last one when a resumed run logged a step
    twice), by step; ``knn``: online k-NN records, by step; ``seconds``: running time at each record
    (``"train"`` / ``"knn"`` -> one entry per record, None without ``time``; see
    :func:`wall_clock_seconds`); ``config``: ``config.yaml`` as written (None if missing); ``results``:
    final evaluations found in the directory, name -> percent; ``notes``: what is missing or was
    skipped, in words.
    """

    name: str
    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    knn: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None
    results: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, list[float | None]] = field(default_factory=dict)

    def series(self, key: str, records: str = "train", x: str = "step") -> tuple[list[float], list[float]]:
        """(x, values) of ``key`` over the ``records`` (``"train"`` or ``"knn"``) that have it as a finite
        number; ``x``: ``"step"`` or ``"seconds"`` (running time; records without it are left out)."""
        xs, values = [], []
        clock = self.seconds.get(records) or [None] * len(getattr(self, records))
        for rec, sec in zip(getattr(self, records), clock):
            v = rec.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                continue
            if x == "step":
                xs.append(float(rec["step"]))
            elif sec is not None:
                xs.append(sec)
            else:
                continue
            values.append(float(v))
        return xs, values

    def last(self, key: str, records: str = "train") -> float | None:
        """The last finite value of ``key``, or None."""
        values = self.series(key, records)[1]
        return values[-1] if values else None

    def loss_terms(self) -> list[str]:
        """``loss`` first, then every other numeric field that is a loss term, in order of appearance."""
        names: dict[str, None] = {}
        for rec in self.train:
            for k, v in rec.items():
                if k not in NOT_LOSS_TERMS and isinstance(v, (int, float)) and not isinstance(v, bool):
                    names[k] = None
        return sorted(names, key=lambda k: (k != "loss", list(names).index(k)))

    def knn_key(self) -> str | None:
        """The online k-NN field drawn: top-1 at k=20 (DINO's headline k), else the smallest k logged."""
        keys = {k for rec in self.knn for k in rec if k.startswith("knn_top1_k")}
        if not keys:
            return None
        return "knn_top1_k20" if "knn_top1_k20" in keys else min(keys, key=lambda k: int(k.rsplit("k", 1)[1]))

    def epochs_done(self) -> float | None:
        """Epochs trained up to the last record: its step over the steps per epoch, which an online k-NN
        record (fractional ``epoch``) or the last record of epoch 0 (every epoch end is logged) gives;
        None while the run is still in its first epoch without online k-NN."""
        if not self.train:
            return None
        per_epoch = next((r["step"] / r["epoch"] for r in self.knn if isinstance(r.get("epoch"), (int, float))
                          and r["epoch"] > 0), None)
        if per_epoch is None and any(r.get("epoch", 0) >= 1 for r in self.train):
            per_epoch = max(r["step"] for r in self.train if r.get("epoch", 0) == 0)
        return None if not per_epoch else self.train[-1]["step"] / per_epoch

    @property
    def out_dim(self) -> int | None:
        """K, the number of prototypes of the DINO head (from the config), for the log K line."""
        try:
            return int(self.config["model"]["out_dim"])  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            return None


def _read_log(path: Path, run: RunData) -> None:
    if not path.is_file():
        run.notes.append(f"{run.name}: no log.jsonl yet")
        return
    train: dict[int, dict[str, Any]] = {}
    knn: dict[int, dict[str, Any]] = {}
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # a line being written right now, or cut short by a kill
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            bad += 1
            continue
        if rec.get("kind") not in (None, "knn"):
            continue  # other records (the boxes file's counts) are not curves
        (knn if rec.get("kind") == "knn" else train)[rec["step"]] = rec  # a step logged again: the last wins
    if bad:
        run.notes.append(f"{run.name}: skipped {bad} unreadable log line(s)")
    run.train = [train[s] for s in sorted(train)]
    run.knn = [knn[s] for s in sorted(knn)]
    if not run.train:
        run.notes.append(f"{run.name}: no training records in log.jsonl yet")
        return
    for key, what in EXPECTED.items():
        if not any(key in rec for rec in run.train):
            run.notes.append(f"{run.name}: no '{key}' ({what}) in log.jsonl (an older version?): skipped")
    if not run.knn:
        run.notes.append(f"{run.name}: no online k-NN records (monitor.knn_every_* off, or an older version)")


def _percent(path: Path, what: str) -> float | None:
    """The headline number of one results file, in percent (None if it has none)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if what == "knn":
        acc = data.get("accuracy", {})
        key = "k=20" if "k=20" in acc else next(iter(acc), None)
        return float(acc[key]["top1"]) if key else None
    if what == "corloc":
        return 100.0 * float(data["corloc"]) if "corloc" in data else None
    return float(data["top1"]) if isinstance(data.get("top1"), (int, float)) else None


def _read_results(run: RunData) -> None:
    """Final evaluations written by ``ssl-distill knn / linear / discover`` into the run directory."""
    found: list[tuple[str, Path, str]] = [
        ("k-NN", run.path / "knn.json", "knn"), ("k-NN random init", run.path / "knn_random_init.json", "knn")]
    found += [(f"linear {p.stem[len('linear_'):]}", p, "linear") for p in sorted(run.path.glob("linear_*.json"))]
    found += [(f"CorLoc {p.parent.name}", p, "corloc") for p in sorted(run.path.glob("*/corloc.json"))]
    for name, path, what in found:
        if path.is_file():
            value = _percent(path, what)
            if value is not None:
                run.results[name] = value


def read_run(path: str | Path, name: str | None = None) -> RunData:
    """Everything the report draws from ``path``; raises DataError when it is not a directory."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"report: {path} is not a run directory")
    run = RunData(name or path.name, path)
    config = path / "config.yaml"
    if config.is_file():
        try:
            run.config = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError as e:
            run.notes.append(f"{run.name}: config.yaml unreadable ({type(e).__name__}): no config differences")
    else:
        run.notes.append(f"{run.name}: no config.yaml: no config differences")
    _read_log(path / "log.jsonl", run)
    _untrained_cls(run)
    clock = wall_clock_seconds(run.train + run.knn)
    run.seconds = {"train": clock[:len(run.train)], "knn": clock[len(run.train):]}
    _read_results(run)
    return run


def _untrained_cls(run: RunData) -> None:
    """A note when the run's online k-NN read a [CLS] token that no loss of the run trained (dino.weight 0)."""
    if not run.knn or run.config is None:
        return
    layout = run.knn[-1].get("knn_layout", "cls")
    try:
        note = untrained_cls_note(config_from_dict(run.config), layout)
    except (ConfigError, ValueError, TypeError):
        return  # a config of another version: nothing to say
    if note:
        run.notes.append(f"{run.name}: online k-NN: {note} (monitor.knn_layout=obj)")


def wall_clock_seconds(records: list[dict[str, Any]]) -> list[float | None]:
    """Seconds of running time at each record (same order), from the records' ``time`` (unix seconds).

    Records are put in (step, time) order. Time between two records beyond ``10 x`` the run's median
    seconds per step (and 5 minutes) is a pause (interrupted, then resumed) and counts as the median
    instead; time before the first record counts as its steps at the median rate. None for records
    without ``time``, and for all of them when fewer than two have it.
    """
    timed = sorted((int(r["step"]), float(r["time"]), i) for i, r in enumerate(records)
                   if isinstance(r.get("time"), (int, float)) and isinstance(r.get("step"), int))
    out: list[float | None] = [None] * len(records)
    if len(timed) < 2:
        return out
    rates = sorted((t1 - t0) / (s1 - s0) for (s0, t0, _), (s1, t1, _) in zip(timed, timed[1:]) if s1 > s0 and t1 >= t0)
    per_step = rates[len(rates) // 2] if rates else 0.0
    elapsed = timed[0][0] * per_step
    out[timed[0][2]] = elapsed
    for (s0, t0, _), (s1, t1, i) in zip(timed, timed[1:]):
        expected = max(s1 - s0, 1) * per_step
        dt = t1 - t0
        if dt < 0 or dt > max(_GAP_FACTOR * expected, _GAP_MIN_S):
            dt = expected
        elapsed += dt
        out[i] = elapsed
    return out
