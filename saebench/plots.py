"""The plots that reports and leaderboards draw: L0 frontiers, per-layer curves, intervals.

Every figure is a `matplotlib.figure.Figure` drawn on an Agg canvas, never through pyplot,
so no display is needed, the process-wide backend is left alone and no figure stays open
after it is saved. Each function saves one PNG (`DPI` dots per inch, `SIZE` inches: 900 px
wide, readable when GitHub scales it to 800) and returns its path.

    >>> frontier_plot(table, "l0", "ce_loss_recovered[zero]", Path("out/frontier.png"))
    PosixPath('out/frontier.png')

Intervals come from columns named after the value: `<y>_ci_low` / `<y>_ci_high`. The
helpers `layer_of` and `family_of` turn hook and dictionary names into the layer and
family that per-layer curves are drawn along. No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from itertools import cycle
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, ScalarFormatter

DPI = 120
SIZE = (7.5, 4.8)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
"""matplotlib's tab10 colours, cycled over groups."""
LABEL_SIZE = 7.5
_LABEL_OFFSETS = ((6, 3), (6, -11), (-6, 3), (-6, -11), (6, 13), (6, -21), (-6, 13),
                  (-6, -21), (6, 23), (6, -31))
"""Candidate offsets (points) of a Pareto label from its point, tried in turn until its box
overlaps no label placed before (else the last is used)."""
_SEPARATORS = "-_./: "
_HOOK = re.compile(r"blocks\.(\d+)\.[\w.]+")
_LAYER_LABEL = re.compile(r"layer (\d+)(?: \(.*\))?")
"""`layer 12 (hook not stated)`: a SAEBench import whose file states its layer, not its hook
(`saebench.saebench_core_fields`)."""


# --------------------------------------------------------------------------- names


def layer_of(hook: str) -> int | None:
    """The block index of a TransformerLens hook name (or of a `layer <n> (…)` label); None
    for a hook outside the blocks (`hook_embed`, `ln_final.hook_normalized`) or several hooks
    joined with commas.

    >>> [layer_of(h) for h in ("blocks.3.hook_resid_pre", "blocks.1.attn.hook_z", "hook_embed")]
    [3, 1, None]
    >>> layer_of("layer 12 (hook not stated)")
    12
    """
    if not isinstance(hook, str):
        return None
    match = _HOOK.fullmatch(hook.strip()) or _LAYER_LABEL.fullmatch(hook.strip())
    return int(match.group(1)) if match else None


def family_of(dictionary: str, hook: str) -> str:
    """A dictionary's family: its name with the part naming its layer removed, so that one
    family's dictionaries at several layers can be drawn as one curve.

    The layer part is `L<n>`, `layer<n>`, `layers.<n>`, `blocks.<n>` and the like, with `n`
    the hook's layer, between separators (`-_./:` or space). A name that is only the layer
    part gives the hook's kind; a name without one, or a hook outside the blocks, is kept.

    >>> family_of("resid-L2-topk16", "blocks.2.hook_resid_pre")
    'resid-topk16'
    >>> family_of("blocks.5.hook_resid_pre", "blocks.5.hook_resid_pre")
    'hook_resid_pre'
    >>> family_of("gemma-scope-2b-pt-res/layer_12/width_16k", "blocks.12.hook_resid_post")
    'gemma-scope-2b-pt-res/width_16k'
    """
    layer = layer_of(hook)
    if layer is None:
        return dictionary
    sep = re.escape(_SEPARATORS)
    token = rf"(?i)(?<![^{sep}])(?:layers?|blocks?|l)[{sep}]?0*{layer}(?:[{sep}]+|$)"
    family = re.sub(token, "", dictionary, count=1).rstrip(_SEPARATORS)
    return family or hook.strip().removeprefix(f"blocks.{layer}.")


# --------------------------------------------------------------------------- the front


def pareto_front(frame: pd.DataFrame, x: str, y: str, *, x_lower_better: bool = True,
                 y_higher_better: bool = True) -> pd.Series:
    """Which rows no other row beats: at least as good on both axes and better on one.

    Equal points do not beat each other (both stay on the front); a row with a missing x or
    y is never on the front and beats nothing. Returns a boolean Series on `frame`'s index.

    >>> table = pd.DataFrame({"l0": [4, 8, 8, 16], "ce": [0.7, 0.9, 0.8, 0.9]})
    >>> pareto_front(table, "l0", "ce").tolist()
    [True, True, False, False]
    """
    xs = _numbers(frame[x]) * (1 if x_lower_better else -1)
    ys = _numbers(frame[y]) * (-1 if y_higher_better else 1)
    known = ~(np.isnan(xs) | np.isnan(ys))
    a, b = xs[known], ys[known]
    as_good = (a[:, None] <= a[None, :]) & (b[:, None] <= b[None, :])
    better = (a[:, None] < a[None, :]) | (b[:, None] < b[None, :])
    front = np.zeros(len(frame), dtype=bool)
    front[np.flatnonzero(known)] = ~(as_good & better).any(axis=0)
    return pd.Series(front, index=frame.index, name="pareto")


