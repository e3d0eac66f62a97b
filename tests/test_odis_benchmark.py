"""experiments/odis_benchmark.py at tiny sizes: scenes and centred items written, the crop statistics printed
before training, iBOT and ODIS trained 2 steps and evaluated, the table written into a temporary docs file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_scenes import write_bar_source

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_runs_at_tiny_sizes(tmp_path: Path):
    src = tmp_path / "src"
    write_bar_source(src / "train", per_class=12)
    write_bar_source(src / "val", per_class=6)
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n\nprose kept\n")
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "odis_benchmark.py"), "--items", "2", "--seeds", "0",
         "--methods", "iBOT", "ODIS", "--steps", "2", "--n-train", "8", "--n-test", "4", "--n-items", "20",
         "--stats-samples", "20", "--data", str(tmp_path / "data"), "--fmnist", str(src), "--out",
         str(tmp_path / "out"), "--docs", str(docs), "--set", "data.batch_size=4"],
        cwd=ROOT / "experiments", capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 item(s) per canvas: 20 samples: plain global pairs disagree" in out.stdout
    assert out.stdout.index("item(s) per canvas") < out.stdout.index("ssl_distill.cli train")  # before training
    text = docs.read_text()
    assert "prose kept" in text and "<!-- begin experiments/odis_benchmark.py -->" in text
    assert "| 2 |" in text and "| ODIS - iBOT |" in text
    rows = json.loads((tmp_path / "out" / "table.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"iBOT", "ODIS"}
    odis = next(r for r in rows if r["method"] == "ODIS")
    assert {"image_cls", "image_obj_box", "image_obj_all", "object_obj", "object_crop"} <= set(odis)
    data = json.loads((tmp_path / "data" / "items" / "train" / "boxes.json").read_text())
    assert len(data["images"]) == 20 and data["images"][0]["width"] == 56
    whole = json.loads((tmp_path / "data" / "items_whole" / "train" / "boxes.json").read_text())
    assert all(a["bbox"] == [0, 0, 56, 56] for a in whole["annotations"])


def test_gap_lines_by_hand(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    from odis_benchmark import gap_lines

    def row(method: str, seed: int, cls: float, crop: float, **obj: float) -> dict:
        return {"method": method, "items": 2, "seed": seed, "image_cls": cls, "object_crop": crop, **obj}

    rows = [row("iBOT", 0, 70.0, 60.0), row("iBOT", 1, 72.0, 62.0), row("DINO", 0, 10.0, 10.0),
            row("ODIS", 0, 71.0, 61.0, image_obj_box=80.0, object_obj=50.0),
            row("ODIS", 1, 73.0, 61.0, image_obj_box=81.0, object_obj=51.0),
            {**row("ODIS", 0, 0.0, 0.0, image_obj_box=0.0, object_obj=0.0), "items": 4}]
    gaps, same = gap_lines(rows, 2)
    # [OBJ] box - [CLS]: 10 and 9 (mean 9.5, sd 0.71: ahead); [OBJ] box - crop: -10 and -11 (behind)
    assert gaps == ("| 2 | | ODIS - iBOT | 9.5 ± 0.7 (ODIS ahead (2 sd)) | | | -10.5 ± 0.7 (ODIS behind (2 sd)) | |")
    # [CLS] - [CLS]: 1 and 1 (sd 0: ahead); crop - crop: 1 and -1 (mean 0: no difference)
    assert same == ("| 2 | | ODIS - iBOT, both [CLS] | 1.0 ± 0.0 (ODIS ahead (2 sd)) | | | | 0.0 ± 1.4 "
                    "(no difference (2 sd)) |")
    assert gap_lines(rows[:2], 2) == []  # no ODIS run
