"""Result rows -> a Markdown report (`report.md` of a run directory) and its plots.

The report reads top-down like a review: what needs attention (failed, regressed, errored
checks), one matrix of the key metrics per dictionary, the plots, then every check folded
per dictionary, the worst prompts, the feature tables (ablations, fidelity, clamps) and the
feature cards. The rows come from `saebench.results`; `render_report` is a pure function of
the run's files (plots are referenced by path), `write_report` draws the plots into `plots/`
and writes report.md.

    >>> write_report(Path("reports/20261201-153000-ab12"))  # .../report.md
"""

from __future__ import annotations

import argparse
import html
import json
import math
import numbers
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from saebench import plots, verdicts
from saebench.results import (
    BREAKDOWN_COLUMNS,
    BREAKDOWN_FILE,
    FEATURE_COLUMNS,
    FEATURES_FILE,
    PER_PROMPT_BASE_COLUMNS,
    RESULTS_FILE,
    atomic_write,
    is_missing,
    read_per_prompt,
    read_results,
    read_table,
)

REPORT_FILE = "report.md"
BASELINE_FILE = "baseline.json"
PLOTS_DIR = "plots"

VERDICT_MARKS = verdicts.MARKS
VERDICT_MEANINGS = verdicts.MEANINGS
UNKNOWN_MARK = verdicts.UNKNOWN_MARK
FINE_VERDICTS = verdicts.FINE
"""Verdicts that need no attention (`saebench.verdicts`); every other one (fail,
regression, error, empty, unstable, xpass, or one this version does not know) is listed
under "What needs attention"."""
MATRIX_COLUMNS: dict[str, str] = {
    "l0": "L0",
    "ce_loss_recovered[zero]": "loss rec.",
    "kl_div_score[zero]": "KL score",
    "explained_variance": "EV",
}
"""Metric keys of the summary matrix and their column titles; one `LD <task>` column
(`logit_diff_recovered[<task>]`) per task follows."""
TASK_METRIC = "logit_diff_recovered"
FRONTIER_Y = "ce_loss_recovered[zero]"
"""The metric key of the frontier's y axis and of the per-layer curves."""
LOSS_RECOVERED = "loss recovered (zero ablation)"
LAYER_ERROR = "normalised MSE vs the clean model"
TASK_VALUE = "logit-diff recovered"
"""Column names of the plot frames, which the plots show as axis labels."""

_PROVENANCE = {
    "saebench_version": "saebench", "saebench_commit": "commit",
    "sae_lens_version": "sae_lens", "transformer_lens_version": "transformer_lens",
    "torch_version": "torch", "device": "device", "dtype": "dtype", "token_set": "token set",
    "seed": "seed",
}
_MESSAGE_WIDTH = 80
_REASON_WIDTH = 160
_PARTS_WIDTH = 40
_PROMPT_WIDTH = 100
_MISSING_UNFOLDED = 10
_NA = "—"
_DELTA_HEADER = "Δ vs baseline"
_DELTA_NOTE = ("Δ vs baseline: new − baseline, oriented so that positive is better, its 95% "
               "interval (paired over the same sequences unless marked), and the verdict of "
               "the comparison.")
_ABLATION_TABLES = ("", "ablation")
"""`table` values of feature-ablation rows in features.csv ("": written before the column)."""
_LOWEST_CORRELATIONS = 10
_MARKDOWN_ACTIVE = re.compile(r"[\\`*_\[\]<>|~#&$]")
_RESTATED = re.compile(r"(?P<metric>\S+) = \S+ (\[[^\]]*\]|no interval) \(n=[^)]*\) ")
"""The start of a message that restates a row's value, interval and n (`checks.judge`)."""
_RESTATED_BASELINE = re.compile(
    r"(^|; )vs baseline \S+: Δ = [^→]* → (same|improved|regression|noisy)$")
"""The baseline comparison appended to a message (`gate.judge`), restated by the vs-baseline
column."""


# --------------------------------------------------------------------------- ids and values