def _numbers(column: pd.Series) -> np.ndarray:
    """A column as float64 with NaN for anything missing or not a number."""
    return pd.to_numeric(column, errors="coerce").astype("float64").to_numpy()


# --------------------------------------------------------------------------- figures


def _figure(height: float = SIZE[1]) -> tuple[Figure, Axes]:
    """A figure `SIZE[0]` inches wide on an Agg canvas, with one axes and a light grid."""
    figure = Figure(figsize=(SIZE[0], height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.grid(True, color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    return figure, axes


def _save(figure: Figure, path: Path) -> Path:
    """Write the figure as a PNG (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _groups(frame: pd.DataFrame, group: str | None) -> Iterator[tuple[str, str | None,
                                                                      pd.DataFrame]]:
    """(colour, group name, rows) per value of `group` in order of appearance; one unnamed
    group when `group` is None."""
    parts = [(None, frame)] if group is None else [
        (str(name), rows) for name, rows in frame.groupby(group, sort=False, dropna=False)]
    for colour, (name, rows) in zip(cycle(PALETTE), parts):
        yield colour, name, rows


def _interval(frame: pd.DataFrame, value: str, low: str, high: str) -> np.ndarray:
    """The [2, n] distances from each value down to `low` and up to `high` (0 if missing)."""
    values = _numbers(frame[value])
    below = np.nan_to_num(values - _numbers(frame[low])).clip(min=0)
    above = np.nan_to_num(_numbers(frame[high]) - values).clip(min=0)
    return np.vstack([below, above])


def _has_interval(frame: pd.DataFrame, value: str) -> bool:
    return {f"{value}_ci_low", f"{value}_ci_high"} <= set(frame.columns)


def _no_data(axes: Axes) -> None:
    axes.text(0.5, 0.5, "no data", transform=axes.transAxes, ha="center", va="center",
              color="grey")


def _legend(axes: Axes, extra: Sequence[Line2D] = ()) -> None:
    """A small legend of the labelled artists (plus `extra` handles), when there are any."""
    handles, _ = axes.get_legend_handles_labels()
    if handles or extra:
        axes.legend(handles=[*handles, *extra], fontsize=8, loc="best", framealpha=0.85)


# --------------------------------------------------------------------------- frontier


def frontier_plot(frame: pd.DataFrame, x: str, y: str, path: Path, *, label: str = "dictionary",
                  group: str | None = "hook", title: str = "", x_label: str | None = None,
                  y_label: str | None = None, y_higher_better: bool = True) -> Path:
    """A scatter of `y` against `x` (lower x is better: L0), one colour per `group` value,
    the Pareto-optimal points of each group as stars joined by a step line and labelled with
    their `label` text; error bars from `<y>_ci_low`/`<y>_ci_high` when the frame has them.
    The x axis is logarithmic when its (positive) values span more than a factor 10.

    >>> frontier_plot(table, "l0", "kl_div_score[zero]", Path("kl.png"), group=None)
    """
    figure, axes = _figure()
    data = frame[frame[x].notna() & frame[y].notna()]
    fronts = [_draw_front(axes, rows, x, y, colour, name, y_higher_better)
              for colour, name, rows in _groups(data, group)]
    values = _numbers(data[x])
    if len(values) and values.min() > 0 and values.max() > 10 * values.min():
        axes.set_xscale("log")
        axes.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(NullFormatter())
    if fronts:
        best = pd.concat(fronts)
        _place_labels(axes, best[x], best[y], best[label].astype(str))
    if data.empty:
        _no_data(axes)
    axes.set(xlabel=x_label or x, ylabel=y_label or y, title=title)
    star = Line2D([], [], marker="*", color="black", linestyle="-", markersize=10,
                  label="Pareto-optimal")
    _legend(axes, [star])
    return _save(figure, path)


def _draw_front(axes: Axes, rows: pd.DataFrame, x: str, y: str, colour: str,
                name: str | None, y_higher_better: bool) -> pd.DataFrame:
    """One group of a frontier plot: error bars, points, and its front as stars joined by a
    step line; returns the front's rows."""
    front = pareto_front(rows, x, y, y_higher_better=y_higher_better)
    if _has_interval(rows, y):
        axes.errorbar(rows[x], rows[y], yerr=_interval(rows, y, f"{y}_ci_low", f"{y}_ci_high"),
                      fmt="none", ecolor=colour, alpha=0.6, elinewidth=1, capsize=2)
    axes.scatter(rows.loc[~front, x], rows.loc[~front, y], color=colour, s=28, alpha=0.6)
    best = rows[front].sort_values(x, kind="stable")
    axes.step(best[x], best[y], where="post", color=colour, linewidth=1.4, label=name)
    axes.scatter(best[x], best[y], color=colour, marker="*", s=160, edgecolors="black",
                 linewidths=0.6, zorder=3)
    return best


def _place_labels(axes: Axes, xs: pd.Series, ys: pd.Series, texts: pd.Series) -> None:
    """Label points, each at the first offset whose box (estimated from the text's length,
    in display pixels) overlaps no label placed before."""
    axes.autoscale_view()
    scale = DPI / 72
    placed: list[tuple[float, float, float, float]] = []
    for x, y, text in zip(xs, ys, texts, strict=True):
        px, py = axes.transData.transform((x, y))
        width, height = 0.6 * LABEL_SIZE * len(text) * scale, 1.2 * LABEL_SIZE * scale
        for dx, dy in _LABEL_OFFSETS:
            left = px + dx * scale - (width if dx < 0 else 0)
            box = (left, py + dy * scale, left + width, py + dy * scale + height)
            if not any(_overlap(box, other) for other in placed):
                break
        placed.append(box)
        axes.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                      fontsize=LABEL_SIZE, ha="right" if dx < 0 else "left", va="bottom")


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Whether two boxes (left, bottom, right, top) overlap."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# --------------------------------------------------------------------------- layers


def layer_curves(frame: pd.DataFrame, path: Path, *, metric: str, layer: str = "layer",
                 family: str = "family", title: str = "") -> Path:
    """One line per dictionary family across (integer) layers, the 95% interval as a band
    when `<metric>_ci_low`/`<metric>_ci_high` exist.

    >>> layer_curves(table.assign(layer=[0, 1], family="resid-topk16"), Path("layers.png"),
    ...              metric="ce_loss_recovered[zero]")
    """
    figure, axes = _figure()
    data = frame[frame[layer].notna() & frame[metric].notna()]
    for colour, name, rows in _groups(data, family):
        rows = rows.assign(**{layer: _numbers(rows[layer])}).sort_values(layer, kind="stable")
        axes.plot(rows[layer], rows[metric], marker="o", color=colour, label=name)
        if _has_interval(rows, metric):
            axes.fill_between(rows[layer], _numbers(rows[f"{metric}_ci_low"]),
                              _numbers(rows[f"{metric}_ci_high"]), color=colour, alpha=0.2,
                              linewidth=0)
    if data.empty:
        _no_data(axes)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(xlabel="layer", ylabel=metric, title=title)
    _legend(axes)
    return _save(figure, path)


def bucket_curves(frame: pd.DataFrame, path: Path, *, value: str = "value",
                  label: str = "check_id", bucket: str = "bucket", title: str = "",
                  y_label: str = "value") -> Path:
    """One line per `label` across the buckets of a breakdown (in their order of
    appearance, e.g. token positions 0, 1, 2-3, 4-7, ...), the 95% interval as a band.

    >>> bucket_curves(breakdown, Path("by-position.png"), title="delta_ce by position")
    """
    figure, axes = _figure()
    buckets = list(dict.fromkeys(frame[bucket].astype(str)))
    data = frame[frame[value].notna()]
    for colour, name, rows in _groups(data, label):
        xs = rows[bucket].astype(str).map(buckets.index).to_numpy()
        axes.plot(xs, _numbers(rows[value]), marker="o", color=colour, label=name)
        if _has_interval(rows.rename(columns={"ci_low": f"{value}_ci_low",
                                              "ci_high": f"{value}_ci_high"}), value):
            axes.fill_between(xs, _numbers(rows["ci_low"]), _numbers(rows["ci_high"]),
                              color=colour, alpha=0.2, linewidth=0)
    if data.empty:
        _no_data(axes)
    axes.set_xticks(range(len(buckets)), buckets, fontsize=8, rotation=30)
    axes.set(xlabel=bucket, ylabel=y_label, title=title)
    _legend(axes)
    return _save(figure, path)


# --------------------------------------------------------------------------- intervals


def interval_bars(frame: pd.DataFrame, path: Path, *, label: str, value: str, low: str,
                  high: str, group: str | None = None, title: str = "",
                  reference: float | None = None) -> Path:
    """A dot with its interval as a horizontal whisker per `label` (top to bottom in order
    of appearance), dots of each `group` value (e.g. task) in their own colour side by side,
    and a dashed vertical line at `reference` (e.g. 1.0 for "recovered").

    >>> interval_bars(table, Path("tasks.png"), label="dictionary", value="value",
    ...               low="ci_low", high="ci_high", group="task", reference=1.0)
    """
    labels = list(dict.fromkeys(frame[label].astype(str)))
    figure, axes = _figure(height=max(2.5, 0.35 * len(labels) + 1.4))
    parts = list(_groups(frame, group))
    for index, (colour, name, rows) in enumerate(parts):
        shift = (index - (len(parts) - 1) / 2) * 0.7 / len(parts)
        ys = rows[label].astype(str).map(labels.index).to_numpy() + shift
        axes.errorbar(rows[value], ys, xerr=_interval(rows, value, low, high), fmt="o",
                      color=colour, markersize=4, capsize=2, label=name)
    if reference is not None:
        axes.axvline(reference, color="grey", linestyle="--", linewidth=1)
    if frame.empty:
        _no_data(axes)
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.set_ylim(len(labels) - 0.5, -0.5)
    axes.set(xlabel=value, title=title)
    _legend(axes)
    return _save(figure, path)
