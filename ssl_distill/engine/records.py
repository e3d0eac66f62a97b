"""What a training step logs, and the log line of a window of steps.

A step's record (:class:`StepRecord`) keeps the objectives' terms and monitors as 0-d tensors on the run's
device: a step that does not log never waits for the device to read them (the step's one wait is the
finiteness check of its loss). The logging step reads the whole window at once (:class:`LogWindow`): one
transfer, then each value's mean over the window's steps that computed it, as plain Python floats in the
order the steps made them (the same numbers as reading every step).

With several processes the log line holds the global batch's figures, all-reduced at the logging step
(:func:`reduce_over_ranks`): a loss term or monitor is the mean over every (rank, step) that computed it
(each rank's loss is the mean over its share of the batch, so this is the loss of the global batch); a
teacher's collapse monitors come from every rank's rows (:class:`~ssl_distill.objectives.base.TeacherRows`):
its entropy weighted by each rank's rows, its KL to uniform recomputed from the mean distribution of all
rows. So 1 process x batch B and 2 processes x B/2 log the same loss and collapse monitors.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist

from ..objectives.base import TeacherRows
from . import distributed as du


def read_values(tensors: list[torch.Tensor]) -> list[float]:
    """0-d tensors -> Python floats with one transfer (float64 holds any float dtype's value exactly, so
    each is the float ``float(t)`` gives)."""
    if not tensors:
        return []
    return torch.stack([t.detach().reshape(()).double() for t in tensors]).tolist()


class StepRecord(Mapping[str, float]):
    """One step's logged values: ``terms`` (the loss, the objectives' terms and monitors: host floats or 0-d
    device tensors, the tensors read on first access, all at once), ``schedule`` (lr, temperatures ...: host
    floats, the same on every rank) and ``rows`` (the step's
    :class:`~ssl_distill.objectives.base.TeacherRows` by key, not logged)."""

    def __init__(self, terms: dict[str, float | torch.Tensor], schedule: dict[str, float],
                 rows: dict[str, TeacherRows] | None = None) -> None:
        self.terms = dict(terms)
        self.schedule = schedule
        self.rows = rows or {}

    def pending(self) -> list[str]:
        """The terms still on the device."""
        return [k for k, v in self.terms.items() if isinstance(v, torch.Tensor)]

    def read(self) -> None:
        keys = self.pending()
        self.terms.update(zip(keys, read_values([self.terms[k] for k in keys])))

    def __getitem__(self, key: str) -> float:
        if key not in self.terms:
            return self.schedule[key]
        if isinstance(self.terms[key], torch.Tensor):
            self.read()
        return self.terms[key]  # type: ignore[return-value]

    def __iter__(self) -> Iterator[str]:
        yield from self.terms
        yield from self.schedule

    def __len__(self) -> int:
        return len(self.terms) + len(self.schedule)

    def __contains__(self, key: object) -> bool:
        return key in self.terms or key in self.schedule


class LogWindow:
    """The records of the steps since the last log line."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    def append(self, record: StepRecord) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def read(self) -> None:
        """Every pending term of the window, in one transfer."""
        pending = [(r, k) for r in self.records for k in r.pending()]
        for (r, k), v in zip(pending, read_values([r.terms[k] for r, k in pending])):
            r.terms[k] = v

    def means(self) -> tuple[dict[str, float], dict[str, int]]:
        """Each term's mean over the steps that have it (a monitor a step did not compute is absent from its
        record: no masked patch, no valid [OBJ] view, the Gram terms before their start), and how many did.
        Schedule values are not averaged: :meth:`schedule` gives the last step's."""
        self.read()
        keys = dict.fromkeys(k for r in self.records for k in r.terms)
        means = {k: float(np.mean([r.terms[k] for r in self.records if k in r.terms])) for k in keys}
        return means, {k: sum(k in r.terms for r in self.records) for k in keys}

    def schedule(self) -> dict[str, float]:
        """The schedule values (lr, wd, momentum, temperatures, Gram weights) of the window's last step."""
        return dict(self.records[-1].schedule)


def reduce_over_ranks(window: LogWindow, device: torch.device, counters: dict[str, float]
                      ) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    """The window's terms over every rank, by one all-reduce on ``device``; every rank calls it at the same
    step. Returns (means, how many steps had each teacher monitor on some rank, ``counters`` summed).

    A term: its mean over every (rank, step) that computed it. A teacher's monitors (the names of a
    :class:`~ssl_distill.objectives.base.TeacherRows`): per step, the entropy's mean over every rank's rows
    and the KL to uniform of the mean distribution of every rank's rows; then their mean over the steps
    where some rank had rows.
    """
    window.read()
    records = window.records
    # the keys each rank has (one without a masked patch or a valid [OBJ] view lacks some): agreed first
    mine = {name: (t.mean_p.numel(), t.entropy, t.kl_uniform) for r in records for name, t in r.rows.items()}
    layouts = du.gather_objects((sorted({k for r in records for k in r.terms}), mine))
    teachers: dict[str, tuple[int, str, str]] = {}
    for _, theirs in layouts:
        teachers.update(theirs)
    order = sorted(teachers)
    monitors = {name for _, entropy, kl in teachers.values() for name in (entropy, kl)}
    plain = sorted({k for keys, _ in layouts for k in keys} - monitors)

    # one float64 vector: (sum, count) of each term; (entropy x rows, rows) of each teacher at each step;
    # the counters; then each teacher's mean distribution x rows at each step
    head: list[float] = []
    for k in plain:
        values = [r[k] for r in records if k in r.terms]
        head += [math.fsum(values), float(len(values))]
    for name in order:
        for r in records:
            t = r.rows.get(name)
            head += [r[t.entropy] * t.rows, float(t.rows)] if t is not None else [0.0, 0.0]
    head += list(counters.values())
    vectors = [r.rows[name].mean_p.reshape(-1).to(device, torch.float64) * r.rows[name].rows if name in r.rows
               else torch.zeros(teachers[name][0], dtype=torch.float64, device=device)
               for name in order for r in records]
    flat = torch.cat([torch.tensor(head, dtype=torch.float64, device=device), *vectors])
    dist.all_reduce(flat)
    flat = flat.cpu()
    summed = flat[: len(head)].tolist()

    means: dict[str, float] = {}
    steps: dict[str, int] = {}
    for i, k in enumerate(plain):
        if summed[2 * i + 1] > 0:
            means[k] = summed[2 * i] / summed[2 * i + 1]
    at, vector_at = 2 * len(plain), len(head)
    for name in order:
        k, entropy, kl_uniform = teachers[name]
        entropies, kls = [], []
        for _ in records:
            weighted, rows = summed[at], summed[at + 1]
            mean_p = flat[vector_at: vector_at + k] / max(rows, 1.0)
            at, vector_at = at + 2, vector_at + k
            if rows > 0:
                entropies.append(weighted / rows)
                kls.append(math.log(k) + float((mean_p * torch.log(mean_p.clamp_min(1e-30))).sum()))
        if entropies:
            means[entropy], means[kl_uniform] = float(np.mean(entropies)), float(np.mean(kls))
            steps[entropy] = steps[kl_uniform] = len(entropies)
    return means, steps, dict(zip(counters, summed[at:]))
