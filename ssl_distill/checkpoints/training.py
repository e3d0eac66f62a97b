"""Training checkpoints: the file a run writes, resumes from, and the state it carries.

One file per save, ``checkpoint.pth`` (:data:`LATEST`) in the run directory (and a
``checkpoint_epoch<NNNN>.pth`` copy every ``run.keep_every_epochs``), written atomically (:func:`atomic_save`) and marked with
:data:`FORMAT`; it holds student, teacher, optimizer, the objectives' buffers, scaler, step, epoch,
config and every rank's RNG states (:func:`rng_state`, plain tensors and types, so it reads back with
``weights_only=True``). Resuming reads it with :func:`read_training_checkpoint` and loads each state
dict strictly (:func:`load_state_strict`), naming missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..atomic import atomic_write
from ..errors import CheckpointError
from .files import read_checkpoint

__all__ = [
    "FORMAT", "LATEST", "atomic_save", "describe_mismatch", "find_checkpoint", "is_training_checkpoint",
    "load_state_strict", "read_training_checkpoint", "rng_state", "set_rng_state",
]

FORMAT = "ssl-distill/1"
LATEST = "checkpoint.pth"


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through :func:`ssl_distill.atomic.atomic_write` (temporary name, fsync, rename)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors / plain types (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_training_checkpoint(path: Path, run_dir: Path) -> dict[str, Any] | None:
    """The training checkpoint a run in ``run_dir`` resumes from; None when there is none yet.

    Read with :func:`read_checkpoint`'s allow-list, so an official DINO / iBOT file gets a sentence, not
    an unpickling error. Raises CheckpointError, saying how to go on, for a file that ssl-distill did not write (an
    official DINO checkpoint copied in, another tool's file) or cannot read.
    """
    if not path.exists():
        return None
    how = (f"move it out of {run_dir}, train into another run.output_dir, or pass --fresh to start over "
           "(which moves it aside, into previous/)")
    try:
        ckpt, _ = read_checkpoint(path)
    except CheckpointError as e:
        kept = newest_kept_checkpoint(run_dir)
        back = (f"; or copy {kept.name}, the newest of the run's kept copies, over {path.name} to resume from "
                "that epoch" if kept is not None else "")
        raise CheckpointError(f"{e}; a run resumes from {path.name}, so {how}{back}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} was not written by ssl-distill training (format {found!r}, expected "
                              f"{FORMAT!r}), so the run cannot resume from it: {how}")
    return ckpt


def newest_kept_checkpoint(run_dir: Path) -> Path | None:
    """The ``checkpoint_epoch<NNNN>.pth`` of ``run_dir`` with the highest epoch that is a readable training
    checkpoint (:func:`is_training_checkpoint`); None when there is none."""
    for kept in sorted(run_dir.glob("checkpoint_epoch*.pth"), reverse=True):
        if is_training_checkpoint(kept):
            return kept
    return None


def is_training_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a file that ssl-distill training wrote (its :data:`FORMAT` mark): a run resumes from
    it. Read memory-mapped, so a large file costs little; anything unreadable is not one."""
    if not path.is_file():
        return False
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch zip file, or not ours: safetensors, legacy pickles, other tools' files
        return False
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


def describe_mismatch(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], name: Callable[[str], str] = lambda k: k
) -> str | None:
    """Missing / unexpected keys and shape mismatches between a model's and a file's state dicts.

    ``name`` maps a key to the name it has in the user's file (for messages). None when they fit.
    """
    missing = sorted(set(own) - set(state))
    unexpected = sorted(name(k) for k in set(state) - set(own))
    shapes = [
        f"{name(k)}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    if shapes:
        parts.append("shape mismatches " + "; ".join(shapes[:20]))
    return ", ".join(parts) or None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True) with an error that lists the mismatching keys and shapes."""
    problem = describe_mismatch(module.state_dict(), state)
    if problem:
        raise CheckpointError(f"{what} does not fit the model: {problem}")
    module.load_state_dict(state, strict=True)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the latest checkpoint inside a run directory."""
    path = Path(path)
    if path.is_dir():
        cand = path / LATEST
        if not cand.is_file():
            raise CheckpointError(f"no {LATEST} in run directory {path}")
        return cand
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path
