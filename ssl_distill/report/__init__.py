"""``ssl-distill report``: one figure and one Markdown table for one or several run directories.

The figure (:mod:`.figure`) draws loss terms, the collapse monitors, the schedules, images/s and the
online k-NN against step and against wall-clock, several runs overlaid; the table (:mod:`.table`)
lists each run's results and config differences. Runs are read as they stand (:mod:`.runs`): a
run still going, or one written by an older version (missing fields become notes). Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .runs import RunData, read_run

__all__ = ["Report", "RunData", "read_run", "write_report"]


@dataclass
class Report:
    """Where the report went: ``figure`` (PNG), ``table`` (Markdown, beside it) and the Markdown text."""

    figure: Path
    table: Path
    markdown: str
    runs: list[RunData]


def _names(paths: list[Path], names: list[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(paths):
            raise ValueError(f"--names gives {len(names)} name(s) for {len(paths)} run(s): give one per run")
        return names
    short = [p.resolve().name for p in paths]
    if len(set(short)) == len(short):
        return short
    return [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]  # e.g. two runs/<x>/run folders


def _why_empty(path: Path) -> str:
    """Why the run directory ``path`` gives no curve: no log yet, or a folder of runs given instead of one."""
    log = path / "log.jsonl"
    why = f"{path} has {'no training records in its log.jsonl' if log.is_file() else 'no log.jsonl'}"
    runs = sorted(p.parent.name for p in path.glob("*/log.jsonl"))
    if runs:
        return f"{why}, but its subfolders {', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''} have one: give those"
    return why + (" (the run has not logged its first step)" if (path / "config.yaml").is_file() else
                  " (not a run directory?)")


def write_report(run_dirs: list[str | Path], out: str | Path | None = None, names: list[str] | None = None,
                 dpi: int = 110) -> Report:
    """Read ``run_dirs``, draw the figure to ``out`` (default ``<run>/report.png`` for one run,
    ``./report.png`` for several) and write the Markdown table beside it (same name, ``.md``). DataError, and
    nothing written, when no run has a record to draw (an empty folder, a run not started, a folder of runs)."""
    from .figure import draw_report  # matplotlib: only when drawing
    from .table import markdown

    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("report: give at least one run directory")
    figure = Path(out) if out is not None else (paths[0] / "report.png" if len(paths) == 1 else Path("report.png"))
    if figure.suffix.lower() != ".png":
        raise ValueError(f"report: the figure is a PNG file; --out {figure} should end in .png")
    runs = [read_run(p, n) for p, n in zip(paths, _names(paths, names))]
    if not any(run.train or run.knn for run in runs):
        raise DataError(f"report: nothing to draw yet: {'; '.join(_why_empty(run.path) for run in runs)}")
    draw_report(runs, figure, dpi)
    text = markdown(runs, figure.name)
    table = figure.with_suffix(".md")
    table.write_text(text)
    return Report(figure, table, text, runs)
