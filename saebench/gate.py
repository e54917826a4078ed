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
from saebench.stats import resampled, summarize
from saebench.verdicts import FAILING, VALUED

Z = 1.959964
"""The normal quantile of a two-sided 95% interval."""
N_BOOT = 1000
TERMS_RTOL = 1e-9
"""How far a row's value may lie from the value its own stored terms give: both are float64
sums of the same numbers, which differ only where numpy and torch order a sum differently
(a few ulp, ~1e-15 relative); 1e-9 leaves room for sums of ~10^6 terms and catches any
edit of a value or of its terms."""
COMPARED_FACTS = {"model_hash": "model", "saebench_version": "saebench version"}
"""Provenance a run and its baseline must share to be compared (besides the suite): numbers
of another model, or of another saebench, are not a baseline."""


class Incomparable(ValueError):
    """A run and a baseline that measured different things: another suite, model or
    saebench version (one line, naming both sides)."""


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
    if base_row.get("verdict") not in (*VALUED, "error", "empty", "unstable", "skipped"):
        return Comparison("incomparable", message=f"its baseline row has the verdict "
                                                  f"{base_row.get('verdict')!r}, which saebench "
                                                  "does not write")
    base_value, value = _number(base_row.get("value")), float(new_row["value"])
    if base_row["verdict"] not in VALUED or not math.isfinite(base_value):
        return Comparison("new", message=f"the baseline has no value for this check "
                                         f"(its verdict: {base_row['verdict']})")
    if base_row.get("metric") != new_row["metric"]:
        return Comparison("incomparable", message=f"its baseline row measured "
                                                  f"{base_row.get('metric')!r}, not "
                                                  f"{new_row['metric']!r}")
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


def _number(value: Any) -> float:
    """A cell as a float; NaN for a missing or non-numeric one."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def judge(verdict: str, message: str, comparison: Comparison) -> tuple[str, str]:
    """A check's verdict from its threshold verdict and its baseline comparison, which are
    independent: a passing (or measured) check that regressed is a `regression` (one worse
    within noise `noisy`: reported, failed only when strict); a failing one stays `fail`;
    a baseline row that cannot be compared makes the check an `error`. The message gives
    both, so it says which part decided.

        >>> judge("pass", "l0 = 16 meets <= 70", Comparison("regression", message="Δ = -3"))
        ('regression', 'l0 = 16 meets <= 70; Δ = -3')
    """
    if comparison.verdict == "incomparable":
        return "error", f"{message}; cannot compare with the baseline: {comparison.message}"
    if comparison.verdict == "new" or verdict not in VALUED:
        return verdict, message
    message = f"{message}; {comparison.message}"
    if verdict in ("pass", "measured") and comparison.verdict in ("regression", "noisy"):
        return comparison.verdict, message
    return verdict, message


def terms_contradiction(row: Mapping[str, Any], terms: Mapping[str, Any] | None) -> str | None:
    """Why a row's value is not the value its own stored terms give (an edited row or
    terms), or None when they agree or there is nothing to check."""
    if not terms or row.get("verdict") not in VALUED:
        return None
    try:
        metric = get_metric(str(row["metric"]))
        options = _options(row)
        names = (metric.count_term, *metric.terms(options))
        if not all(n in terms for n in names):
            return None
        tensors = {n: torch.as_tensor(np.asarray(terms[n])) for n in names}
        value = summarize(metric, tensors, options, n_boot=0).value
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as err:
        return f"its stored terms cannot give its metric ({type(err).__name__}: {err})"
    stated = _number(row.get("value"))
    if math.isclose(value, stated, rel_tol=TERMS_RTOL, abs_tol=1e-12) or (
            math.isnan(value) and math.isnan(stated)):
        return None
    return f"its value {stated!r} is not what its stored terms give ({value!r})"


# --------------------------------------------------------------------------- baselines


@dataclass(frozen=True)
class Baseline:
    """A baseline: the rows (and stored terms) of a run directory, or of a trimmed copy
    committed next to a suite, by (suite, check id)."""

    run: results.RunDir
    rows: dict[tuple[str, str], dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> Baseline:
        """The baseline in `path` (a run directory or its results.csv); FileNotFoundError
        when there is none, ValueError when it is not a results file."""
        path = Path(path)
        run = results.RunDir(path.parent if path.is_file() else path)
        frame = results.read_results(path)
        return cls(run, {results.row_key(r): r for r in frame.to_dict("records")})

    @property
    def suites(self) -> list[str]:
        """The suites the baseline holds rows of, in order."""
        return list(dict.fromkeys(suite for suite, _ in self.rows))

    def row(self, check_id: str, suite: str = "") -> dict[str, Any] | None:
        return self.rows.get((suite, check_id))

    def terms(self, check_id: str, suite: str = "") -> dict[str, np.ndarray] | None:
        """The check's stored terms; `results.DamagedFile` when they cannot be read."""
        return results.read_terms(self.run, check_id, suite)

    def facts(self, suite: str) -> dict[str, list[str]]:
        """The distinct values of `COMPARED_FACTS` among the suite's rows."""
        rows = [r for (s, _), r in self.rows.items() if s == suite]
        return {k: sorted({str(r.get(k) or "") for r in rows}) for k in COMPARED_FACTS}


