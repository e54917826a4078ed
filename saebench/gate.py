"""Regression gates: a check's new result against its baseline row, beyond tolerance and noise.

Let d = new − baseline, oriented so that positive is better (the registry knows each
metric's direction). A check **regresses** when d < −tolerance *and* the 95% interval of d
excludes zero; worse than tolerance but within noise is **noisy** (reported, not failed,
unless strict); better than tolerance with an interval above zero is **improved**; else
**same**. The interval of d is a paired bootstrap over the stored per-sequence terms when
both runs measured the same token set (the same resamples of the same sequences), else the
two runs' intervals combined as independent. A check without a baseline row is **new**.

    >>> baseline = Baseline.load(Path("suites/baselines/toy"))
    >>> comparison = compare(new_row, baseline.row(check_id), new_terms, baseline.terms(id))
    >>> comparison.verdict, comparison.delta, comparison.message

`saebench gate NEW --baseline OLD` makes the same comparison offline, from two run
directories (or results.csv files): exit 0 when nothing regressed, 1 when something did,
2 for a usage or input error.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tabulate import tabulate

from saebench import results
from saebench.metrics.registry import Metric, get_metric
from saebench.stats import resampled

Z = 1.959964
"""The normal quantile of a two-sided 95% interval."""
N_BOOT = 1000
COMPARED = ("pass", "fail", "xfail", "xpass")
"""Verdicts whose value was measured and may be compared with a baseline."""


@dataclass(frozen=True)
class Comparison:
    """A check against its baseline row: `verdict` (same, improved, regression, noisy, new),
    d = new − baseline oriented so that positive is better, its 95% interval, the
    baseline's value, how the interval was made (paired, unpaired or none) and the
    tolerance d was held to, plus a one-line `message`."""

    verdict: str
    delta: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    baseline_value: float = math.nan
    method: str = ""
    tolerance: float = math.nan
    message: str = ""

    def columns(self) -> dict[str, Any]:
        """The baseline columns of a result row (`saebench.results.BASELINE_COLUMNS`)."""
        return {"vs_baseline": self.verdict, "baseline_value": self.baseline_value,
                "delta": self.delta, "delta_ci_low": self.ci_low, "delta_ci_high": self.ci_high,
                "comparison": self.method, "tolerance": self.tolerance}


def tolerance_of(metric: Metric, baseline_value: float, absolute: float | None = None,
                 relative: float | None = None) -> float:
    """How much worse than `baseline_value` a value may be: the check's own tolerance
    (absolute, or a share of the baseline) when it declares one, else the metric's."""
    if absolute is None and relative is None:
        absolute, relative = metric.tolerance, metric.rel_tolerance
    return max(absolute or 0.0, (relative or 0.0) * abs(baseline_value))


def _paired(metric: Metric, options: Mapping[str, Any], new_terms: Mapping[str, Any],
            base_terms: Mapping[str, Any], sign: float) -> tuple[float, float] | None:
    """The paired 95% interval of d from both runs' terms, or None when they do not pair."""
    names = (metric.count_term, *metric.terms(options))
    if not all(n in new_terms and n in base_terms for n in names):
        return None
    new = {n: torch.as_tensor(np.asarray(new_terms[n])) for n in names}
    base = {n: torch.as_tensor(np.asarray(base_terms[n])) for n in names}
    if len(new[names[0]]) != len(base[names[0]]) or len(new[names[0]]) < 2:
        return None
    d = sign * (resampled(metric, new, options, N_BOOT, 0)
                - resampled(metric, base, options, N_BOOT, 0))
    d = d[torch.isfinite(d)]
    if len(d) < N_BOOT // 2:
        return None
    q = torch.quantile(d, d.new_tensor([0.025, 0.975]))
    return float(q[0]), float(q[1])


def _unpaired(new_row: Mapping[str, Any], base_row: Mapping[str, Any], delta: float
              ) -> tuple[float, float] | None:
    """d ± 1.96·√(se_new² + se_base²), se = half an interval's width / 1.96; None without
    both intervals."""
    widths = [float(r["ci_high"]) - float(r["ci_low"]) for r in (new_row, base_row)]
    if not all(math.isfinite(w) for w in widths):
        return None
    half = Z * math.sqrt(sum((w / (2 * Z)) ** 2 for w in widths))
    return delta - half, delta + half


