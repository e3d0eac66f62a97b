"""DINO, iBOT, AttMask-High, AttMask-Hint and DINOv2-style side by side on Fashion-MNIST, each given the
same seed and the same wall-clock training budget on this machine; k-NN (k=20) and linear (fast grid).
``--dinov3``: the README demo's recipe against its DINOv3-style twin (``dinov3_tiny_fmnist.yaml``: RoPE,
registers, LayerScale) without and with Gram anchoring, the same way (its own table and docs section).

Each method's step is timed first (data loading included, a few steps after a warm-up); its run then
gets ``optim.epochs = budget / (seconds per step x steps per epoch)`` (fractional epochs end mid-epoch
with every schedule annealed), so a slower objective trains on fewer images, as it would on a deadline.
The methods' steps are timed in turn (:func:`interleaved_seconds_per_step`), so a shared machine's load
falls on all of them alike. A recipe with Gram anchoring from a later step is timed with and without the term
(its step is the mix of the two, :func:`gram_from_the_start`), and its step keys (start, ramp, snapshot,
refreshes) are scaled by the same factor as its length (:func:`gram_steps`), so the term covers the same part
of the shorter run. Run alone on the machine if you can: the step timings decide the epochs.

Usage: python experiments/compare_objectives.py [--budget-min 8] [--out runs/compare] [--methods DINO iBOT ...]
           [--variants NAME=KEY=VALUE,KEY=VALUE ...] [--skip-linear] [--dinov3]
``--variants`` adds runs of the demo's recipe with overrides (the ablation table of README "Demo results":
``--methods --variants h512=model.hidden_dim=512 h512_b64=model.hidden_dim=512,data.batch_size=64``; a comma
inside ``[...]`` belongs to a list value: ``ls=data.crops.local_scale=[0.1,0.4]``).
Writes ``<out>/table.md`` and ``<out>/table.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ssl_distill.config import load_config
from ssl_distill.data.fashion_mnist import build_fashion_mnist_folders
from ssl_distill.engine.schedules import total_iterations
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

#: the demo against its DINOv3-style twin (``--dinov3``): the twin's recipe as it stands runs Gram anchoring
NO_GRAM = ["gram.weight=0", "data.crops.gram_size=null", "gram.it_load_ema_teacher=-1", "gram.update_frequency=0",
           "gram.max_updates=null", "gram.it_first_update=0", "gram.dino_local_weight=1"]
DINOV3: dict[str, tuple[str, list[str]]] = {
    "demo (DINOv2-style)": (DEMO_RECIPE, []),
    "DINOv3-style": ("dinov3_tiny_fmnist.yaml", NO_GRAM),
    "DINOv3-style + Gram": ("dinov3_tiny_fmnist.yaml", []),
}
GRAM_STEP_KEYS = ("start_step", "ramp_steps", "it_load_ema_teacher", "update_frequency", "it_first_update")


def gram_steps(recipe: str, overrides: list[str], epochs: float, iters_per_epoch: int) -> list[str]:
    """Overrides that scale a Gram-anchoring recipe's step keys (:data:`GRAM_STEP_KEYS`) by the run's length
    over the recipe's (``epochs`` against its ``optim.epochs``); none for a recipe without the Gram term."""
    cfg = load_config(ROOT / "configs" / recipe, overrides)
    if not cfg.gram.on:
        return []
    ratio = total_iterations(epochs, iters_per_epoch) / total_iterations(cfg.optim.epochs, iters_per_epoch)
    return [f"gram.{key}={max(1, round(getattr(cfg.gram, key) * ratio))}" for key in GRAM_STEP_KEYS
            if getattr(cfg.gram, key) > 0]


def gram_from_the_start(recipe: str, overrides: list[str]) -> list[str] | None:
    """For a recipe whose Gram term starts after step 0 (and so after a step timing's few steps): overrides that
    start it, with its teacher, at step 0; None otherwise. A run's seconds per step are then the two timings
    weighted by the share of the run before the term (:func:`before_gram`)."""
    cfg = load_config(ROOT / "configs" / recipe, overrides)
    if not cfg.gram.on or cfg.gram.start_step == 0:
        return None
    snapshot = ["gram.it_load_ema_teacher=0"] if cfg.gram.it_load_ema_teacher >= 0 else []
    return ["gram.start_step=0", "gram.ramp_steps=0", *snapshot]


