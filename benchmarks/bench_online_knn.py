"""Online k-NN overhead at the demo's setting (configs/dino_tiny_fmnist.yaml: every 0.5 epoch and before the
first step, 5,000 train / 2,000 val Fashion-MNIST images, bf16).

Two short runs of the demo recipe on the full Fashion-MNIST folders (``ssl-distill prepare-fmnist``), the
same ``--steps`` steps with and without online k-NN (every ``--steps / 2`` steps, so at 0, the middle and
the end: 3 evaluations); prints both wall-clock times, the cost per evaluation, and the overhead this
cost means for the whole demo: 7 evaluations against 3 epochs x 468 steps.

The projection divides by the step time of the run with online k-NN itself (its wall-clock less its
evaluations), so that evaluations and steps are timed under the same load: on a machine shared with
other work the two runs' totals differ by more than the evaluations cost (both are printed).

    python benchmarks/bench_online_knn.py [--data data/fmnist] [--steps 30]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ssl_distill.hardware import hardware_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "dino_tiny_fmnist.yaml"


def timed_run(out: Path, data: Path, steps: int, knn: bool) -> tuple[float, list[dict]]:
    """Wall-clock seconds of ``train()`` for ``steps`` steps of the demo recipe, and its k-NN records."""
    from ssl_distill.config import load_config
    from ssl_distill.engine.train import train

    overrides = [f"data.train_dir={data / 'train'}", f"knn.train_dir={data / 'train'}", f"knn.val_dir={data / 'val'}",
                 f"run.output_dir={out}", f"run.stop_at_step={steps}", "run.progress=false",
                 "run.checkpoint_every=100000", "run.keep_every_epochs=0"]
    overrides += ["monitor.knn_every_epochs=0", f"monitor.knn_every_steps={steps // 2}"] if knn else \
        ["monitor.knn_every_epochs=0"]
    cfg = load_config(CONFIG, overrides)
    t0 = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return seconds, [r for r in records if r.get("kind") == "knn"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "fmnist"), help="ssl-distill prepare-fmnist output")
    p.add_argument("--steps", type=int, default=30, help="training steps per run")
    args = p.parse_args()
    print(hardware_line())
    data = Path(args.data)
    if not (data / "train").is_dir():
        raise SystemExit(f"{data}/train not found: run ssl-distill prepare-fmnist {data}")
    with tempfile.TemporaryDirectory() as tmp:
        t_plain, _ = timed_run(Path(tmp) / "plain", data, args.steps, knn=False)
        t_knn, records = timed_run(Path(tmp) / "knn", data, args.steps, knn=True)
    spent = sum(r["knn_seconds"] for r in records)
    per_eval = spent / len(records)
    per_step = (t_knn - spent) / args.steps  # the same run's training, evaluations left out
    demo_steps, demo_evals = 3 * 468, 7
    print(f"demo recipe, {args.steps} steps (batch 128, 2 x 28 px + 4 x 14 px crops): {t_plain:.1f} s without online "
          f"k-NN, {t_knn:.1f} s with {len(records)} evaluations (+{t_knn - t_plain:.1f} s, "
          f"{100 * (t_knn - t_plain) / t_plain:.1f}% of this short run; {t_plain / args.steps:.2f} vs "
          f"{per_step:.2f} s/step, evaluations left out)")
    print(f"one evaluation ({records[0]['knn_n_train']} train / {records[0]['knn_n_val']} val images, "
          f"{records[0]['knn_precision']}): {per_eval:.2f} s measured inside the loop "
          f"({[round(r['knn_seconds'], 2) for r in records]} s)")
    print(f"the demo (3 epochs x 468 steps at {per_step:.2f} s/step = {demo_steps * per_step / 60:.1f} min of training, "
          f"{demo_evals} evaluations): online k-NN {demo_evals * per_eval:.0f} s = "
          f"{100 * demo_evals * per_eval / (demo_steps * per_step):.1f}% of its training time (target <= 5%)")


if __name__ == "__main__":
    main()
