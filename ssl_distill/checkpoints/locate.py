"""Finding the ViT backbone's weights inside a loaded checkpoint: which entry, which key prefix.

Entries looked at, unless one is named with ``key``: ``teacher`` (or ``student``), ``model``,
``state_dict``, or the whole file when it is a bare state dict. Inside the entry, the backbone is the
first prefix of :data:`PREFIXES` under which :data:`ANCHOR` exists (``backbone.``, ``module.backbone.``,
``teacher.backbone.`` ...); the DINO / iBOT ``args`` saved beside the weights give architecture hints.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["ANCHOR", "PREFIXES", "BackboneState", "find_backbone_state", "strip_prefix"]

ANCHOR = "patch_embed.proj.weight"  # the key every ViT backbone has
PREFIXES = {
    "teacher": ("", "backbone.", "module.backbone.", "teacher.backbone.", "backbone.vit.", "module.", "model."),
    "student": ("student.backbone.", "module.backbone.", "backbone.", "backbone.vit.", "module.", ""),
}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys starting with ``prefix``, with it removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _hints(obj: dict[str, Any]) -> dict[str, Any]:
    """Architecture hints from a checkpoint's saved arguments (DINO / iBOT ``args``)."""
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        return {}
    return {k: args[k] for k in ("arch", "patch_size") if k in args}


def _describe(obj: dict[str, Any]) -> str:
    keys = list(obj)
    return f"{keys[:12]}{' ...' if len(keys) > 12 else ''}"


@dataclass
class BackboneState:
    """The backbone weights found in a checkpoint, in the file's own names (prefix removed)."""

    state: dict[str, torch.Tensor]
    source: str  # the entry it came from ("teacher", "state_dict", "(whole file)" ...)
    prefix: str
    ignored: int  # keys of that entry outside the backbone (heads ...)
    hints: dict[str, Any] = field(default_factory=dict)


def find_backbone_state(obj: Any, which: str | None = None, key: str | None = None) -> BackboneState:
    """Locate the ViT backbone in a loaded checkpoint object (any official layout).

    Args:
        obj: what :func:`ssl_distill.checkpoints.files.read_checkpoint` returned.
        which: ``"teacher"`` (default where a file holds both) or ``"student"``.
        key: name of the top-level entry holding the weights (e.g. ``"teacher"``, ``"model"``,
            ``"state_dict"``); by default detected.
    """
    if which not in (None, "teacher", "student"):
        raise CheckpointError(f"which must be 'teacher' or 'student', got {which!r}")
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a dict of tensors or of entries, got {type(obj).__name__}")
    hints = _hints(obj)
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"no entry {key!r} in the checkpoint; its entries are {_describe(obj)}")
        container, source = obj[key], key
    elif which == "student":
        if "student" in obj:
            container, source = obj["student"], "student"
        elif isinstance(obj.get("model"), dict) and any(k.startswith("student.") for k in obj["model"]):
            container, source = obj["model"], "model"
        else:
            raise CheckpointError(f"no student weights in this checkpoint (entries: {_describe(obj)})")
    elif "teacher" in obj:
        container, source = obj["teacher"], "teacher"
    elif isinstance(obj.get("model"), dict):
        container, source = obj["model"], "model"
    elif isinstance(obj.get("state_dict"), dict):
        container, source = obj["state_dict"], "state_dict"
    elif _is_state_dict(obj):
        container, source = obj, "(whole file)"
    else:
        raise CheckpointError(f"cannot tell where the backbone is; entries: {_describe(obj)}. Name it with key=...")
    if not isinstance(container, dict):
        raise CheckpointError(f"entry {source!r} is a {type(container).__name__}, not a state dict")
    for prefix in PREFIXES[which or "teacher"]:
        if prefix + ANCHOR in container:
            state = strip_prefix(container, prefix)
            bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise CheckpointError(f"entry {source!r}: non-tensor values under {prefix!r}: {bad[:5]}")
            return BackboneState(state, source, prefix, len(container) - len(state), hints)
    sample = [k for k in container if isinstance(k, str)][:8]
    conv = any(re.match(r"(.*\.)?(conv1|layer1\.0\.conv1)\.weight$", k) for k in container if isinstance(k, str))
    why = " (this looks like a ResNet: only ViT backbones are supported)" if conv else ""
    raise CheckpointError(
        f"no ViT backbone in entry {source!r}{why}: expected a key ending in '{ANCHOR}' "
        f"under one of the prefixes {list(PREFIXES[which or 'teacher'])}; keys look like {sample}"
    )
