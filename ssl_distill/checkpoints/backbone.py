"""Loading a frozen backbone from any supported checkpoint: ours, or an official DINO / iBOT / DINOv2 / DINOv3 /
timm file.

:func:`load_any_backbone` finds the file (a run directory gives its ``checkpoint.pth``), reads it safely
(:mod:`.files`), and then either rebuilds one of our runs from its saved config, or locates the official
backbone (:mod:`.locate`), converts it to timm's names (:mod:`.layouts`) and infers its architecture
(:func:`infer_spec`): width, depth, patch size, stored image size, registers, layer scale, MLP kind and
width, qkv bias. The head count of a learned-position ViT is not in the weights: it comes from the
checkpoint's ``args.arch`` when present, else from the standard size of that width (64-wide heads for
others); pass ``num_heads`` for anything else. A DINOv3 (RoPE) file gives it by its periods' length
(D_head / 4; 64-wide heads for timm's names, which have no periods), and its periods are loaded as they
are. Files written by ``ssl-distill export`` carry their exact spec (:data:`SPEC_METADATA_KEY`) and a RoPE
backbone's periods (:data:`ROPE_PERIODS_METADATA_KEY`).

Mask tokens (``mask_token``, ``masked_embed``) are dropped and reported, and handed on as
:attr:`LoadedBackbone.mask_token` (``model.init_from`` starts a run's mask token from it). Asked for an
ODIS backbone (``obj_token=True``), a file without an [OBJ] token gives one initialised from its [CLS]
token and [CLS]'s position term (where it has a learned one), with a printed note. Everything else under the backbone prefix must match the
model exactly: missing, unexpected or mis-shaped keys raise :class:`CheckpointError` listing them.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config, config_from_dict
from ..errors import CheckpointError
from ..models import (
    OBJ_KEYS, BackboneSpec, ObjAttention, TokenBackbone, build_backbone, config_from_spec, spec_from_config,
)
from ..models.backbone import VIT_SIZES, arch_for_width, grid_side, standard_heads
from .files import read_checkpoint
from .layouts import MASK_TOKENS, TimmState, to_timm_layout
from .locate import ANCHOR, find_backbone_state, strip_prefix
from .training import FORMAT, describe_mismatch, find_checkpoint, load_state_strict

__all__ = ["ROPE_PERIODS_METADATA_KEY", "SPEC_METADATA_KEY", "LoadedBackbone", "infer_spec", "load_any_backbone",
           "load_backbone"]

SPEC_METADATA_KEY = "ssl_distill.backbone_spec"  # safetensors metadata written by ``ssl-distill export``
ROPE_PERIODS_METADATA_KEY = "ssl_distill.rope_periods"  # ... with a RoPE backbone's periods (timm's names have none)


# ----------------------------------------------------------------------------------------------------
# Architecture from the weights
# ----------------------------------------------------------------------------------------------------
def infer_spec(ts: TimmState, hints: dict[str, Any] | None = None, **overrides: Any) -> BackboneSpec:
    """The architecture of a timm-named backbone state dict (see the module docstring)."""
    s = ts.state
    if ANCHOR not in s:
        raise CheckpointError(f"no {ANCHOR} in the backbone weights")
    w = s[ANCHOR]
    if w.dim() != 4 or w.shape[-1] != w.shape[-2]:
        raise CheckpointError(f"{ANCHOR} has shape {tuple(w.shape)}; expected (D, 3, p, p)")
    width, patch = int(w.shape[0]), int(w.shape[-1])
    blocks = {int(m.group(1)) for k in s if (m := re.match(r"^blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError("no transformer blocks (blocks.<i>.*) in the backbone weights")
    depth = max(blocks) + 1
    reg = int(s["reg_token"].shape[1]) if "reg_token" in s else 0
    if ts.pos_embed == "rope":
        spec = _rope_spec(s, width, patch, depth, reg)
    else:
        spec = _learned_spec(ts, hints or {}, width, patch, depth, reg)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(BackboneSpec)}
    if unknown:
        raise CheckpointError(f"unknown architecture options {sorted(unknown)}")
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if spec.num_heads is None:
        raise CheckpointError(f"cannot tell the head count of a ViT of width {width}; pass num_heads")
    if width % spec.num_heads:
        raise CheckpointError(f"num_heads={spec.num_heads} does not divide the width {width}")
    return spec


def _learned_spec(ts: TimmState, hints: dict[str, Any], width: int, patch: int, depth: int,
                  reg: int) -> BackboneSpec:
    """A learned-position ViT's spec from timm's ``VisionTransformer`` names."""
    s = ts.state
    if "pos_embed" not in s:
        raise CheckpointError("no pos_embed in the backbone weights")
    n_pos = int(s["pos_embed"].shape[1])
    # registers: timm's reg models (and converted DINOv2 ones) keep the prefix out of pos_embed
    order = ((True, 0), (False, 1 + reg)) if reg else ((False, 1), (True, 0))
    for no_embed_class, n_prefix in order:
        side = grid_side(n_pos - n_prefix) if n_pos > n_prefix else None
        if side:
            break
    else:
        raise CheckpointError(f"pos_embed has {n_pos} entries: not a square grid plus {1 + reg} prefix tokens")
    fc1 = s.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise CheckpointError("no blocks.0.mlp.fc1.weight (or mlp.w12.weight) in the backbone weights")
    fc2 = s.get("blocks.0.mlp.fc2.weight")
    # timm names: SwiGLUPacked's fc2 takes half of fc1's (packed) output
    swiglu = ts.swiglu or (fc2 is not None and 2 * int(fc2.shape[1]) == int(fc1.shape[0]))
    heads = None
    arch_hint = str(hints.get("arch", ""))
    if arch_hint in VIT_SIZES and VIT_SIZES[arch_hint][0] == width:
        heads = VIT_SIZES[arch_hint][2]
    heads = heads or standard_heads(width)
    pos_interp = "dino" if ts.layout in ("dino", "ibot") or (ts.layout == "dinov2" and not ts.registers_converted) \
        else "timm"
    return BackboneSpec(
        arch=arch_for_width(width), patch_size=patch, img_size=side * patch, depth=depth, embed_dim=width,
        num_heads=heads, drop_path_rate=0.0, mlp_ratio=int(fc1.shape[0]) / width,
        mlp_layer="swiglu" if swiglu else "mlp", qkv_bias="blocks.0.attn.qkv.bias" in s,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in s else None, reg_tokens=reg, no_embed_class=no_embed_class,
        pos_interp=pos_interp,
    )


def _rope_spec(s: dict[str, torch.Tensor], width: int, patch: int, depth: int, reg: int) -> BackboneSpec:
    """A DINOv3 (RoPE) ViT's spec from timm's ``Eva`` names: heads and period base from ``rope.periods``
    (D_head / 4 values ``base ** (4 i / D_head)``); without periods, 64-wide heads and base 100 (every
    DINOv3 release but the 7B, whose heads are 128 wide). Built at 224 px, as the releases (the size
    only names the patch grid: RoPE takes any)."""
    periods = s.get("rope.periods")
    heads, base = (width // 64 if width % 64 == 0 else None), 100.0
    if periods is not None:
        head_dim = 4 * periods.numel()
        if periods.dim() != 1 or width % head_dim:
            raise CheckpointError(f"rope.periods has shape {tuple(periods.shape)}: a head width of {head_dim} does "
                                  f"not divide the width {width}")
        heads = width // head_dim
        if periods.numel() > 1:  # rounded: a released file's periods may be bf16-rounded
            base = float(f"{float(periods[-1]) ** (head_dim / (4 * (periods.numel() - 1))):.4g}")
    gate, fc1 = s.get("blocks.0.mlp.fc1_g.weight"), s.get("blocks.0.mlp.fc1.weight")
    if gate is None and fc1 is None:
        raise CheckpointError("no blocks.0.mlp.fc1.weight (or mlp.w1.weight) in the backbone weights")
    mlp_ratio = 2 * int(gate.shape[0]) / width if gate is not None else int(fc1.shape[0]) / width
    return BackboneSpec(
        arch=arch_for_width(width), patch_size=patch, img_size=224, depth=depth, embed_dim=width, num_heads=heads,
        mlp_ratio=mlp_ratio, mlp_layer="swiglu" if gate is not None else "mlp",
        qkv_bias="blocks.0.attn.q_bias" in s, layer_scale=1e-5 if "blocks.0.gamma_1" in s else None,
        reg_tokens=reg, pos_embed="rope", rope_theta=base,
    )


def _strict_load(backbone: TokenBackbone, ts: TimmState, what: str) -> None:
    """load_state_dict(strict=True) on the timm model, errors in the file's own key names."""
    problem = describe_mismatch(backbone.vit.state_dict(), ts.state, lambda k: ts.origin.get(k, k))
    if problem:
        raise CheckpointError(f"{what} does not fit the inferred model {backbone.spec}: {problem}")
    backbone.vit.load_state_dict(ts.state, strict=True)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
