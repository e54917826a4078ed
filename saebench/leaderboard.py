"""`saebench leaderboard RUN_DIR_OR_CSV... -o DIR [--metric M]`: runs merged into ranked tables.

Any number of inputs (run directories, results.csv files, SAEBench core-eval
`*_eval_results.json` files or folders of them) are merged into *entries*: one dictionary
measured on one model, at one hook, on one token set. Rows are one entry only when they
agree on `ENTRY_KEY` = model, model_hash, token_set, hook and `entry`, the dictionary's key
(`dictionary_key`): `identity:<row identity>` (a hash of everything that makes a
dictionary's numbers: weights, `args:`, hook overrides, factory) when the row has one. Rows
without it (older files, SAEBench imports) fall back to the weights' sha256, else a `source`
that says where the weights came from (`kind:reference`; a SAEBench import's
`saebench-core:` prefix dropped), else model + dictionary name; when one run holds two
dictionary names under one such key (the same weights under other `args:`, as a control
with shuffled decoders), the name is added to it. An empty model_hash or token_set is a
value of its own: a row that states none never joins one that does. Within an entry the
newest row per metric key wins (by `started_at`, then input order).

A value is shown only when its row measured it (verdict in `saebench.verdicts.VALUED` or
"imported"): an import read as missing (`saebench.saebench_core`) or a check that was
`error`, `empty`, `unstable` shows "—" with a footnote saying why, and is not ranked.

`DIR/leaderboard.md` (`saebench.leaderboard_markdown`) has, per model and hook, a table
ranked by one metric key (default `ce_loss_recovered[zero]`) with every other key beside it,
the Pareto-optimal entries (L0 vs loss recovered and vs KL score) marked, and PNG plots next
to it; a table holding entries of different model hashes or token sets shows both and says
so. `DIR/leaderboard.csv` has one row per entry: `CSV_COLUMNS` (the entry's key, its row
identity, sources, which values are imported, `missing` as JSON key → reason), then value
and interval columns per metric key. Entries whose difference from the one ranked just
above is within noise share its rank (`within_noise`).

    >>> build([Path("reports/run-a"), Path("reports/run-b")], Path("board"))
    PosixPath('board/leaderboard.md')
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from saebench.leaderboard_markdown import FRONTIERS, L0_KEY, render
from saebench.plots import family_of, layer_of, pareto_front
from saebench.results import RESULT_COLUMNS, RESULTS_FILE, atomic_write, is_missing, read_results
from saebench.saebench_core import (
    FILE_SUFFIX,
    IMPORTED_VERDICT,
    SOURCE_PREFIX,
    missing_reason_of,
    read_core_results,
)
from saebench.verdicts import MEANINGS, VALUED

DEFAULT_METRIC = "ce_loss_recovered[zero]"
MARKDOWN_FILE = "leaderboard.md"
CSV_FILE = "leaderboard.csv"
Z95 = 1.96
_TEXT_COLUMNS = ("suite", "check_id", "model", "dictionary", "hook", "metric", "source",
                 "architecture", "identity", "weights_sha256", "model_hash", "token_set",
                 "run_id", "verdict", "message")
ENTRY_KEY = ["model", "model_hash", "token_set", "hook", "entry"]
"""What rows must agree on to be one entry."""
CSV_COLUMNS = ["model", "hook", "dictionary", "architecture", "d_sae", "source", "imported",
               "entry", "identity", "model_hash", "token_set", "layer", "family", "missing"]
"""What an entry holds besides its value and interval per metric key (and rank, Pareto):
`entry` is its dictionary key, `identity` its newest row's identity column ("" for rows
without one), `imported` the metric keys whose value came from SAEBench, `missing` a JSON
object of metric key → why its value is missing."""


class InputError(ValueError):
    """An input or output the leaderboard cannot use (missing, not results, no rows)."""


# --------------------------------------------------------------------------- reading rows


def _text(value: Any) -> str:
    return "" if is_missing(value) else str(value)


def read_source(path: Path) -> pd.DataFrame:
    """The result rows of one input: a run directory or results.csv (`read_results`), a
    SAEBench core-eval JSON file or a folder holding such `*_eval_results.json` files (at
    any depth; `saebench.saebench_core.read_core_results`). Raises InputError, in one line,
    when it is missing, unreadable or holds no rows."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    core = path.suffix == ".json" or (path.is_dir() and not (path / RESULTS_FILE).is_file())
    if path.is_dir() and core and not any(path.rglob(f"*{FILE_SUFFIX}")):
        raise InputError(f"{path}: holds no {RESULTS_FILE} and no *{FILE_SUFFIX} file")
    try:
        rows = read_core_results(path) if core else read_results(path)
    except (OSError, ValueError, KeyError) as err:
        message = str(err)
        raise InputError(message if str(path) in message else f"{path}: {message}") from None
    if rows.empty:
        raise InputError(f"{path}: holds no results")
    return rows


