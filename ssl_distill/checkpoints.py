"""Reading backbones out of checkpoint files: ours, and the official DINO / iBOT / DINOv2 releases.

Layouts recognised automatically (or name the entry with ``key``):

================================  =============================================================================
ssl-distill                       ``{"format": "ssl-distill/1", "teacher": {"backbone.vit.*"}, "student": ...,
                                  "config": ...}`` (a file or a run directory); teacher by default.
DINO backbone release             bare state dict in timm's names (``dino_deitsmall16_pretrain.pth``).
DINO full training checkpoint     ``{"teacher": {"backbone.*", "head.*"}, "student": {"module.backbone.*", ...},
                                  "args": argparse.Namespace, "optimizer", "epoch", "dino_loss"}``; the head's
                                  last layer is stored as ``weight_g`` / ``weight_v`` (ignored here).
iBOT                              ``{"state_dict": backbone}`` releases, or full checkpoints like DINO's whose
                                  backbone has ``masked_embed`` and whose head has ``last_layer2``; layer scale as
                                  ``blocks.i.gamma_1`` / ``gamma_2`` when trained with ``init_values``.
DINOv2                            bare release (patch 14, ``pos_embed`` for 518 px, ``ls1/ls2.gamma``,
                                  ``mask_token``, ``register_tokens`` in the ``_reg4`` models, SwiGLU ``mlp.w12`` /
                                  ``mlp.w3`` for ViT-g); training outputs with chunked ``blocks.<chunk>.<i>`` keys,
                                  as ``{"teacher": {"backbone.*", "dino_head.*", ...}}`` or
                                  ``{"model": {"teacher.backbone.*", "student.backbone.*", ...}}``.
timm                              a state dict in timm's own names (what ``ssl-distill export`` writes; also
                                  ``.safetensors``), e.g. with ``reg_token`` and ``no_embed_class``.
================================  =============================================================================

Conversion to timm's names: chunked blocks are flattened (in DINOv2 the inner index already is the
global block index: chunk ``c`` pads its list with ``Identity`` modules), ``w12``/``w3`` become ``fc1``/
``fc2`` (timm's ``SwiGLUPacked`` computes ``silu(x1) * x2`` of the same packed halves), ``gamma_1``/
``gamma_2`` become ``ls1.gamma``/``ls2.gamma``, and DINOv2 registers become timm's ``reg_token`` with the
class token's position term folded into ``cls_token`` (registers carry no position term in DINOv2). Mask
tokens (``mask_token``, ``masked_embed``) are only used for masked-image-modelling training; they are
dropped and reported. Asked for an ODIS backbone (``obj_token=True``), a file without an [OBJ] token gives
one initialised from its [CLS] token and [CLS]'s position term, with a printed note. Everything else
under the backbone prefix must match the model exactly: missing, unexpected or mis-shaped keys raise
:class:`CheckpointError` listing them.

The architecture (width, depth, patch size, stored image size, registers, layer scale, MLP kind and
width, qkv bias) is inferred from the weights. The head count is not in the weights: it comes from
the checkpoint's ``args.arch`` when present, else from the standard size of that width (64-wide heads
for others); pass ``num_heads`` for anything else.

Files are read with ``torch.load(weights_only=True)`` plus an allow-list of the harmless types official
files contain (:data:`SAFE_GLOBALS`); a pickle that wants anything else is refused with the list of what
it wants. ``.safetensors`` files are read with safetensors.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, config_from_dict
from .engine.checkpoint import FORMAT, CheckpointError, describe_mismatch, find_checkpoint, unreadable
from .models import OBJ_KEYS, BackboneSpec, ViTBackbone, config_from_spec, fill_obj_from_cls, spec_from_config
from .models.backbone import VIT_SIZES, arch_for_width, grid_side, standard_heads

__all__ = [
    "SAFE_GLOBALS",
    "LoadedBackbone",
    "read_checkpoint",
    "find_backbone_state",
    "to_timm_layout",
    "infer_spec",
    "load_any_backbone",
    "load_backbone",
    "strip_prefix",
    "SPEC_METADATA_KEY",
]

SPEC_METADATA_KEY = "ssl_distill.backbone_spec"  # safetensors metadata written by ``ssl-distill export``


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


def read_training_checkpoint(path: Path, run_dir: Path) -> dict[str, Any] | None:
    """The training checkpoint a run in ``run_dir`` resumes from; None when there is none yet.

    Read with :func:`read_checkpoint`'s allow-list, so an official DINO / iBOT file gets a sentence, not
    an unpickling error. Raises CheckpointError, saying how to go on, for a file that ssl-distill did not write (an
    official DINO checkpoint copied in, another tool's file) or cannot read.
    """
    if not path.exists():
        return None
    how = (f"move it out of {run_dir}, train into another run.output_dir, or pass --fresh to start over "
           "(which deletes it)")
    try:
        ckpt, _ = read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; a run resumes from {path.name}, so {how}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} was not written by ssl-distill training (format {found!r}, expected "
                              f"{FORMAT!r}), so the run cannot resume from it: {how}")
    return ckpt


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


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys starting with ``prefix``, with it removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------------
# Finding the backbone inside a checkpoint
# ----------------------------------------------------------------------------------------------------
_ANCHOR = "patch_embed.proj.weight"
_PREFIXES = {
    "teacher": ("", "backbone.", "module.backbone.", "teacher.backbone.", "backbone.vit.", "module.", "model."),
    "student": ("student.backbone.", "module.backbone.", "backbone.", "backbone.vit.", "module.", ""),
}


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
        obj: what :func:`read_checkpoint` returned.
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
    for prefix in _PREFIXES[which or "teacher"]:
        if prefix + _ANCHOR in container:
            state = {k[len(prefix):]: v for k, v in container.items() if k.startswith(prefix)}
            bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise CheckpointError(f"entry {source!r}: non-tensor values under {prefix!r}: {bad[:5]}")
            return BackboneState(state, source, prefix, len(container) - len(state), hints)
    sample = [k for k in container if isinstance(k, str)][:8]
    conv = any(re.match(r"(.*\.)?(conv1|layer1\.0\.conv1)\.weight$", k) for k in container if isinstance(k, str))
    why = " (this looks like a ResNet: only ViT backbones are supported)" if conv else ""
    raise CheckpointError(
        f"no ViT backbone in entry {source!r}{why}: expected a key ending in '{_ANCHOR}' "
        f"under one of the prefixes {list(_PREFIXES[which or 'teacher'])}; keys look like {sample}"
    )


# ----------------------------------------------------------------------------------------------------
# Official names -> timm names
# ----------------------------------------------------------------------------------------------------
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_RENAMES = (
    (re.compile(r"^(blocks\.\d+\.mlp)\.w12\."), r"\1.fc1."),
    (re.compile(r"^(blocks\.\d+\.mlp)\.w3\."), r"\1.fc2."),
    (re.compile(r"^(blocks\.\d+)\.gamma_1$"), r"\1.ls1.gamma"),
    (re.compile(r"^(blocks\.\d+)\.gamma_2$"), r"\1.ls2.gamma"),
)
MASK_TOKENS = ("mask_token", "masked_embed")


@dataclass
class TimmState:
    """A backbone state dict in timm's names, with what the conversion found."""

    state: dict[str, torch.Tensor]
    origin: dict[str, str]  # timm name -> name in the file
    dropped: list[str]
    layout: str  # "dino", "ibot", "dinov2", "timm"
    swiglu: bool
    registers_converted: bool


def to_timm_layout(state: dict[str, torch.Tensor], source: str = "") -> TimmState:
    """Rename an official backbone state dict (prefix already removed) to timm's VisionTransformer names."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: list[str] = []
    chunked = swiglu = False
    for k, v in state.items():
        if k in MASK_TOKENS:
            dropped.append(k)
            continue
        new = k
        m = _CHUNKED.match(new)
        if m:
            chunked = True
            new = f"blocks.{m.group(2)}.{m.group(3)}"
        for pattern, repl in _RENAMES:
            new2 = pattern.sub(repl, new)
            if new2 != new and ".mlp.fc" in new2:
                swiglu = True
            new = new2
        if new in out:
            raise CheckpointError(f"keys {origin[new]!r} and {k!r} both map to {new!r}")
        out[new] = v
        origin[new] = k
    registers = False
    if "register_tokens" in out:  # DINOv2 registers: no position term; cls gets pos_embed[:, 0]
        registers = True
        if "pos_embed" not in out or "cls_token" not in out:
            raise CheckpointError("register_tokens without cls_token / pos_embed")
        out["reg_token"] = out.pop("register_tokens")
        origin["reg_token"] = origin.pop("register_tokens")
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    if chunked or registers or swiglu or "mask_token" in dropped:
        layout = "dinov2"
    elif "masked_embed" in dropped or any(k.endswith("gamma_1") for k in state) or source == "state_dict":
        layout = "ibot"
    elif "reg_token" in out or any(k.endswith("ls1.gamma") for k in out):
        layout = "timm"
    else:
        layout = "dino"
    return TimmState(out, origin, dropped, layout, swiglu, registers)


def infer_spec(ts: TimmState, hints: dict[str, Any] | None = None, **overrides: Any) -> BackboneSpec:
    """The architecture of a timm-named backbone state dict (see the module docstring)."""
    s = ts.state
    hints = hints or {}
    if _ANCHOR not in s:
        raise CheckpointError(f"no {_ANCHOR} in the backbone weights")
    w = s[_ANCHOR]
    if w.dim() != 4 or w.shape[-1] != w.shape[-2]:
        raise CheckpointError(f"{_ANCHOR} has shape {tuple(w.shape)}; expected (D, 3, p, p)")
    width, patch = int(w.shape[0]), int(w.shape[-1])
    blocks = {int(m.group(1)) for k in s if (m := re.match(r"^blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError("no transformer blocks (blocks.<i>.*) in the backbone weights")
    depth = max(blocks) + 1
    reg = int(s["reg_token"].shape[1]) if "reg_token" in s else 0
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
    spec = BackboneSpec(
        arch=arch_for_width(width), patch_size=patch, img_size=side * patch, depth=depth, embed_dim=width,
        num_heads=heads, drop_path_rate=0.0, mlp_ratio=int(fc1.shape[0]) / width,
        mlp_layer="swiglu" if swiglu else "mlp", qkv_bias="blocks.0.attn.qkv.bias" in s,
        layer_scale=1e-5 if "blocks.0.ls1.gamma" in s else None, reg_tokens=reg, no_embed_class=no_embed_class,
        pos_interp=pos_interp,
    )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(BackboneSpec)}
    if unknown:
        raise CheckpointError(f"unknown architecture options {sorted(unknown)}")
    spec = dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if spec.num_heads is None:
        raise CheckpointError(f"cannot tell the head count of a ViT of width {width}; pass num_heads")
    if width % spec.num_heads:
        raise CheckpointError(f"num_heads={spec.num_heads} does not divide the width {width}")
    return spec


def _strict_load(backbone: ViTBackbone, ts: TimmState, what: str) -> None:
    """load_state_dict(strict=True) on the timm model, errors in the file's own key names."""
    problem = describe_mismatch(backbone.vit.state_dict(), ts.state, lambda k: ts.origin.get(k, k))
    if problem:
        raise CheckpointError(f"{what} does not fit the inferred model {backbone.spec}: {problem}")
    state = ts.state
    backbone.vit.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
@dataclass
class LoadedBackbone:
    """A frozen backbone read from a checkpoint, and where it came from."""

    backbone: ViTBackbone
    config: Config  # ours: the run's config; official: defaults + the inferred model section
    file: Path
    format: str  # "ssl-distill", "dino", "ibot", "dinov2", "timm"
    source: str  # entry of the file ("teacher", "student", "state_dict", "model", "(whole file)")
    prefix: str  # key prefix removed inside that entry
    dropped: list[str] = field(default_factory=list)  # backbone keys deliberately not loaded (mask tokens)
    ignored: int = 0  # other keys of that entry (heads, ...)

    @property
    def spec(self) -> BackboneSpec:
        return self.backbone.spec

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary for results files."""
        return {
            "file": str(self.file), "format": self.format, "source": self.source, "prefix": self.prefix,
            "dropped": self.dropped, "ignored_keys": self.ignored, "spec": dataclasses.asdict(self.spec),
        }


def _freeze(backbone: ViTBackbone) -> ViTBackbone:
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
        obj_token: build an ODIS backbone with an [OBJ] token; a file without one (DINO, iBOT, DINOv2, our
            non-ODIS runs) initialises it from its [CLS] token (:func:`ssl_distill.models.fill_obj_from_cls`).
            Our ODIS checkpoints get their [OBJ] token whatever this says.
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
        backbone = ViTBackbone(spec, init_weights=False, obj_token=obj_token)
    except (ValueError, AssertionError, TypeError) as e:
        raise CheckpointError(f"{file}: cannot build the inferred backbone {spec}: {e}") from e
    _strict_load(backbone, ts, f"{file} [{found.source}{', prefix ' + repr(found.prefix) if found.prefix else ''}]")
    if obj_token:
        backbone.init_obj_from_cls()
        _obj_note(f"{file} [{found.source}]")
    return LoadedBackbone(_freeze(backbone), config_from_spec(spec), file, ts.layout, found.source, found.prefix,
                          ts.dropped, found.ignored)


def _obj_note(what: str) -> None:
    print(f"note: {what} has no [OBJ] token: obj_token starts as its cls_token, obj_pos_embed as the CLS "
          "position term")


def _load_ours(file: Path, ckpt: dict[str, Any], which: str, obj_token: bool = False) -> LoadedBackbone:
    if which not in ("teacher", "student"):
        raise CheckpointError(f"which must be 'teacher' or 'student', got {which!r}")
    if "config" not in ckpt or which not in ckpt:
        raise CheckpointError(f"{file}: ssl-distill checkpoint without 'config' or '{which}'")
    cfg = config_from_dict(ckpt["config"])
    from .engine.checkpoint import load_state_strict

    state = strip_prefix(ckpt[which], "backbone.")
    has_obj = obj_token or any(k in state for k in OBJ_KEYS)  # our ODIS runs keep their [OBJ] token
    backbone = ViTBackbone(spec_from_config(cfg), init_weights=False, obj_token=has_obj)
    dropped = [k for k in MASK_TOKENS if state.pop(k, None) is not None]  # iBOT's mask token: training only
    ignored = len(ckpt[which]) - len(state) - len(dropped)
    try:
        filled = has_obj and fill_obj_from_cls(state, backbone.vit.no_embed_class)
    except ValueError as e:
        raise CheckpointError(f"{file}: {which} backbone: {e}") from e
    load_state_strict(backbone, state, f"{file}: {which} backbone")
    if filled:
        _obj_note(f"{file} [{which}]")
    return LoadedBackbone(_freeze(backbone), cfg, file, "ssl-distill", which, "backbone.", dropped, ignored)


def load_backbone(path: str | Path, which: str = "teacher", key: str | None = None, obj_token: bool = False,
                  **spec_overrides: Any) -> tuple[ViTBackbone, Config]:
    """The frozen backbone of a checkpoint file or run directory, and its config.

    ssl-distill checkpoints return the run's config; official DINO / iBOT / DINOv2 / timm files return a
    default config whose model section describes the inferred architecture. ``which`` is ``teacher``
    (default, as DINO evaluates) or ``student``. Loading is strict: a missing or unexpected backbone key
    raises CheckpointError naming it (``obj_token``: see :func:`load_any_backbone`).
    """
    loaded = load_any_backbone(path, which, key, obj_token, **spec_overrides)
    return loaded.backbone, loaded.config
