"""Training checkpoints: one file, written atomically, read without unpickling arbitrary code."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..atomic import atomic_write
from ..errors import CheckpointError  # defined without torch, for the command line; re-exported here

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
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary code from the pickle)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError and friends; keep the reason
        raise unreadable(path, e) from e


def unreadable(path: Path, error: Exception) -> CheckpointError:
    """The error for a file torch.load rejected: not a torch file at all, or a damaged one."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] != b"PK" and head[:1] != b"\x80":  # zip archive (torch >= 1.6) or legacy pickle
        return CheckpointError(f"{path} is not a PyTorch checkpoint: it starts with {head!r}, neither a zip "
                               "archive nor a pickle")
    reason = (str(error).strip().splitlines() or [""])[0]  # torch's messages run to several paragraphs
    return CheckpointError(f"cannot read checkpoint {path} (truncated or damaged?): {type(error).__name__}: {reason}")


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
