"""Training-step throughput of the DINO engine (issue: >= 2.0 images/s for ViT-S/16 on this CPU).

ViT-S/16, 2 x 224 + 10 x 96 crops, out_dim 65536, batch 8, bf16 autocast, plain attention on CPU;
beside it the same step in fp32 with the fused attention kernel (what the reference DINO runs on a
CPU), the model GFLOP/s achieved (FLOPs counted by torch's FlopCounterMode for one full step) and
the machine's measured fp32 / bf16 GEMM peaks. Usage: python benchmarks/bench_train_step.py [--steps N]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import gemm_gflops, hardware_line, peak_rss_mib  # noqa: E402

from ssl_distill.config import load_config  # noqa: E402
from ssl_distill.engine.train import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def photo_folder(dst: Path) -> Path:
    """A folder of the real photos scikit-image ships (no download)."""
    import shutil

    import skimage

    src = Path(skimage.__file__).parent / "data"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                 "hubble_deep_field.jpg", "ihc.png", "retina.jpg"):
        shutil.copy(src / name, dst / name)
    return dst


def measure(cfg_overrides: list[str], data_dir: Path, out_dir: Path, steps: int) -> tuple[float, float]:
    """Returns (images/s, GFLOP per step) of Trainer.train_step on one real multi-crop batch."""
    cfg = load_config(ROOT / "configs" / "dino_vit_small16.yaml", [
        f"data.train_dir={data_dir}", f"run.output_dir={out_dir}", "data.batch_size=8",
        "data.num_workers=0", "run.progress=false", *cfg_overrides,
    ])
    trainer = Trainer(cfg, fresh=True)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.loader))
    crops = [c.to(trainer.device) for c in batch["crops"]]
    trainer.train_step(crops, 0)  # warm-up: kernel selection, allocator
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(crops, 1)
    gflop = counter.get_total_flops() / 1e9
    best = float("inf")
    for s in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(crops, 2 + s)
        best = min(best, time.perf_counter() - t0)
    return cfg.data.batch_size / best, gflop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-fp32", action="store_true")
    args = ap.parse_args()
    print(hardware_line())
    with tempfile.TemporaryDirectory() as tmp:
        data = photo_folder(Path(tmp) / "photos")
        ips, gflop = measure(["run.precision=bf16"], data, Path(tmp) / "bf16", args.steps)
        bf16_peak = gemm_gflops(torch.bfloat16)
        print(f"ssl-distill bf16, plain attention: {ips:.2f} images/s  ({gflop:.0f} GFLOP/step, "
              f"{gflop * ips / 8:.0f} GFLOP/s achieved; bf16 GEMM peak {bf16_peak:.0f} GFLOP/s)")
        if not args.skip_fp32:
            ips32, _ = measure(["run.precision=fp32", "model.fused_attn=true"], data, Path(tmp) / "fp32", args.steps)
            fp32_peak = gemm_gflops(torch.float32)
            print(f"fp32, fused attention (the reference DINO's CPU path): {ips32:.2f} images/s  "
                  f"({gflop * ips32 / 8:.0f} GFLOP/s achieved; fp32 GEMM peak {fp32_peak:.0f} GFLOP/s)")
            print(f"speed-up {ips / ips32:.1f}x")
    print(f"target: >= 2.0 images/s; peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
