"""The report's Markdown: each run's results and where the runs' configs differ (torch-free)."""
from __future__ import annotations

import math
from typing import Any

from ..config import Config, config_to_dict
from .runs import RunData

__all__ = ["config_differences", "flatten", "markdown"]

_MISSING = "—"
# keys that differ between any two runs without saying anything about the method
_IGNORED = frozenset({"run.output_dir"})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if v is None:
        return "null"
    return str(v).replace("|", "\\|")


def config_differences(runs: list[RunData]) -> tuple[str, list[str], dict[str, list[str]]]:
    """(caption, keys, {key: value per run}) of the config keys that differ.

    Several runs: the keys whose values differ between them (``run.output_dir`` aside). One run: the
    keys it sets away from the defaults of :mod:`ssl_distill.config`. A config written by an older
    version gets today's defaults for the keys it lacks, so only real differences show.
    """
    defaults = flatten(config_to_dict(Config()))
    flat = [None if r.config is None else {**defaults, **flatten(r.config)} for r in runs]
    if len(runs) == 1:
        mine = flat[0] or {}
        keys = [k for k in mine if k not in _IGNORED and (k not in defaults or mine[k] != defaults[k])]
        caption = "Config: keys set away from the defaults (ssl_distill/config.py)"
        return caption, keys, {k: [_value(mine[k]), _value(defaults.get(k))] for k in keys}
    known = [f for f in flat if f is not None]
    every = {k for f in known for k in f} - _IGNORED
    keys = [k for k in every if len({repr(f.get(k, _MISSING)) for f in known}) > 1]
    order = {k: i for i, k in enumerate(defaults)}
    keys.sort(key=lambda k: (order.get(k, len(order)), k))
    rows = {k: [_MISSING if f is None else _value(f.get(k, _MISSING)) for f in flat] for k in keys}
    return "Config differences between the runs", keys, rows


def _number(v: float | None, fmt: str = "{:.2f}") -> str:
    return _MISSING if v is None or not math.isfinite(v) else fmt.format(v)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return _MISSING
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.2f} h"


def _epochs(run: RunData) -> str:
    epochs = run.epochs_done()
    return _number(epochs, "{:.2f}") if epochs is not None else ("< 1" if run.train else _MISSING)


def _knn_cost(run: RunData, seconds: float | None) -> str:
    """Seconds spent in online k-NN, and their share of the run's wall-clock time."""
    spent = sum(r["knn_seconds"] for r in run.knn if isinstance(r.get("knn_seconds"), (int, float)))
    if not run.knn:
        return _MISSING
    share = f" ({100 * spent / seconds:.1f}%)" if seconds else ""
    return f"{_duration(spent)}{share}"


def _results_rows(runs: list[RunData]) -> list[str]:
    evaluations = list(dict.fromkeys(name for r in runs for name in r.results))  # k-NN, linear, CorLoc
    header = ["run", "steps", "epochs", "wall-clock", "loss (last)", "teacher entropy / log K",
              "online k-NN top-1 (last)", "online k-NN time", *[f"{name} top-1" if "CorLoc" not in name else name for name in evaluations]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in runs:
        last = r.train[-1] if r.train else {}
        clock = [s for s in (r.seconds.get("train") or []) + (r.seconds.get("knn") or []) if s is not None]
        entropy, k = r.last("teacher_entropy"), r.out_dim
        ratio = None if entropy is None or not k or k < 2 else entropy / math.log(k)
        knn_key = r.knn_key()
        online = None
        if knn_key is not None:
            steps, values = r.series(knn_key, "knn")
            online = f"{values[-1]:.2f}% (k={knn_key.rsplit('k', 1)[1]}, step {int(steps[-1])})" if values else None
        cells = [r.name, _number(last.get("step"), "{:.0f}"), _epochs(r),
                 _duration(max(clock) if clock else None), _number(r.last("loss"), "{:.4f}"),
                 _number(ratio, "{:.3f}"), online or _MISSING, _knn_cost(r, max(clock) if clock else None),
                 *[_number(r.results.get(name), "{:.2f}%") for name in evaluations]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(runs: list[RunData], figure_name: str) -> str:
    """The report's Markdown: the figure, each run's results, the config differences and the notes."""
    lines = [f"# Training report: {', '.join(r.name for r in runs)}", "", f"![report]({figure_name})", "",
             "## Results", "", *_results_rows(runs), ""]
    caption, keys, rows = config_differences(runs)
    lines += [f"## {caption}", ""]
    if not keys:
        lines += ["(none)", ""]
    else:
        columns = ["this run", "default"] if len(runs) == 1 else [r.name for r in runs]
        lines += ["| key | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
        lines += [f"| `{k}` | " + " | ".join(rows[k]) + " |" for k in keys]
        lines.append("")
    notes = [n for r in runs for n in r.notes]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)
