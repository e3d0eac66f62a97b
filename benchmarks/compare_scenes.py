"""Object-level table on the labeled scene benchmark: DINO, iBOT, ODIS on ground-truth boxes and ODIS on
boxes discovered without labels, each given the same seed and the same wall-clock training budget.

1. ``ssl-distill make-scenes data/scenes`` (if absent): 2,000 train / 1,000 test 96-px scenes of 1-4
   Fashion-MNIST items, with COCO boxes and classes.
2. Each method's step is timed first on the quiet machine (data loading included); its run gets
   ``optim.epochs = budget / (seconds per step x steps per epoch)``.
3. DINO trains; ``ssl-distill discover`` on its teacher writes boxes for the training scenes (label-free);
   iBOT, ODIS (ground-truth boxes) and ODIS (discovered boxes) train.
4. Every model and a random-init one: ``ssl-distill object-knn --mode all`` (test objects classified from
   train objects: (a) [OBJ] with the box mask, (b) [CLS] of the box crop, (c) [CLS] of the whole scene)
   and ``ssl-distill discover`` CorLoc on the test scenes; ``object-knn --mode pixels``: the box crops'
   raw pixels, the bar (b) must clear.

With ``--set model.init_from=RUN`` every run starts from that model (ODIS's [OBJ] token from its [CLS]), and
the table gets a row for that model as it is, before any training on the scenes.

Usage: python benchmarks/compare_scenes.py [--budget-min 6] [--out runs/scenes_compare] [--set KEY=VALUE ...]
Writes ``<out>/table.md`` and ``<out>/table.json``; run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware_line  # noqa: E402
from compare_objectives import cli, seconds_per_step, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IBOT = ["ibot.weight=1", "masking.shape=block", "masking.pred_ratio=[0,0.3]", "masking.pred_ratio_var=[0,0.2]"]


def evaluate(model: str, scenes: Path, out: Path, random_init: bool = False) -> dict:
    """Object-level k-NN (every mode the model has) and CorLoc on the test scenes."""
    extra = ["--random-init"] if random_init else []
    knn_json = out / ("object_knn_random_init.json" if random_init else "object_knn.json")
    cli("object-knn", model, "--scenes", str(scenes), "--mode", "all", "--out", str(knn_json), *extra)
    disc = out / ("discover_test_random_init" if random_init else "discover_test")
    cli("discover", model, "--coco", str(scenes / "test" / "boxes.json"), "--images", str(scenes / "test"),
        "--out", str(disc), *extra)
    acc = json.loads(knn_json.read_text())["accuracy"]
    corloc = json.loads((disc / "corloc.json").read_text())["corloc"]
    return {**{f"knn_{m}": acc[m]["top1"] for m in acc}, "corloc": 100 * corloc}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-min", type=float, default=6.0, help="training wall-clock per method, minutes")
    ap.add_argument("--out", default="runs/scenes_compare")
    ap.add_argument("--scenes", default="data/scenes")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every run (e.g. data.batch_size=32)")
    args = ap.parse_args()
    print(hardware_line(), flush=True)
    scenes = Path(args.scenes)
    if not (scenes / "test" / "boxes.json").is_file():
        cli("make-scenes", str(scenes))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    found = out / "dino_discovered_train"
    common = [f"data.train_dir={scenes / 'train'}", *args.set]
    methods: dict[str, tuple[str, list[str]]] = {
        "DINO": ("dino_tiny_scenes.yaml", common),
        "iBOT": ("dino_tiny_scenes.yaml", [*common, *IBOT]),
        "ODIS (ground-truth boxes)": ("odis_tiny_scenes.yaml", [*common, f"data.boxes={scenes / 'train' / 'boxes.json'}"]),
        "ODIS (discovered boxes)": ("odis_tiny_scenes.yaml", [*common, f"data.boxes={found / 'boxes.json'}"]),
    }
    # step times on the quiet machine first (discovered boxes are not there yet: time ODIS on the true ones)
    timing = {name: seconds_per_step(recipe, ov) for name, (recipe, ov) in list(methods.items())[:3]}
    timing["ODIS (discovered boxes)"] = timing["ODIS (ground-truth boxes)"]
    rows = []
    for name, (recipe, overrides) in methods.items():
        sec, iters, precision = timing[name]
        epochs = round(args.budget_min * 60 / (sec * iters), 3)
        run_dir = out / (name.split()[0].lower() + ("_discovered" if "discovered" in name else ""))
        t0 = time.perf_counter()
        cli("train", str(ROOT / "configs" / recipe), *overrides, f"optim.epochs={epochs}", f"run.output_dir={run_dir}",
            "run.progress=false", "--fresh")
        train_min = (time.perf_counter() - t0) / 60
        if name == "DINO":  # the label-free loop: boxes for the training scenes from DINO's own attention
            cli("discover", str(run_dir), "--images", str(scenes / "train"), "--out", str(found))
        rows.append({"method": name, "seconds_per_step": sec, "epochs": epochs, "train_minutes": train_min,
                     "precision": precision, **evaluate(str(run_dir), scenes, run_dir)})
        print(rows[-1], flush=True)
    # the same ODIS architecture at random init (its [OBJ] token too)
    rows.insert(0, {"method": "random init", "epochs": 0.0,
                    **evaluate(str(out / "odis"), scenes, out, random_init=True)})
    init = [o.partition("=")[2] for o in args.set if o.startswith("model.init_from=")]
    if init:  # every run started from this model: it is the row to beat, evaluated as it is
        (out / "init").mkdir(exist_ok=True)
        rows.insert(1, {"method": f"init_from {init[-1]}, before the scenes", "epochs": 0.0,
                        **evaluate(init[-1], scenes, out / "init")})
    # the bar without any model: the box crops' raw pixels (gray, 28 px, mean removed)
    cli("object-knn", "--mode", "pixels", "--scenes", str(scenes), "--out", str(out / "object_knn_pixels.json"))
    pixels = json.loads((out / "object_knn_pixels.json").read_text())["accuracy"]["pixels"]["top1"]
    lines = [f"| raw pixels of the box crop (no model) | - | - | {pixels:.2f}% | - | - |"]
    for r in rows:
        obj = f"{r['knn_obj']:.2f}%" if "knn_obj" in r else "-"
        lines.append(f"| {r['method']} | {r['epochs']:.2f} | {obj} | {r['knn_crop']:.2f}% | {r['knn_scene']:.2f}% | "
                     f"{r['corloc']:.2f}% |")
    rows.insert(0, {"method": "raw pixels of the box crop", "knn_pixels": pixels})
    write_table(out, f"Scene benchmark ({scenes})", ["pretraining", "epochs", "object k-NN: [OBJ] + box mask (a)",
                                                      "[CLS] of box crop (b)", "[CLS] of scene (c)",
                                                      "CorLoc (test scenes)"], lines, rows, args.budget_min)


if __name__ == "__main__":
    main()