def before_gram(recipe: str, overrides: list[str], iters_per_epoch: int) -> float:
    """The share of a recipe's run (``optim.epochs`` of ``iters_per_epoch`` steps) before its Gram term starts."""
    cfg = load_config(ROOT / "configs" / recipe, overrides)
    return min(cfg.gram.start_step / total_iterations(cfg.optim.epochs, iters_per_epoch), 1.0)


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """``NAME=KEY=VALUE,KEY=VALUE`` -> ``{NAME: ["KEY=VALUE", ...]}``; a comma inside ``[...]`` belongs to
    a list value (``ls=data.crops.local_scale=[0.1,0.4]``); ``NAME=`` is the recipe unchanged."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, _, overrides = spec.partition("=")
        out[name] = [o for o in re.split(r",(?![^\[]*\])", overrides) if o]
    return out


@contextlib.contextmanager
def _stepper(recipe: str, overrides: list[str]) -> Iterator[tuple[Trainer, Callable[[int], None]]]:
    """A recipe's trainer in a temporary run directory, and a function that trains its step ``i`` on the next
    batch (a small folder's epochs in turn), the device synchronised after it."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / recipe, [*overrides, f"run.output_dir={tmp}/run", "run.progress=false",
                                                      "monitor.knn_every_epochs=0", "monitor.knn_every_steps=0"])
        trainer = Trainer(cfg, fresh=True)

        def epochs() -> Iterator:
            for epoch in itertools.count():
                trainer.sampler.set_epoch(epoch)
                yield from trainer.loader

        batches = epochs()
        sync = device_sync(trainer.device)  # or the budget would buy a GPU run too many epochs

        def step(i: int) -> None:
            crops, *masks = trainer.step_inputs(next(batches))
            trainer.train_step(crops, i, *masks)
            sync()

        yield trainer, step


