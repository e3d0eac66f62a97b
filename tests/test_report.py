"""``ssl-distill report``: a figure and a table from real short runs, older logs and runs still going."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from ssl_distill.config import load_config
from ssl_distill.data.fashion_mnist import DEFAULT_SOURCE
from ssl_distill.engine.train import train
from ssl_distill.report import RunData, read_run, write_report
from ssl_distill.report.runs import wall_clock_seconds
from test_end_to_end import CONFIG, make_folder, tiny_overrides


def _figure_ok(path: Path) -> np.ndarray:
    image = imread(path)
    assert image.shape[0] > 1000 and image.shape[1] > 1000  # six rows of two panels
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank page
    return image


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A DINO and an iBOT run, one epoch each, with online k-NN, and results files beside the DINO one."""
    base = tmp_path_factory.mktemp("report")
    train_dir, val_dir = make_folder(base / "train", 12, 0), make_folder(base / "val", 4, 1)
    common = ["optim.epochs=1", "monitor.knn_every_steps=3", f"knn.train_dir={train_dir}", f"knn.val_dir={val_dir}",
              "knn.image_size=32", "knn.resize_size=32", "knn.ks=[3,20]", "knn.num_workers=0", "run.log_every=1"]
    dino, ibot = base / "dino", base / "ibot"
    train(load_config(CONFIG, tiny_overrides(train_dir, dino) + common))
    train(load_config(CONFIG, tiny_overrides(train_dir, ibot) + common + ["ibot.weight=1", "masking.shape=block"]))
    (dino / "knn.json").write_text(json.dumps({"accuracy": {"k=10": {"top1": 61.0}, "k=20": {"top1": 62.5}}}))
    (dino / "linear_fast.json").write_text(json.dumps({"top1": 70.25}))
    (dino / "discover").mkdir()
    (dino / "discover" / "corloc.json").write_text(json.dumps({"corloc": 0.5}))
    return dino, ibot


@pytest.mark.slow
def test_report_of_real_runs_overlays_them_and_lists_config_differences(runs, tmp_path):
    dino, ibot = runs
    report = write_report([dino, ibot], out=tmp_path / "cmp.png", names=["DINO", "iBOT"])
    assert report.figure == tmp_path / "cmp.png" and report.table == tmp_path / "cmp.md"
    _figure_ok(report.figure)
    text = report.table.read_text()
    assert text == report.markdown and "![report](cmp.png)" in text
    # the config differences: exactly what the two runs set differently (output_dir aside)
    assert "| `masking.shape` | none | block |" in text and "| `ibot.weight` | 0 | 1 |" in text
    assert "output_dir" not in text and "model.depth" not in text
    # results: steps, epochs, the last online k-NN point, and the evaluations found in the run directory
    row = next(line for line in text.splitlines() if line.startswith("| DINO |"))
    assert "| 6 | 1.00 |" in row and "(k=20, step 6)" in row
    assert "62.50%" in row and "70.25%" in row and "50.00%" in row
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert "k-NN top-1" in header and "linear fast top-1" in header and "CorLoc discover" in header
    assert "## Notes" not in text  # nothing missing in runs of this version

    dino_run = read_run(dino)
    assert [r["step"] for r in dino_run.knn] == [0, 3, 6]
    assert dino_run.loss_terms() == ["loss", "dino"] and read_run(ibot).loss_terms() == ["loss", "dino", "patch"]
    # the collapse panel: the [CLS] teacher's monitors for both runs, the patch teacher's where iBOT logs them
    from matplotlib.figure import Figure

    from ssl_distill.report.figure import _collapse
    legend = [name for name, _ in _collapse(Figure().add_subplot(), [dino_run, read_run(ibot)], ["C0", "C1"], "step",
                                            1.0)]
    assert legend == ["teacher entropy", "KL(mean teacher || uniform)", "patch teacher entropy",
                      "KL(mean patch teacher || uniform)"]
    assert len(read_run(ibot).series("patch_teacher_entropy", "train", "step")[0]) > 0
    assert all(s is not None for s in dino_run.seconds["train"] + dino_run.seconds["knn"])
    assert dino_run.seconds["knn"][0] == 0.0 and dino_run.seconds["train"][-1] > 0


@pytest.mark.slow
def test_report_of_one_run_defaults_to_its_directory_and_compares_with_the_defaults(runs):
    dino, _ = runs
    report = write_report([dino])
    assert report.figure == dino / "report.png" and (dino / "report.md").is_file()
    _figure_ok(report.figure)
    assert "keys set away from the defaults" in report.markdown
    assert "| `model.depth` | 2 | null |" in report.markdown