def compare(new_row: Mapping[str, Any], base_row: Mapping[str, Any] | None,
            new_terms: Mapping[str, Any] | None = None,
            base_terms: Mapping[str, Any] | None = None, *,
            options: Mapping[str, Any] | None = None, tolerance: float | None = None,
            rel_tolerance: float | None = None) -> Comparison:
    """`new_row` against `base_row` (None: no baseline row). Terms are the per-sequence
    terms each run stored for the check; `options` are the metric's options."""
    if base_row is None:
        return Comparison("new", message="no baseline row for this check")
    base_value, value = float(base_row["value"]), float(new_row["value"])
    if base_row["verdict"] not in COMPARED or not math.isfinite(base_value):
        return Comparison("new", message=f"the baseline has no value for this check "
                                         f"(its verdict: {base_row['verdict']})")
    metric = get_metric(str(new_row["metric"]))
    sign = 1.0 if metric.higher_is_better else -1.0
    delta = sign * (value - base_value)
    tol = tolerance_of(metric, base_value, tolerance, rel_tolerance)
    interval, method = None, "none"
    same_tokens = new_row.get("token_set") == base_row.get("token_set")
    if new_terms and base_terms and same_tokens:
        interval = _paired(metric, options or {}, new_terms, base_terms, sign)
        method = "paired" if interval else method
    if interval is None:
        interval = _unpaired(new_row, base_row, delta)
        method = "unpaired" if interval else method
    low, high = interval or (delta, delta)
    verdict = ("regression" if delta < -tol and high < 0 else
               "noisy" if delta < -tol else
               "improved" if delta > tol and low > 0 else "same")
    how = {"paired": "paired bootstrap over the same sequences",
           "unpaired": "the two runs' intervals combined",
           "none": "no interval: by the tolerance alone"}[method]
    message = (f"vs baseline {base_value:.4g}: Δ = {delta:+.4g} [{low:+.4g}, {high:+.4g}] "
               f"(positive is better; {how}; tolerance {tol:.3g}) → {verdict}")
    return Comparison(verdict, delta, low, high, base_value, method, tol, message)


def judge(verdict: str, message: str, comparison: Comparison) -> tuple[str, str]:
    """A check's verdict from its threshold verdict and its baseline comparison, which are
    independent: a passing check that regressed is a `regression` (one worse within noise
    `noisy`: reported, failed only when strict); a failing one stays `fail`. The message
    gives both, so it says which part decided.

        >>> judge("pass", "l0 = 16 meets <= 70", Comparison("regression", message="Δ = -3"))
        ('regression', 'l0 = 16 meets <= 70; Δ = -3')
    """
    if comparison.verdict == "new" or verdict not in COMPARED:
        return verdict, message
    message = f"{message}; {comparison.message}"
    if verdict == "pass" and comparison.verdict in ("regression", "noisy"):
        return comparison.verdict, message
    return verdict, message


# --------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class Baseline:
    """A baseline: the rows (and stored terms) of a run directory, or of a trimmed copy
    committed next to a suite, by check id."""

    run: results.RunDir
    rows: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> Baseline:
        """The baseline in `path` (a run directory or its results.csv); FileNotFoundError
        when there is none, ValueError when it is not a results file."""
        path = Path(path)
        run = results.RunDir(path.parent if path.is_file() else path)
        frame = results.read_results(run.path)
        return cls(run, {r["check_id"]: r for r in frame.to_dict("records")})

    def row(self, check_id: str) -> dict[str, Any] | None:
        return self.rows.get(check_id)

    def terms(self, check_id: str) -> dict[str, np.ndarray] | None:
        return results.read_terms(self.run, check_id)


def locate(path: Path, suite: str) -> Path:
    """Where a suite's baseline is under `--saebench-baseline PATH`: PATH itself when it
    holds a results.csv or is named after the suite, else `PATH/<suite>`."""
    path = Path(path)
    if (path / results.RESULTS_FILE).is_file() or path.is_file() or path.name == suite:
        return path
    return path / suite