def metric_key(check_id: str, metric: str = "") -> str:
    """The metric key of a check id `<dictionary set>::<metric key>`: the metric name and the
    check's own options or task in brackets.

    >>> metric_key("resid-L2-topk16::logit_diff_recovered[ioi]", "logit_diff_recovered")
    'logit_diff_recovered[ioi]'
    """
    starts = [m.start() + 2 for m in re.finditer(rf"::{re.escape(metric)}(?=\[|$)", check_id)]
    return check_id[starts[-1]:] if metric and starts else check_id.rpartition("::")[2]


def dictionary_key(row: Mapping[str, Any]) -> str:
    """Which dictionary a row measured: `identity:…` when the row has an identity, else
    `sha256:…` of its weights, else `source:…` when its `source` names a location (`zoo:…`,
    `release:id`; not a bare class name), else `name:<model>/<dictionary>`.

    >>> dictionary_key({"identity": "", "source": "saebench-core:gemma-scope:layer_12"})
    'source:gemma-scope:layer_12'
    """
    identity = _text(row.get("identity"))
    if identity:
        return f"identity:{identity}"
    sha = _text(row.get("weights_sha256"))
    if sha and all(sha.split("+")):
        return f"sha256:{sha}"
    source = _text(row.get("source")).removeprefix(SOURCE_PREFIX)
    if ":" in source:
        return f"source:{source}"
    return f"name:{_text(row.get('model'))}/{_text(row.get('dictionary'))}"