def incomparable(baseline: Baseline, suite: str, facts: Mapping[str, Any], where: Path
                 ) -> str | None:
    """Why `baseline` is not a baseline of a run of `suite` with these provenance `facts`
    (`COMPARED_FACTS`), in one line, or None when it is."""
    if suite not in baseline.suites:
        held = ", ".join(repr(s) for s in baseline.suites) or "no suite"
        return f"{where} holds rows of {held}, not of suite {suite!r}"
    for key, what in COMPARED_FACTS.items():
        theirs, ours = baseline.facts(suite)[key], str(facts.get(key) or "")
        if theirs != [ours]:
            return (f"{where} measured another {what} ({', '.join(theirs) or 'unknown'}) than "
                    f"this run of {suite!r} ({ours or 'unknown'})")
    return None


def locate(path: Path, suite: str) -> Path:
    """Where a suite's baseline is under `--saebench-baseline PATH`: PATH itself when it
    holds a results.csv or is named after the suite, else `PATH/<suite>`."""
    path = Path(path)
    if (path / results.RESULTS_FILE).is_file() or path.is_file() or path.name == suite:
        return path
    return path / suite


def write_baseline(run: results.RunDir, target: Path,
                   keys: Sequence[tuple[str, str]] | None = None) -> Path:
    """Copy a run's rows (those of `keys`, (suite, check id) pairs, or all) and their stored
    terms into the baseline directory `target`, keeping the baseline's other rows: a trimmed
    run directory (no per-prompt tables, features or report), small enough to commit."""
    frame = results.read_results(run.path)
    ids = list(zip(frame["suite"], frame["check_id"], strict=True))
    if keys is not None:
        wanted = set(keys)
        frame = frame[[key in wanted for key in ids]]
        ids = [key for key in ids if key in wanted]
    target.mkdir(parents=True, exist_ok=True)
    kept = pd.DataFrame(columns=frame.columns)
    if (target / results.RESULTS_FILE).is_file():
        old = results.read_results(target)
        written = set(ids)
        kept = old[[key not in written
                    for key in zip(old["suite"], old["check_id"], strict=True)]]
    merged = pd.concat([kept, frame], ignore_index=True) if len(kept) else frame
    if not len(merged):
        return target
    base = results.RunDir(target)
    with tempfile.TemporaryDirectory(dir=target) as staging:
        staged = Path(staging) / results.RESULTS_FILE
        results.append_rows(staged, merged.to_dict("records"), columns=list(merged.columns))
        staged.replace(base.results)
    for suite, check_id in ids:
        source = results.stored_terms_path(run, check_id, suite)
        dest = base.terms_file(check_id, suite)
        base.terms_file(check_id).unlink(missing_ok=True)  # an older saebench's name
        if source is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        else:
            dest.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------- offline gate


def _not_selected(new: Path, suite: str) -> str | None:
    """How the new run's selection left checks of `suite` out (`-k resid`, `--saebench-shard
    2/3`), or None when it selected every check of the suite (`results.SELECTION_FILE`)."""
    selection = results.read_selection(new)
    entry = selection.get("suites", {}).get(suite)
    if not entry or entry.get("selected", 0) >= entry.get("total", 0):
        return None
    return (f"the run selected {entry['selected']} of the suite's {entry['total']} checks: "
            f"{selection.get('how') or 'a selection'}")