@dataclass
class LoadedBackbone:
    """A frozen backbone read from a checkpoint, and where it came from."""

    backbone: TokenBackbone
    config: Config  # ours: the run's config; official: defaults + the inferred model section
    file: Path
    format: str  # "ssl-distill", "dino", "ibot", "dinov2", "dinov3", "timm"
    source: str  # entry of the file ("teacher", "student", "state_dict", "model", "(whole file)")
    prefix: str  # key prefix removed inside that entry
    dropped: list[str] = field(default_factory=list)  # backbone keys deliberately not loaded (mask tokens)
    ignored: int = 0  # other keys of that entry (heads, ...)
    mask_token: torch.Tensor | None = None  # the file's mask token (1, D), if it has one

    @property
    def spec(self) -> BackboneSpec:
        return self.backbone.spec

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary for results files."""
        return {
            "file": str(self.file), "format": self.format, "source": self.source, "prefix": self.prefix,
            "dropped": self.dropped, "ignored_keys": self.ignored, "spec": dataclasses.asdict(self.spec),
        }


def _freeze(backbone: TokenBackbone) -> TokenBackbone:
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad = False
    return backbone


def load_any_backbone(path: str | Path, which: str | None = None, key: str | None = None,
                      obj_token: bool = False, **spec_overrides: Any) -> LoadedBackbone:
    """The frozen backbone of any supported checkpoint (see the module docstring).

    Args:
        path: a checkpoint file (``.pth`` / ``.pt`` / ``.safetensors``) or an ssl-distill run directory.
        which: ``"teacher"`` (default where both exist, as DINO evaluates) or ``"student"``.
        key: top-level entry holding the weights, when automatic detection is not wanted.
        obj_token: build an ODIS backbone with an [OBJ] token; a file without one (DINO, iBOT, DINOv2, DINOv3,
            our non-ODIS runs) initialises it from its [CLS] token (the backbone's ``init_obj_from_cls``).
            Our ODIS checkpoints get their [OBJ] token whatever this says, with their run's attention pattern
            (``ObjAttention.from_config``); elsewhere [OBJ] is a read-out no other token reads.
        spec_overrides: :class:`BackboneSpec` fields to force for official files (e.g. ``num_heads``,
            ``pos_interp``); ``None`` values are ignored.
    """
    file = find_checkpoint(path)
    obj, meta = read_checkpoint(file)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if key not in (None, "teacher", "student"):
            raise CheckpointError(f"{file} is an ssl-distill checkpoint: key must be 'teacher' or 'student', "
                                  f"got {key!r}")
        return _load_ours(file, obj, key or which or "teacher", obj_token)
    found = find_backbone_state(obj, which, key)
    ts = to_timm_layout(found.state, found.source)
    if SPEC_METADATA_KEY in meta:  # written by our export: the exact spec, pos_interp included
        try:
            spec = BackboneSpec(**json.loads(meta[SPEC_METADATA_KEY]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: unreadable {SPEC_METADATA_KEY} metadata: {e}") from e
        spec = dataclasses.replace(spec, **{k: v for k, v in spec_overrides.items() if v is not None})
    else:
        spec = infer_spec(ts, found.hints, **spec_overrides)
    try:
        backbone = build_backbone(spec, init_weights=False, obj_token=obj_token,  # [OBJ] as a read-out
                                  obj_attention=ObjAttention(patches_read_obj=False))
    except (ValueError, AssertionError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot build the inferred backbone {spec}: {e}") from e
    if ts.pos_embed == "rope" and "rope.periods" not in ts.state:  # timm's names: timm computes the periods
        periods = meta.get(ROPE_PERIODS_METADATA_KEY)  # what our export kept of the model's own
        ts.state["rope.periods"] = (torch.tensor(json.loads(periods), dtype=torch.float32) if periods
                                    else backbone.vit.rope.periods.clone())
    _strict_load(backbone, ts, f"{file} [{found.source}{', prefix ' + repr(found.prefix) if found.prefix else ''}]")
    if obj_token:
        backbone.init_obj_from_cls()
        _obj_note(f"{file} [{found.source}]")
    return LoadedBackbone(_freeze(backbone), config_from_spec(spec), file, ts.layout, found.source, found.prefix,
                          ts.dropped, found.ignored, ts.mask_token)


def _obj_note(what: str) -> None:
    print(f"note: {what} has no [OBJ] token: obj_token starts as its cls_token, obj_pos_embed (where the model has "
          "a learned position embedding) as the CLS position term")


def _load_ours(file: Path, ckpt: dict[str, Any], which: str, obj_token: bool = False) -> LoadedBackbone:
    if which not in ("teacher", "student"):
        raise CheckpointError(f"which must be 'teacher' or 'student', got {which!r}")
    if "config" not in ckpt or which not in ckpt:
        raise CheckpointError(f"{file}: ssl-distill checkpoint without 'config' or '{which}'")
    cfg = config_from_dict(ckpt["config"])
    state = strip_prefix(ckpt[which], "backbone.")
    has_obj = obj_token or any(k in state for k in OBJ_KEYS)  # our ODIS runs keep their [OBJ] token
    backbone = build_backbone(spec_from_config(cfg), init_weights=False, obj_token=has_obj,
                              obj_attention=ObjAttention.from_config(cfg, ckpt["config"].get("odis") or {}))
    mask_tokens = {k: state.pop(k) for k in MASK_TOKENS if k in state}  # iBOT's mask token: training only
    dropped = list(mask_tokens)
    ignored = len(ckpt[which]) - len(state) - len(dropped)
    try:
        filled = has_obj and backbone.fill_obj(state)
    except ValueError as e:
        raise CheckpointError(f"{file}: {which} backbone: {e}") from e
    load_state_strict(backbone, state, f"{file}: {which} backbone")
    if filled:
        _obj_note(f"{file} [{which}]")
    return LoadedBackbone(_freeze(backbone), cfg, file, "ssl-distill", which, "backbone.", dropped, ignored,
                          next(iter(mask_tokens.values()), None))


def load_backbone(path: str | Path, which: str = "teacher", key: str | None = None, obj_token: bool = False,
                  **spec_overrides: Any) -> tuple[TokenBackbone, Config]:
    """The frozen backbone of a checkpoint file or run directory, and its config.

    ssl-distill checkpoints return the run's config; official DINO / iBOT / DINOv2 / DINOv3 / timm files return a
    default config whose model section describes the inferred architecture. ``which`` is ``teacher``
    (default, as DINO evaluates) or ``student``. Loading is strict: a missing or unexpected backbone key
    raises CheckpointError naming it (``obj_token``: see :func:`load_any_backbone`).
    """
    loaded = load_any_backbone(path, which, key, obj_token, **spec_overrides)
    return loaded.backbone, loaded.config