def test_report_of_an_older_run_still_going_notes_what_is_missing(tmp_path):
    """A log of an older version (no time, no KL, no online k-NN, no config.yaml) with a half-written
    last line, as a run still writing it leaves it."""
    run = tmp_path / "old"
    run.mkdir()
    lines = [json.dumps({"step": s, "epoch": 0, "loss": 8.0 - s / 10, "lr": 1e-4 * s, "teacher_entropy": 3.0})
             for s in (10, 20, 30)]
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 40, "epoch": 0, "lo')
    report = write_report([run])
    _figure_ok(report.figure)
    notes = report.markdown.split("## Notes", 1)[1]
    assert "skipped 1 unreadable log line" in notes
    for missing in ("teacher_kl_uniform", "wd", "momentum", "images_per_s", "time"):
        assert f"no '{missing}'" in notes
    assert "no online k-NN records" in notes and "no config.yaml" in notes
    row = next(line for line in report.markdown.splitlines() if line.startswith("| old |"))
    assert row.startswith("| old | 30 | < 1 | — | 5.0000 | — | — | — |")  # no time: no wall-clock, no K: no ratio
    # an empty run directory beside it: no curve of its own, a note in the table
    empty = tmp_path / "new"
    empty.mkdir()
    assert "new: no log.jsonl yet" in write_report([run, empty], out=tmp_path / "both.png").markdown


def test_report_with_nothing_to_draw_says_why_and_writes_nothing(tmp_path):
    """An empty folder, a run that has not logged its first step, a folder of runs: one sentence, no blank figure."""
    from ssl_distill.errors import DataError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"nothing to draw yet: {empty} has no log.jsonl \\(not a run directory"):
        write_report([empty])
    started = tmp_path / "runs" / "started"
    started.mkdir(parents=True)
    (started / "config.yaml").write_text("run: {}\n")
    (started / "log.jsonl").write_text('{"step": 0, "kind": "config_note"}\n')
    with pytest.raises(DataError, match="has no training records in its log.jsonl \\(the run has not logged"):
        write_report([started, empty])
    (tmp_path / "runs" / "done").mkdir()
    (tmp_path / "runs" / "done" / "log.jsonl").write_text("")
    with pytest.raises(DataError, match="runs has no log.jsonl, but its subfolders done, started have one: give"):
        write_report([tmp_path / "runs"])
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.md"))


def test_report_refuses_a_missing_directory_and_wrong_names(tmp_path):
    from ssl_distill.errors import DataError

    with pytest.raises(DataError, match="is not a run directory"):
        write_report([tmp_path / "nope"])
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="--names gives 2 name"):
        write_report([tmp_path / "a"], names=["x", "y"])
    with pytest.raises(ValueError, match="should end in .png"):
        write_report([tmp_path / "a"], out=tmp_path / "a.pdf")


def test_wall_clock_leaves_out_the_pause_between_interrupt_and_resume():
    records = [{"step": s, "time": 1000.0 + 2 * s} for s in (10, 20, 30)]  # 2 s per step
    records += [{"step": s, "time": 90000.0 + 2 * (s - 30)} for s in (40, 50)]  # resumed a day later
    seconds = wall_clock_seconds(records)
    assert seconds == [20.0, 40.0, 60.0, 80.0, 100.0]
    assert wall_clock_seconds([{"step": 1}]) == [None]
    assert math.isclose(wall_clock_seconds([{"step": 0, "time": 5.0}, {"step": 4, "time": 9.0}])[1], 4.0)


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_SOURCE / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs the Debian package dataset-fashion-mnist")
def test_demo_writes_its_report(tmp_path, capsys):
    from ssl_distill.demo import run_demo

    out = tmp_path / "demo"
    tiny = [f"run.output_dir={out}", "run.progress=false", "run.threads=1", "data.batch_size=20",
            "model.depth=2", "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
            "optim.epochs=1", "monitor.knn_every_epochs=0.5", "monitor.knn_train_size=100",
            "monitor.knn_val_size=50", "knn.ks=[5,20]"]
    summary = run_demo(config=str(CONFIG), data_dir=str(tmp_path / "fmnist"), overrides=tiny, limit_per_class=10)
    printed = capsys.readouterr().out
    assert "[online k-NN] step 0 (epoch 0.00)" in printed and "[online k-NN] step 5 (epoch 1.00)" in printed
    assert summary["report"] == str(out / "report.png") and f"[demo] report: {out / 'report.png'}" in printed
    _figure_ok(out / "report.png")
    table = (out / "report.md").read_text()
    assert "k-NN random init top-1" in table and "k-NN top-1" in table
    assert [r["step"] for r in read_run(out).knn] == [0, 3, 5]  # 0.5 x 5 = 2.5 -> 3, and the end


