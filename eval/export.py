"""Export a clean backbone file: timm's own key names, nothing but the backbone's tensors.

Any checkpoint :func:`ssl_distill.checkpoints.load_any_backbone` reads (our run directories and files,
official DINO / iBOT / DINOv2 releases and training checkpoints) becomes a state dict of timm's
``VisionTransformer`` that loads with::

    timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=OUT), **KWARGS)

where NAME and KWARGS are printed, returned and written beside the file (``OUT`` with suffix ``.json``).
Formats: ``.safetensors`` (default; carries the backbone spec in its metadata so that ``ssl-distill``
rebuilds the exact model, position-embedding interpolation included) or a plain ``torch.save`` state
dict (``.pth`` / ``.pt``).

Note: timm interpolates position embeddings with antialiasing; models whose official code does not
(DINO, iBOT, DINOv2 without registers) give identical features in timm at the stored image size only.

RoPE backbones (DINOv3, ours or official) export to timm's DINOv3 model (``vit_*_patch16_dinov3_qkvb``,
its ``Eva``) without their RoPE periods, which timm does not store but computes in fp32 from
``rope_temperature``. Where the backbone's periods differ from that formula (a released file's may be
bf16-rounded), the sidecar JSON lists them (``rope_periods``) with the line that copies them into
``model.rope.periods``; the ``.safetensors`` metadata keeps them too, so ``ssl-distill`` reloads the exact model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import timm

from ssl_distill.atomic import atomic_write
from ssl_distill.checkpoints import (
    ROPE_PERIODS_METADATA_KEY, SPEC_METADATA_KEY, atomic_save, find_checkpoint, is_training_checkpoint,
)
from ssl_distill.cli_args import export_arguments as add_arguments  # options: torch-free
from ssl_distill.cli_args import tool_main
from ssl_distill.models import OBJ_KEYS, BackboneSpec
from ssl_distill.models.rope_backbone import dinov3_timm_args, rope_export

from .model import load_model

__all__ = ["export_backbone", "timm_model_args", "add_arguments", "run"]

_SIZE_NAMES = {"vit_tiny": "tiny", "vit_small": "small", "vit_base": "base", "vit_large": "large",
               "vit_huge": "huge", "vit_giant": "giant"}


def timm_model_args(spec: BackboneSpec) -> tuple[str, dict[str, Any]]:
    """(timm model name, keyword arguments) that build ``spec`` with ``timm.create_model``.

    The name only supplies what keywords cannot express in JSON (SwiGLU layers for ViT-g); every
    dimension is given explicitly.
    """
    if spec.pos_embed == "rope":
        return dinov3_timm_args(spec)
    width, depth, heads = spec.dims()
    size = _SIZE_NAMES.get(spec.arch, "base")
    if spec.mlp_layer == "swiglu":
        name = "vit_giant_patch14_reg4_dinov2" if spec.reg_tokens else "vit_giant_patch14_dinov2"
    else:
        candidates = [f"vit_{size}_patch{spec.patch_size}_{'reg4_' if spec.reg_tokens else ''}dinov2",
                      f"vit_{size}_patch{spec.patch_size}_224", "vit_base_patch16_224"]
        if spec.layer_scale is None and not spec.reg_tokens:
            candidates.pop(0)
        name = next(n for n in candidates if timm.is_model(n))
    kwargs = spec.timm_kwargs()
    for k in ("mlp_layer", "act_layer", "drop_path_rate"):
        kwargs.pop(k, None)
    kwargs.setdefault("init_values", None)
    kwargs.setdefault("reg_tokens", 0)
    kwargs.setdefault("no_embed_class", False)
    kwargs.update(embed_dim=width, depth=depth, num_heads=heads)
    return name, kwargs


def _check_outputs(checkpoint: str | Path, out: Path, sidecar: Path, force: bool) -> None:
    """Refuse, before anything is read, an output that would lose something: a folder, the file being exported,
    a training checkpoint (a run resumes from it; not even with ``force``), or any existing file without ``force``."""
    if out == sidecar:
        raise ValueError(f"{out}: the output's description is written beside it as <name>.json, so the output "
                         "itself must not end in .json: name it .safetensors or .pth")
    source = find_checkpoint(checkpoint)
    for path in (out, sidecar):
        if path.is_dir():
            raise ValueError(f"{path} is a folder: name the output file, e.g. {out / 'backbone.safetensors'}"
                             if path == out else f"{path} (where the output's description goes) is a folder: "
                             "name the output file differently")
        if not path.exists():
            continue
        if is_training_checkpoint(path):
            raise ValueError(f"{path} is a training checkpoint (a run resumes from it), which export never "
                             "replaces: write the backbone to another file")
        if path.samefile(source):
            raise ValueError(f"{path} is the checkpoint being exported: write the backbone to another file")
        if not force:
            raise ValueError(f"{path} exists: pass --force to replace it, or name another output file")


def export_backbone(checkpoint: str | Path, out: str | Path, which: str | None = None, key: str | None = None,
                    fmt: str | None = None, force: bool = False, **spec_overrides: Any) -> dict[str, Any]:
    """Write the backbone of ``checkpoint`` to ``out`` in timm's names; returns what the sidecar JSON holds.

    Timm's ``VisionTransformer`` has no mask token and no [OBJ] token: those keys are left out and listed
    under ``dropped``.

    Args:
        fmt: ``"safetensors"`` or ``"pth"``; by default from ``out``'s suffix (safetensors unless ``.pth``/``.pt``).
        force: replace an existing ``out`` (and its sidecar), unless it is a training checkpoint or ``checkpoint``.
        which, key, spec_overrides: as :func:`ssl_distill.eval.model.load_model`.
    """
    out = Path(out)
    if fmt is None:
        fmt = "pth" if out.suffix in (".pth", ".pt") else "safetensors"
    if fmt not in ("safetensors", "pth"):
        raise ValueError(f"format must be 'safetensors' or 'pth', got {fmt!r}")
    sidecar = out.with_suffix(".json")
    _check_outputs(checkpoint, out, sidecar, force)
    backbone, loaded = load_model(checkpoint, which, key=key, **spec_overrides)
    state = {k: v.detach().contiguous().clone() for k, v in backbone.vit.state_dict().items()}
    dropped = [*loaded.dropped, *(k for k in OBJ_KEYS if k in backbone.state_dict())]
    spec = loaded.spec
    rope = rope_export(backbone, state) if spec.pos_embed == "rope" else {}  # drops state's periods
    name, kwargs = timm_model_args(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        with atomic_write(out) as tmp:
            save_file(state, str(tmp), metadata={
                "format": "pt", SPEC_METADATA_KEY: json.dumps(dataclasses.asdict(spec)),
                "source": json.dumps({k: v for k, v in loaded.describe().items() if k != "spec"}),
                **({ROPE_PERIODS_METADATA_KEY: json.dumps(rope["rope_periods"])} if rope else {}),
            })
    else:
        atomic_save(state, out)
    info = {
        "file": str(out), "format": fmt, "timm_model": name, "timm_kwargs": kwargs,
        "python": f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={str(out)!r}), "
                  + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")",
        "source": loaded.describe(),
        "num_tensors": len(state),
        "dropped": dropped,
        "note": ("timm resamples position embeddings with antialiasing: features match at img_size="
                 f"{spec.img_size} exactly" + ("" if spec.pos_interp == "timm" else
                                                 "; at other sizes ssl-distill follows the official DINO "
                                                 "interpolation")),
        **rope,
    }
    sidecar.write_text(json.dumps(info, indent=2) + "\n")
    info["sidecar"] = str(sidecar)
    return info


def run(args: argparse.Namespace) -> int:
    info = export_backbone(args.checkpoint, args.out, which=args.which, key=args.key, fmt=args.fmt,
                           force=args.force, num_heads=args.num_heads)
    print(f"wrote {info['file']} ({info['num_tensors']} tensors, {info['source']['format']} "
          f"{info['source']['source']}) and {info['sidecar']}")
    if info["dropped"]:
        named = [f"{k} ([OBJ] token)" if k in OBJ_KEYS else f"{k} (mask token)" for k in info["dropped"]]
        print(f"left out (timm's VisionTransformer has no such token): {', '.join(named)}")
    print(f"load with: {info['python']}")
    return 0


main = tool_main("export", add_arguments, run)  # python -m ssl_distill.eval.export


if __name__ == "__main__":
    raise SystemExit(main())