def seconds_per_step(recipe: str, overrides: list[str], steps: int = 8) -> tuple[float, int, str]:
    """(seconds per training step including data loading, steps per epoch, precision) of a recipe.

    Without data workers: the median of ``steps`` single steps after two warm-ups. With workers (a GPU
    run): the mean over ``4 x steps`` steps after ``10 + 2 x workers x prefetch`` warm-ups, so the batches
    the workers queued during the slow first steps are used up and a data-bound run is timed as one.
    """
    with _stepper(recipe, overrides) as (trainer, step):
        workers = trainer.cfg.data.num_workers
        warmup, timed = (2, steps) if workers == 0 else (10 + 2 * workers * 2, 4 * steps)
        for i in range(warmup):
            step(i)
        times = []
        t_all = time.perf_counter()
        for i in range(warmup, warmup + timed):
            t0 = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t0)
        sec = sorted(times)[len(times) // 2] if workers == 0 else (time.perf_counter() - t_all) / timed
        return sec, trainer.iters_per_epoch, trainer.precision


def interleaved_seconds_per_step(methods: dict[str, tuple[str, list[str]]],
                                 steps: int = 12) -> dict[str, tuple[float, int, str]]:
    """:func:`seconds_per_step` of every method (recipe, overrides) of a run without data workers, their steps
    taken in turn (one of each, then the next of each), so that a shared machine's changing load falls on all of
    them alike: the median of ``steps`` single steps each, after two warm-ups each."""
    with contextlib.ExitStack() as stack:
        steppers = {name: stack.enter_context(_stepper(recipe, extra)) for name, (recipe, extra) in methods.items()}
        times: dict[str, list[float]] = {name: [] for name in methods}
        for i in range(2 + steps):
            for name, (_, step) in steppers.items():
                t0 = time.perf_counter()
                step(i)
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
        return {name: (sorted(times[name])[steps // 2], trainer.iters_per_epoch, trainer.precision)
                for name, (trainer, _) in steppers.items()}


def run_step_times(methods: dict[str, tuple[str, list[str]]]) -> dict[str, tuple[float, int, str]]:
    """Each method's (seconds per step over its whole run, steps per epoch, precision), the steps timed in turn
    (:func:`interleaved_seconds_per_step`); a recipe whose Gram term starts later is also timed with the term on,
    and its figure is the two weighted by the share of the run before the term (:func:`gram_from_the_start`)."""
    timed = dict(methods)
    later_gram = {name: gram_from_the_start(recipe, overrides) for name, (recipe, overrides) in methods.items()}
    later_gram = {name: found for name, found in later_gram.items() if found is not None}
    for name, start in later_gram.items():
        timed[f"{name}, Gram term on"] = (timed[name][0], [*timed[name][1], *start])
    timing = interleaved_seconds_per_step(timed)
    for name, (sec, _, precision) in timing.items():
        print(f"{name}: {sec:.3f} s/step ({precision})", flush=True)
    for name in later_gram:  # the run's mean step: before the Gram term, then with it
        sec, iters, precision = timing[name]
        before = before_gram(*methods[name], iters)
        timing[name] = (before * sec + (1 - before) * timing.pop(f"{name}, Gram term on")[0], iters, precision)
        print(f"{name}: {timing[name][0]:.3f} s/step over the run ({before:.0%} of it before the Gram term)",
              flush=True)
    return timing


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
    ap.add_argument("--out", default=str(ROOT / "runs" / "compare"))
    ap.add_argument("--data", default=str(ROOT / "data" / "fmnist"))
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--variants", nargs="*", default=[], metavar="NAME=KEY=VALUE,...",
                    help="the demo's recipe with comma-separated overrides, run like the methods")
    ap.add_argument("--skip-linear", action="store_true", help="k-NN only")
    ap.add_argument("--docs", action="store_true", help="also write the table into docs/results.md (its section)")
    ap.add_argument("--dinov3", action="store_true",
                    help="the demo against its DINOv3-style twin without and with Gram anchoring (not --methods)")
    args = ap.parse_args()
    methods = dict(DINOV3) if args.dinov3 else {name: METHODS[name] for name in args.methods}
    for name, overrides in parse_variants(args.variants).items():
        methods[name] = (DEMO_RECIPE, overrides)
    print(hardware_line(), flush=True)
    root = build_fashion_mnist_folders(args.data)
    data = [f"data.train_dir={root / 'train'}", f"knn.train_dir={root / 'train'}", f"knn.val_dir={root / 'val'}",
            "monitor.knn_every_epochs=0"]  # the same for every method: no online k-NN
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # every step time first, the methods' steps in turn: they set the epochs; training then may share the CPU
    timing = run_step_times({name: (recipe, [*data, *extra]) for name, (recipe, extra) in methods.items()})
    rows = []
    for name, (recipe, extra) in methods.items():
        sec, iters, precision = timing[name]
        epochs = round(args.budget_min * 60 / (sec * iters), 3)
        run_dir = out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        scaled = gram_steps(recipe, [*data, *extra], epochs, iters)
        t0 = time.perf_counter()
        cli("train", str(ROOT / "configs" / recipe), *data, *extra, *scaled, f"optim.epochs={epochs}",
            f"run.output_dir={run_dir}", "run.progress=false", "--fresh")
        train_min = (time.perf_counter() - t0) / 60
        cli("knn", str(run_dir))
        if not args.skip_linear:
            cli("linear", str(run_dir), "--mode", "fast")
        knn = json.loads((run_dir / "knn.json").read_text())["accuracy"]["k=20"]["top1"]
        linear = None if args.skip_linear else json.loads((run_dir / "linear_fast.json").read_text())["top1"]
        rows.append({"method": name, "recipe": recipe, "overrides": extra + scaled, "seconds_per_step": sec,
                     "epochs": epochs, "train_minutes": train_min, "precision": precision,
                     "knn_top1_k20": knn, "linear_fast_top1": linear})
        print(rows[-1], flush=True)
    lines = []
    for r in rows:
        recipe = r["recipe"] + (" " + " ".join(r["overrides"]) if r["overrides"] else "")
        lines.append(f"| {r['method']} | `{recipe}` | {r['seconds_per_step']:.2f} | {r['epochs']:.2f} | "
                     f"{r['train_minutes']:.1f} | {r['knn_top1_k20']:.2f}% | "
                     + ("-" if r["linear_fast_top1"] is None else f"{r['linear_fast_top1']:.2f}%") + " |")
    section = "experiments/compare_objectives.py" + (" --dinov3" if args.dinov3 else "")
    write_table(out, "Fashion-MNIST", ["method", "recipe", "s/step", "epochs", "train min", "k-NN top-1 (k=20)",
                                       "linear (fast) top-1"], lines, rows, args.budget_min,
                docs=section if args.docs else None)


if __name__ == "__main__":
    main()