def write_baseline(run: results.RunDir, target: Path, check_ids: Sequence[str] | None = None
                   ) -> Path:
    """Copy a run's rows (those of `check_ids`, or all) and their stored terms into the
    baseline directory `target`, keeping the baseline's other rows: a trimmed run
    directory (no per-prompt tables, features or report), small enough to commit."""
    frame = results.read_results(run.path)
    if check_ids is not None:
        frame = frame[frame["check_id"].isin(set(check_ids))]
    target.mkdir(parents=True, exist_ok=True)
    kept = pd.DataFrame(columns=frame.columns)
    if (target / results.RESULTS_FILE).is_file():
        old = results.read_results(target)
        kept = old[~old["check_id"].isin(set(frame["check_id"]))]
    merged = pd.concat([kept, frame], ignore_index=True) if len(kept) else frame
    if not len(merged):
        return target
    base = results.RunDir(target)
    with tempfile.TemporaryDirectory(dir=target) as staging:
        staged = Path(staging) / results.RESULTS_FILE
        results.append_rows(staged, merged.to_dict("records"), columns=list(merged.columns))
        staged.replace(base.results)
    for check_id in frame["check_id"]:
        source, dest = run.terms_file(check_id), base.terms_file(check_id)
        if source.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        else:
            dest.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------- offline gate


FAILING = ("regression", "error", "empty", "unstable")
"""Outcomes that fail `saebench gate` (and `noisy` with --strict)."""


def gate_runs(new: Path, old: Path) -> pd.DataFrame:
    """Every check of run `new` against run `old` (directories or results.csv files): one
    row per check id of either run, with the comparison's columns; a check that the new run
    could not measure keeps its verdict (error, empty, unstable), and one only in `old` is
    `missing`."""
    new_base, old_base = Baseline.load(new), Baseline.load(old)
    rows = []
    for check_id, row in new_base.rows.items():
        if row["verdict"] not in COMPARED:
            rows.append({"check_id": check_id, "vs_baseline": row["verdict"],
                         "message": row["message"]})
            continue
        tol = row.get("tolerance")
        comparison = compare(row, old_base.row(check_id), new_base.terms(check_id),
                             old_base.terms(check_id), options=_options(row),
                             tolerance=None if pd.isna(tol) else float(tol))
        rows.append({"check_id": check_id, **comparison.columns(), "value": row["value"],
                     "message": comparison.message})
    rows += [{"check_id": c, "vs_baseline": "missing", "message": "in the baseline only"}
             for c in old_base.rows if c not in new_base.rows]
    return pd.DataFrame(rows)


def _options(row: Mapping[str, Any]) -> dict[str, Any]:
    """The metric options recorded in a row (its `options` JSON)."""
    try:
        options = json.loads(row.get("options") or "{}")
    except ValueError:
        return {}
    return options if isinstance(options, dict) else {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `saebench gate`."""
    parser.add_argument("new", type=Path, help="the new run (a run directory or results.csv)")
    parser.add_argument("--baseline", type=Path, required=True,
                        help="the baseline run (a run directory, results.csv, or a baseline "
                             "directory such as suites/baselines/toy)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on noisy checks too (worse beyond tolerance, within noise)")


def run(args: argparse.Namespace) -> int:
    """`saebench gate`: print what regressed; 0 nothing did, 1 something regressed (or could
    not be measured, or was noisy with --strict), 2 a usage or input error."""
    try:
        table = gate_runs(args.new, args.baseline)
    except (FileNotFoundError, ValueError) as err:
        print(f"saebench gate: {err}", file=sys.stderr)
        return 2
    failing = (*FAILING, "noisy") if args.strict else FAILING
    shown = table[table["vs_baseline"].isin((*failing, "noisy", "missing"))]
    if len(shown):
        print(tabulate([[r["check_id"], r["vs_baseline"], r["message"]]
                        for r in shown.to_dict("records")],
                       headers=["check", "verdict", "why"], tablefmt="github",
                       maxcolwidths=[48, 12, 90]))
    counts = table["vs_baseline"].value_counts()
    print(f"{len(table)} checks: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return 1 if table["vs_baseline"].isin(failing).any() else 0
