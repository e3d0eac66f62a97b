"""Start-up time of the command line: ``ssl-distill --help``, every subcommand's ``--help`` and an argument
error, beside ``python -c pass`` (the interpreter's own start-up). Target: ``ssl-distill --help`` <= 0.5 s.

Each figure is the median wall-clock of ``--repeats`` fresh processes of the ``ssl-distill`` found on PATH
(what a user or a SLURM script types; under pyenv a shell shim that adds its own start-up) and of the
console script itself.

    python benchmarks/bench_cli.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ssl_distill.hardware import hardware_line

from ssl_distill.cli import COMMANDS  # noqa: E402  (torch-free)


def wall(cmd: list[str], repeats: int) -> float:
    """Median wall-clock seconds of running ``cmd`` to completion ``repeats`` times (after one warm-up)."""
    subprocess.run(cmd, capture_output=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(hardware_line())
    on_path = shutil.which("ssl-distill")
    script = Path(sys.executable).with_name("ssl-distill")
    if on_path is None:
        raise SystemExit("ssl-distill is not on PATH: pip install -e . first")
    base = wall([sys.executable, "-c", "pass"], args.repeats)
    print(f"python -c pass{'':27s} {base:6.3f} s")
    commands = [["--help"], *[[name, "--help"] for name, *_ in COMMANDS], ["train"], ["knn", "x", "--which", "nobody"]]
    print(f"{'command':40s} {'PATH':>7s} {'script':>7s}   (PATH: {on_path})")
    for argv in commands:
        a = wall([on_path, *argv], args.repeats)
        b = wall([str(script), *argv], args.repeats) if script.is_file() else float("nan")
        target = "  (target <= 0.5 s)" if argv == ["--help"] else ""
        print(f"{'ssl-distill ' + ' '.join(argv):40s} {a:6.3f}s {b:6.3f}s{target}")


if __name__ == "__main__":
    main()
