"""Our ViT-S/16 DINO step beside the official DINO and DINOv2 modules' step, on one device, in one run (issue 28).

Each row is one training step at batch 64 and 128 (``--batch-sizes``), 2 x 224 + 10 x 96 crops, out_dim 65536,
bf16 autocast, timed to the device's end, the rows interleaved (a drift of the machine's speed falls on each
alike) and the fastest of ``--steps`` kept:

- ``ssl-distill``: ``Trainer.train_step`` of ``configs/dino_vit_small16.yaml`` on a real batch of photos (and with
  ``--compile`` the same step with ``run.compile=on``, its compile time left out);
- ``official DINO`` (``--dino-repo``, a checkout of facebookresearch/dino): its ``vision_transformer.vit_small``,
  ``DINOHead``, ``utils.MultiCropWrapper`` and ``main_dino.DINOLoss``, in the step ``main_dino.train_one_epoch``
  takes: teacher and student forward under autocast, ``loss.item()``'s finiteness check, backward,
  ``utils.clip_gradients``, ``utils.cancel_gradients_last_layer`` (past the first epoch: the last layer
  trains, as ours at these steps), AdamW on ``utils.get_params_groups``, the EMA
  loop; its centre's all-reduce is left out (one process; ours has none there either);
- ``official DINOv2 modules`` (``--dinov2-repo``, a checkout of facebookresearch/dinov2): DINO's [CLS] step on
  DINOv2's ``vit_small`` (LayerScale 1e-5, no xformers: PyTorch's SDPA), ``DINOHead`` and ``DINOLoss`` (softmax
  centring), with DINOv2's global-norm clipping and foreach EMA; no iBOT / KoLeo term (the same work as ours).

The official modules are imported from the checkouts given (nothing of them is copied into the project); without
a checkout its row is left out and the table says so. The teacher and student of each get random inputs of the
crops' shapes (the data is outside the timed step for every row). Beside each row: images/s, ms per step, the
step's FLOPs (torch's FlopCounterMode, per row) as TFLOP/s, that rate as a share of the device's measured bf16
GEMM peak (``ssl_distill.hardware``), and the speed relative to the official DINO modules. Targets (issue 28,
ViT-S/16 on a lent GPU): >= 1.5x the official modules and >= 30% of the bf16 GEMM peak. The table goes to
``--docs`` (docs/benchmarks.md) between the markers named after this script.
Usage: python benchmarks/bench_gpu_step.py --dino-repo DIR --dinov2-repo DIR [--batch-sizes 64 128] [--steps N]
           [--compile] [--device cuda|cpu] [--docs docs/benchmarks.md]
  (tiny sizes for a CPU check: --global-size 32 --local-size 16 --n-local 2 --out-dim 256 --batch-sizes 2)
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench_train_step import ROOT, Step, batch_folder, prepare
from ssl_distill.hardware import cuda_line, cuda_tflops, device_sync, gemm_gflops, hardware_line
from ssl_distill.report.docs import update_section

CLIP = 3.0  # DINO's clip_grad (main_dino.py) and DINOv2's clip_grad
MOMENTUM = 0.996  # DINO's momentum_teacher


@dataclass
class Sizes:
    """The step's shapes: crops, batch, prototypes."""

    batch: int
    global_size: int
    local_size: int
    n_local: int
    out_dim: int

    def crops(self, device: torch.device) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        shapes = [self.global_size] * 2 + [self.local_size] * self.n_local
        return [torch.randn(self.batch, 3, s, s, generator=gen).to(device) for s in shapes]

    def overrides(self) -> list[str]:
        return [f"data.batch_size={self.batch}", f"data.crops.global_size={self.global_size}",
                f"data.crops.local_size={self.local_size}", f"data.crops.n_local={self.n_local}",
                f"model.out_dim={self.out_dim}"]


@dataclass
class Row:
    """One implementation's step: ``run()`` is one training step; its FLOPs counted once."""

    name: str
    run: Callable[[], None]
    gflop: float = 0.0

    def count(self) -> "Row":
        self.run()  # warm-up: kernel choice, allocator
        with FlopCounterMode(display=False) as counter:
            self.run()
        self.gflop = counter.get_total_flops() / 1e9
        return self


def import_from(repo: Path, *names: str) -> list[object]:
    """The modules ``names`` of the checkout ``repo`` (its folder first on the import path)."""
    sys.path.insert(0, str(repo))
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        sys.path.remove(str(repo))


