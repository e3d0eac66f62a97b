"""Linear probe fast mode: 52 heads trained jointly vs one head, on 60,000 cached feature vectors.

Target: the 52-head grid ({last 1, last 4 blocks} x {with, without mean patch token} x 13 learning rates),
10 classes, 10 epochs, in under 2x the time of training a single head the same way.

Features: 60,000 x 1,920 float32 (ViT-S: the 1,536 CLS columns of the last 4 blocks + the 384-wide mean
patch token; every head reads its contiguous column range), Gaussian class means plus noise. Timed, in
alternating rounds (the machine is shared), wall clock and CPU seconds of this process:

- ``grid``: :class:`LinearGrid` with the 52 heads (one GEMM per head group and direction per step);
- ``one head``: the same trainer with one head (last 4 blocks + mean, the widest input);
- ``torch one head``: one ``nn.Linear`` trained the textbook way (autograd, ``torch.optim.SGD``,
  ``CosineAnnealingLR`` per iteration) on the same batches.

Also printed: the work of the grid in multiply-adds relative to one head (31x for these 52 heads), the
time that arithmetic alone takes at the GEMM rate measured in the same process (a lower bound for any
exact joint training; compared with the one-head time it shows whether < 2x is reachable on this
machine), and the held-out / test accuracy of the best head of a full :func:`fast_probe`.

    python benchmarks/bench_linear.py [--n 60000 --dim 384 --classes 10 --epochs 10 --batch 256]
                                      [--rounds 2] [--compute bf16|fp32|both] [--threads 0]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ssl_distill.hardware import gemm_gflops, hardware_line
from ssl_distill.eval.features import FeatureSet
from ssl_distill.eval.linear import HeadSpec, LinearGrid, fast_probe, head_grid


def make_features(n: int, d: int, blocks: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means (the same for every split) + unit Gaussian noise; ``seed`` draws labels and noise."""
    means = torch.randn(c, (blocks + 1) * d, generator=torch.Generator().manual_seed(1234)) * 0.04
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = means[y] + torch.randn(n, (blocks + 1) * d, generator=g)
    return x, y