def started_seconds(started: pd.Series) -> pd.Series:
    """`started_at` as seconds since the epoch (epoch numbers or ISO dates); -inf if missing,
    so rows without a time count as oldest."""
    numeric = pd.to_numeric(started, errors="coerce").astype("float64")
    dates = pd.to_datetime(started.where(numeric.isna()), utc=True, errors="coerce",
                           format="ISO8601")
    seconds = (dates - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return numeric.fillna(seconds).fillna(-math.inf)


def merge(sources: Sequence[Path]) -> pd.DataFrame:
    """The newest row per entry (`ENTRY_KEY`) and metric key of all inputs, oldest first,
    with `metric_key`, `entry` and `started_s` columns added. Raises InputError for no
    inputs."""
    if not sources:
        raise InputError("no inputs given")
    rows = pd.concat([read_source(path) for path in sources], ignore_index=True)
    rows = rows.reindex(columns=[*RESULT_COLUMNS,
                                 *(c for c in rows.columns if c not in RESULT_COLUMNS)])
    for column in _TEXT_COLUMNS:
        rows[column] = rows[column].map(_text)
    rows["metric_key"] = [metric_key(check, name) for check, name
                          in zip(rows["check_id"], rows["metric"], strict=True)]
    rows["entry"] = _named_where_ambiguous(rows, [dictionary_key(r) for r
                                                  in rows.to_dict("records")])
    rows["started_s"] = started_seconds(rows["started_at"])
    order = np.lexsort((np.arange(len(rows)), rows["started_s"].to_numpy()))
    newest = rows.iloc[order].drop_duplicates([*ENTRY_KEY, "metric_key"], keep="last")
    return newest.reset_index(drop=True)


def _named_where_ambiguous(rows: pd.DataFrame, keys: list[str]) -> list[str]:
    """The dictionary keys, the dictionary name added (`key#name`) to a key without identity
    that one run (run id and suite) holds under two names: two declarations of one file,
    which may differ in what no column of an older row records (`args:`, hook overrides)."""
    frame = rows[["model", "model_hash", "token_set", "hook", "run_id", "suite",
                  "dictionary"]].assign(entry=keys)
    fallback = ~frame["entry"].str.startswith("identity:")
    names = frame[fallback].groupby([*ENTRY_KEY, "run_id", "suite"])["dictionary"].nunique()
    ambiguous = {key[:len(ENTRY_KEY)] for key, n in names.items() if n > 1}
    return [f"{key}#{name}" if tuple(r) in ambiguous else key for key, name, r
            in zip(keys, frame["dictionary"], frame[ENTRY_KEY].itertuples(index=False),
                   strict=True)]


# --------------------------------------------------------------------------- ranking


def direction(key: str, rows: pd.DataFrame) -> bool | None:
    """Whether higher is better for a metric key: from the registry by the metric name before
    `[`, else as its rows state it (imported metrics); None when neither knows."""
    from saebench.metrics import get_metric  # lazily: the registry imports torch

    try:
        return get_metric(key.split("[", 1)[0]).higher_is_better
    except KeyError:
        stated = rows.loc[rows["metric_key"] == key, "higher_is_better"].dropna()
        return bool(stated.iloc[-1]) if len(stated) else None


def within_noise(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Whether two (value, ci_low, ci_high) differ by no more than noise: |Δ| ≤
    1.96·√(se_a² + se_b²), se = half the 95% interval's width / 1.96 (independent intervals).
    When either has no interval, only an exact tie counts.

    >>> within_noise((0.90, 0.88, 0.92), (0.89, 0.87, 0.91)), within_noise((1, 1, 1), (2, 2, 2))
    (True, False)
    """
    (value_a, low_a, high_a), (value_b, low_b, high_b) = a, b
    diff = abs(value_a - value_b)
    if any(is_missing(bound) for bound in (low_a, high_a, low_b, high_b)):
        return diff == 0
    se_a, se_b = (high_a - low_a) / 2 / Z95, (high_b - low_b) / 2 / Z95
    return diff <= Z95 * math.hypot(se_a, se_b)


def rank_entries(table: pd.DataFrame, key: str, higher_is_better: bool) -> pd.DataFrame:
    """The table sorted best first by `key` with a `rank` column (1 = best): an entry within
    noise of the one ranked just above shares its rank; entries without a value get <NA>."""
    table = table.sort_values(key, ascending=not higher_is_better, na_position="last",
                              kind="stable")
    triples = list(zip(table[key], table[f"{key}_ci_low"], table[f"{key}_ci_high"], strict=True))
    ranks: list[int | None] = []
    for index, triple in enumerate(triples):
        if is_missing(triple[0]):
            ranks.append(None)
        elif index and within_noise(triples[index - 1], triple):
            ranks.append(ranks[-1])
        else:
            ranks.append(index + 1)
    return table.assign(rank=pd.array(ranks, dtype="Int64"))


# --------------------------------------------------------------------------- entries


def _key_order(keys: Sequence[str], metric: str) -> list[str]:
    """The ranking key, L0, the frontier keys, then the other keys alphabetically."""
    return [k for k in dict.fromkeys([metric, L0_KEY, *FRONTIERS, *sorted(keys)]) if k in keys]


def _entry(rows: pd.DataFrame) -> dict[str, Any]:
    """One entry from its rows (newest per metric key, oldest first): its columns, and per
    metric key the value and interval of a measured row, NaN and the reason otherwise."""
    newest = rows.iloc[-1]
    records = rows.to_dict("records")
    sources = (r["source"] or (f"run {r['run_id']}" if r["run_id"] else "") for r in records)
    entry = {
        "model": newest["model"], "hook": newest["hook"], "dictionary": newest["dictionary"],
        "architecture": next((r["architecture"] for r in records if r["architecture"]), ""),
        "d_sae": next((r["d_sae"] for r in records if not is_missing(r["d_sae"])), pd.NA),
        "source": "; ".join(s for s in dict.fromkeys(sources) if s),
        "imported": ";".join(r["metric_key"] for r in records
                             if r["source"].startswith(SOURCE_PREFIX)),
        **{c: newest[c] for c in ("entry", "identity", "model_hash", "token_set")},
        "layer": layer_of(newest["hook"]),
        "family": family_of(newest["dictionary"], newest["hook"]),
    }
    missing = {}
    for r in records:
        key = r["metric_key"]
        if r["verdict"] in (*VALUED, IMPORTED_VERDICT):
            entry |= {key: r["value"], f"{key}_ci_low": r["ci_low"],
                      f"{key}_ci_high": r["ci_high"]}
        else:
            entry |= {key: math.nan, f"{key}_ci_low": math.nan, f"{key}_ci_high": math.nan}
            missing[key] = missing_reason(r)
    entry["missing"] = json.dumps(missing, ensure_ascii=False) if missing else ""
    return entry


def missing_reason(row: Mapping[str, Any]) -> str:
    """Why a row has no value to show: an import's reason, else its verdict and what that
    means (`saebench.verdicts.MEANINGS`).

    >>> missing_reason({"verdict": "empty", "message": ""})
    '[empty] in its run: nothing was measured'
    """
    imported = missing_reason_of(row)
    if imported:
        return f"SAEBench core file: {imported}"
    verdict = _text(row.get("verdict")) or "no verdict"
    return f"[{verdict}] in its run: {MEANINGS.get(verdict, 'not a measurement')}"


def _table_order(entries: pd.DataFrame) -> list[tuple[str, str]]:
    """(model, hook) pairs: by model, then by layer (hooks outside blocks last), then name."""
    pairs = dict.fromkeys(zip(entries["model"], entries["hook"], strict=True))
    return sorted(pairs, key=lambda p: (p[0], layer_of(p[1]) is None, layer_of(p[1]) or 0, p[1]))


def leaderboard_table(rows: pd.DataFrame, metric: str,
                      directions: Mapping[str, bool | None]) -> pd.DataFrame:
    """One row per entry (`ENTRY_KEY`), tables (model, hook) in order and each ranked by
    `metric`, with `pareto_<key>` marks for the frontier keys and value / interval columns
    per metric key."""
    keys = _key_order(list(dict.fromkeys(rows["metric_key"])), metric)
    grouped = rows.groupby(ENTRY_KEY, sort=False)
    entries = pd.DataFrame([_entry(group) for _, group in grouped])
    entries = entries.reindex(columns=[*CSV_COLUMNS, *(f"{k}{suffix}" for k in keys
                                                         for suffix in ("", "_ci_low",
                                                                        "_ci_high"))])
    entries = entries.astype({"d_sae": "Int64", "layer": "Int64"}).copy()  # consolidated
    tables = []
    for model, hook in _table_order(entries):
        table = entries[(entries["model"] == model) & (entries["hook"] == hook)]
        table = rank_entries(table, metric, bool(directions[metric]))
        tables.append(table.assign(**{
            f"pareto_{key}": pareto_front(table, L0_KEY, key,
                                          y_higher_better=directions.get(key) is not False)
            if key in keys and L0_KEY in keys else False for key in FRONTIERS}))
    board = pd.concat(tables, ignore_index=True)
    first = ["model", "hook", "rank", "dictionary", "architecture", "d_sae",
             *(f"pareto_{k}" for k in FRONTIERS)]
    return board[[*first, *(c for c in board.columns if c not in first)]]


# --------------------------------------------------------------------------- building


def _output_dir(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def build(sources: Sequence[Path], out: Path, metric: str = DEFAULT_METRIC) -> Path:
    """Merge the inputs, write `out/leaderboard.md`, `out/leaderboard.csv` and the PNGs, and
    return the Markdown's path. Raises InputError for an input or metric key it cannot use.

    >>> build([Path("reports/example")], Path("board"), metric="kl_div_score[zero]")
    PosixPath('board/leaderboard.md')
    """
    rows = merge(sources)
    keys = list(dict.fromkeys(rows["metric_key"]))
    if metric not in keys:
        raise InputError(f"no row has the metric key {metric!r}; keys present: "
                         f"{', '.join(sorted(keys))}")
    directions = {k: direction(k, rows) for k in _key_order(keys, metric)}
    if directions[metric] is None:
        raise InputError(f"{metric!r} is not a registered metric and its rows do not say "
                         "whether higher is better")
    board = leaderboard_table(rows, metric, directions)
    out = _output_dir(out)
    markdown = render(board, metric, directions, out, sources)
    atomic_write(out / CSV_FILE, board.to_csv(index=False))
    atomic_write(out / MARKDOWN_FILE, markdown)
    return out / MARKDOWN_FILE


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `saebench leaderboard` on its (sub)parser; sets `func=run`."""
    parser.add_argument("sources", nargs="+", type=Path, metavar="RUN_DIR_OR_CSV",
                        help="run directories, results.csv files, SAEBench core-eval "
                             f"*{FILE_SUFFIX} files or folders of them")
    parser.add_argument("-o", "--out", type=Path, required=True, metavar="DIR",
                        help=f"where {MARKDOWN_FILE}, {CSV_FILE} and the plots are written")
    parser.add_argument("--metric", default=DEFAULT_METRIC, metavar="M",
                        help=f"the metric key to rank by (default {DEFAULT_METRIC})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the leaderboard and print its Markdown path: 0, or 2 with a one-line message on
    stderr for an input that is missing or holds no results, or an unknown metric key."""
    try:
        path = build(args.sources, args.out, args.metric)
    except (InputError, OSError) as err:
        print(f"saebench leaderboard: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(path)
    return 0
