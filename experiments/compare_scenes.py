"""Object-level table on the labeled scene benchmark: DINO, iBOT, ODIS on ground-truth boxes and ODIS on
boxes discovered without labels, each given the same seed and the same wall-clock training budget.

1. ``ssl-distill make-scenes data/scenes`` (if absent): 2,000 train / 1,000 test 96-px scenes of 1-4
   Fashion-MNIST items, with COCO boxes and classes.
2. Each method's step is timed first on the quiet machine (data loading included); its run gets
   ``optim.epochs = budget / (seconds per step x steps per epoch)``.
3. DINO trains; ``ssl-distill discover`` on its teacher writes boxes for the training scenes (label-free);
   iBOT, ODIS (ground-truth boxes) and ODIS (discovered boxes) train.
4. Every model and a random-init one: ``ssl-distill object-knn --mode all`` (test objects classified from
   train objects: (a) [OBJ] with the box mask, (b) [CLS] of the box crop upsampled to the view, (b') [CLS] of
   the box crop at the scene's scale on black, (c) [CLS] of the whole scene)
   and CorLoc on the test scenes of ``ssl-distill discover`` (TokenCut) and of ``discover --dinoseg
   --dinoseg-head mean`` (DINO-seg on the heads' mean [CLS] attention); ``object-knn --mode pixels``: the
   box crops' raw pixels, the bar (b) must clear.

``--dinov3``: DINO against the DINOv3-style twin (``dinov3_tiny_scenes.yaml``: RoPE, registers, LayerScale,
DINOv3's objectives) without and with Gram anchoring, the same way (the random-init row is the twin's
architecture; its own docs section); the Gram recipe's step keys scale with its length, as in
``compare_objectives.py --dinov3``.

With ``--set model.init_from=RUN`` every run starts from that model (ODIS's [OBJ] token from its [CLS]), and
the table gets a row for that model as it is, before any training on the scenes. ``--variants`` adds rows of
ODIS on ground-truth boxes with overrides (``sep=ibot.shared_head=false``), timed and trained like the others.

On a GPU (``--set run.device=cuda data.num_workers=3 run.threads=1 --parallel 4``) the runs train side by
side, each in its own process with its output in ``<run>/stdout.log``; their epochs still come from step
times measured one at a time on the quiet machine, so sharing the machine makes a run slower, not longer.
ODIS on discovered boxes starts when DINO's boxes are written.

``--seeds 0 1 2`` repeats the whole table with each ``run.seed`` (training, data order, and the random init's
weights), each seed's runs and table under ``<out>/seed<S>/``, and ``<out>/table.md`` gives every figure as
mean ± sd over the seeds: on these tiny models one seed cannot tell a few points from noise (CorLoc of DINO's
4-epoch run on the plain scenes is 24.4% with seed 0 and 12.4% with seed 1). The step times are measured once.

Usage: python experiments/compare_scenes.py [--budget-min 6] [--out runs/scenes_compare] [--seeds 0 [1 ...]]
           [--set KEY=VALUE ...] [--variants NAME=KEY=VALUE,...] [--parallel N] [--dinov3]
Writes ``<out>/table.md``, ``<out>/table.json`` and, as each run ends, a line of ``rows.jsonl`` beside it; run it
alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from compare_objectives import NO_GRAM, cli, gram_steps, parse_variants, run_step_times, write_table
from ssl_distill.hardware import cuda_line, hardware_line

ROOT = Path(__file__).resolve().parents[1]
IBOT = ["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0,0.3]", "masking.pred_ratio_var=[0,0.2]"]


def evaluate(model: str, scenes: Path, out: Path, random_init: bool = False, log: Path | None = None,
             threads: int | None = None) -> dict:
    """Object-level k-NN (every mode the model has) and CorLoc (TokenCut, DINO-seg) on the test scenes."""
    extra = ["--random-init"] if random_init else []
    suffix = "_random_init" if random_init else ""
    knn_json = out / f"object_knn{suffix}.json"
    cli("object-knn", model, "--scenes", str(scenes), "--mode", "all", "--out", str(knn_json), *extra, log=log,
        threads=threads)
    acc = json.loads(knn_json.read_text())["accuracy"]
    corloc = {}
    for key, name, how in (("corloc", "discover_test", []),
                           ("corloc_dinoseg", "discover_dinoseg_test", ["--dinoseg", "--dinoseg-head", "mean"])):
        cli("discover", model, "--coco", str(scenes / "test" / "boxes.json"), "--images", str(scenes / "test"),
            "--out", str(out / f"{name}{suffix}"), *how, *extra, log=log, threads=threads)
        corloc[key] = 100 * json.loads((out / f"{name}{suffix}" / "corloc.json").read_text())["corloc"]
    return {**{f"knn_{m}": acc[m]["top1"] for m in acc}, **corloc}


METRICS = ("knn_obj", "knn_crop", "knn_crop_native", "knn_scene", "corloc", "corloc_dinoseg")
HEADER = ["pretraining", "epochs", "object k-NN: [OBJ] + box mask (a)", "[CLS] of box crop (b)",
          "[CLS] of box crop at the scene's scale (b')", "[CLS] of scene (c)", "CorLoc, TokenCut (test scenes)",
          "CorLoc, DINO-seg (heads' mean)"]


def run_seed(seed: int, out: Path, scenes: Path, methods: dict[str, tuple[str, list[str], Path]],
             timing: dict[str, tuple[float, int, str]], budget_min: float, parallel: int,
             random_init_as: str) -> tuple[list[dict], list[str]]:
    """Train and evaluate every method with ``run.seed = seed`` under ``out``; the rows (random init first, the
    architecture of method ``random_init_as``) and the failures. ``methods``' run directories are relative to
    ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    found = out / "dino_discovered_train"
    (out / "rows.jsonl").write_text("")  # this call's rows only
    side_by_side = parallel > 1
    threads = max(1, (os.cpu_count() or 1) // parallel) if side_by_side else None
    boxes_written = threading.Event()
    rows: dict[str, dict] = {}

    def train_and_evaluate(name: str) -> None:
        recipe, overrides, sub = methods[name]
        run_dir = out / sub
        log = run_dir / "stdout.log" if side_by_side else None
        if name == "ODIS (discovered boxes)":
            boxes_written.wait()
            if not (found / "boxes.json").is_file():
                raise RuntimeError("DINO's run or its discovery failed: no discovered boxes to train on")
            overrides = [*overrides, f"data.boxes={found / 'boxes.json'}"]
        sec, iters, precision = timing[name]
        epochs = round(budget_min * 60 / (sec * iters), 3)
        scaled = gram_steps(recipe, overrides, epochs, iters)  # a Gram term covers the same part of the run
        t0 = time.perf_counter()
        try:
            cli("train", str(ROOT / "configs" / recipe), *overrides, *scaled, f"run.seed={seed}",
                f"optim.epochs={epochs}", f"run.output_dir={run_dir}", "run.progress=false", "--fresh", log=log,
                threads=threads)
            train_min = (time.perf_counter() - t0) / 60
            if name == "DINO" and "ODIS (discovered boxes)" in methods:  # the label-free loop: DINO's boxes
                cli("discover", str(run_dir), "--images", str(scenes / "train"), "--out", str(found), log=log,
                    threads=threads)
        finally:
            if name == "DINO":
                boxes_written.set()
        rows[name] = {"method": name, "seed": seed, "overrides": scaled, "seconds_per_step": sec, "epochs": epochs,
                      "train_minutes": train_min, "precision": precision,
                      **evaluate(str(run_dir), scenes, run_dir, log=log, threads=threads)}
        print(json.dumps(rows[name]), flush=True)
        with open(out / "rows.jsonl", "a") as f:
            f.write(json.dumps(rows[name]) + "\n")

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        # DINO first (its boxes gate ODIS on discovered boxes, submitted last so it never waits in a slot early)
        order = sorted(methods, key=lambda name: "discovered" in name)
        futures = [pool.submit(train_and_evaluate, name) for name in order]
        errors = [f.exception() for f in futures]
    # that method's architecture at random init (ODIS's: its [OBJ] token too), drawn with this seed
    random_init = {"method": f"random init ({random_init_as}'s architecture)", "seed": seed, "epochs": 0.0,
                   **evaluate(str(out / methods[random_init_as][2]), scenes, out, random_init=True)}
    failed = [f"seed {seed}, {name}: {e}" for name, e in zip(order, errors) if e is not None]
    return [random_init] + [rows[name] for name in methods if name in rows], failed


def _cell(values: list[float]) -> str:
    """``m%`` for one value; ``mean ± sd%`` (sample sd) for several."""
    if len(values) == 1:
        return f"{values[0]:.2f}%"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}%"


