"""DINO, iBOT, AttMask-High, AttMask-Hint and DINOv2-style side by side on Fashion-MNIST, each given the
same seed and the same wall-clock training budget on this machine; k-NN (k=20) and linear (fast grid).

Each method's step is timed first (data loading included, a few steps after a warm-up); its run then
gets ``optim.epochs = budget / (seconds per step x steps per epoch)`` (fractional epochs end mid-epoch
with every schedule annealed), so a slower objective trains on fewer images, as it would on a deadline.
Run alone on the machine: the step timings decide the epochs.

Usage: python experiments/compare_objectives.py [--budget-min 8] [--out runs/compare] [--methods DINO iBOT ...]
           [--variants NAME=KEY=VALUE,KEY=VALUE ...] [--skip-linear]
``--variants`` adds runs of the demo's recipe with overrides (the ablation table of README "Demo results":
``--methods --variants h512=model.hidden_dim=512 h512_b64=model.hidden_dim=512,data.batch_size=64``; a comma
inside ``[...]`` belongs to a list value: ``ls=data.crops.local_scale=[0.1,0.4]``).
Writes ``<out>/table.md`` and ``<out>/table.json``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ssl_distill.config import load_config
from ssl_distill.data.fashion_mnist import build_fashion_mnist_folders
from ssl_distill.engine.train import Trainer
from ssl_distill.hardware import device_sync, hardware_line
from ssl_distill.report.docs import update_section

ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = "dinov2_style_tiny_fmnist.yaml"  # what --variants start from
METHODS: dict[str, tuple[str, list[str]]] = {
    "DINO": ("dino_tiny_fmnist.yaml", []),
    "iBOT": ("ibot_tiny_fmnist.yaml", []),
    "AttMask-High": ("attmask_tiny_fmnist.yaml", []),
    "AttMask-Hint": ("attmask_tiny_fmnist.yaml", ["masking.attmask=hint"]),
    # the demo's recipe with the ViT, heads and batch of the other four, so the table compares objectives only
    "DINOv2-style": ("dinov2_style_tiny_fmnist.yaml", ["model.depth=6", "model.hidden_dim=2048", "model.out_dim=4096",
                                                       "ibot.patch_out_dim=4096", "data.batch_size=128",
                                                       "optim.lr=0.002"]),
}


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """``NAME=KEY=VALUE,KEY=VALUE`` -> ``{NAME: ["KEY=VALUE", ...]}``; a comma inside ``[...]`` belongs to
    a list value (``ls=data.crops.local_scale=[0.1,0.4]``); ``NAME=`` is the recipe unchanged."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, _, overrides = spec.partition("=")
        out[name] = [o for o in re.split(r",(?![^\[]*\])", overrides) if o]
    return out


