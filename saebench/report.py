"""Result rows -> a Markdown report (`report.md` of a run directory).

The rows and tables come from `saebench.results` (results.csv, per_prompt.csv,
features.csv); this module only renders them, and writes report.md atomically.

    >>> write_report(Path("reports/20261201-153000-ab12"))  # .../report.md
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from saebench.results import (
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

VERDICT_MARKS: dict[str, str] = {
    "pass": "✅",
    "fail": "❌",
    "xfail": "❎",
    "xpass": "❗",
    "error": "💥",
    "unstable": "❓",
    "empty": "⭕",
    "skipped": "⏩",
}
"""One wide emoji per verdict (no variation selectors, so terminal tables stay aligned);
tables always print the verdict's name next to its mark."""
UNKNOWN_MARK = "❔"
PROBLEM_VERDICTS = ("fail", "error", "empty", "unstable")
"""Verdicts listed first in a suite's check table."""

_PROVENANCE = {
    "saebench_version": "saebench", "sae_lens_version": "sae_lens",
    "transformer_lens_version": "transformer_lens", "torch_version": "torch",
    "device": "device", "dtype": "dtype", "token_set": "token set", "seed": "seed",
}
_MESSAGE_WIDTH = 80
_PROMPT_WIDTH = 100
_NA = "—"


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


# --------------------------------------------------------------------------- writing rows


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


