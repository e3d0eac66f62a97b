"""benchmarks/bench_gpu_step.py runs on the CPU at tiny sizes and writes its table into its marked section of a
docs file, leaving the rest of the file as it was; with checkouts of the official DINO and DINOv2 code (here
taken from the local mirrors when this machine has them) their modules' steps get rows beside ours."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
MIRRORS = Path("/work/.mirror")
OFFICIAL = {"dino": ("facebookresearch+dino", r"(main_dino|utils|vision_transformer)\.py"),
            "dinov2": ("facebookresearch+dinov2", r"dinov2/(__init__|layers/.*|loss/.*|models/.*)\.py")}
TINY = ["--device", "cpu", "--global-size", "32", "--local-size", "16", "--n-local", "2", "--out-dim", "256",
        "--batch-sizes", "2", "--steps", "1"]


def checkout(name: str, dst: Path) -> Path:
    """The official repository's Python files the benchmark imports, from the local bare mirror."""
    import re

    folder, pattern = OFFICIAL[name]
    git = ["git", "-C", str(MIRRORS / folder / "repo")]
    for path in subprocess.run([*git, "ls-tree", "-r", "--name-only", "HEAD"], capture_output=True, text=True,
                               check=True).stdout.split():
        if re.fullmatch(pattern, path):
            (dst / path).parent.mkdir(parents=True, exist_ok=True)
            (dst / path).write_bytes(subprocess.run([*git, "show", f"HEAD:{path}"], capture_output=True,
                                                    check=True).stdout)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("official", [False, pytest.param(True, marks=pytest.mark.skipif(
    not all((MIRRORS / folder / "repo").is_dir() for folder, _ in OFFICIAL.values()),
    reason="no local mirror of the official DINO / DINOv2 code"))])
def test_the_gpu_benchmark_runs_on_cpu_and_writes_its_section(official, tmp_path):
    import bench_gpu_step

    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nSomething measured before.\n")
    repos = ["--dino-repo", str(checkout("dino", tmp_path / "dino")),
             "--dinov2-repo", str(checkout("dinov2", tmp_path / "dinov2"))] if official else []
    bench_gpu_step.main([*TINY, *repos, "--docs", str(docs)])
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nSomething measured before.\n\n<!-- begin bench_gpu_step.py -->\n")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| 2 |" in line]
    names = [row.split(" | ")[0].lstrip("| ") for row in rows]
    if official:
        assert names == ["ssl-distill", "official DINO modules", "official DINOv2 modules"]
        assert rows[1].endswith("| 1.00x |")
    else:
        assert names == ["ssl-distill"] and rows[0].endswith("| - |")
        assert "`--dino-repo` not given: no official DINO row" in text
    assert text.rstrip().endswith("<!-- end bench_gpu_step.py -->")