def test_docs_sections_are_replaced_in_place(tmp_path):
    """A generated table replaces only its own marked section; the prose around it stays; a file without the
    markers gets the section appended."""
    from ssl_distill.report.docs import read_section, update_section

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nprose before\n\n<!-- begin exp.py -->\n| old |\n<!-- end exp.py -->\n\nprose after\n")
    update_section(doc, "exp.py", "| new |\n|---|")
    assert doc.read_text() == ("# Results\n\nprose before\n\n<!-- begin exp.py -->\n| new |\n|---|\n"
                               "<!-- end exp.py -->\n\nprose after\n")
    assert read_section(doc, "exp.py") == "| new |\n|---|\n"
    update_section(doc, "other.py", "| b |")
    assert doc.read_text().endswith("prose after\n\n<!-- begin other.py -->\n| b |\n<!-- end other.py -->\n")
    assert read_section(doc, "exp.py") == "| new |\n|---|\n" and read_section(tmp_path / "none.md", "x") is None


def _schedule_run(prefixes: tuple[str, ...] = ("", "patch_")) -> RunData:
    """A run whose log has the demo's shapes: lr warms up then decays, wd rises to 0.4 in the upper right corner
    (where the legend used to go), the KL monitors of its teachers lie together near 0."""
    n = 3600
    train = []
    for step in range(50, n + 1, 50):
        f = step / n
        rec = {"step": step, "loss": 7 + 3 * math.exp(-step / 400), "time": 1000 + 0.36 * step,
               "lr": 7.5e-4 * min(1, step / 300) * 0.5 * (1 + math.cos(math.pi * max(0, step - 300) / (n - 300))),
               "wd": 0.04 + 0.36 * 0.5 * (1 - math.cos(math.pi * f))}
        for i, prefix in enumerate(prefixes):
            rec[f"{prefix}teacher_entropy"] = 3 + i + 3 * math.exp(-step / 500)
            rec[f"{prefix}teacher_kl_uniform"] = 0.02 + 0.08 * f + 0.001 * i
        train.append(rec)
    return RunData("demo", Path("demo"), train=train, config={"model": {"out_dim": 1024}},
                   seconds={"train": [None] * len(train), "knn": []})


def test_the_weight_decay_curve_does_not_run_through_the_panel_legend():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ssl_distill.report.figure import ROWS, _panel_legend

    fig = Figure(figsize=(7, 3), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw = dict(ROWS)["learning rate and weight decay"]
    _panel_legend(ax, draw(ax, [_schedule_run()], ["C0"], "step", 1.0))
    fig.canvas.draw()
    legends = [a.get_legend() for a in fig.axes if a.get_legend() is not None]
    assert len(legends) == 1 and legends[0].axes is fig.axes[-1]  # on the twin, drawn above both curves
    box = legends[0].get_window_extent()
    curves = [line for a in fig.axes for line in a.get_lines() if line.get_visible()]
    assert len(curves) == 2
    for line in curves:
        assert not line.get_transform().transform_path(line.get_path()).intersects_bbox(box), line.get_label()


def test_kl_monitors_near_zero_and_log_k_are_told_apart():
    """Every teacher's KL curve carries its own marker at staggered places (two curves near 0 on top of each
    other stay apart), and the log K line is drawn unlike any curve (a wide pale band)."""
    from matplotlib.figure import Figure

    from ssl_distill.report.figure import _collapse

    ax = Figure().add_subplot()
    legend = dict(_collapse(ax, [_schedule_run(("", "obj_", "patch_"))], ["C0"], "step", 1.0))
    kls = [look for name, look in legend.items() if name.startswith("KL")]
    assert len(kls) == 3 and all(look.marker for look in kls)
    assert len({look.marker for look in kls}) == 3 and len({look.markevery[0] for look in kls}) == 3
    (log_k,) = [line for line in ax.get_lines() if line.get_label().startswith("_")]  # the axhline
    curves = [line for line in ax.get_lines() if line is not log_k]
    assert len(curves) == 6
    assert log_k.get_linewidth() > 2 * max(c.get_linewidth() for c in curves) and log_k.get_alpha() < 0.5
    assert {c.get_marker() for c in curves if "KL" in c.get_label()} == {"v", "s", "^"}