def no_decay_groups(model: nn.Module) -> list[dict]:
    """AdamW's groups as DINO's ``utils.get_params_groups`` makes them: no weight decay on biases and 1-d tensors."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not (n.endswith(".bias") or p.ndim == 1)]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def official_dino(repo: Path, sizes: Sizes, device: torch.device, bf16: bool = True) -> Row:
    """The official DINO modules' step (see the module docstring); ``bf16=False``: in fp32, what ``main_dino.py``
    runs on a CPU (its autocast is CUDA's fp16 only)."""
    utils, vits, main_dino = import_from(repo, "utils", "vision_transformer", "main_dino")
    main_dino.dist = SimpleNamespace(all_reduce=lambda *a, **k: None, get_world_size=lambda: 1)  # one process
    student = utils.MultiCropWrapper(vits.vit_small(patch_size=16, drop_path_rate=0.1),
                                     vits.DINOHead(384, sizes.out_dim, use_bn=False, norm_last_layer=True)).to(device)
    teacher = utils.MultiCropWrapper(vits.vit_small(patch_size=16),
                                     vits.DINOHead(384, sizes.out_dim, use_bn=False)).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = main_dino.DINOLoss(sizes.out_dim, sizes.n_local + 2, 0.04, 0.04, 0, 100).to(device)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    crops = sizes.crops(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            teacher_output = teacher(crops[:2])
            student_output = student(crops)
            loss = loss_fn(student_output, teacher_output, 0)
        if not math.isfinite(loss.item()):
            raise FloatingPointError("official DINO: non-finite loss")
        optimizer.zero_grad()
        loss.backward()
        utils.clip_gradients(student, CLIP)
        utils.cancel_gradients_last_layer(1, student, 1)  # past its first epoch: the last layer trains, as ours
        optimizer.step()
        with torch.no_grad():
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(MOMENTUM).add_((1 - MOMENTUM) * param_q.detach().data)

    return Row("official DINO modules" if bf16 else "official DINO modules, fp32", step)


def official_dinov2(repo: Path, sizes: Sizes, device: torch.device) -> Row:
    """DINO's [CLS] step on the official DINOv2 modules (see the module docstring)."""
    vit, layers, losses = import_from(repo, "dinov2.models.vision_transformer", "dinov2.layers", "dinov2.loss")

    def network(drop_path: float) -> nn.ModuleDict:
        return nn.ModuleDict({
            "backbone": vit.vit_small(patch_size=16, img_size=224, init_values=1e-5, block_chunks=0,
                                      drop_path_rate=drop_path),
            "head": layers.DINOHead(384, sizes.out_dim)}).to(device)

    student, teacher = network(0.1), network(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    loss_fn = losses.DINOLoss(sizes.out_dim).to(device)
    optimizer = torch.optim.AdamW(no_decay_groups(student))
    crops = sizes.crops(device)
    n_crops = len(crops)

    def forward(net: nn.ModuleDict, views: list[torch.Tensor]) -> torch.Tensor:
        groups = [torch.cat(views[:2])] + ([torch.cat(views[2:])] if len(views) > 2 else [])
        return net["head"](torch.cat([net["backbone"](g) for g in groups]))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                teacher_logits = forward(teacher, crops[:2])
                targets = loss_fn.softmax_center_teacher(teacher_logits, 0.04)
                loss_fn.update_center(teacher_logits)
            student_logits = forward(student, crops)
            loss = loss_fn(list(student_logits.chunk(n_crops)), list(targets.chunk(2))) / (2 * n_crops)
        if not math.isfinite(loss.item()):
            raise FloatingPointError("official DINOv2 modules: non-finite loss")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
        optimizer.step()
        with torch.no_grad():
            tp, sp = list(teacher.parameters()), list(student.parameters())
            torch._foreach_mul_(tp, MOMENTUM)
            torch._foreach_add_(tp, sp, alpha=1 - MOMENTUM)

    return Row("official DINOv2 modules", step)


def ours(sizes: Sizes, device: torch.device, data: Path, out: Path, compiled: bool) -> Row:
    """``Trainer.train_step`` of the ViT-S/16 DINO recipe at these sizes (compiled: its compile paid here)."""
    step: Step = prepare([*sizes.overrides(), f"run.device={device.type}", "run.precision=bf16",
                          f"run.compile={'on' if compiled else 'off'}"], data, out)
    counter = iter(range(2, 10**9))
    return Row("ssl-distill, compiled blocks" if compiled else "ssl-distill", lambda: step.run(next(counter)),
               step.gflop)


def fastest(rows: list[Row], steps: int, device: torch.device) -> list[float]:
    """Seconds of each row's fastest step of ``steps``, the rows interleaved."""
    sync = device_sync(device)
    best = [float("inf")] * len(rows)
    for _ in range(steps):
        for j, row in enumerate(rows):
            sync()
            t0 = time.perf_counter()
            row.run()
            sync()
            best[j] = min(best[j], time.perf_counter() - t0)
    return best


def table(results: list[tuple[int, Row, float]], peak_tflops: float) -> list[str]:
    """Markdown rows: step, batch, images/s, ms/step, TFLOP/s, % of the bf16 GEMM peak, x the official DINO step."""
    lines = ["| step | batch | images/s | ms/step | TFLOP/s | % of bf16 GEMM peak | x official DINO |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    official = {b: s for b, row, s in results if row.name == "official DINO modules"}
    for batch, row, seconds in results:
        tflops = row.gflop / seconds / 1e3
        ratio = f"{official[batch] / seconds:.2f}x" if batch in official else "-"
        lines.append(f"| {row.name} | {batch} | {batch / seconds:.1f} | {seconds * 1e3:.1f} | {tflops:.3g} | "
                     f"{100 * tflops / peak_tflops:.0f}% | {ratio} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dino-repo", type=Path, help="a checkout of facebookresearch/dino")
    ap.add_argument("--dinov2-repo", type=Path, help="a checkout of facebookresearch/dinov2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="also our step with run.compile=on")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--n-local", type=int, default=10)
    ap.add_argument("--out-dim", type=int, default=65536)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    machine = cuda_line() if gpu else hardware_line()
    peak = cuda_tflops(torch.bfloat16) if gpu else gemm_gflops(torch.bfloat16) / 1e3
    print(machine)
    results: list[tuple[int, Row, float]] = []
    notes = [f"`--{flag}` not given: no {name} row" for flag, name, repo in
             (("dino-repo", "official DINO", args.dino_repo), ("dinov2-repo", "official DINOv2", args.dinov2_repo))
             if repo is None]
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch_sizes:
            sizes = Sizes(batch, args.global_size, args.local_size, args.n_local, args.out_dim)
            data = batch_folder(Path(tmp) / f"photos{batch}", batch)
            rows = [ours(sizes, device, data, Path(tmp) / f"ours{batch}", False)]  # prepare warmed and counted it
            if args.compile:
                rows.append(ours(sizes, device, data, Path(tmp) / f"compiled{batch}", True))
            if args.dino_repo is not None:
                rows.append(official_dino(args.dino_repo, sizes, device).count())
            if args.dinov2_repo is not None:
                rows.append(official_dinov2(args.dinov2_repo, sizes, device).count())
            for row, seconds in zip(rows, fastest(rows, args.steps, device)):
                results.append((batch, row, seconds))
                print(f"{row.name}, batch {batch}: {batch / seconds:.1f} images/s, {seconds * 1e3:.1f} ms/step, "
                      f"{row.gflop / seconds / 1e3:.3g} TFLOP/s = {100 * row.gflop / seconds / 1e3 / peak:.0f}% "
                      f"of the bf16 GEMM peak ({peak:.1f} TFLOP/s, measured now)", flush=True)
            del rows
            if gpu:
                torch.cuda.empty_cache()
    crops = f"2 x {args.global_size} + {args.n_local} x {args.local_size}"
    text = "\n".join([
        f"ViT-S/16 DINO step ({crops} crops, out_dim {args.out_dim}, bf16 autocast, fastest of {args.steps} "
        f"interleaved steps) on `{machine}`; bf16 GEMM peak measured in the same run: {peak:.1f} TFLOP/s.",
        f"Command: `python benchmarks/bench_gpu_step.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
        + ("" if not notes else f" ({'; '.join(notes)})") + ".",
        "", *table(results, peak)])
    update_section(args.docs, "bench_gpu_step.py", text)
    print(f"table written to {args.docs}")


if __name__ == "__main__":
    main()
