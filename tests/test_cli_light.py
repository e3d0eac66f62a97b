"""The command line answers without torch: help, argument errors, ``submit`` checks and ``report``.

Every command below runs in one subprocess whose importer refuses torch, timm and torchvision: a
light path that imports one of them fails here (and would cost seconds of start-up).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ssl_distill.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision")

DRIVER = r'''
import contextlib, io, json, sys

class Refuse:
    """Raises on any import of a heavy package."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {heavy}:
            raise ImportError(f"blocked import of {{name}}")
        return None

sys.meta_path.insert(0, Refuse())
from ssl_distill.cli import run

results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # a blocked import, or a bug: report it
            code, err = "raised", io.StringIO(f"{{type(e).__name__}}: {{e}}")
    results.append({{"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()}})
print(json.dumps({{"results": results, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in {heavy})}}))
'''


def run_blocked(commands: list[list[str]], cwd: Path = ROOT) -> tuple[list[dict], list[str]]:
    """Run each argv through ``ssl_distill.cli.run`` with torch, timm and torchvision blocked."""
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(heavy=set(HEAVY)), json.dumps(commands)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return data["results"], data["heavy"]


def test_the_blocker_blocks():
    """The harness itself: a subcommand that needs torch fails inside it (so the checks below mean something)."""
    results, _ = run_blocked([["knn", "nowhere", "--train", "a", "--val", "b"]])
    assert results[0]["code"] == "raised" and "blocked import of torch" in results[0]["err"]


def test_help_and_argument_errors_need_no_torch():
    names = [name for name, *_ in COMMANDS]
    assert {"train", "knn", "submit", "report", "linear", "export", "discover", "corloc", "visualize", "demo",
            "prepare-fmnist"} <= set(names)
    results, heavy = run_blocked([["--help"], *[[name, "--help"] for name in names],
                                  ["report"], ["train"], ["knn", "run", "--which", "nobody"], ["frobnicate"],
                                  ["linear", "run", "--mode", "fastest"], ["submit", "x.yaml", "--nodes", "two"]])
    assert heavy == []
    top, *subcommands = results[: len(names) + 1]
    assert top["code"] == 0 and all(name in top["out"] for name in names)
    for res, name in zip(subcommands, names):
        assert res["code"] == 0 and f"usage: ssl-distill {name}" in res["out"], res
    for res in results[len(names) + 1:]:  # argparse errors: exit 2 with one usage line and the reason
        assert res["code"] == 2 and "error:" in res["err"], res
    assert "the following arguments are required: RUN_DIR" in results[len(names) + 1]["err"]
    assert "invalid choice: 'nobody'" in results[len(names) + 3]["err"]


def test_submit_checks_and_report_run_without_torch(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 9.0 - s, "time": 100.0 + s})
                                             for s in (1, 2, 3)) + "\n")
    config = ROOT / "configs" / "dino_tiny_fmnist.yaml"
    results, heavy = run_blocked([
        ["submit", str(config), "optim.lrr=1"],  # a config error, before anything is queued
        ["submit", str(config), f"data.train_dir={tmp_path / 'missing'}", f"run.output_dir={tmp_path / 'o'}"],
        ["submit", str(config), "--slurm-arg", "novalue"],
        ["report", str(run), "--out", str(tmp_path / "r.png")],
        ["report", str(tmp_path / "nothing")],
    ])
    assert heavy == []
    bad_key, no_data, bad_arg, report, no_run = results
    assert bad_key["code"] == 1 and "did you mean 'optim.lr'?" in bad_key["err"]
    assert no_data["code"] == 1 and "no such folder" in no_data["err"]
    assert bad_arg["code"] == 1 and "--slurm-arg expects KEY=VALUE" in bad_arg["err"]
    assert report["code"] == 0 and (tmp_path / "r.png").is_file() and (tmp_path / "r.md").is_file()
    assert "| run | 3 |" in report["out"]
    assert no_run["code"] == 1 and "is not a run directory" in no_run["err"]


@pytest.mark.parametrize("module", ["ssl_distill.cli", "ssl_distill.cli_args", "ssl_distill.errors",
                                    "ssl_distill.report", "ssl_distill.launch.submit", "ssl_distill.config"])
def test_light_modules_import_no_heavy_package(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in {set(HEAVY)}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
