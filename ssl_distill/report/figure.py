"""The report figure: one row per quantity, against step (left) and running wall-clock time (right).

Rows: loss terms; the collapse monitors (teacher entropy and KL of the mean teacher output to
uniform, with log K marked: entropy -> log K is collapse to uniform, KL -> log K collapse to one
prototype; for the [CLS] teacher and, where the run logs them, the [OBJ] and patch teachers);
learning rate and weight decay; EMA momentum and teacher temperature; images/s; online k-NN top-1;
and, when a run trains with Gram anchoring, its monitors: the mean cosine similarity of two patches
of one view for the student and the Gram teacher (-> 1: every patch the same feature, dense collapse),
beside the Gram weight. One colour per run (figure legend), one line style per quantity (panel legend;
the KL monitors also carry a marker each, so that two of them near 0 stay apart, and log K is a wide pale
band no curve looks like). The panel legend goes on the panel's top axes, where neither y axis's curves
run. Matplotlib's object API only (no pyplot state), so it draws in any process, display or not.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .runs import GRAM_MONITORS, TEACHER_PREFIXES, RunData

__all__ = ["GRAM_ROW", "ROWS", "draw_report"]

_STYLES = ("-", "--", ":", "-.")
#: a matplotlib line style: a name ("-", "--", ...) or (offset, (on, off, ...)) dashes
LineStyle = str | tuple[int, tuple[int, ...]]


class Look(NamedTuple):
    """How a quantity is drawn, and shown in the panel legend: a line style, and a marker spaced along the
    curve (``markevery``: start and spacing as fractions of the axes' diagonal; None: at every point) or none."""

    style: LineStyle
    marker: str | None = None
    markevery: tuple[float, float] | None = None


#: what a drawer returns: the panel legend's entries, (name, look) of each quantity drawn
Legend = list[tuple[str, Look]]
Drawer = Callable[[Axes, list[RunData], list[str], str, float], Legend]


def _plot(ax: Axes, run: RunData, key: str, x: str, scale: float, color: str, look: Look, label: str,
          records: str = "train") -> bool:
    xs, ys = run.series(key, records, x)
    if not xs:
        return False
    xs = [v / scale for v in xs] if x == "seconds" else xs
    few = len(xs) < 3
    ax.plot(xs, ys, linestyle=look.style, color=color, label=label, marker=look.marker or ("o" if few else None),
            markevery=None if few else look.markevery, markersize=4, linewidth=1.4)
    return True


def _loss(ax: Axes, runs: list[RunData], colors: list[str], x: str, scale: float) -> Legend:
    looks: dict[str, Look] = {}
    drawn = False
    for run, color in zip(runs, colors):
        terms = run.loss_terms()
        # a single term equals the loss up to its weight: draw the loss alone
        shown = terms if len([t for t in terms if t != "loss"]) > 1 else [t for t in terms if t == "loss"]
        for term in shown:
            look = looks.setdefault(term, Look(_STYLES[len(looks) % len(_STYLES)]))
            drawn |= _plot(ax, run, term, x, scale, color, look, term)
    ax.set_ylabel("loss")
    return list(looks.items()) if drawn else []


#: how each teacher of ``TEACHER_PREFIXES`` is drawn: (legend name, entropy look, KL look). The KL monitors
#: often lie together near 0, where line styles cannot be told apart: each has its own marker, at staggered
#: places along the curve
_TEACHER_STYLES = (("teacher", Look("-"), Look("--", "v", (0.0, 0.09))),
                   ("[OBJ] teacher", Look("-."), Look(":", "s", (0.03, 0.09))),
                   ("patch teacher", Look((0, (5, 1, 1, 1, 1, 1))), Look((0, (1, 3)), "^", (0.06, 0.09))))


def _collapse(ax: Axes, runs: list[RunData], colors: list[str], x: str, scale: float) -> Legend:
    legend = []
    for prefix, (name, entropy_look, kl_look) in zip(TEACHER_PREFIXES, _TEACHER_STYLES, strict=True):
        entropy = kl = False
        for run, color in zip(runs, colors):
            entropy |= _plot(ax, run, f"{prefix}teacher_entropy", x, scale, color, entropy_look, f"{name} entropy")
            kl |= _plot(ax, run, f"{prefix}teacher_kl_uniform", x, scale, color, kl_look,
                        f"KL(mean {name} || uniform)")
        legend += ([(f"{name} entropy", entropy_look)] if entropy else []) + (
            [(f"KL(mean {name} || uniform)", kl_look)] if kl else [])
    if legend:
        for k in sorted({r.out_dim for r in runs if r.out_dim and r.out_dim > 1}):
            # a wide pale band: no curve or legend entry looks like it
            ax.axhline(math.log(k), color="0.35", alpha=0.25, linewidth=4, solid_capstyle="butt")
            ax.annotate(f"log K = {math.log(k):.2f} (K = {k})", (0.005, math.log(k)), xycoords=("axes fraction", "data"),
                        fontsize=7, color="0.3", va="bottom")
    ax.set_ylabel("nats")
    return legend


def _pair(left: str, right: str, left_label: str, right_label: str) -> Drawer:
    """Two quantities of different scales: ``left`` solid on the left axis, ``right`` dashed on the right."""

    def draw(ax: Axes, runs: list[RunData], colors: list[str], x: str, scale: float) -> Legend:
        twin = ax.twinx()
        twin.ticklabel_format(axis="y", useOffset=False)  # 0.9995, not 1e-5 + 9.99e-1
        a = b = False
        for run, color in zip(runs, colors):
            a |= _plot(ax, run, left, x, scale, color, Look("-"), left_label)
            b |= _plot(twin, run, right, x, scale, color, Look("--"), right_label)
        ax.set_ylabel(left_label)
        if b:
            twin.set_ylabel(right_label)
        else:
            twin.set_yticks([])
        return ([(left_label, Look("-"))] if a else []) + ([(f"{right_label} (right axis)", Look("--"))] if b else [])

    return draw


def _gram(ax: Axes, runs: list[RunData], colors: list[str], x: str, scale: float) -> Legend:
    """Gram anchoring's monitors (student solid, Gram teacher dashed) and its weight (dotted, right axis)."""
    twin = ax.twinx()
    names = ("student", "Gram teacher")
    drawn = {name: False for name in (*names, "weight")}
    for run, color in zip(runs, colors):
        for key, name, style in zip(GRAM_MONITORS, names, ("-", "--")):
            drawn[name] |= _plot(ax, run, key, x, scale, color, Look(style), name)
        drawn["weight"] |= _plot(twin, run, "gram_weight", x, scale, color, Look(":"), "Gram weight")
    ax.set_ylabel("mean patch cosine similarity")
    twin.set_ylabel("Gram weight")
    return [(label, Look(style)) for label, style, key in (
        ("student patches", "-", "student"), ("Gram teacher patches", "--", "Gram teacher"),
        ("Gram weight (right axis)", ":", "weight")) if drawn[key]]


def _images(ax: Axes, runs: list[RunData], colors: list[str], x: str, scale: float) -> Legend:
    drawn = False
    for run, color in zip(runs, colors):
        drawn |= _plot(ax, run, "images_per_s", x, scale, color, Look("-"), "images/s")
    ax.set_ylabel("images/s (training)")
    return [("images/s", Look("-"))] if drawn else []


def _knn(ax: Axes, runs: list[RunData], colors: list[str], x: str, scale: float) -> Legend:
    labels: set[str] = set()
    for run, color in zip(runs, colors):
        key = run.knn_key()
        if key is not None and _plot(ax, run, key, x, scale, color, Look("-", "o"), key, records="knn"):
            layout = run.knn[-1].get("knn_layout", "cls")  # the token the features read: [CLS] or [OBJ]
            labels.add(f"top-1, k = {key.rsplit('k', 1)[1]}" + ("" if layout == "cls" else f", {layout} features"))
    ax.set_ylabel("online k-NN top-1 (%)")
    return [(label, Look("-", "o")) for label in sorted(labels)]


#: (title, drawer) of each row
ROWS: tuple[tuple[str, Drawer], ...] = (
    ("loss terms", _loss),
    ("collapse monitors", _collapse),
    ("learning rate and weight decay", _pair("lr", "wd", "learning rate", "weight decay")),
    ("EMA momentum and teacher temperature", _pair("momentum", "teacher_temp", "EMA momentum", "teacher temperature")),
    ("throughput", _images),
    ("online k-NN (teacher)", _knn),
)
#: drawn after :data:`ROWS` when a run logs Gram anchoring's monitors
GRAM_ROW = ("Gram anchoring", _gram)


def _panel_legend(ax: Axes, legend: Legend) -> None:
    """The legend of the panel of ``ax``, on its top axes (a right-axis twin, when there is one: its curves
    are drawn over whatever lies below), where no curve of either axes runs (matplotlib's ``best`` place
    weighs the curves of the axes the legend belongs to: the others' join them as invisible stand-ins)."""
    panel = [ax, *(a for a in ax.figure.axes if a is not ax and ax.get_shared_x_axes().joined(ax, a))]  # its twin last
    top = panel[-1]
    for below in panel[:-1]:
        for line in below.get_lines():
            top.add_artist(Line2D(*line.get_data(), transform=line.get_transform(), visible=False))
    handles = [Line2D([], [], color="0.2", linestyle=look.style, marker=look.marker, markersize=4)
               for _, look in legend]
    top.legend(handles, [name for name, _ in legend], fontsize=7, loc="best")


def draw_report(runs: list[RunData], path: Path, dpi: int = 110) -> Path:
    """Draw every row of :data:`ROWS` (and :data:`GRAM_ROW` where it has data) for ``runs`` and save the
    figure to ``path`` (PNG)."""
    seconds = [s for r in runs for part in r.seconds.values() for s in part if s is not None]
    hours = bool(seconds) and max(seconds) >= 7200
    scale, unit = (3600.0, "hours") if hours else (60.0, "minutes")
    colors = [f"C{i % 10}" for i in range(len(runs))]
    rows = ROWS + ((GRAM_ROW,) if any(run.series(GRAM_MONITORS[0])[0] for run in runs) else ())
    fig = Figure(figsize=(14, 3.0 * len(rows) + 1.2), dpi=dpi, layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for row, (title, draw) in enumerate(rows):
        for col, (x, xlabel) in enumerate((("step", "step"), ("seconds", f"wall-clock ({unit}, pauses removed)"))):
            ax = axes[row][col]
            ax.ticklabel_format(axis="y", useOffset=False)
            legend = draw(ax, runs, colors, x, scale)
            ax.set_title(f"{title} vs {'step' if x == 'step' else 'wall-clock'}", fontsize=10, loc="left")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.grid(alpha=0.3)
            if not legend:
                ax.text(0.5, 0.5, "no data in the log", transform=ax.transAxes, ha="center", va="center", color="0.5")
            elif col == 0 and (len(legend) > 1 or len(runs) == 1):
                _panel_legend(ax, legend)
    handles = [Line2D([], [], color=c, linewidth=2.5) for c in colors]
    fig.legend(handles, [r.name for r in runs], loc="outside upper center", ncols=min(len(runs), 6), fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
