"""What a run directory holds, and moving an earlier run's files aside before a new run starts there.

A run directory (``run.output_dir``) holds what training writes (``checkpoint.pth``,
``checkpoint_epochNNNN.pth``, ``log.jsonl``, ``config.yaml``, the file-list caches, ``tensorboard/``) and the
results the evaluations write there by default (``knn.json``, ``linear_*.json``, ``report.png`` ...): the
names of :data:`RUN_FILES`. A new run that starts in a directory where an earlier one left such files (with
``--fresh``, or without a checkpoint after a start that failed) first moves them into
``previous/<time>/`` (:func:`move_earlier_run_aside`): none of them stays under a name the new run writes,
where it would pass for the new run's (an old ``checkpoint_epoch0010.pth`` evaluated as the new run's, an old
step-0 k-NN record kept as the new random-init point), and nothing is deleted. Anything else in the folder
(the submitit job folder, the user's own files) stays where it is.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["PREVIOUS", "RUN_FILES", "earlier_run_files", "move_earlier_run_aside"]

#: what training and the evaluations' default outputs write into a run directory (glob patterns)
RUN_FILES = (
    "checkpoint.pth", "checkpoint_epoch*.pth", "log.jsonl", "config.yaml", "filelist.json",
    "knn_train_filelist.json", "knn_val_filelist.json", "tensorboard",  # training
    "knn.json", "knn_random_init.json", "linear_*", "object_knn*.json", "attention", "attention_random_init",
    "discover", "discover_*", "report.png", "report.md", "demo_summary.json",  # evaluations, report, demo
)
PREVIOUS = "previous"  # the folder earlier runs' files are moved into, one dated subfolder per move


def earlier_run_files(out: Path) -> list[Path]:
    """The entries of ``out`` named like :data:`RUN_FILES`, sorted."""
    return sorted({p for pattern in RUN_FILES for p in out.glob(pattern)})


def move_earlier_run_aside(out: Path) -> tuple[Path, list[str]] | None:
    """Move :func:`earlier_run_files` into ``out/previous/<YYYYmmdd-HHMMSS>/``; returns (that folder, the names
    moved), or None when there was nothing to move. Renames within one file system: nothing is copied."""
    found = earlier_run_files(out)
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = out / PREVIOUS / stamp, 1
    while dest.exists():  # two moves within one second
        dest, n = out / PREVIOUS / f"{stamp}-{n}", n + 1
    dest.mkdir(parents=True)
    for path in found:
        os.replace(path, dest / path.name)
    return dest, [path.name for path in found]
