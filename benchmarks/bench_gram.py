"""Gram anchoring's cost in the training step (DINOv3, issue 25), on this CPU.

ViT-S/16 (the DINO recipe, out_dim 65536), 2 x 224 + 10 x 96 crops, batch 8, bf16 autocast, plain
attention; four things timed round-robin on their own real batches (a drift of the machine's speed
falls on each alike), the fastest of ``--steps`` each:

- the step without Gram;
- the step with Gram against the live EMA teacher (``gram.ema_teacher``: no extra model);
- the step with a frozen Gram teacher on Gram crops at twice the global size (448 px: 28 x 28 patches,
  resized bicubically to 14 x 14), taken from the EMA teacher before step 0;
- that Gram teacher's forward on the Gram crops alone (the cost it adds at the least).

Targets (issue 25): live EMA teacher <= 1.10x the step without Gram; frozen at 2x <= the step without Gram
plus 1.2x the Gram teacher's forward. Printed beside the machine's measured GEMM ceiling and each step's
GFLOP (torch's FlopCounterMode).
``--dinov3``: all of it on DINOv3's step instead (its objectives -- DINO + iBOT on separate heads,
Sinkhorn-Knopp, KoLeo -- on the RoPE ViT-S/16 with 4 registers and LayerScale), with a fifth step in the same
round-robin: those objectives on the learned-position ViT-S/16 (target: the DINOv3 step without Gram <= 1.05x
it), so every step-cost target of issue 25 comes out of one interleaved run.
Usage: python benchmarks/bench_gram.py [--steps N] [--batch-size B] [--ibot] [--dinov3]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_train_step import DINOV3_TERMS, IBOT, ROPE, Step, batch_folder, images_per_s, prepare
from ssl_distill.hardware import gemm_gflops, hardware_line, peak_rss_mib
from ssl_distill.runtime import autocast_context

LIVE = ["gram.weight=1", "gram.ema_teacher=true"]
FROZEN_2X = ["gram.weight=1", "gram.it_load_ema_teacher=0", "data.crops.gram_size=448"]


class GramForward(Step):
    """The frozen Gram teacher of ``trainer`` on its batch's Gram crops, timed like a step."""

    def run(self, i: int) -> float:
        trainer, gram_crops = self.trainer, self.args[4]
        t0 = time.perf_counter()
        with autocast_context(trainer.device, trainer.precision):
            trainer.gram.patches(gram_crops)
        return time.perf_counter() - t0


def gram_forward(frozen: Step) -> GramForward:
    forward = GramForward(frozen.trainer, frozen.args, frozen.batch_size, 0.0)
    with FlopCounterMode(display=False) as counter:
        forward.run(0)
    forward.gflop = counter.get_total_flops() / 1e9
    return forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ibot", action="store_true", help="add iBOT's patch term (the student's masked views feed Gram)")
    ap.add_argument("--dinov3", action="store_true",
                    help="DINOv3's objectives on its RoPE ViT-S/16, and on the learned-position ViT-S/16 alongside")
    args = ap.parse_args()
    run = [f"data.batch_size={args.batch_size}", "run.device=cpu", "run.precision=bf16"]
    terms = DINOV3_TERMS if args.dinov3 else IBOT if args.ibot else []
    base = [*run, *terms, *(ROPE if args.dinov3 else [])]
    print(hardware_line())
    with tempfile.TemporaryDirectory() as tmp:
        data = batch_folder(Path(tmp) / "photos", args.batch_size)
        steps = {"learned-position ViT": prepare([*run, *terms], data, Path(tmp) / "learned")} if args.dinov3 else {}
        steps |= {"without Gram": prepare(base, data, Path(tmp) / "plain"),
                 "Gram, live EMA teacher": prepare([*base, *LIVE], data, Path(tmp) / "live"),
                 "Gram, frozen teacher at 2x": prepare([*base, *FROZEN_2X], data, Path(tmp) / "frozen")}
        steps["Gram teacher forward alone"] = gram_forward(steps["Gram, frozen teacher at 2x"])
        speed = dict(zip(steps, images_per_s(list(steps.values()), args.steps)))
    seconds = {name: args.batch_size / ips for name, ips in speed.items()}
    peak = gemm_gflops(torch.bfloat16)
    objectives = ("DINOv3's objectives, RoPE + 4 registers + LayerScale" if args.dinov3 else
                  "DINO + iBOT" if args.ibot else "DINO")
    print(f"ViT-S/16, {objectives}, 2 x 224 + 10 x 96, batch {args.batch_size}, bf16, plain attention; fastest of "
          f"{args.steps}, round-robin; bf16 GEMM peak {peak:.0f} GFLOP/s")
    for name, step in steps.items():
        print(f"  {name:28s} {seconds[name]:7.3f} s  {step.gflop:6.0f} GFLOP  "
              f"{step.gflop / seconds[name]:5.0f} GFLOP/s ({100 * step.gflop / seconds[name] / peak:.0f}% of peak)")
    plain, live = seconds["without Gram"], seconds["Gram, live EMA teacher"]
    if args.dinov3:
        print(f"DINOv3 step without Gram: {plain / seconds['learned-position ViT']:.3f}x the same objectives on the "
              "learned-position ViT-S/16 (target <= 1.05x)")
    frozen, forward = seconds["Gram, frozen teacher at 2x"], seconds["Gram teacher forward alone"]
    print(f"live EMA teacher: {live / plain:.3f}x the step without Gram (target <= 1.10x)")
    budget = plain + 1.2 * forward
    verdict = "met" if frozen <= budget else "missed"
    print(f"frozen teacher at 2x: {frozen:.3f} s = without Gram + {(frozen - plain) / forward:.2f}x the Gram "
          f"teacher's forward (target <= without Gram + 1.2x = {budget:.3f} s: {verdict})")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
