"""SLURM launch figures on the local cluster (``sudo bash .ci/slurm-up``), demo recipe, 2 CPU tasks:

- time from ``ssl-distill submit`` to the job running and to its first finished training step;
- lost work on preemption: for each of ``--preemptions`` SIGUSR2 signals (what SLURM sends before a
  time limit or on preemption), the steps finished when the signal was sent against the step the
  requeued job resumes at (target: at most one step lost), and the downtime until training runs again.

    python benchmarks/bench_launch.py [--data data/fmnist/train] [--preemptions 3]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ssl_distill.hardware import hardware_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "dino_tiny_fmnist.yaml"


def log_records(out: Path) -> list[dict]:
    path = out / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_state(job: str) -> dict[str, str]:
    res = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True)
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


def wait(predicate, what: str, timeout: float = 600, poll: float = 0.05):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data" / "fmnist" / "train"))
    p.add_argument("--preemptions", type=int, default=3)
    p.add_argument("--steps-between", type=int, default=5, help="training steps between signals")
    args = p.parse_args()
    print(hardware_line())
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        out = Path(tmp) / "run"
        stop_at = (args.preemptions + 1) * (args.steps_between + 2) + 5
        cmd = [sys.executable, "-m", "ssl_distill.cli", "submit", str(CONFIG), f"data.train_dir={args.data}",
               f"run.output_dir={out}", "run.log_every=1", "run.progress=false", f"run.stop_at_step={stop_at}",
               "data.batch_size=64", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "30"]
        t_submit = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            raise SystemExit(res.stdout + res.stderr)
        job = re.search(r"submitted job (\S+)", res.stdout).group(1)
        t_returned = time.time()
        wait(lambda: job_state(job)["JobState"] == "RUNNING", "the job to start", poll=0.2)
        t_running = time.time()
        first = wait(lambda: log_records(out), "the first training step")[0]
        print(f"submit command returned after {t_returned - t_submit:.1f} s; job RUNNING after "
              f"{t_running - t_submit:.1f} s; first training step finished {first['time'] - t_submit:.1f} s "
              f"after submit (job {job}, 2 tasks x 1 CPU, demo recipe at batch 2 x 64)")

        lost = []
        for i in range(args.preemptions):
            target = log_records(out)[-1]["step"] + args.steps_between
            wait(lambda: log_records(out)[-1]["step"] >= target, f"step {target}")
            done = log_records(out)[-1]["step"]
            t_signal = time.time()
            subprocess.run(["scancel", "--signal=USR2", job], check=True)
            log = out / "submitit" / f"{job}_0_log.out"
            pattern = re.compile(r"resumed from \S+ at step (\d+)")
            resumed = int(wait(lambda: pattern.findall(log.read_text())[i:i + 1], f"resume {i + 1}",
                               poll=0.2)[0])
            again = wait(lambda: [r for r in log_records(out) if r["time"] > t_signal and r["step"] > resumed],
                         "the first step after the resume", poll=0.2)[0]
            lost.append(max(0, done - resumed))
            print(f"preemption {i + 1}: {done} steps done at the signal, resumed at step {resumed} "
                  f"(lost {lost[-1]}), training again {again['time'] - t_signal:.1f} s after the signal")
        final = wait(lambda: job_state(job)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED") and job_state(job),
                     "the job to end", poll=0.5)
        print(f"job ended {final['JobState']} after {final['Restarts']} requeue(s); lost work per preemption: "
              f"max {max(lost)} step(s) (target <= 1)")


if __name__ == "__main__":
    main()
