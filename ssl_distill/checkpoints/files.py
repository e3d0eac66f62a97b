"""Reading checkpoint files without running code from them.

torch files are read with ``torch.load(weights_only=True)`` plus an allow-list of the harmless types
official files contain (:data:`SAFE_GLOBALS`); a pickle that wants anything else is refused with the
list of what it wants. ``.safetensors`` files are read with safetensors. A file torch cannot read at
all is diagnosed (:func:`unreadable`): not a torch file, or a truncated / damaged one.
"""
from __future__ import annotations

import argparse
import pathlib
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = ["SAFE_GLOBALS", "load_file", "read_checkpoint", "unreadable"]


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars and dtypes (as pickled by numpy 1.x and 2.x): plain numbers, no code."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    out: list[Any] = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    out += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool", "uint8")]
    return out


# Types found in official checkpoints, harmless to construct: DINO / iBOT save their command-line
# arguments as argparse.Namespace (whose fields may be paths); some training scripts store numpy scalars.
SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    pathlib.PosixPath,
    pathlib.WindowsPath,
    pathlib.PurePosixPath,
    pathlib.PureWindowsPath,
    *_numpy_safe_globals(),
]


def _safe_names() -> list[str]:
    names = []
    for g in SAFE_GLOBALS:
        names.append(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}")
    return sorted(set(names))


def read_checkpoint(path: str | Path) -> tuple[Any, dict[str, str]]:
    """The object stored in ``path`` and its safetensors metadata (empty for torch files).

    torch files are unpickled with ``weights_only=True`` and :data:`SAFE_GLOBALS` allowed; anything
    else raises :class:`CheckpointError` naming the globals the pickle wants.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as e:
        wanted = _pickle_globals(path)
        if wanted is None:
            raise unreadable(path, e) from e
        allowed = set(_safe_names())
        refused = [g for g in wanted if g not in allowed]
        what = ", ".join(refused) if refused else "objects outside the weights-only allow-list"
        raise CheckpointError(
            f"refusing to unpickle {path}: it needs {what}, which could run code while loading. Only tensors, "
            f"plain Python containers and these harmless types are accepted: {', '.join(sorted(allowed))}. "
            "If you trust the file's origin, re-save its tensors once in a trusted Python session, e.g. "
            "torch.save(torch.load(path, weights_only=False)['teacher'], 'clean.pth'), and load that. "
            f"(torch: {str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    except Exception as e:  # corrupt zip, truncated file, not a torch file...
        raise unreadable(path, e) from e


def _pickle_globals(path: Path) -> list[str] | None:
    """Globals a checkpoint's pickle imports (without unpickling it); None if it is no pickle at all."""
    if zipfile.is_zipfile(path):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
            return None
    names: list[str] = []
    try:  # legacy torch files: a sequence of pickles; scan their opcodes
        with open(path, "rb") as f:
            while f.peek(1) if hasattr(f, "peek") else f.read(0):
                strings: list[str] = []
                for op, arg, _ in pickletools.genops(f):
                    if op.name == "GLOBAL":
                        names.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
                    if op.name == "STOP":
                        break
                if len(names) > 100:
                    break
    except Exception:
        return names or None
    return names


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
