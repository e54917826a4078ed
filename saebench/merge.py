"""`saebench merge`: shard run directories into one run directory, as a serial run writes it.

    saebench merge reports/shard-1 reports/shard-2 reports/shard-3 -o reports/merged

Every table (results, per-prompt, feature, layer and breakdown rows) and every stored term
file of the shards is gathered into the output, rows in the order a serial run writes
them (the selection each shard recorded in `shard.json`; the order the runs are given
otherwise), with the merged run's id; then its report is built. Runs that cannot be one
run are refused with a message saying which runs differ and how: different saebench
versions, suites, token sets or shard selections, a check measured twice, a shard missing
(unless `allow_partial`). Reads and writes result rows only (no torch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from saebench import results
from saebench.shards import SHARD_FILE

TABLES = (results.PER_PROMPT_FILE, results.FEATURES_FILE, results.LAYERS_FILE,
          results.BREAKDOWN_FILE)
"""The tables beside results.csv merged row for row."""
MERGE_FILE = "merge.json"
"""What a merged run directory records about the runs it was merged from."""


class MergeError(ValueError):
    """Runs that cannot be merged into one: the message says which and why."""


@dataclass(frozen=True)
class _Run:
    path: Path
    rows: pd.DataFrame
    shard: dict | None


def _load(path: Path) -> _Run:
    if not (path / results.RESULTS_FILE).is_file():
        raise MergeError(f"{path}: not a run directory (no {results.RESULTS_FILE})")
    shard_file = path / SHARD_FILE
    shard = _read_shard(shard_file) if shard_file.is_file() else None
    return _Run(path, results.read_results(path), shard)


def _read_shard(path: Path) -> dict:
    """A shard record (`shards.SHARD_FILE`) with the fields merging reads, checked; a damaged
    one is a MergeError naming the file."""
    try:
        shard = json.loads(path.read_text(encoding="utf-8"))
        index, count, checks = shard["index"], shard["count"], shard["checks"]
        if not (isinstance(index, int) and isinstance(count, int) and 1 <= index <= count):
            raise ValueError(f"index {index!r} of count {count!r} is not a shard I of N")
        if not isinstance(checks, list) or not all(
                isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c)
                for c in checks):
            raise ValueError("checks must be a list of [suite, check id] pairs")
        shard["shard"] = f"{index}/{count}"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise MergeError(f"{path}: damaged shard record ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:160]}); rerun that shard") from None
    return shard


def _one(runs: Sequence[_Run], what: str, get) -> None:
    """Refuse unless `get(run)` is the same for every run, naming the first that differs."""
    first = get(runs[0])
    for run in runs[1:]:
        if get(run) != first:
            raise MergeError(f"{run.path} and {runs[0].path} differ in {what}: "
                             f"{get(run)} vs {first}; merge runs of one {what} only")


def _values(run: _Run, column: str, where: pd.Series | None = None) -> list[str]:
    """The distinct values of `column` in the run's rows (those `where` holds)."""
    cells = run.rows[column] if where is None else run.rows.loc[where, column]
    return sorted({str(v) for v in cells if not results.is_missing(v)})


def _order(runs: Sequence[_Run], allow_partial: bool) -> list[tuple[str, str]] | None:
    """The (suite, check id) order of the merged rows from the shards' records, after
    checking they are the shards of one selection; None when the runs are not shards."""
    sharded = [r for r in runs if r.shard is not None]
    if not sharded:
        return None
    if len(sharded) < len(runs):
        plain = next(r for r in runs if r.shard is None)
        raise MergeError(f"{plain.path} is not a shard (no {SHARD_FILE}) but "
                         f"{sharded[0].path} is; merge the shards of one run only")
    _one(runs, "shard selection (the checks selected before sharding)",
         lambda r: (r.shard["count"], r.shard["checks"]))
    seen: dict[int, Path] = {}
    for run in runs:
        index = run.shard["index"]
        if index in seen:
            raise MergeError(f"{run.path} and {seen[index]} are both shard "
                             f"{run.shard['shard']}")
        seen[index] = run.path
    missing = sorted(set(range(1, runs[0].shard["count"] + 1)) - set(seen))
    if missing and not allow_partial:
        count = runs[0].shard["count"]
        raise MergeError(f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing: "
                         "give every shard's run directory (or --allow-partial)")
    return [tuple(c) for c in runs[0].shard["checks"]]


