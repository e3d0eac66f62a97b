"""DINOv3 (Siméoni et al. 2025): the backbone releases, the training outputs, and timm's names for them.

- release ``dinov3_<arch>_pretrain_<lvd1689m|sat493m>-<hash>.pth``: a bare state dict with ``cls_token``,
  ``storage_tokens`` (registers), ``mask_token`` (1, D), ``rope_embed.periods`` (D_head / 4,), per block
  ``attn.qkv.bias`` with ``attn.qkv.bias_mask``, ``ls1.gamma`` / ``ls2.gamma``, ``mlp.fc1`` / ``fc2`` or
  SwiGLU's ``mlp.w1`` / ``w2`` / ``w3``; no ``pos_embed``; ``local_cls_norm.*`` in the SAT-493M ViT-L and
  the 7B files;
- training output ``teacher_checkpoint.pth``: ``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``
  (found by :mod:`ssl_distill.checkpoints.locate`: the ``teacher`` entry, prefix ``backbone.``);
- timm's names for the same model (its ``Eva``: what ``ssl-distill export`` writes of a RoPE backbone,
  timm's own DINOv3 weights): ``reg_token``, ``gamma_1`` / ``gamma_2``, ``attn.q_bias`` / ``attn.v_bias``,
  ``mlp.fc1_g`` / ``fc1_x`` / ``fc2``, no periods (timm computes them).

To timm's ``Eva`` names (:func:`to_eva`): ``storage_tokens`` -> ``reg_token``, ``rope_embed.periods`` ->
``rope.periods`` (kept: :class:`ssl_distill.models.RopeViTBackbone` holds them as a buffer),
``ls1/ls2.gamma`` -> ``gamma_1/gamma_2``, ``w1/w2/w3`` -> ``fc1_g/fc1_x/fc2``; the qkv bias is split into
``q_bias`` and ``v_bias``. Its K third is not loaded: the official forward multiplies it by the
``bias_mask``'s zeros (every release is built with ``mask_k_bias``), and timm's ``Eva`` holds a zero
``k_bias`` buffer. A ``bias_mask`` must be exactly that mask (ones, zeros over K, ones); a file without one
(a run trained with ``mask_k_bias: false`` adds its K bias) loads only when its K third is zero. Dropped
and reported: ``mask_token`` (handed on as :attr:`TimmState.mask_token`: ``model.init_from`` starts a run's
mask token from it), the ``bias_mask`` buffers, and ``local_cls_norm.*`` (applied to local crops in
training only, never in evaluation).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from ...errors import CheckpointError
from .base import Rename, TimmState

__all__ = ["claims", "to_eva"]

RENAMES = (
    Rename(re.compile(r"^storage_tokens$"), "reg_token"),
    Rename(re.compile(r"^rope_embed\.periods$"), "rope.periods"),
    Rename(re.compile(r"^(blocks\.\d+)\.ls([12])\.gamma$"), r"\1.gamma_\2"),
    Rename(re.compile(r"^(blocks\.\d+\.mlp)\.w1\."), r"\1.fc1_g.", swiglu=True),
    Rename(re.compile(r"^(blocks\.\d+\.mlp)\.w2\."), r"\1.fc1_x.", swiglu=True),
    Rename(re.compile(r"^(blocks\.\d+\.mlp)\.w3\."), r"\1.fc2.", swiglu=True),
)
_QKV_BIAS = re.compile(r"^(blocks\.\d+\.attn)\.qkv\.bias$")
_OFFICIAL = ("storage_tokens", "rope_embed.periods")
_EVA = ("attn.q_bias", ".gamma_1", "mlp.fc1_g.weight")


def claims(state: Mapping[str, Tensor]) -> bool:
    """True for a DINOv3 backbone (official names or timm's ``Eva`` names), prefix removed.

    Official files name their storage tokens or RoPE periods; timm's names have no ``pos_embed`` and a
    register token, Eva's separate Q / V biases, its ``gamma_1`` layer scale or its SwiGLU gate.
    """
    if any(k in state for k in (*_OFFICIAL, "rope.periods")):
        return True
    return "pos_embed" not in state and ("reg_token" in state or any(k.endswith(_EVA) for k in state))


def _split_qkv_bias(key: str, bias: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(Q, V) thirds of one block's qkv bias, after checking that its K third is masked (or zero)."""
    d = bias.shape[0] // 3
    if bias.dim() != 1 or 3 * d != bias.shape[0]:
        raise CheckpointError(f"{key} has shape {tuple(bias.shape)}; expected (3 D,)")
    q, k, v = bias.split(d)
    if mask is not None:
        expected = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
        if mask.shape != bias.shape or not torch.equal(mask.float(), expected):
            raise CheckpointError(f"{key}_mask is not DINOv3's K mask (ones over Q and V, zeros over K): the model "
                                  "that wrote it adds a different part of its qkv bias")
    elif torch.count_nonzero(k):
        raise CheckpointError(f"{key} has a non-zero K third and no bias_mask: the model that wrote it adds a K "
                              "bias (mask_k_bias false), which timm's Eva (a zero k_bias) cannot")
    return q, v


def to_eva(state: Mapping[str, Tensor]) -> TimmState:
    """A DINOv3 backbone state dict (prefix removed, :func:`claims` true) in timm's ``Eva`` names."""
    official = any(k in state for k in _OFFICIAL) or any(k.endswith(".qkv.bias_mask") for k in state)
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    mask_token = None
    masked = False
    for key, value in state.items():
        if key == "mask_token":
            mask_token = value.reshape(1, -1)
            dropped.append(key)
            continue
        if key.startswith("local_cls_norm."):
            dropped.append(key)
            continue
        if key.endswith(".qkv.bias_mask") and key[: -len("_mask")] in state:
            masked = True  # checked with its bias
            continue
        if m := _QKV_BIAS.match(key):
            q, v = _split_qkv_bias(key, value, state.get(key + "_mask"))
            for name, part in ((f"{m.group(1)}.q_bias", q), (f"{m.group(1)}.v_bias", v)):
                out[name], origin[name] = part, key
            continue
        new = key
        for rename in RENAMES:
            new = rename.pattern.sub(rename.repl, new)
        if new in out:
            raise CheckpointError(f"keys {origin[new]!r} and {key!r} both map to {new!r}")
        out[new], origin[new] = value, key
    if masked:
        dropped += ["blocks.*.attn.qkv.bias_mask", "blocks.*.attn.qkv.bias (K third)"]
    swiglu = any(k.endswith("mlp.fc1_g.weight") for k in out)
    return TimmState(out, origin, dropped, "dinov3" if official else "timm", swiglu, registers_converted=False,
                     pos_embed="rope", mask_token=mask_token)