def torch_single_head(x: torch.Tensor, y: torch.Tensor, head: HeadSpec, d: int, blocks: int, c: int,
                      epochs: int, batch: int, seed: int = 0) -> nn.Linear:
    start, stop = head.columns(d, blocks)
    lin = nn.Linear(stop - start, c)
    nn.init.normal_(lin.weight, std=0.01)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.SGD(lin.parameters(), lr=head.lr * batch / 256, momentum=0.9, weight_decay=0.0)
    n = x.shape[0]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, math.ceil(n / batch) * epochs, eta_min=0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            loss = F.cross_entropy(lin(x.index_select(0, idx)[:, start:stop]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return lin


def best_one(times: dict[str, list[tuple[float, float]]]) -> float:
    return min(t[0] for t in times["one head"])


def timed(fn):  # noqa: ANN001, ANN201
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=60000)
    p.add_argument("--dim", type=int, default=384, help="backbone width D (features: 5 D wide)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=256, help="SGD batch (fast mode default)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--compute", choices=["bf16", "fp32", "both"], default="both")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip-probe", action="store_true", help="skip the full fast_probe run")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, d, c, blocks = args.n, args.dim, args.classes, 4
    print(hardware_line(), flush=True)
    x, y = make_features(n, d, blocks, c, seed=0)
    idx = torch.arange(n)
    grid_heads = head_grid((1, blocks))
    one = HeadSpec(blocks, True, 1e-3)
    macs_grid = sum((h.columns(d, blocks)[1] - h.columns(d, blocks)[0]) * c for h in grid_heads)
    macs_one = (one.columns(d, blocks)[1] - one.columns(d, blocks)[0]) * c
    print(f"features {n} x {x.shape[1]} float32 ({blocks * d} CLS columns + {d} mean), {c} classes, "
          f"{args.epochs} epochs, batch {args.batch}, torch threads {torch.get_num_threads()}")
    print(f"multiply-adds per sample and pass: grid of {len(grid_heads)} heads {macs_grid:,} vs one head "
          f"{macs_one:,} ({macs_grid / macs_one:.1f}x)", flush=True)

    flops = 2 * 2 * args.epochs * n * macs_grid  # forward + weight gradient, every sample and epoch
    peak = {"bf16": gemm_gflops(torch.bfloat16), "fp32": gemm_gflops(torch.float32)}
    print("lower bound of the grid from its arithmetic alone (at the 2048^3 GEMM rate measured now): "
          + ", ".join(f"{k} {flops / (v * 1e9):.1f} s" for k, v in peak.items()), flush=True)
    computes = ("bf16", "fp32") if args.compute == "both" else (args.compute,)
    for compute in computes:
        times: dict[str, list[tuple[float, float]]] = {"grid": [], "one head": [], "torch one head": []}
        for r in range(args.rounds):
            w, cp, _ = timed(lambda: LinearGrid(grid_heads, d, c, args.batch, compute=compute).fit(  # noqa: B023
                x, y, idx, args.epochs))
            times["grid"].append((w, cp))
            w, cp, _ = timed(lambda: LinearGrid([one], d, c, args.batch, compute=compute).fit(  # noqa: B023
                x, y, idx, args.epochs))
            times["one head"].append((w, cp))
            if compute == "fp32":
                w, cp, _ = timed(lambda: torch_single_head(x, y, one, d, blocks, c, args.epochs, args.batch))
                times["torch one head"].append((w, cp))
            g, o = times["grid"][-1], times["one head"][-1]
            print(f"  [{compute}] round {r}: grid {g[0]:.1f} s ({g[1]:.1f} cpu-s) | one head {o[0]:.1f} s "
                  f"({o[1]:.1f} cpu-s) | ratio {g[0] / o[0]:.2f}x wall, {g[1] / o[1]:.2f}x cpu"
                  + (f" | torch one head {times['torch one head'][-1][0]:.1f} s "
                     f"({times['torch one head'][-1][1]:.1f} cpu-s)" if compute == "fp32" else ""), flush=True)
        best = {k: (min(t[0] for t in v), min(t[1] for t in v)) for k, v in times.items() if v}
        ratios = sorted(g[0] / o[0] for g, o in zip(times["grid"], times["one head"]))
        print(f"  [{compute}] median per-round ratio {ratios[len(ratios) // 2]:.2f}x; arithmetic lower bound of the "
              f"grid = {flops / (peak[compute] * 1e9) / best_one(times):.1f}x the best one-head time", flush=True)
        print(f"  [{compute}] best: grid {best['grid'][0]:.1f} s / {best['grid'][1]:.1f} cpu-s; one head "
              f"{best['one head'][0]:.1f} s / {best['one head'][1]:.1f} cpu-s -> grid = "
              f"{best['grid'][0] / best['one head'][0]:.2f}x one head (wall), "
              f"{best['grid'][1] / best['one head'][1]:.2f}x (cpu) (target < 2x)", flush=True)
        if "torch one head" in best:
            t1 = best["torch one head"]
            print(f"  [{compute}] textbook torch single head: {t1[0]:.1f} s / {t1[1]:.1f} cpu-s -> grid = "
                  f"{best['grid'][0] / t1[0]:.2f}x (wall), {best['grid'][1] / t1[1]:.2f}x (cpu)", flush=True)

    if not args.skip_probe:
        xt, yt = make_features(10000, d, blocks, c, seed=1)
        train = FeatureSet(x, y, [str(i) for i in range(c)])
        test = FeatureSet(xt, yt, train.classes)
        w, cp, res = timed(lambda: fast_probe(train, test, d, blocks, epochs=args.epochs, batch_size=args.batch,
                                              compute=computes[0]))
        b = res["best"]
        print(f"\nfast_probe ({computes[0]}, 52 heads, hold-out 10%, then evaluation of every head): {w:.1f} s "
              f"({cp:.1f} cpu-s); best {b['name']}: held-out top-1 {b['holdout_top1']:.2f}%, "
              f"test top-1 {res['top1']:.2f}%", flush=True)
    print(hardware_line())


if __name__ == "__main__":
    main()
