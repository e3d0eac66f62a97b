"""Where a training step's time goes: phase by phase and op by op (torch.profiler), on this CPU.

Two steps: the demo's (``configs/dinov2_style_tiny_fmnist.yaml``: DINOv2-style objective, 4-block ViT-tiny,
patch 7, 2 x 28 + 4 x 14 crops of Fashion-MNIST-sized images, batch 64, bf16) and the ViT-S/16 DINO step
(``configs/dino_vit_small16.yaml``: 2 x 224 + 10 x 96, batch 8, bf16, out_dim 65536). For each: the step's
median time and GFLOP/s beside the bf16 GEMM ceiling measured in the same run, the time of each phase
(teacher forward, student forward, objectives, backward, gradient clipping, optimizer, EMA), and the ops
with the most self time, grouped (GEMM, attention products, casts and copies, elementwise, normalisation,
softmax, reductions, optimizer arithmetic).

What it showed on the 2-core AMD EPYC (AVX512-BF16, bf16 GEMM ceiling 389 GFLOP/s quiet), eager, before
issue 28's changes, 1 compute thread (the machine was shared: 2 threads stalled on every op):
the demo's step is 50.6 GFLOP; the GEMMs (mm 36%, addmm 27%, bmm 3%: the blocks' linears at
M = 2176 / 1280 tokens, K = N = 192..768, and the heads) hold 66% of its time and run at the ceiling's rate
(200-220 GFLOP/s a thread for those shapes); the rest is ~7,000 small ops a step: autocast's bf16 casts and
their backward (copy_ / _to_copy, 5%), GELU and its backward (6%), the residual adds, scalings and
LayerNorms (6%), softmax forward and backward (2%), and AdamW's per-parameter arithmetic for 77 tensors
(addcdiv_, lerp_, sqrt, addcmul_, mul_, add_: 3%) with a ``.item()`` of each step count; every one pays a
parallel region's start. The ViT-S/16 step is dominated by GEMMs too, its head's 65536-wide last layer and
loss (softmax / log-softmax over 12 x 8 x 65536 logits) being the largest non-block share.
Beside the profile, the step's GEMMs alone (:func:`gemm_floor`): every matrix product the step ran, each shape
timed by itself, added up: the step's bound here, whatever fuses or packs the rest (docs/benchmarks.md).
``--modes`` times the step eager, with ``run.compile=on`` and with a foreach AdamW, round-robin, and one batch's
preparation by the loader, beside the ceiling (issue 28's candidates, measured where they are chosen).
Usage: python benchmarks/bench_step_profile.py [--step demo|vits16] [--steps N] [--rows R] [--threads T] [--modes]
"""
from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train_step import Step, batch_folder, prepare
from ssl_distill.engine import train as train_module
from ssl_distill.engine.train import Trainer
from ssl_distill.hardware import gemm_gflops, hardware_line

