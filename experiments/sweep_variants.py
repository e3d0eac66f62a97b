"""Variants of one recipe, each trained for the recipe's epochs (not a wall-clock budget), several at once,
then k-NN (k=20) of each on the full Fashion-MNIST test set: which changes of a recipe win at full length.

Made for a GPU (``--device cuda``: every variant in its own process on the one GPU, each with its own
data workers), where a full-length demo run takes minutes; on a CPU, ``--parallel 1``. Each variant's
output goes to ``<out>/<name>/stdout.log``; the table to ``<out>/table.md`` and ``<out>/table.json``.

Usage: python experiments/sweep_variants.py --device cuda --parallel 6 --workers 1 \\
           --set run.precision=fp32 --variants base= lr3=optim.lr=0.003 "gs=data.crops.global_scale=[0.3,1.0]"
"""
from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ssl_distill.hardware import cuda_line, hardware_line  # noqa: E402
from compare_objectives import cli, parse_variants  # noqa: E402

from ssl_distill.data.fashion_mnist import build_fashion_mnist_folders  # noqa: E402
from ssl_distill.report import read_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_variant(name: str, argv: list[str], run_dir: Path) -> dict:
    """Train then k-NN one variant in child processes; returns its row (``error`` set when a step failed)."""
    log = run_dir / "stdout.log"
    row: dict = {"name": name}
    t0 = time.perf_counter()
    try:
        cli("train", *argv, f"run.output_dir={run_dir}", "--fresh", log=log, threads=1)
        row["train_min"] = (time.perf_counter() - t0) / 60
        cli("knn", str(run_dir), log=log, threads=1)
    except RuntimeError as e:
        row["error"] = str(e)
        return row
    row["knn_top1_k20"] = json.loads((run_dir / "knn.json").read_text())["accuracy"]["k=20"]["top1"]
    row["online_knn"] = [round(r["knn_top1_k20"], 2) for r in read_run(run_dir).knn if "knn_top1_k20" in r]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="dinov2_style_tiny_fmnist.yaml")
    ap.add_argument("--variants", nargs="+", required=True, metavar="NAME=KEY=VALUE,...",
                    help="overrides of the recipe per variant; NAME= is the recipe unchanged")
    ap.add_argument("--set", nargs="*", default=[], help="overrides for every variant")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--parallel", type=int, default=1, help="variants at once")
    ap.add_argument("--workers", type=int, default=0, help="data workers per variant (train and k-NN)")
    ap.add_argument("--data", default=str(ROOT / "data" / "fmnist"))
    ap.add_argument("--out", default=str(ROOT / "runs" / "sweep"))
    args = ap.parse_args()
    hardware = cuda_line() if args.device == "cuda" else hardware_line()
    print(hardware, flush=True)
    root = build_fashion_mnist_folders(args.data)
    common = [str(ROOT / "configs" / args.recipe), f"data.train_dir={root / 'train'}", f"knn.train_dir={root / 'train'}",
              f"knn.val_dir={root / 'val'}", f"run.device={args.device}", f"data.num_workers={args.workers}",
              f"knn.num_workers={args.workers}", "run.threads=1", "run.progress=false", *args.set]
    out = Path(args.out)
    variants = parse_variants(args.variants)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {name: pool.submit(run_variant, name, [*common, *extra], out / name) for name, extra in variants.items()}
        rows = []
        for name, fut in futures.items():
            row = {**fut.result(), "overrides": variants[name]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [f"| {r['name']} | {' '.join(r['overrides']) or '(recipe)'} | "
             + (f"{r['knn_top1_k20']:.2f}% | {r['train_min']:.1f} | {' -> '.join(map(str, r['online_knn']))} |"
                if "error" not in r else f"{r['error']} | | |") for r in rows]
    text = "\n".join([f"{args.recipe} variants, common overrides {' '.join(args.set) or '(none)'}; {hardware}", "",
                      "| variant | overrides | k-NN top-1 (k=20) | train min | online k-NN |", "|---|---|---|---|---|",
                      *lines])
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps({"hardware": hardware, "recipe": args.recipe, "set": args.set,
                                                "rows": rows}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
