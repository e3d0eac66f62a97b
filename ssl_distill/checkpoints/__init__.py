"""Checkpoints: our training checkpoints, and backbones from ours or the official DINO / iBOT / DINOv2 / DINOv3
files.

==================  ==================================================================================
``files.py``        reading any checkpoint file safely (``weights_only`` with an allow-list,
                    safetensors) and saying why an unreadable one is
``training.py``     the training checkpoint: its format mark, atomic save, RNG states, reading it to
                    resume, strict state-dict loading; the checkpoint of a run directory
``locate.py``       where the backbone is inside a loaded file (entry and key prefix)
``layouts/``        the official layouts, one file each, and their conversion to timm's names
``backbone.py``     the architecture inferred from the weights; loading a frozen backbone from any of them
==================  ==================================================================================

Our format: ``{"format": "ssl-distill/1", "teacher": {"backbone.vit.*", ...}, "student": ...,
"config": ..., "optimizer": ..., "loss": ..., "step": ..., "rngs": ...}`` in ``<run>/checkpoint.pth``
(:func:`ssl_distill.engine.train.Trainer.checkpoint_dict`); a backbone is read from the teacher by default. Writing files atomically is :mod:`ssl_distill.atomic`'s job; the
conversions between a config and a :class:`ssl_distill.models.BackboneSpec` live with the backbone in
:mod:`ssl_distill.models`.
"""
from ..errors import CheckpointError
from .backbone import ROPE_PERIODS_METADATA_KEY, SPEC_METADATA_KEY, LoadedBackbone, load_any_backbone, load_backbone
from .files import load_file, read_checkpoint
from .training import (
    FORMAT, LATEST, atomic_save, describe_mismatch, find_checkpoint, is_training_checkpoint, load_state_strict,
    read_training_checkpoint, rng_state, set_rng_state,
)

__all__ = [
    "CheckpointError",
    "ROPE_PERIODS_METADATA_KEY", "SPEC_METADATA_KEY", "LoadedBackbone", "load_any_backbone", "load_backbone",
    "load_file", "read_checkpoint",
    "FORMAT", "LATEST", "atomic_save", "describe_mismatch", "find_checkpoint", "is_training_checkpoint",
    "load_state_strict", "read_training_checkpoint", "rng_state", "set_rng_state",
]