def seconds_per_step(recipe: str, overrides: list[str], steps: int = 8) -> tuple[float, int, str]:
    """(seconds per training step including data loading, steps per epoch, precision) of a recipe.

    Without data workers: the median of ``steps`` single steps after two warm-ups. With workers (a GPU
    run): the mean over ``4 x steps`` steps after ``10 + 2 x workers x prefetch`` warm-ups, so the batches
    the workers queued during the slow first steps are used up and a data-bound run is timed as one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / recipe, [*overrides, f"run.output_dir={tmp}/run", "run.progress=false",
                                                      "monitor.knn_every_epochs=0", "monitor.knn_every_steps=0"])
        trainer = Trainer(cfg, fresh=True)

        def epochs() -> Iterator:  # as many batches as the timing needs, a small folder's epochs in turn
            for epoch in itertools.count():
                trainer.sampler.set_epoch(epoch)
                yield from trainer.loader

        batches = epochs()
        sync = device_sync(trainer.device)  # or the budget would buy a GPU run too many epochs
        workers = cfg.data.num_workers
        warmup, timed = (2, steps) if workers == 0 else (10 + 2 * workers * 2, 4 * steps)

        def step(i: int) -> None:
            crops, *masks = trainer.step_inputs(next(batches))
            trainer.train_step(crops, i, *masks)

        for i in range(warmup):
            step(i)
        times = []
        sync()  # the last warm-up step's kernels belong to the warm-up
        t_all = time.perf_counter()
        for i in range(warmup, warmup + timed):
            sync()
            t0 = time.perf_counter()
            step(i)
            sync()
            times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2] if workers == 0 else (time.perf_counter() - t_all) / timed
        return sec, trainer.iters_per_epoch, trainer.precision


def cli(*args: str, log: Path | None = None, threads: int | None = None) -> None:
    """Run one ``ssl-distill`` subcommand with this Python, echoing it; a failure stops the benchmark.

    ``log``: append the command and its output to this file instead of this process's stdout (runs side
    by side); ``threads``: the child's OMP_NUM_THREADS.
    """
    cmd = [sys.executable, "-m", "ssl_distill.cli", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if log is None:
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed (exit {done.returncode}); see {log}")


def write_table(out: Path, title: str, header: list[str], lines: list[str], rows: list[dict], budget_min: float,
                hardware: str | None = None, seeds: list[int] | None = None, docs: str | None = None) -> None:
    """``out/table.json`` (the rows, the hardware line, the budget, the seeds) and ``out/table.md``; prints the
    table. ``seeds``: the runs' ``run.seed`` values (default: the recipes' 0). ``docs``: also replace this
    experiment's section of ``docs/results.md`` (named after the script that calls) with the table."""
    hardware = hardware or hardware_line()
    seeds = seeds or [0]
    (out / "table.json").write_text(json.dumps({"hardware": hardware, "budget_min": budget_min, "seeds": seeds,
                                                "rows": rows}, indent=2))
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (mean ± sd)"
    text = "\n".join([f"{title}, {which}, {budget_min:g} min of training each; {hardware}", "",
                      "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines])
    (out / "table.md").write_text(text + "\n")
    if docs:
        update_section(ROOT / "docs" / "results.md", docs, text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-min", type=float, default=8.0, help="training wall-clock per method, minutes")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--data", default="data/fmnist")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--variants", nargs="*", default=[], metavar="NAME=KEY=VALUE,...",
                    help="the demo's recipe with comma-separated overrides, run like the methods")
    ap.add_argument("--skip-linear", action="store_true", help="k-NN only")
    ap.add_argument("--docs", action="store_true", help="also write the table into docs/results.md (its section)")
    args = ap.parse_args()
    methods = {name: METHODS[name] for name in args.methods}
    for name, overrides in parse_variants(args.variants).items():
        methods[name] = (DEMO_RECIPE, overrides)
    print(hardware_line(), flush=True)
    root = build_fashion_mnist_folders(args.data)
    data = [f"data.train_dir={root / 'train'}", f"knn.train_dir={root / 'train'}", f"knn.val_dir={root / 'val'}",
            "monitor.knn_every_epochs=0"]  # the same for every method: no online k-NN
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # every step time first, on a quiet machine: they set the epochs; training then may share the CPU
    timing = {name: seconds_per_step(recipe, [*data, *extra]) for name, (recipe, extra) in methods.items()}
    for name, (sec, _, precision) in timing.items():
        print(f"{name}: {sec:.3f} s/step ({precision})", flush=True)
    rows = []
    for name, (recipe, extra) in methods.items():
        sec, iters, precision = timing[name]
        epochs = round(args.budget_min * 60 / (sec * iters), 3)
        run_dir = out / name.replace("-", "_").lower()
        t0 = time.perf_counter()
        cli("train", str(ROOT / "configs" / recipe), *data, *extra, f"optim.epochs={epochs}", f"run.output_dir={run_dir}",
            "run.progress=false", "--fresh")
        train_min = (time.perf_counter() - t0) / 60
        cli("knn", str(run_dir))
        if not args.skip_linear:
            cli("linear", str(run_dir), "--mode", "fast")
        knn = json.loads((run_dir / "knn.json").read_text())["accuracy"]["k=20"]["top1"]
        linear = None if args.skip_linear else json.loads((run_dir / "linear_fast.json").read_text())["top1"]
        rows.append({"method": name, "recipe": recipe, "overrides": extra, "seconds_per_step": sec,
                     "epochs": epochs, "train_minutes": train_min, "precision": precision,
                     "knn_top1_k20": knn, "linear_fast_top1": linear})
        print(rows[-1], flush=True)
    lines = []
    for r in rows:
        recipe = r["recipe"] + (" " + " ".join(r["overrides"]) if r["overrides"] else "")
        lines.append(f"| {r['method']} | `{recipe}` | {r['seconds_per_step']:.2f} | {r['epochs']:.2f} | "
                     f"{r['train_minutes']:.1f} | {r['knn_top1_k20']:.2f}% | "
                     + ("-" if r["linear_fast_top1"] is None else f"{r['linear_fast_top1']:.2f}%") + " |")
    write_table(out, "Fashion-MNIST", ["method", "recipe", "s/step", "epochs", "train min", "k-NN top-1 (k=20)",
                                       "linear (fast) top-1"], lines, rows, args.budget_min,
                docs="experiments/compare_objectives.py" if args.docs else None)


if __name__ == "__main__":
    main()