def _gate_row(key: tuple[str, str], row: dict[str, Any], new_base: Baseline,
              old_base: Baseline, flag: str) -> dict[str, Any]:
    """One check of the new run against its baseline row, as a gate table row."""
    suite, check_id = key
    out = {"suite": suite, "check_id": check_id}
    if row["verdict"] not in VALUED:
        return {**out, "vs_baseline": row["verdict"], "message": row["message"]}
    new_terms, base_row = new_base.terms(check_id, suite), old_base.row(check_id, suite)
    base_terms = old_base.terms(check_id, suite) if base_row is not None else None
    for side, checked, terms in (("new", row, new_terms), ("baseline", base_row, base_terms)):
        problem = checked is not None and terms_contradiction(checked, terms)
        if problem:
            return {**out, "vs_baseline": "error", "message": f"the {side} row: {problem}"}
    tol = row.get("tolerance")
    comparison = compare(row, base_row, new_terms, base_terms, options=_options(row),
                         tolerance=None if pd.isna(tol) else float(tol))
    return {**out, **comparison.columns(), "value": row["value"],
            "message": flag + comparison.message}


def gate_runs(new: Path, old: Path, allow_incomparable: bool = False) -> pd.DataFrame:
    """Every check of run `new` against run `old` (directories or results.csv files): one
    row per (suite, check id) of either run, with the comparison's columns.

    A check that the new run could not measure keeps its verdict (error, empty, unstable);
    one only in `old` is `missing` (failing) unless the new run's selection left it out
    (`not selected`); a row that its own stored terms contradict is an `error`. Raises
    `Incomparable` when the runs measured another suite, model or saebench version (unless
    `allow_incomparable`, which compares anyway and flags every message), and
    `results.DamagedFile` for stored terms that cannot be read.
    """
    new_base, old_base = Baseline.load(new), Baseline.load(old)
    flags = {}
    for suite in new_base.suites:
        facts = {k: (new_base.facts(suite)[k] or [""])[0] for k in COMPARED_FACTS}
        problem = incomparable(old_base, suite, facts, Path(old))
        if problem and not allow_incomparable:
            raise Incomparable(f"{problem}; --allow-incomparable compares anyway")
        flags[suite] = f"INCOMPARABLE ({problem}): " if problem else ""
    rows = [_gate_row(key, row, new_base, old_base, flags[key[0]])
            for key, row in new_base.rows.items()]
    for suite, check_id in old_base.rows:
        if (suite, check_id) in new_base.rows:
            continue
        why = _not_selected(Path(new), suite)
        rows.append({"suite": suite, "check_id": check_id,
                     "vs_baseline": "not selected" if why else "missing",
                     "message": f"in the baseline only; {why}" if why else
                     "in the baseline only: the run did not measure it"})
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
    parser.add_argument("--allow-incomparable", action="store_true",
                        help="compare with a baseline of another suite, model or saebench "
                             "version anyway (every message says so)")


def run(args: argparse.Namespace) -> int:
    """`saebench gate`: print what regressed; 0 nothing did, 1 something regressed (or could
    not be measured, is missing from the run, or was noisy with --strict), 2 a usage or
    input error (a missing or damaged file, a baseline of something else)."""
    try:
        table = gate_runs(args.new, args.baseline, args.allow_incomparable)
    except (FileNotFoundError, ValueError) as err:
        print(f"saebench gate: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    failing = (*FAILING, "noisy") if args.strict else FAILING
    shown = table[table["vs_baseline"].isin((*failing, "noisy", "not selected"))]
    several = table["suite"].nunique() > 1
    if len(shown):
        print(tabulate([[f"{r['suite']}::{r['check_id']}" if several else r["check_id"],
                         r["vs_baseline"], r["message"]] for r in shown.to_dict("records")],
                       headers=["check", "verdict", "why"], tablefmt="github",
                       maxcolwidths=[48, 12, 90]))
    counts = table["vs_baseline"].value_counts()
    print(f"{len(table)} checks: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    flagged = table["message"].fillna("").str.extract(r"^INCOMPARABLE \((.*?)\): ")[0]
    for problem in flagged.dropna().unique():
        print(f"compared anyway (--allow-incomparable): {problem}")
    return 1 if table["vs_baseline"].isin(failing).any() else 0