def _shorten(text: str, width: int = _MESSAGE_WIDTH) -> str:
    """Whitespace collapsed to single spaces, cut to `width` characters with "…"."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _tail(text: str, width: int = _PROMPT_WIDTH) -> str:
    """The last `width` characters of a prompt (its end is where the answer goes), "…" first."""
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def _verdict(verdict: str) -> str:
    return f"{VERDICT_MARKS.get(verdict, UNKNOWN_MARK)} {verdict or '?'}"


def _counts(verdicts: pd.Series) -> str:
    """The verdict counts, e.g. "3 checks: 2 ✅ pass, 1 ❌ fail"."""
    counts = verdicts.value_counts()
    order = [*VERDICT_MARKS, *(v for v in counts.index if v not in VERDICT_MARKS)]
    items = [f"{counts[v]} {_verdict(v)}" for v in order if v in counts]
    n = len(verdicts)
    return f"{n} check{'' if n == 1 else 's'}" + (": " + ", ".join(items) if items else "")


def _distinct(values: pd.Series) -> list[str]:
    """Distinct non-empty values as text, in order of first appearance."""
    texts = (format_value(v) if not isinstance(v, str) else v for v in values)
    return [t for t in dict.fromkeys(texts) if t not in ("", _NA)]


def _json_items(text: str) -> str:
    """A JSON object as `k=v, …` (numbers via `format_value`); other text unchanged."""
    try:
        obj = json.loads(text)
    except ValueError:
        return text
    if not isinstance(obj, dict):
        return text
    return ", ".join(
        f"{k}={format_value(v) if isinstance(v, (int, float)) else v}" for k, v in obj.items()
    )


def _groups(frame: pd.DataFrame, column: str) -> Iterator[tuple[Any, pd.DataFrame]]:
    """Sub-frames per value of `column`, in order of first appearance."""
    yield from frame.groupby(column, sort=False, dropna=False)


def _summary(results: pd.DataFrame, run_dir: Path) -> str:
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
    if len(resumed.drop("", errors="ignore")):
        lines += ["", f"Resumed: {resumed.get('recomputed', 0)} check(s) recomputed because "
                  f"they or their inputs changed (or their rows were damaged), "
                  f"{resumed.get('re-judged', 0)} re-judged against a changed threshold."]
    return "\n".join(lines)


def _suite_section(suite: str, rows: pd.DataFrame) -> str:
    records = rows.to_dict("records")
    ordered = sorted(records, key=lambda r: r["verdict"] not in PROBLEM_VERDICTS)
    checks = [
        [_verdict(r["verdict"]), r["check_id"], r["metric"], format_value(r["value"]),
         format_ci(r["ci_low"], r["ci_high"]), format_value(r["n"]),
         r["threshold"] or _NA, _shorten(r["message"])]
        for r in ordered
    ]
    headers = ["verdict", "check", "metric", "value", "95% CI", "n", "threshold", "message"]
    models = _distinct(rows["model"])
    intro = ("model " + ", ".join(models) + " · " if models else "") + _counts(rows["verdict"])
    parts = [f"## Suite {suite or '(unnamed)'}", intro,
             _table(checks, headers, right=("value", "95% CI", "n"))]
    for dictionary, sub in _groups(rows, "dictionary"):
        parts.append(_dictionary_section(dictionary, sub))
    return "\n\n".join(parts)


def _direction(higher_is_better: Any) -> str:
    return "" if is_missing(higher_is_better) else ("↑" if higher_is_better else "↓")


def _dictionary_section(dictionary: str, rows: pd.DataFrame) -> str:
    metrics = [
        [r["metric"], r["task"], _json_items(r["options"]), format_value(r["value"]),
         format_ci(r["ci_low"], r["ci_high"]), format_value(r["n"]),
         _direction(r["higher_is_better"]), _shorten(_json_items(r["parts"]))]
        for r in rows.to_dict("records")
    ]
    headers = ["metric", "task", "options", "value", "95% CI", "n", "direction", "parts"]
    parts = [f"### {dictionary or '(no dictionary)'}"]
    hooks = _distinct(rows["hook"])
    if hooks:
        parts.append("hook " + ", ".join(f"`{h}`" for h in hooks))
    parts.append(_table(metrics, headers, right=("value", "95% CI", "n")))
    return "\n\n".join(parts)


def _worst_prompts_section(per_prompt: pd.DataFrame, k: int) -> str:
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
        title = " · ".join(t for t in (suite, task, dictionary) if t)
        parts += [f"### {title or '(unnamed)'}", _table(rows, headers, right=headers[4:])]
    return "\n\n".join(parts) if len(parts) > 2 else ""


def _features_section(features: pd.DataFrame) -> str:
    features = features.drop_duplicates(["check_id", "feature"], keep="last")
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
        where = " · ".join(_distinct(group["dictionary"]) + _distinct(group["task"]))
        parts += [f"### {check_id}", *([where] if where else []),
                  _table(rows, headers, right=headers)]
    return "\n\n".join(parts) if len(parts) > 1 else ""


def render_report(run_dir: Path, worst_prompts: int = 5) -> str:
    """The Markdown report of a run: summary and provenance, per suite a table of checks
    (problems first) and per dictionary a table of metrics, then the worst prompts and the
    feature-ablation tables when the run has them.

    >>> print(render_report(Path("reports/20261123-081530-ab12")))
    # saebench report 20261123-081530-ab12
    ...
    """
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    parts = [_summary(results, run_dir)]
    parts += [_suite_section(suite, rows) for suite, rows in _groups(results, "suite")]
    if worst_prompts > 0:
        parts.append(_worst_prompts_section(read_per_prompt(run_dir), worst_prompts))
    if (run_dir / FEATURES_FILE).is_file():
        parts.append(_features_section(read_table(run_dir / FEATURES_FILE, FEATURE_COLUMNS)))
    return "\n\n".join(p for p in parts if p) + "\n"


def write_report(run_dir: Path, worst_prompts: int = 5) -> Path:
    """Render the report and write `run_dir/report.md` atomically (a temporary file in the
    same directory, fsynced, then `os.replace`); returns its path.

    >>> write_report(Path("reports/20261123-081530-ab12"))
    PosixPath('reports/20261123-081530-ab12/report.md')
    """
    run_dir = Path(run_dir)
    target = run_dir / REPORT_FILE
    atomic_write(target, render_report(run_dir, worst_prompts))
    return target


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """`saebench report <run-dir>`: rebuild report.md from the run's CSV files.

    Exit status 0 on success, 2 (with a message naming the path) when the run directory or
    its results.csv is missing.

    >>> main(["reports/20261123-081530-ab12"])
    0
    """
    parser = argparse.ArgumentParser(
        prog="saebench report", description="Rebuild report.md of a run from its results.csv.")
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
    print(write_report(run_dir, args.worst_prompts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
