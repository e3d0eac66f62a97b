"""Evaluate a checkpoint or run directory from the command line (k-NN)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ssl_distill.checkpoints import load_backbone, spec_from_config
from ssl_distill.config import ConfigError, KnnConfig, apply_overrides, config_from_dict, config_to_dict
from ssl_distill.data.folder import DataError, scan_image_folder
from ssl_distill.data.loader import build_eval_loader
from ssl_distill.engine.checkpoint import find_checkpoint
from ssl_distill.engine.train import resolve_device
from ssl_distill.models import ViTBackbone

from .knn import run_knn, write_results


def _knn_settings(run_cfg_dict: dict[str, Any], overrides: list[str]) -> KnnConfig:
    for o in overrides:
        if not o.startswith("knn."):
            raise ConfigError(f"evaluation overrides must be knn.* keys, got {o!r}")
    return config_from_dict(apply_overrides(run_cfg_dict, overrides)).knn


def knn_on_checkpoint(
    checkpoint: str | Path,
    train_dir: str | None = None,
    val_dir: str | None = None,
    which: str = "teacher",
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    random_init: bool = False,
    device: str = "auto",
    precision: str = "bf16",
) -> dict[str, Any]:
    """Weighted k-NN of the frozen backbone of ``checkpoint`` (file or run directory).

    Image settings, k values and temperature come from the run's ``knn`` config section, updated by
    ``knn.*`` overrides; ``train_dir`` / ``val_dir`` replace the configured folders. With
    ``random_init`` the same architecture is evaluated with freshly initialised weights (seeded).
    Writes ``out`` (default ``<run dir>/knn[_random_init].json``) and returns the results, whose
    ``accuracy`` entry maps ``k=..`` to top-1 / top-5 percentages.
    """
    backbone, cfg = load_backbone(checkpoint, which)
    if random_init:
        torch.manual_seed(cfg.run.seed)
        backbone = ViTBackbone(spec_from_config(cfg)).eval()
    knn = _knn_settings(config_to_dict(cfg), overrides or [])
    knn = dataclasses.replace(knn, train_dir=train_dir or knn.train_dir, val_dir=val_dir or knn.val_dir)
    if not knn.train_dir or not knn.val_dir:
        raise ConfigError("k-NN needs labeled train and val folders: pass --train and --val (or set knn.train_dir/val_dir)")
    train_classes = scan_image_folder(knn.train_dir, labeled=True).classes
    val_classes = scan_image_folder(knn.val_dir, labeled=True).classes
    if train_classes != val_classes:
        raise DataError(
            f"train and val folders have different classes: {sorted(set(train_classes) ^ set(val_classes))}"
        )
    dev = resolve_device(device)
    backbone.to(dev)
    backbone.set_fused_attn(dev.type == "cuda")  # inference only: the fused kernel is fastest everywhere but CPU backward
    crops = cfg.data.crops
    loaders = [
        build_eval_loader(d, knn.image_size, knn.resize_size, knn.batch_size, knn.num_workers, crops.mean, crops.std)
        for d in (knn.train_dir, knn.val_dir)
    ]
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    res = run_knn(backbone, loaders[0], loaders[1], knn.ks, knn.temperature, dev, amp)
    results = {
        "checkpoint": str(find_checkpoint(checkpoint)),
        "which": "random_init" if random_init else which,
        "train_dir": knn.train_dir,
        "val_dir": knn.val_dir,
        "classes": train_classes,
        "image_size": knn.image_size,
        "resize_size": knn.resize_size,
        "accuracy": {k: {"top1": v["top1"], "top5": v["top5"]} for k, v in res.items() if k.startswith("k=")},
        "details": res,
    }
    if out is None:
        run_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
        out = run_dir / ("knn_random_init.json" if random_init else "knn.json")
    write_results(results, Path(out))
    results["out"] = str(out)
    return results