def format_value(value: Any) -> str:
    """A number for a report: 4 significant digits, scientific when tiny or huge, "—" if missing.

    >>> [format_value(v) for v in (0.912345, 1234.56, 1.5e-6, 2.5e7, 12, float("nan"), None)]
    ['0.9123', '1235', '1.500e-06', '2.500e+07', '12', '—', '—']
    """
    if is_missing(value) or (isinstance(value, str) and not value):
        return _NA
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if not isinstance(value, float):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return str(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"


def format_ci(low: Any, high: Any) -> str:
    """A 95% interval as `[lo, hi]`; "—" when both bounds are missing.

    >>> format_ci(0.81234, 0.9), format_ci(float("nan"), float("nan"))
    ('[0.8123, 0.9]', '—')
    """
    if is_missing(low) and is_missing(high):
        return _NA
    return f"[{format_value(low)}, {format_value(high)}]"


def format_delta(value: Any) -> str:
    """A difference to 2 significant digits with its sign, so that "+" reads as better.

    >>> format_delta(0.0001234), format_delta(-2.0), format_delta(0.0), format_delta(None)
    ('+0.00012', '-2', '0', '—')
    """
    if is_missing(value):
        return _NA
    return "0" if float(value) == 0 else f"{float(value):+.2g}"


def split_check_id(check_id: str) -> tuple[str, str]:
    """(dictionary set, metric key) of a check id `<set>::<key>`; the set is "" without `::`.

    >>> split_check_id("resid-L0-topk16::ce_loss_recovered[zero]")
    ('resid-L0-topk16', 'ce_loss_recovered[zero]')
    """
    head, _, key = check_id.rpartition("::")
    return head, key


def _with_keys(results: pd.DataFrame) -> pd.DataFrame:
    """The rows with `set` (dictionary set: the check id's head, else the dictionary) and
    `key` (metric key) columns added."""
    pairs = [split_check_id(c) for c in results["check_id"]]
    sets = [s or d for (s, _), d in zip(pairs, results["dictionary"], strict=True)]
    return results.assign(set=sets, key=[k for _, k in pairs])


# --------------------------------------------------------------------------- Markdown


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell: `|` escaped, line breaks shown as ↵."""
    text = str(value).replace("|", "\\|").replace("\r\n", "↵")
    return text.replace("\n", "↵").replace("\r", "↵")


def _table(rows: list[list[Any]], headers: list[str], right: Sequence[str] = ()) -> str:
    """A GitHub-flavoured Markdown table; columns named in `right` are right-aligned."""
    align = ["right" if h in right else "left" for h in headers]
    cells = [[_cell(c) for c in row] for row in rows]
    return tabulate(cells, headers=headers, tablefmt="github", disable_numparse=True,
                    colalign=align)


def _fold(summary: str, body: str) -> str:
    """A `<details>` block: `summary` (HTML) shown, the Markdown `body` folded under it."""
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


def _shorten(text: str, width: int = _MESSAGE_WIDTH) -> str:
    """Whitespace collapsed to single spaces, cut to `width` characters with "…"."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _tail(text: str, width: int = _PROMPT_WIDTH) -> str:
    """The last `width` characters of a prompt (its end is where the answer goes), "…" first."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _nowrap(text: str) -> str:
    """Text that a browser keeps on one line (spaces made no-break), for short table cells."""
    return text.replace(" ", "\N{NO-BREAK SPACE}")


def _verdict(verdict: str) -> str:
    return f"{VERDICT_MARKS.get(verdict, UNKNOWN_MARK)} {verdict or '?'}"


def _counts(column: pd.Series, noun: str = "check") -> str:
    """The counts of a verdict `column`, e.g. "3 checks: 2 ✅ pass, 1 ❌ fail"."""
    counts = column.value_counts()
    order = [*VERDICT_MARKS, *(v for v in counts.index if v not in VERDICT_MARKS)]
    items = [f"{counts[v]} {_verdict(v)}" for v in order if v in counts]
    n = len(column)
    return f"{n} {noun}{'' if n == 1 else 's'}" + (": " + ", ".join(items) if items else "")


def _distinct(values: pd.Series) -> list[str]:
    """Distinct non-empty values as text, in order of first appearance."""
    texts = (format_value(v) if not isinstance(v, str) else v for v in values)
    return [t for t in dict.fromkeys(texts) if t not in ("", _NA)]


def _json_items(text: str, width: int | None = None) -> str:
    """A JSON object as `k=v, …` (numbers via `format_value`, whole numbers in full), only
    the items that fit in `width` characters then "…"; other text unchanged.

    >>> _json_items('{"n_act": 72788.0, "ce": 0.98395, "d": 128}', width=25)
    'n_act=72788, ce=0.9839, …'
    """
    try:
        obj = json.loads(text)
    except ValueError:
        return text
    if not isinstance(obj, dict):
        return text
    items = [f"{k}={_part(v)}" for k, v in obj.items()]
    shown = ", ".join(items)
    while width is not None and len(shown) > width and items:
        items.pop()
        shown = ", ".join([*items, "…"])
    return shown


def _part(value: Any) -> str:
    """One raw quantity: a whole number in full (counts), else `format_value`."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format_value(value) if isinstance(value, (int, float)) else str(value)


def _groups(frame: pd.DataFrame, column: str) -> Iterator[tuple[Any, pd.DataFrame]]:
    """Sub-frames per value of `column`, in order of first appearance."""
    yield from frame.groupby(column, sort=False, dropna=False)


def _value_ci(row: dict[str, Any]) -> str:
    """The value and its interval in one cell, e.g. `0.5 [0.4, 0.6]`."""
    ci = format_ci(row["ci_low"], row["ci_high"])
    return format_value(row["value"]) + ("" if ci == _NA else f" {ci}")


def _vs_baseline(row: dict[str, Any]) -> str:
    """The baseline comparison of a row: Δ [95% CI] and its verdict, how Δ's interval was
    made when not paired, and the tolerance when Δ is worse than it, e.g.
    `-0.03 [-0.04, -0.02] 📉 regression (tol 0.01)`."""
    verdict = row["vs_baseline"]
    if not verdict:
        return _NA
    if is_missing(row["delta"]):
        return verdict
    ci = f"[{format_delta(row['delta_ci_low'])}, {format_delta(row['delta_ci_high'])}]"
    how = [row["comparison"]] if row["comparison"] not in ("", "paired") else []
    if verdict in ("regression", "noisy") and not is_missing(row["tolerance"]):
        how.append(f"tol {format_value(row['tolerance'])}")
    mark = f"{VERDICT_MARKS[verdict]} " if verdict in VERDICT_MARKS else ""
    suffix = f" ({', '.join(how)})" if how else ""
    return f"{format_delta(row['delta'])} {ci} {mark}{verdict}{suffix}"


def _message(row: dict[str, Any]) -> str:
    """What a row's message says beyond its other cells ("" when nothing): without the
    restated value, interval and n, the restated threshold verdict, and the baseline
    comparison that the vs-baseline cell shows."""
    message = str(row["message"])
    if row["vs_baseline"]:
        message = _RESTATED_BASELINE.sub("", message)
    shown = _RESTATED.match(message)
    if not shown or shown["metric"] != row["metric"]:
        return message
    rest = message[shown.end():]
    judged = (f"meets {row['threshold']}", f"fails {row['threshold']}", "(no threshold)",
              "(measured: no threshold)")
    return "" if rest in judged else rest


# --------------------------------------------------------------------------- summary


def _summary(results: pd.DataFrame, run_dir: Path, baseline: dict[str, Any] | None) -> str:
    """The title, the verdict counts, provenance in one line, and resume / baseline notes."""
    run_ids = _distinct(results["run_id"]) or [run_dir.resolve().name]
    lines = [f"# saebench report {', '.join(run_ids)}", "", _counts(results["verdict"])]
    provenance = [
        f"{label} {', '.join(values)}"
        for column, label in _PROVENANCE.items()
        if (values := _distinct(results[column]))
    ]
    if provenance:
        lines += ["", "Provenance: " + " · ".join(provenance)]
    resumed = results["resumed"].value_counts()
    if resumed.get("recomputed", 0) or resumed.get("re-judged", 0):
        lines += ["", f"Resumed: {resumed.get('recomputed', 0)} check(s) recomputed because "
                  f"they or their inputs changed (or their rows were damaged), "
                  f"{resumed.get('re-judged', 0)} re-judged against a changed threshold or "
                  "baseline."]
    if baseline is not None or results["vs_baseline"].ne("").any():
        lines += ["", _baseline_line(results, baseline)]
    return "\n".join(lines)


def _baseline_line(results: pd.DataFrame, baseline: dict[str, Any] | None) -> str:
    """One line on the baseline: where it is and how the checks compared with it."""
    if baseline and baseline.get("problem"):
        return f"Baseline: {baseline['problem']}"
    where = f" `{baseline['path']}`" if baseline and baseline["path"] else ""
    counts = results["vs_baseline"][results["vs_baseline"] != ""].value_counts()
    items = [f"{n} {_verdict(v) if v in VERDICT_MARKS else v}" for v, n in counts.items()]
    if baseline and baseline["missing"]:
        items.append(f"{len(baseline['missing'])} missing from this run")
    return f"Baseline{where}: " + (", ".join(items) if items else "no check compared")


def _read_baseline(run_dir: Path) -> dict[str, Any] | None:
    """The run's baseline.json as `{"path": str, "missing": [check id, …]}`, None when there
    is none; one that cannot be read gives a `problem` instead, so the report still renders."""
    path = run_dir / BASELINE_FILE
    if not path.is_file():
        return None
    try:
        note = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        note = err
    if not isinstance(note, dict):
        why = note if isinstance(note, Exception) else "not a JSON object"
        return {"path": "", "missing": [], "problem": f"{BASELINE_FILE} is unreadable ({why})"}
    missing = note.get("missing")
    return {"path": str(note.get("path") or ""),
            "missing": [str(c) for c in missing] if isinstance(missing, list) else []}


# --------------------------------------------------------------------------- what needs attention


def _attention_section(results: pd.DataFrame, baseline: dict[str, Any] | None) -> str:
    """The checks that failed, regressed or could not be measured, then the noisy ones as a
    notice, then the baseline's checks this run did not have; "Nothing failed." when none."""
    fine = results["verdict"].isin(FINE_VERDICTS) & results["vs_baseline"].ne("regression")
    noisy = fine & (results["verdict"].eq("noisy") | results["vs_baseline"].eq("noisy"))
    several_suites = len(_distinct(results["suite"])) > 1
    parts = ["## What needs attention"]
    if fine.all():
        parts.append("Nothing failed.")
    else:
        parts.append(_attention_table(results[~fine], several_suites))
    if noisy.any():
        parts += [f"Notice: {VERDICT_MARKS['noisy']} noisy — "
                  f"{VERDICT_MEANINGS['noisy']} (reported, not failed):",
                  _attention_table(results[noisy], several_suites)]
    if baseline and baseline["missing"]:
        parts.append(_missing_list(baseline["missing"], baseline["path"]))
    return "\n\n".join(parts)


def _attention_table(rows: pd.DataFrame, several_suites: bool) -> str:
    """Listed checks: verdict, check id, value [CI], threshold, vs baseline (when any has
    one) and the message where it says more than the row."""
    records = rows.to_dict("records")
    with_baseline = any(r["vs_baseline"] not in ("", "new") for r in records)
    table = [
        [_nowrap(_verdict(r["verdict"])),
         f"{r['suite']}: {r['check_id']}" if several_suites else r["check_id"],
         _value_ci(r), r["threshold"] or _NA,
         *([_vs_baseline(r)] if with_baseline else []),
         _shorten(_message(r), _REASON_WIDTH) or _NA]
        for r in records
    ]
    headers = ["verdict", "check", "value [95% CI]", "threshold",
               *([_DELTA_HEADER] if with_baseline else []), "message"]
    return _table(table, headers)


def _missing_list(missing: list[str], path: str) -> str:
    """The baseline's checks that this run did not have, folded when they are many."""
    title = f"Missing from this run: {len(missing)} check(s) of the baseline"
    items = "\n".join(f"- `{c}`" for c in missing)
    if len(missing) <= _MISSING_UNFOLDED:
        return title + (f" (`{path}`)" if path else "") + f":\n\n{items}"
    return _fold(title + (f" (<code>{html.escape(path)}</code>)" if path else ""), items)


# --------------------------------------------------------------------------- summary matrix


def _matrix_section(results: pd.DataFrame) -> str:
    """Per suite, a row per dictionary (or spliced set) and a column per key metric that some
    row has: value and verdict mark; a legend of marks and columns under it."""
    parts = ["## Summary"]
    for suite, rows in _groups(results, "suite"):
        columns = _matrix_columns(rows)
        models = _distinct(rows["model"])
        title = f"### Suite {suite or '(unnamed)'}" + (
            f" · model {', '.join(models)}" if models else "")
        parts.append(title)
        if not columns:
            parts.append("No key metric (L0, loss recovered, KL score, EV, logit-diff "
                         "recovered) was measured.")
            continue
        table = [[_matrix_label(group), *(_matrix_cell(group, key) for key in columns)]
                 for _, group in _groups(rows, "set")]
        parts += [_table(table, ["dictionary", *columns.values()], right=columns.values()),
                  _legend(rows, columns)]
    return "\n\n".join(parts)


def _matrix_columns(rows: pd.DataFrame) -> dict[str, str]:
    """The matrix's metric keys present in `rows`, with their titles, in the fixed order."""
    tasks = _distinct(rows["task"][rows["metric"] == TASK_METRIC])
    wanted = {**MATRIX_COLUMNS, **{f"{TASK_METRIC}[{t}]": f"LD {t}" for t in tasks}}
    present = set(rows["key"])
    return {key: title for key, title in wanted.items() if key in present}


def _matrix_label(rows: pd.DataFrame) -> str:
    """A matrix row's first cell: the set's name, and below it, small, its hook(s),
    architecture and d_sae where known."""
    first = rows.iloc[0]
    architectures = dict.fromkeys(a for a in str(first["architecture"]).split("+") if a)
    details = [_compact_hooks(first["hook"]), "+".join(architectures),
               *(_nowrap(f"d_sae {d}") for d in _distinct(rows["d_sae"])[:1])]
    details = [html.escape(d) for d in details if d]
    name = html.escape(first["set"] or "(no dictionary)")
    return name + (f"<br><sub>{' · '.join(details)}</sub>" if details else "")


def _compact_hooks(hooks: str) -> str:
    """Hooks joined by commas, written once when only the layer differs.

    >>> _compact_hooks("blocks.0.hook_resid_pre,blocks.3.hook_resid_pre")
    'blocks.{0,3}.hook_resid_pre'
    """
    names = [h for h in str(hooks).split(",") if h]
    blocks = [m for h in names if (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", h))]
    if len(names) > 1 and len(blocks) == len(names) and len({m[2] for m in blocks}) == 1:
        return f"blocks.{{{','.join(m[1] for m in blocks)}}}.{blocks[0][2]}"
    return _shorten(", ".join(names), 60)


def _matrix_cell(rows: pd.DataFrame, key: str) -> str:
    """The value of the set's check with metric key `key` and its verdict's mark."""
    found = rows[rows["key"] == key]
    if found.empty:
        return _NA
    row = found.iloc[-1]
    mark = VERDICT_MARKS.get(row["verdict"], UNKNOWN_MARK)
    return _nowrap(f"{format_value(row['value'])} {mark}")


def _legend(rows: pd.DataFrame, columns: dict[str, str]) -> str:
    """What the marks in the matrix mean, and which check each column shows."""
    shown = set(rows[rows["key"].isin(columns)]["verdict"])
    order = [*VERDICT_MARKS, *sorted(shown - set(VERDICT_MARKS))]
    marks = [f"{VERDICT_MARKS.get(v, UNKNOWN_MARK)} {v or '?'}"
             + (f": {VERDICT_MEANINGS[v]}" if v in VERDICT_MEANINGS else "")
             for v in order if v in shown]
    keys = [f"{title} = `{key}`" for key, title in columns.items()]
    return "<sub>" + " · ".join(marks) + "<br>" + " · ".join(keys) + "</sub>"


# --------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class Plot:
    """A plot of the report: its path relative to the run directory, its caption, and the
    `saebench.plots` call that draws it to a given path."""

    path: str
    caption: str
    draw: Callable[[Path], Path]


def plan_plots(results: pd.DataFrame, breakdown: pd.DataFrame | None = None) -> list[Plot]:
    """The plots of a run, per suite: L0 vs loss recovered of its dictionaries, loss
    recovered per layer and family, the per-layer error of replacement models, and
    logit-diff recovered per task; a plot is planned
    only when its rows have something to show. Checks expected to fail (xfail: deliberately
    poor controls) are left out, so that they do not squash the scale of the others."""
    keyed = _with_keys(results)
    planned: list[Plot] = []
    for suite, rows in _groups(keyed[keyed["verdict"] != "xfail"], "suite"):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(suite)).strip("-") or "run"
        where = f" — {suite}" if suite else ""
        frontier, layers, tasks = _frontier_frame(rows), _layer_frame(rows), _task_frame(rows)
        errors = _layer_error_frame(rows)
        if len(frontier) >= 2:
            planned.append(Plot(
                f"{PLOTS_DIR}/{slug}-l0-vs-loss-recovered.png", f"L0 vs loss recovered{where}",
                partial(plots.frontier_plot, frontier, "l0", LOSS_RECOVERED,
                        label="dictionary", group="hook", title=f"L0 vs loss recovered{where}",
                        x_label="L0 (active features per token)")))
        if layers.groupby("family")["layer"].nunique().ge(2).any():
            planned.append(Plot(
                f"{PLOTS_DIR}/{slug}-loss-recovered-by-layer.png",
                f"Loss recovered per layer{where}",
                partial(plots.layer_curves, layers, metric=LOSS_RECOVERED,
                        title=f"Loss recovered (zero ablation) per layer{where}")))
        if errors.groupby("dictionary")["layer"].nunique().ge(2).any():
            planned.append(Plot(
                f"{PLOTS_DIR}/{slug}-per-layer-error.png", f"Per-layer error{where}",
                partial(plots.layer_curves, errors, metric=LAYER_ERROR, family="dictionary",
                        title=f"Per-layer error, every layer spliced at once{where}")))
        if len(tasks):
            planned.append(Plot(
                f"{PLOTS_DIR}/{slug}-logit-diff-recovered.png",
                f"Logit-diff recovered per task{where}",
                partial(plots.interval_bars, tasks, label="dictionary", value=TASK_VALUE,
                        low="ci_low", high="ci_high", group="task", reference=1.0,
                        title=f"Logit-diff recovered per task (95% CI){where}")))
        planned += _breakdown_plots(breakdown, suite, slug, where)
    return planned


def _breakdown_plots(breakdown: pd.DataFrame | None, suite: Any, slug: str, where: str
                     ) -> list[Plot]:
    """Per breakdown (`by:` position or source) and metric of a suite, the value in each
    bucket, one line per check."""
    if breakdown is None or breakdown.empty:
        return []
    rows = breakdown[breakdown["suite"].astype(str) == str(suite)]
    planned = []
    for (by, metric), group in rows.groupby(["by", "metric"], sort=False):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{metric}-by-{by}")
        planned.append(Plot(
            f"{PLOTS_DIR}/{slug}-{name}.png", f"{metric} by {by}{where}",
            partial(plots.bucket_curves, group.reset_index(drop=True), bucket="bucket",
                    title=f"{metric} by {by} (95% CI){where}", y_label=metric)))
    return planned


def _measured(rows: pd.DataFrame, key: str) -> pd.DataFrame:
    """Rows with metric key `key` whose value is a finite number, one per set."""
    found = rows[(rows["key"] == key) & rows["value"].map(_finite)]
    return found.drop_duplicates("set", keep="last")


def _finite(value: Any) -> bool:
    return not is_missing(value) and math.isfinite(float(value))


def _single(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of single dictionaries (not spliced sets) that have a hook."""
    single = ~rows["dictionary"].str.contains("+", regex=False) & ~rows["hook"].str.contains(",")
    return rows[single & rows["hook"].ne("")]


def _frontier_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Per single dictionary: its L0, loss recovered with its interval, and hook."""
    l0 = _measured(rows, "l0")[["set", "value"]].rename(columns={"value": "l0"})
    ce = _single(_measured(rows, FRONTIER_Y))[["set", "hook", "value", "ci_low", "ci_high"]]
    ce = ce.rename(columns={"value": LOSS_RECOVERED, "ci_low": f"{LOSS_RECOVERED}_ci_low",
                            "ci_high": f"{LOSS_RECOVERED}_ci_high"})
    merged = l0.merge(ce, on="set").rename(columns={"set": "dictionary"})
    return merged.reset_index(drop=True)


def _layer_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Per single dictionary with a layer: family, layer, loss recovered and its interval."""
    ce = _single(_measured(rows, FRONTIER_Y))
    frame = pd.DataFrame({
        "dictionary": ce["set"], "hook": ce["hook"],
        "family": [plots.family_of(d, h) for d, h in zip(ce["set"], ce["hook"], strict=True)],
        "layer": [plots.layer_of(h) for h in ce["hook"]],
        LOSS_RECOVERED: ce["value"], f"{LOSS_RECOVERED}_ci_low": ce["ci_low"],
        f"{LOSS_RECOVERED}_ci_high": ce["ci_high"],
    }, columns=["dictionary", "hook", "family", "layer", LOSS_RECOVERED, f"{LOSS_RECOVERED}_ci_low",
                f"{LOSS_RECOVERED}_ci_high"])
    return frame[frame["layer"].notna()].reset_index(drop=True)


def _layer_error_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Per dictionary set with a `per_layer_error` value: each write hook's error (the
    `layer_<i>` parts), one row per layer."""
    checks = rows[(rows["metric"] == "per_layer_error") & rows["value"].map(_finite)]
    records = [
        {"dictionary": row["set"], "layer": int(key.removeprefix("layer_")), LAYER_ERROR: value}
        for row in checks.drop_duplicates("set", keep="last").to_dict("records")
        for key, value in json.loads(row["parts"] or "{}").items()
        if key.startswith("layer_") and _finite(value)]
    return pd.DataFrame(records, columns=["dictionary", "layer", LAYER_ERROR])


def _task_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Per dictionary set and task: logit-diff recovered and its interval."""
    tasks = rows[(rows["metric"] == TASK_METRIC) & rows["value"].map(_finite)]
    tasks = tasks[tasks["key"] == TASK_METRIC + "[" + tasks["task"] + "]"]
    frame = tasks[["set", "task", "value", "ci_low", "ci_high"]]
    frame = frame.rename(columns={"set": "dictionary", "value": TASK_VALUE})
    return frame.reset_index(drop=True)


def _plots_section(results: pd.DataFrame, planned: list[Plot]) -> str:
    """The plots, embedded by their paths relative to report.md."""
    if not planned:
        return ""
    note = ([f"Checks expected to fail ({_verdict('xfail')}) are left out of the plots."]
            if results["verdict"].eq("xfail").any() else [])
    return "\n\n".join(["## Plots", *note, *(f"![{p.caption}]({p.path})" for p in planned)])


def write_plots(run_dir: Path, planned: list[Plot]) -> list[Path]:
    """Draw the planned plots into the run directory; returns their paths."""
    drawn = []
    for plot in planned:
        target = Path(run_dir) / plot.path
        target.parent.mkdir(parents=True, exist_ok=True)
        drawn.append(plot.draw(target))
    return drawn


# --------------------------------------------------------------------------- checks per dictionary


def _checks_section(results: pd.DataFrame) -> str:
    """Per suite, per dictionary set, its checks folded in a `<details>` block."""
    with_baseline = results["vs_baseline"].ne("").any()
    parts = ["## Checks", *([_DELTA_NOTE] if with_baseline else [])]
    for suite, rows in _groups(results, "suite"):
        parts.append(f"### Suite {suite or '(unnamed)'} · {_counts(rows['verdict'])}")
        parts += [_set_details(name, group, with_baseline) for name, group in
                  _groups(rows, "set")]
    return "\n\n".join(parts)


def _set_details(name: str, rows: pd.DataFrame, with_baseline: bool) -> str:
    """One dictionary set's check table under a summary of its name, hook and counts."""
    records = rows.to_dict("records")
    messages = [_message(r) for r in records]
    table = [
        [r["check_id"], _value_ci(r), format_value(r["n"]), r["threshold"] or _NA,
         _nowrap(_verdict(r["verdict"])),
         *([_vs_baseline(r)] if with_baseline else []),
         *([_shorten(m) or _NA] if any(messages) else []),
         _json_items(r["parts"], _PARTS_WIDTH) or _NA]
        for r, m in zip(records, messages, strict=True)
    ]
    headers = ["check", "value [95% CI]", "n", "threshold", "verdict",
               *([_DELTA_HEADER] if with_baseline else []),
               *(["message"] if any(messages) else []), "parts"]
    hooks = [_compact_hooks(h) for h in _distinct(rows["hook"])[:1]]
    summary = f"<b>{html.escape(name or '(no dictionary)')}</b>" + "".join(
        f" · <code>{html.escape(h)}</code>" for h in hooks) + f" · {_counts(rows['verdict'])}"
    return _fold(summary, _table(table, headers, right=("n",)))


# --------------------------------------------------------------------------- per prompt, features


def _worst_prompts_section(per_prompt: pd.DataFrame, k: int) -> str:
    """Per suite, task and dictionary, the `k` prompts the splice hurt most, folded."""
    if not {"ld_clean", "ld_spliced"} <= set(per_prompt.columns):
        return ""
    parts = [
        "## Worst prompts",
        f"Per suite, task and dictionary, the {k} prompts with the largest logit-difference "
        "loss (LD clean − LD spliced).",
    ]
    quantities = [c for c in per_prompt.columns if c not in PER_PROMPT_BASE_COLUMNS]
    for (suite, task, dictionary), group in per_prompt.groupby(
        ["suite", "task", "dictionary"], sort=False, dropna=False
    ):
        # Several checks may report values for the same prompt: merge them per prompt.
        prompts = group.groupby("prompt_index", sort=False, dropna=False).last()
        prompts["loss"] = prompts["ld_clean"] - prompts["ld_spliced"]
        if prompts["loss"].isna().all():
            continue
        worst = prompts.sort_values("loss", ascending=False, na_position="last", kind="stable")
        extra = [q for q in quantities if q not in ("ld_clean", "ld_spliced")
                 and worst[q].notna().any()]
        headers = ["#", "prompt", "answer", "distractor", "ld_clean", "ld_spliced", "loss",
                   *extra]
        rows = [
            [format_value(index), _tail(r["prompt"]), r["answer"], r["distractor"],
             *(format_value(r[q]) for q in ["ld_clean", "ld_spliced", "loss", *extra])]
            for index, r in worst.head(k).iterrows()
        ]
        title = " · ".join(t for t in (suite, task, dictionary) if t) or "(unnamed)"
        summary = f"{html.escape(title)} · worst loss {format_value(worst['loss'].iloc[0])}"
        parts.append(_fold(summary, _table(rows, headers, right=headers[4:])))
    return "\n\n".join(parts) if len(parts) > 2 else ""


def _features_section(features: pd.DataFrame) -> str:
    """Per feature-ablation check, its features' activations and effects, folded (rows of
    table "ablation", or none: written before features.csv had other tables)."""
    features = features[features["table"].isin(_ABLATION_TABLES)]
    features = features.drop_duplicates(["suite", "check_id", "feature"], keep="last")
    parts = ["## Feature ablations"]
    for check_id, group in _groups(features, "check_id"):
        rows = [
            [format_value(r["feature"]), format_value(r["mean_activation"]),
             format_value(r["active_share"]), format_value(r["effect"]),
             format_ci(r["ci_low"], r["ci_high"]), format_value(r["loss_effect"])]
            for r in group.to_dict("records")
        ]
        headers = ["feature", "mean activation", "active share", "logit-diff effect", "95% CI",
                   "answer-loss effect"]
        parts.append(_fold(_feature_summary(check_id, group),
                           _table(rows, headers, right=headers)))
    return "\n\n".join(parts) if len(parts) > 1 else ""


def _feature_summary(check_id: str, rows: pd.DataFrame, *extra: str) -> str:
    """A feature table's fold summary: its check id, dictionary, task and `extra` notes."""
    where = [*_distinct(rows["dictionary"]), *_distinct(rows["task"]), *extra]
    return f"<code>{html.escape(check_id)}</code>" + "".join(
        f" · {html.escape(w)}" for w in where)


def _fidelity_section(features: pd.DataFrame) -> str:
    """Per feature-fidelity check, its features with the lowest correlation, folded."""
    features = features[features["table"] == "fidelity"]
    features = features.drop_duplicates(["suite", "check_id", "feature"], keep="last")
    parts = ["## Feature fidelity",
             f"Per check, the {_LOWEST_CORRELATIONS} features whose activation correlates least "
             "between the clean and the spliced run."]
    for check_id, group in _groups(features, "check_id"):
        lowest = group.sort_values("correlation", na_position="last", kind="stable")
        rows = [[format_value(r["feature"]), format_value(r["active_share"]),
                 format_value(r["mean_activation"]), format_value(r["correlation"])]
                for r in lowest.head(_LOWEST_CORRELATIONS).to_dict("records")]
        headers = ["feature", "active share", "mean activation", "correlation"]
        summary = _feature_summary(check_id, group, f"{len(group)} features")
        parts.append(_fold(summary, _table(rows, headers, right=headers)))
    return "\n\n".join(parts) if len(parts) > 2 else ""


def _clamp_section(features: pd.DataFrame) -> str:
    """Per feature-clamp check, each clamped feature, the feature read and its effects,
    folded."""
    features = features[features["table"] == "clamp"].drop_duplicates(
        ["check_id", "feature", "read_dictionary", "read_feature", "clamp_value"], keep="last")
    parts = ["## Feature clamps",
             "Per check, each clamped feature, the feature of the read dictionary paired with "
             "it, their clean correlation, the clamp value, and the read feature's mean change "
             "per position (effect) with its 95% interval."]
    for check_id, group in _groups(features, "check_id"):
        rows = [[format_value(r["feature"]), format_value(r["read_feature"]),
                 format_value(r["correlation"]), format_value(r["clamp_value"]),
                 format_value(r["effect"]), format_ci(r["ci_low"], r["ci_high"])]
                for r in group.to_dict("records")]
        headers = ["feature", "read feature", "correlation", "clamp value", "effect", "95% CI"]
        read = [f"reads {d}" for d in _distinct(group["read_dictionary"])]
        parts.append(_fold(_feature_summary(check_id, group, *read),
                           _table(rows, headers, right=headers)))
    return "\n\n".join(parts) if len(parts) > 2 else ""


def _cards_section(features: pd.DataFrame) -> str:
    """Per dictionary, a card per feature (the last row of each), folded: density, mean and
    max activation, the logit lens's top and bottom tokens, and the top contexts with the
    activating token in bold."""
    cards = features[features["table"] == "card"]
    cards = cards.drop_duplicates(["dictionary", "feature"], keep="last")
    if cards.empty:
        return ""
    parts = ["## Feature cards",
             "Per dictionary, what each feature responds to: its density (share of positions "
             "where it is nonzero), mean and max activation, the tokens its decoder direction "
             "promotes and suppresses most (logit lens), and the contexts where it activates "
             "most, the activating token in bold."]
    for dictionary, group in _groups(cards, "dictionary"):
        records = group.to_dict("records")
        contexts = [_json_list(r["contexts"]) for r in records]
        tokens = [t for cs in contexts for c in cs for t in c.get("tokens", ())]
        joiner = "" if any(str(t).startswith(" ") for t in tokens) else " "
        body = "\n\n".join(_card(dictionary, r, cs, joiner)
                            for r, cs in zip(records, contexts, strict=True))
        n = len(records)
        summary = (f"<b>{html.escape(dictionary or '(no dictionary)')}</b> · {n} feature "
                   f"card{'' if n == 1 else 's'}")
        parts.append(_fold(summary, body))
    return "\n\n".join(parts)


def _card(dictionary: str, row: dict[str, Any], contexts: list[dict], joiner: str) -> str:
    """One feature's card: a heading, its activation statistics, its logit lens, and its
    contexts as a list (tokens joined by `joiner`: "" for tokenizers whose tokens carry
    their spaces, else a space)."""
    heading = f"#### feature {format_value(row['feature'])} of {_markdown(dictionary)}"
    lines = [f"density {format_value(row['active_share'])} · mean activation "
             f"{format_value(row['mean_activation'])} · max activation "
             f"{format_value(row['max_activation'])}"]
    lens = [(label, _json_list(row[column])) for label, column in
            (("promotes", "logit_top"), ("suppresses", "logit_bottom"))]
    lens_items = [f"{label} " + " ".join(f"{_code(str(t))} ({format_value(v)})"
                                         for t, v in pairs)
                  for label, pairs in lens if pairs]
    if lens_items:
        lines.append("logit lens: " + " · ".join(lens_items))
    body = heading + "\n\n" + "  \n".join(lines)
    items = [f"- {format_value(c.get('activation'))} · row {c.get('row')}, position "
             f"{c.get('position')}: {_context_text(c, joiner)}" for c in contexts]
    return body + ("\n\n" + "\n".join(items) if items else "")


def _context_text(context: dict, joiner: str) -> str:
    """A context's tokens as Markdown text, the activating one (`at`) in bold."""
    shown = []
    for i, token in enumerate(context.get("tokens", ())):
        text = _markdown(_visible(str(token)))
        if i == context.get("at") and text:  # its spaces outside the ** (else no bold)
            lead, core, trail = re.fullmatch(r"( *)(.*?)( *)", text).groups()
            text = f"{lead}**{core}**{trail}"
        shown.append(text)
    return joiner.join(shown)


def _visible(token: str) -> str:
    """A token's whitespace made visible: line breaks as ⏎, tabs as ⇥, and a token of
    spaces only as ␣ per space.

    >>> _visible("\\n"), _visible(" the"), _visible("  ")
    ('⏎', ' the', '␣␣')
    """
    text = token.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎")
    text = text.replace("\t", "⇥")
    return "␣" * len(text) if text and not text.strip(" ") else text


def _markdown(text: str) -> str:
    """Text with Markdown's (and HTML's) active characters backslash-escaped, so it shows
    as written.

    >>> _markdown("a*b|c_<d>")
    'a\\\\*b\\\\|c\\\\_\\\\<d\\\\>'
    """
    return _MARKDOWN_ACTIVE.sub(r"\\\g<0>", text)


def _code(text: str) -> str:
    """Text as an inline code span, whitespace made visible, fenced past any backticks."""
    text = _visible(text)
    fence = "`" * (max((len(m) for m in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _json_list(text: Any) -> list:
    """A JSON list cell (contexts, logit-lens tokens) as a list; [] when empty or unreadable."""
    try:
        value = json.loads(text) if isinstance(text, str) and text else []
    except ValueError:
        return []
    return value if isinstance(value, list) else []


# --------------------------------------------------------------------------- the report


def render_report(run_dir: Path, worst_prompts: int = 5) -> str:
    """The Markdown report of a run: summary and provenance, what needs attention, the
    summary matrix, the plots (by path; `write_report` draws them), every check folded per
    dictionary, then the worst prompts, feature tables and feature cards when the run has
    them.

    >>> print(render_report(Path("reports/20261123-081530-ab12")))
    # saebench report 20261123-081530-ab12
    ...
    """
    run_dir = Path(run_dir)
    results = _with_keys(read_results(run_dir))
    baseline = _read_baseline(run_dir)
    breakdown = _read_breakdown(run_dir)
    parts = [_summary(results, run_dir, baseline), _attention_section(results, baseline),
             _matrix_section(results),
             _plots_section(results, plan_plots(results, breakdown)),
             _checks_section(results), _breakdown_section(breakdown)]
    if worst_prompts > 0:
        parts.append(_worst_prompts_section(read_per_prompt(run_dir), worst_prompts))
    if (run_dir / FEATURES_FILE).is_file():
        features = read_table(run_dir / FEATURES_FILE, FEATURE_COLUMNS)
        parts += [section(features) for section in
                  (_features_section, _fidelity_section, _clamp_section, _cards_section)]
    return "\n\n".join(p for p in parts if p) + "\n"


def _read_breakdown(run_dir: Path) -> pd.DataFrame | None:
    path = Path(run_dir) / BREAKDOWN_FILE
    return read_table(path, BREAKDOWN_COLUMNS) if path.is_file() else None


def _breakdown_section(breakdown: pd.DataFrame | None) -> str:
    """Per check with a `by:` breakdown, its value in each bucket, folded."""
    if breakdown is None or breakdown.empty:
        return ""
    breakdown = breakdown.drop_duplicates(["suite", "check_id", "bucket"], keep="last")
    parts = ["## Breakdowns",
             "Per check with `by:`, its value in each bucket of token positions or data "
             "source, with its 95% interval (plotted above)."]
    for check_id, group in _groups(breakdown, "check_id"):
        rows = [[str(r["bucket"]), format_value(r["value"]), format_ci(r["ci_low"], r["ci_high"]),
                 format_value(r["n"])] for r in group.to_dict("records")]
        headers = [str(group["by"].iloc[0]), "value", "95% CI", "n"]
        parts.append(_fold(_feature_summary(check_id, group),
                           _table(rows, headers, right=headers[1:])))
    return "\n\n".join(parts)


def write_report(run_dir: Path, worst_prompts: int = 5) -> Path:
    """Draw the run's plots into `run_dir/plots/`, then render the report and write
    `run_dir/report.md` atomically (a temporary file beside it, fsynced, then `os.replace`);
    returns its path.

    >>> write_report(Path("reports/20261123-081530-ab12"))
    PosixPath('reports/20261123-081530-ab12/report.md')
    """
    run_dir = Path(run_dir)
    write_plots(run_dir, plan_plots(read_results(run_dir), _read_breakdown(run_dir)))
    target = run_dir / REPORT_FILE
    atomic_write(target, render_report(run_dir, worst_prompts))
    return target


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """`saebench report <run-dir>`: redraw the plots and rebuild report.md from the run's
    files.

    Exit status 0 on success, 2 (with a one-line message naming the path) when the run
    directory or its results.csv is missing or is not a saebench results file.

    >>> main(["reports/20261123-081530-ab12"])
    0
    """
    parser = argparse.ArgumentParser(
        prog="saebench report",
        description="Rebuild report.md and the plots of a run from its results.csv.")
    parser.add_argument("run_dir", type=Path, help="the run directory (reports/<run-id>)")
    parser.add_argument("--worst-prompts", type=int, default=5, metavar="K",
                        help="prompts listed per task and dictionary (default 5; 0: none)")
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir
    if run_dir.is_file() and run_dir.name == RESULTS_FILE:
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        print(f"saebench report: no such run directory: {run_dir}", file=sys.stderr)
        return 2
    if not (run_dir / RESULTS_FILE).is_file():
        print(f"saebench report: no {RESULTS_FILE} in {run_dir} (expected "
              f"{run_dir / RESULTS_FILE})", file=sys.stderr)
        return 2
    try:
        print(write_report(run_dir, args.worst_prompts))
    except (ValueError, OSError) as err:  # not a results file, damaged tables
        print(f"saebench report: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
