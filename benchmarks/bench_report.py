"""``ssl-distill report`` on three demo-sized runs (DINO, iBOT, AttMask): wall-clock of the whole command
(a fresh process: interpreter, matplotlib, reading, drawing, PNG). Target: <= 5 s.

The three run directories are written here with the demo's size and fields: 3 epochs x 468 steps logged
every 50 steps and at each epoch end, 7 online k-NN records, the recipes' config.yaml (the tiny
Fashion-MNIST DINO, iBOT and AttMask recipes) and a knn.json; or pass ``--runs`` to time real ones.

    python benchmarks/bench_report.py [--runs RUN_DIR ...] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from ssl_distill.hardware import hardware_line

ROOT = Path(__file__).resolve().parents[1]
from ssl_distill.config import load_config, save_config  # noqa: E402  (torch-free)

RECIPES = {"dino": "dino_tiny_fmnist.yaml", "ibot": "ibot_tiny_fmnist.yaml", "attmask": "attmask_tiny_fmnist.yaml"}


def write_demo_sized_run(out: Path, recipe: str, seed: int) -> None:
    """A run directory shaped like the demo's after it finished (log, config, results)."""
    out.mkdir(parents=True)
    save_config(load_config(ROOT / "configs" / recipe, [f"run.output_dir={out}"]), out / "config.yaml")
    per_epoch, epochs, t = 468, 3, 1.7e9
    evals = set(range(per_epoch // 2, per_epoch * epochs + 1, per_epoch // 2))  # every half epoch
    steps = sorted({s for s in range(50, per_epoch * epochs + 1, 50)} | {per_epoch * e for e in (1, 2, 3)} | evals)
    lines = [{"kind": "knn", "step": 0, "epoch": 0.0, "knn_top1_k20": 70.0, "knn_top5_k20": 95.0, "knn_seconds": 4.0,
              "knn_n_train": 5000, "knn_n_val": 2000, "knn_precision": "bf16", "time": t}]
    last = 0
    for s in steps:
        t += (s - last) * 0.85
        last = s
        x = s / (per_epoch * epochs)
        rec = {"step": s, "epoch": (s - 1) // per_epoch, "loss": 8.3 - 3 * x + 0.05 * math.sin(s + seed),
               "dino": 8.3 - 3 * x, "teacher_entropy": 8.3 * (1 - x) + 1, "teacher_kl_uniform": 0.5 + x,
               "lr": 1e-3 * min(1.0, 3 * x), "wd": 0.04 + 0.36 * x, "momentum": 0.99 + 0.01 * x, "teacher_temp": 0.04,
               "images_per_s": 150.0, "bad_images": 0, "time": t}
        if recipe != "dino_tiny_fmnist.yaml":
            rec.update(patch=5.0 - x, mask_ratio=0.2)
        if s % 50 == 0 or s % per_epoch == 0:  # logged steps
            lines.append(rec)
        if s in evals:
            t += 4.0
            lines.append({"kind": "knn", "step": s, "epoch": s / per_epoch, "knn_top1_k20": 70 + 9 * x,
                          "knn_top5_k20": 97.0, "knn_seconds": 4.0, "knn_n_train": 5000, "knn_n_val": 2000,
                          "knn_precision": "bf16", "time": t})
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (out / "knn.json").write_text(json.dumps({"accuracy": {"k=20": {"top1": 78.9, "top5": 99.0}}}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=None, help="time these run directories instead")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(hardware_line())
    exe = shutil.which("ssl-distill") or "ssl-distill"
    with tempfile.TemporaryDirectory() as tmp:
        runs = args.runs
        if runs is None:
            runs = []
            for i, (name, recipe) in enumerate(RECIPES.items()):
                write_demo_sized_run(Path(tmp) / name, recipe, i)
                runs.append(str(Path(tmp) / name))
        out = Path(tmp) / "report.png"
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = subprocess.run([exe, "report", *runs, "--out", str(out)], capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if res.returncode != 0:
                raise SystemExit(res.stderr)
        lines = sum(len((Path(r) / "log.jsonl").read_text().splitlines()) for r in runs)
        print(f"ssl-distill report on {len(runs)} runs ({lines} log lines): median {statistics.median(times):.2f} s, "
              f"best {min(times):.2f} s of {args.repeats} (target <= 5 s); figure {out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
