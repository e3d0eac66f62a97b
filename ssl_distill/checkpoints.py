"""Reading backbones out of checkpoint files for evaluation."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Config, config_from_dict
from .engine.checkpoint import FORMAT, CheckpointError, find_checkpoint, load_file, load_state_strict
from .models import BackboneSpec, ViTBackbone


def spec_from_config(cfg: Config) -> BackboneSpec:
    m = cfg.model
    return BackboneSpec(
        arch=m.arch, patch_size=m.patch_size, img_size=m.img_size,
        depth=m.depth, embed_dim=m.embed_dim, num_heads=m.num_heads, drop_path_rate=0.0,
    )


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys starting with ``prefix``, with it removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_backbone(path: str | Path, which: str = "teacher") -> tuple[ViTBackbone, Config]:
    """The frozen backbone of an ssl-distill checkpoint file or run directory.

    ``which`` is ``teacher`` (default, as DINO evaluates) or ``student``. Loading is strict: a
    missing or unexpected backbone key raises CheckpointError naming it.
    """
    file = find_checkpoint(path)
    ckpt = load_file(file)
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an ssl-distill checkpoint (no '{FORMAT}' format tag)")
    if which not in ("teacher", "student"):
        raise CheckpointError(f"which must be 'teacher' or 'student', got {which!r}")
    cfg = config_from_dict(ckpt["config"])
    backbone = ViTBackbone(spec_from_config(cfg))
    load_state_strict(backbone, strip_prefix(ckpt[which], "backbone."), f"{file}: {which} backbone")
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad = False
    return backbone, cfg