def table_lines(rows: list[dict]) -> list[str]:
    """Markdown rows, one per method (in first-seen order); a metric over several seeds is mean ± sd."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    lines = []
    for method, runs in by_method.items():
        cells = [_cell([r[m] for r in runs]) if m in runs[0] else "-" for m in METRICS]
        epochs = statistics.mean(r["epochs"] for r in runs)
        lines.append(f"| {method} | {epochs:.2f} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-min", type=float, default=6.0, help="training wall-clock per method, minutes")
    ap.add_argument("--out", default=str(ROOT / "runs" / "scenes_compare"))
    ap.add_argument("--scenes", default=str(ROOT / "data" / "scenes"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="run.seed of every run (and of the random init); several: <out>/seed<S>/ each, and the "
                         "table gives mean ± sd over them")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run (e.g. data.batch_size=32)")
    ap.add_argument("--variants", nargs="*", default=[], metavar="NAME=KEY=VALUE,...",
                    help="more rows: ODIS on ground-truth boxes with these overrides")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (a GPU); 1 on a CPU")
    ap.add_argument("--docs", action="store_true", help="also write the table into docs/results.md (its section)")
    ap.add_argument("--skip-discovered", action="store_true",
                    help="no ODIS on discovered boxes (it waits for DINO: a second budget of wall-clock)")
    ap.add_argument("--dinov3", action="store_true",
                    help="DINO against the DINOv3-style twin without and with Gram anchoring (no ODIS rows)")
    args = ap.parse_args()
    if args.dinov3 and args.variants:
        ap.error("--variants adds ODIS rows, which --dinov3 has not")
    if any(o.startswith("run.seed=") for o in args.set):
        ap.error("give seeds with --seeds, not --set run.seed=...")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds repeats a seed: {args.seeds}")
    cuda = any(o == "run.device=cuda" for o in args.set)
    hardware = hardware_line() + (f"; {cuda_line()}" if cuda else "")
    print(hardware, flush=True)
    scenes = Path(args.scenes)
    if not (scenes / "test" / "boxes.json").is_file():
        cli("make-scenes", str(scenes))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [f"data.train_dir={scenes / 'train'}", *args.set]
    truth = [*common, f"data.boxes={scenes / 'train' / 'boxes.json'}"]
    variants = parse_variants(args.variants)
    methods: dict[str, tuple[str, list[str], Path]] = {  # name: (recipe, overrides, run directory under a seed's)
        "DINO": ("dino_tiny_scenes.yaml", common, Path("dino")),
        "iBOT": ("dino_tiny_scenes.yaml", [*common, *IBOT], Path("ibot")),
        "ODIS (ground-truth boxes)": ("odis_tiny_scenes.yaml", truth, Path("odis")),
        **{f"ODIS (ground-truth boxes), {' '.join(extra)}": ("odis_tiny_scenes.yaml", [*truth, *extra],
                                                             Path(f"odis_{name}")) for name, extra in variants.items()},
        "ODIS (discovered boxes)": ("odis_tiny_scenes.yaml", common, Path("odis_discovered")),
    }
    random_init_as = "ODIS (ground-truth boxes)"
    if args.dinov3:
        methods = {"DINO": methods["DINO"],
                   "DINOv3-style": ("dinov3_tiny_scenes.yaml", [*common, *NO_GRAM], Path("dinov3")),
                   "DINOv3-style + Gram": ("dinov3_tiny_scenes.yaml", common, Path("dinov3_gram"))}
        random_init_as = "DINOv3-style"
    elif args.skip_discovered:
        del methods["ODIS (discovered boxes)"]
    # step times on the quiet machine first, in turn, once for every seed (discovered boxes are not there yet:
    # time ODIS on the true ones)
    timing = run_step_times({name: (recipe, overrides) for name, (recipe, overrides, _) in methods.items()
                             if "discovered" not in name})
    if "ODIS (discovered boxes)" in methods:
        timing["ODIS (discovered boxes)"] = timing["ODIS (ground-truth boxes)"]
    several = len(args.seeds) > 1
    table: list[dict] = []
    failed: list[str] = []
    for seed in args.seeds:
        seed_out = out / f"seed{seed}" if several else out
        rows, errors = run_seed(seed, seed_out, scenes, methods, timing, args.budget_min, args.parallel,
                                random_init_as)
        table += rows
        failed += errors
        if several:  # each seed's own table beside its runs
            write_table(seed_out, f"Scene benchmark ({scenes})", HEADER, table_lines(rows), rows, args.budget_min,
                        hardware=hardware, seeds=[seed])
    init = [o.partition("=")[2] for o in args.set if o.startswith("model.init_from=")]
    if init:  # every run started from this model: it is the row to beat, evaluated as it is
        (out / "init").mkdir(exist_ok=True)
        # after the first random-init row: table_lines keeps the methods in first-seen order
        table.insert(1, {"method": f"init_from {init[-1]}, before the scenes", "epochs": 0.0,
                         **evaluate(init[-1], scenes, out / "init")})
    # the bar without any model: the box crops' raw pixels (gray, 28 px, mean removed)
    cli("object-knn", "--mode", "pixels", "--scenes", str(scenes), "--out", str(out / "object_knn_pixels.json"))
    pixels = json.loads((out / "object_knn_pixels.json").read_text())["accuracy"]["pixels"]["top1"]
    lines = [f"| raw pixels of the box crop (no model) | - | - | {pixels:.2f}% | - | - | - | - |", *table_lines(table)]
    lines += [f"| {failure} |" + " |" * (len(HEADER) - 1) for failure in failed]
    table.insert(0, {"method": "raw pixels of the box crop", "knn_pixels": pixels})
    write_table(out, f"Scene benchmark ({scenes})", HEADER, lines, table, args.budget_min, hardware=hardware,
                seeds=args.seeds,
                docs=("experiments/compare_scenes.py" + (" --dinov3" if args.dinov3 else "")) if args.docs else None)
    if failed:
        sys.exit("some runs failed:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
