"""What a training step logs, and the log line of a window of steps.

A step's record (:class:`StepRecord`) keeps the objectives' terms and monitors as 0-d tensors on the run's
device: a step that does not log never waits for the device to read them (the step's one wait is the
finiteness check of its loss). The logging step reads the whole window at once (:class:`LogWindow`): one
transfer, then each value's mean over the window's steps that computed it, as plain Python floats in the
order the steps made them (the same numbers as reading every step).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import torch


def read_values(tensors: list[torch.Tensor]) -> list[float]:
    """0-d tensors -> Python floats with one transfer (float64 holds any float dtype's value exactly, so
    each is the float ``float(t)`` gives)."""
    if not tensors:
        return []
    return torch.stack([t.detach().reshape(()).double() for t in tensors]).tolist()


class StepRecord(Mapping[str, float]):
    """One step's logged values: ``terms`` (the loss, the objectives' terms and monitors: host floats or 0-d
    device tensors, the tensors read on first access, all at once) and ``schedule`` (lr, temperatures ...:
    host floats)."""

    def __init__(self, terms: dict[str, float | torch.Tensor], schedule: dict[str, float]) -> None:
        self.terms = dict(terms)
        self.schedule = schedule

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
        """Each key's mean over the steps that have it (a monitor a step did not compute is absent from its
        record: no masked patch, no valid [OBJ] view, the Gram terms before their start), and how many did."""
        self.read()
        keys = dict.fromkeys(k for r in self.records for k in r)
        means = {k: float(np.mean([r[k] for r in self.records if k in r])) for k in keys}
        return means, {k: sum(k in r for r in self.records) for k in keys}
