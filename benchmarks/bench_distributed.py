"""CPU data-parallel efficiency: the demo recipe as 2 gloo processes x 1 thread (torchrun) against
1 process x 2 threads, at the same global batch (128).

Prints each configuration's training images/s (median over log windows after the first) and the
ratio (target >= 0.85), beside the machine's GEMM ceiling.

    python benchmarks/bench_distributed.py [--data data/fmnist/train] [--steps 60]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ssl_distill.hardware import hardware_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "dino_tiny_fmnist.yaml"


def images_per_s(out: Path) -> tuple[float, list[float]]:
    rates = [json.loads(line)["images_per_s"] for line in (out / "log.jsonl").read_text().splitlines()]
    return statistics.median(rates[1:]), rates


def run(processes: int, threads: int, data: Path, steps: int, out: Path, log_every: int) -> float:
    over = [f"data.train_dir={data}", f"run.output_dir={out}", f"run.stop_at_step={steps}",
            f"run.log_every={log_every}", "run.checkpoint_every=100000", "run.progress=false",
            f"run.threads={threads}", f"data.batch_size={128 // processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        cmd = [sys.executable, "-m", "ssl_distill.cli", "train", str(CONFIG), *over, "--fresh"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "ssl_distill.cli", "train", str(CONFIG), *over, "--fresh"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-3000:])
    median, rates = images_per_s(out)
    print(f"  {processes} process(es) x {threads} thread(s): {median:.1f} images/s "
          f"(windows of {log_every} steps: {', '.join(f'{r:.0f}' for r in rates)})", flush=True)
    return median


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "fmnist" / "train"),
                   help="Fashion-MNIST train folder (ssl-distill prepare-fmnist)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="alternate the two configurations this many times")
    args = p.parse_args()
    print(hardware_line())
    print(f"recipe {CONFIG.name}: global batch 128, {args.steps} steps per run")
    single, dual = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            single.append(run(1, 2, Path(args.data), args.steps, Path(tmp) / f"one{i}", args.log_every))
            dual.append(run(2, 1, Path(args.data), args.steps, Path(tmp) / f"two{i}", args.log_every))
    a, b = max(single), max(dual)
    print(f"1 process x 2 threads: {a:.1f} images/s; 2 processes x 1 thread (gloo): {b:.1f} images/s; "
          f"efficiency {b / a:.2f} (target >= 0.85)")


if __name__ == "__main__":
    main()