def _sorted(frame: pd.DataFrame, order: dict[tuple[str, str], int] | None) -> pd.DataFrame:
    """Rows in the merged order (stable within a check); as given without an order."""
    if order is None or frame.empty:
        return frame
    rank = [order.get((s, c), len(order)) for s, c in zip(frame["suite"], frame["check_id"],
                                                           strict=True)]
    return frame.assign(_rank=rank).sort_values("_rank", kind="stable").drop(columns="_rank")


def merge(run_dirs: Sequence[Path], out: Path, *, allow_partial: bool = False) -> Path:
    """Merge `run_dirs` into the new run directory `out` and build its report; returns `out`.

    Raises MergeError when the runs cannot be one run or `out` already holds results.
    """
    from saebench import report

    if not run_dirs:
        raise MergeError("no run directories to merge")
    runs = [_load(Path(p)) for p in run_dirs]
    if (Path(out) / results.RESULTS_FILE).exists():
        raise MergeError(f"{out} already holds {results.RESULTS_FILE}: merge into a new "
                         "directory")
    _one(runs, "saebench version", lambda r: (_values(r, "saebench_version"),
                                              _values(r, "saebench_commit")))
    checks = _order(runs, allow_partial)
    if checks is None:
        _one(runs, "suites", lambda r: _values(r, "suite"))
    for suite in sorted({s for r in runs for s in _values(r, "suite")}):
        having = [r for r in runs if suite in _values(r, "suite")]
        for column, what in (("token_set", "token set"), ("model_hash", "model")):
            _one(having, f"{what} of suite {suite!r}",
                 lambda r, s=suite, c=column: _values(r, c, r.rows["suite"] == s))
    owner: dict[tuple[str, str], Path] = {}
    for run in runs:
        for key in zip(run.rows["suite"], run.rows["check_id"], strict=True):
            if key in owner:
                raise MergeError(f"check {key[1]} of suite {key[0]} is in both "
                                 f"{owner[key]} and {run.path}")
            owner[key] = run.path
    order = None if checks is None else {key: i for i, key in enumerate(checks)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = results.RunDir(out).run_id
    merged = _sorted(pd.concat([r.rows for r in runs], ignore_index=True), order)
    results.append_rows(out / results.RESULTS_FILE,
                        [{**row, "run_id": run_id} for row in _records(merged)])
    for name in TABLES:
        parts = [results.read_table(r.path / name) for r in runs if (r.path / name).is_file()]
        if parts:
            table = _sorted(pd.concat(parts, ignore_index=True), order)
            results.append_rows(out / name, [{**row, "run_id": run_id}
                                             for row in _records(table)])
    for run in runs:
        terms = run.path / results.TERMS_DIR
        if terms.is_dir():
            shutil.copytree(terms, out / results.TERMS_DIR, dirs_exist_ok=True)
    note = {"merged_from": [str(r.path) for r in runs],
            "shards": [r.shard["shard"] for r in runs if r.shard is not None]}
    results.atomic_write(out / MERGE_FILE, json.dumps(note, indent=1))
    _write_selection(runs, merged, out)
    report.write_report(out)
    return out


def _write_selection(runs: Sequence[_Run], merged: pd.DataFrame, out: Path) -> None:
    """The merged run's selection (`results.SELECTION_FILE`): per suite, the checks merged
    of the total the runs recorded; how the runs selected, without the shard part."""
    recorded = [results.read_selection(r.path) for r in runs]
    totals = {s: e["total"] for sel in recorded for s, e in sel.get("suites", {}).items()}
    if not totals:
        return
    counts = {s: (int((merged["suite"] == s).sum()), total) for s, total in totals.items()}
    hows = {", ".join(p for p in str(sel.get("how", "")).split(", ")
                      if p and not p.startswith("--saebench-shard")) for sel in recorded}
    results.write_selection(out, counts, "; ".join(sorted(h for h in hows if h))
                            or "shards not merged (--allow-partial)")


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts with missing cells as None, so they are written empty."""
    return [{k: (None if results.is_missing(v) else v) for k, v in row.items()}
            for row in frame.to_dict("records")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `saebench merge`."""
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="the shards' run directories")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="RUN_DIR",
                        help="the merged run directory (new)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="merge even when some shards are missing")


def run(args: argparse.Namespace) -> int:
    """`saebench merge`: 0 when merged, 2 when the runs cannot be merged."""
    try:
        out = merge(args.run_dirs, args.out, allow_partial=args.allow_partial)
    except (ValueError, FileNotFoundError) as err:  # MergeError, DamagedFile, not results
        print(f"saebench merge: {err}", file=sys.stderr)
        return 2
    print(f"saebench merge: {len(args.run_dirs)} run(s) -> {out / 'report.md'}")
    return 0