GROUPS = {
    "GEMM (linear layers, heads)": ("aten::mm", "aten::addmm", "aten::mkldnn_convolution", "aten::convolution_backward",
                                    "aten::_mkl_linear", "aten::linear"),
    "attention products": ("aten::bmm", "aten::baddbmm"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat"),
    "normalisation": ("aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::native_batch_norm",
                      "aten::native_batch_norm_backward"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data", "aten::_log_softmax",
                "aten::_log_softmax_backward_data"),
    "optimizer arithmetic": ("aten::addcdiv_", "aten::lerp_", "aten::addcmul_", "aten::sqrt", "aten::_foreach_mul_",
                             "aten::_foreach_add_", "aten::_foreach_norm", "aten::_fused_adamw_"),
    "reductions": ("aten::sum", "aten::mean", "aten::linalg_vector_norm", "aten::max", "aten::norm"),
}


def demo_step(tmp: Path, batch_size: int = 64, overrides: list[str] = ()) -> Step:
    """The demo recipe's step on a folder of 28 x 28 images (Fashion-MNIST's when the Debian package is
    installed, else the stripes of the tests), bf16."""
    from ssl_distill.data.fashion_mnist import build_fashion_mnist_folders

    try:
        data = build_fashion_mnist_folders(tmp / "fmnist", limit_per_class=-(-4 * batch_size // 10)) / "train"
    except Exception:  # noqa: BLE001 (no Fashion-MNIST here: any 28-px folder has the same step)
        data = batch_folder(tmp / "photos", 4 * batch_size)
    return prepare([f"data.batch_size={batch_size}", "run.precision=bf16", "monitor.knn_every_epochs=0",
                    "optim.epochs=1000", *overrides], data, tmp / "demo", "dinov2_style_tiny_fmnist.yaml")


def vits16_step(tmp: Path, batch_size: int = 8, overrides: list[str] = ()) -> Step:
    """The ViT-S/16 DINO step (2 x 224 + 10 x 96, out_dim 65536) on the photo folder, bf16."""
    data = batch_folder(tmp / "photos", batch_size)
    return prepare([f"data.batch_size={batch_size}", "run.precision=bf16", "optim.epochs=1000", *overrides], data,
                   tmp / "vits16")


class Phases:
    """Wall time of each phase of ``trainer``'s steps, by wrapping the calls the step makes."""

    def __init__(self, trainer: Trainer) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.undo = []
        self._wrap(trainer.teacher, "forward", "teacher forward")
        self._wrap(trainer.student, "forward", "student forward")
        for objective in trainer.objectives:
            self._wrap(objective, "terms", "objectives")
        self._wrap(torch.Tensor, "backward", "backward")
        self._wrap(train_module, "clip_gradients_per_param", "gradient clipping")
        self._wrap(trainer.optimizer, "step", "optimizer")
        self._wrap(train_module, "ema_update", "EMA")

    def _wrap(self, owner, name: str, phase: str) -> None:
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - t0

        had = name in vars(owner)
        setattr(owner, name, timed)
        self.undo.append(lambda: setattr(owner, name, real) if had else delattr(owner, name))

    def close(self) -> None:
        for undo in reversed(self.undo):
            undo()


def report(name: str, step: Step, steps: int, rows: int, target: int) -> None:
    times = [step.run(2 + i) for i in range(steps)]
    median = statistics.median(times)
    bf16 = gemm_gflops(torch.bfloat16)
    print(f"\n{name}: {step.gflop:.1f} GFLOP/step, median {median * 1e3:.0f} ms = {step.gflop / median:.0f} GFLOP/s, "
          f"{100 * step.gflop / median / bf16:.0f}% of the bf16 GEMM ceiling ({bf16:.0f} GFLOP/s, measured now; "
          f"issue 28's target >= {target}%)")
    phases = Phases(step.trainer)
    try:
        total = sum(step.run(2 + steps + i) for i in range(steps))
    finally:
        phases.close()
    for phase, seconds in phases.seconds.most_common():
        print(f"  {phase:<20} {1e3 * seconds / steps:7.1f} ms  {100 * seconds / total:5.1f}%")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(steps):
            step.run(2 + 2 * steps + i)
    floor, floor_gflop = gemm_floor(prof.events(), steps)
    print(f"  its GEMMs alone (each shape timed by itself, fastest of {FLOOR_REPS}): {floor * 1e3:.0f} ms for "
          f"{floor_gflop:.1f} GFLOP = {floor_gflop / floor:.0f} GFLOP/s = {100 * floor_gflop / floor / bf16:.0f}% of "
          f"the ceiling: the step's own bound here; the step spends {(median - floor) * 1e3:.0f} ms beyond it")
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    grouped: collections.Counter[str] = collections.Counter()
    for e in events:
        group = next((g for g, ops in GROUPS.items() if e.key in ops), "other (elementwise, views, Python)")
        grouped[group] += e.self_cpu_time_total
    print(f"  ops by group (self time, {len(events)} distinct ops, "
          f"{sum(e.count for e in events) // steps} calls a step):")
    for group, us in grouped.most_common():
        print(f"    {group:<36} {100 * us / total_us:5.1f}%")
    print(f"  top {rows} ops:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"    {e.key:<36} {100 * e.self_cpu_time_total / total_us:5.1f}%  {e.count // steps:5d} calls a step")


DTYPES = {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16, "double": torch.float64}
FLOOR_REPS = 10


def gemm_floor(events, steps: int) -> tuple[float, float]:
    """(seconds, GFLOP) a step's matrix products (mm, addmm, bmm) take when each of their shapes runs alone,
    fastest of ``FLOOR_REPS`` on fresh contiguous operands: what the step would take if it did nothing else,
    its bound on this machine whatever fuses or packs the rest. ``events``: the profile of ``steps`` steps
    (``record_shapes=True``)."""
    counts: collections.Counter[tuple] = collections.Counter()
    for e in events:
        if e.name in ("aten::mm", "aten::addmm", "aten::bmm") and all(d in DTYPES for d in e.input_dtypes[:3]):
            counts[(e.name, tuple(map(tuple, e.input_shapes[:3])), tuple(e.input_dtypes[:3]))] += 1
    seconds = flop = 0.0
    for (name, shapes, dtypes), count in counts.items():
        operands = [torch.randn(shape, dtype=DTYPES[dtype]) for shape, dtype in zip(shapes, dtypes) if shape]
        op = {"aten::mm": torch.mm, "aten::addmm": torch.addmm, "aten::bmm": torch.bmm}[name]
        a, b = operands[-2:]
        flop_one = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if name == "aten::bmm" else 1)
        best = float("inf")
        for _ in range(FLOOR_REPS + 2):
            t0 = time.perf_counter()
            op(*operands)
            best = min(best, time.perf_counter() - t0)
        seconds += best * count / steps
        flop += flop_one * count / steps
    return seconds, flop / 1e9


# each step's name, builder and issue 28's target share of the bf16 GEMM ceiling (%)
STEPS = {"demo": ("demo step (batch 64)", demo_step, 70), "vits16": ("ViT-S/16 step (batch 8)", vits16_step, 75)}


def compare_modes(name: str, make: Callable[[Path, list[str]], Step], tmp: Path, steps: int, target: int) -> None:
    """The step eager, with its blocks compiled (``run.compile=on``: compile time printed apart) and with a foreach
    AdamW, timed round-robin (fastest of ``steps`` each), and one batch's preparation by the loader (serial, as
    ``data.num_workers: 0`` runs it), beside the bf16 GEMM ceiling measured after them."""
    modes = {"eager": make(tmp / "eager", []), "foreach AdamW": make(tmp / "foreach", [])}
    for group in modes["foreach AdamW"].trainer.optimizer.param_groups:
        group["foreach"] = True
    t0 = time.perf_counter()
    modes["compiled blocks"] = make(tmp / "compiled", ["run.compile=on"])
    print(f"\n{name}: built and compiled in {time.perf_counter() - t0:.0f} s")
    best = {mode: float("inf") for mode in modes}
    for i in range(steps):
        for mode, step in modes.items():
            best[mode] = min(best[mode], step.run(2 + i))
    first, later = preparation(modes["eager"].trainer)
    bf16 = gemm_gflops(torch.bfloat16)
    for mode, seconds in best.items():
        gflop = modes[mode].gflop
        print(f"  {mode:<16} {seconds * 1e3:7.0f} ms  {gflop / seconds:5.0f} GFLOP/s = {100 * gflop / seconds / bf16:3.0f}% "
              f"of the bf16 GEMM ceiling ({bf16:.0f} GFLOP/s, measured now; target >= {target}%); "
              f"x{best['eager'] / seconds:.2f} eager")
    for when, data in (("first epoch, files decoded", first), ("later epochs, decoded images kept", later)):
        print(f"  one batch's preparation (serial; {when}): {data * 1e3:.0f} ms = "
              f"{100 * data / (data + best['eager']):.0f}% of an eager step with it (target <= 10%)")


def preparation(trainer: Trainer, epochs: int = 3) -> tuple[float, float]:
    """Median seconds of one batch's serial preparation by ``trainer``'s loader (``data.num_workers: 0``) in its
    first epoch (every image read and decoded) and in the later ones (decoded images in memory, ``data.cache_mb``)."""
    times: list[list[float]] = [[], []]
    for epoch in range(epochs):
        trainer.sampler.set_epoch(epoch)
        batches = iter(trainer.loader)
        while True:
            t0 = time.perf_counter()
            if next(batches, None) is None:
                break
            times[min(epoch, 1)].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--step", choices=["demo", "vits16", "both"], default="both")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="compute threads (0: torch's default)")
    ap.add_argument("--modes", action="store_true",
                    help="instead of the profile: eager, compiled blocks and foreach AdamW timed round-robin")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(hardware_line())
    with tempfile.TemporaryDirectory() as tmp:
        for key, (name, build, target) in STEPS.items():
            if args.step not in (key, "both"):
                continue
            make = lambda folder, over, build=build: build(folder, overrides=over)  # noqa: E731
            if args.modes:
                compare_modes(name, make, Path(tmp) / key, args.steps, target)
            else:
                report(name, make(Path(tmp) / key, []), args.steps, args.rows, target)


if __name__ == "__main__":
    main()
