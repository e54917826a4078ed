"""`saebench leaderboard RUN_DIR_OR_CSV... -o DIR [--metric M]`: runs merged into ranked tables.

Any number of inputs (run directories, results.csv files, SAEBench core-eval
`*_eval_results.json` files or folders of them) are merged: per dictionary *identity* and
metric key the newest row wins (by `started_at`, then input order). The identity is the
weights' sha256 when the row has it, else its `source` when that says where the weights came
from (`kind:reference`, as suites write it; a SAEBench import's `saebench-core:` prefix is
dropped, so an import and a run of the same release merge), else model + dictionary name.

`DIR/leaderboard.md` has, per model and hook, a table ranked by one metric key (default
`ce_loss_recovered[zero]`) with every other key beside it, the Pareto-optimal entries (L0 vs
loss recovered and vs KL score) marked, and PNG plots next to it; `DIR/leaderboard.csv` has
one row per entry. Entries whose difference from the one ranked just above is within noise
share its rank (`within_noise`).

    >>> build([Path("reports/run-a"), Path("reports/run-b")], Path("board"))
    PosixPath('board/leaderboard.md')
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping, Sequence
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from saebench.plots import family_of, frontier_plot, layer_curves, layer_of, pareto_front
from saebench.report import format_ci, format_value
from saebench.results import RESULT_COLUMNS, RESULTS_FILE, atomic_write, is_missing, read_results
from saebench.saebench_core import FILE_SUFFIX, SOURCE_PREFIX, read_core_results

DEFAULT_METRIC = "ce_loss_recovered[zero]"
L0_KEY = "l0"
FRONTIERS: dict[str, str] = {"ce_loss_recovered[zero]": "loss recovered",
                             "kl_div_score[zero]": "KL score"}
"""Metric keys drawn against L0 per hook, with their short names in tables."""
UNCENTRED_EV = "explained_variance_uncentred"
MARKDOWN_FILE = "leaderboard.md"
CSV_FILE = "leaderboard.csv"
Z95 = 1.96
IMPORTED_MARK = "†"
_TEXT_COLUMNS = ("check_id", "model", "dictionary", "hook", "metric", "source", "architecture",
                 "weights_sha256", "model_hash", "run_id")
ENTRY_COLUMNS = ["model", "hook", "dictionary", "architecture", "d_sae", "source", "imported",
                 "identity", "model_hash", "layer", "family"]
"""What an entry holds besides its value and interval per metric key (and rank, Pareto)."""
_SOURCE_WIDTH = 80


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


def identity(row: Mapping[str, Any]) -> str:
    """Which dictionary a row measured: `sha256:…` of its weights, else `source:…` when its
    `source` names a location (`zoo:…`, `release:id`; not a bare class name), else
    `name:<model>/<dictionary>`.

    >>> identity({"weights_sha256": "", "source": "saebench-core:gemma-scope:layer_12"})
    'source:gemma-scope:layer_12'
    """
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
    """The newest row per (dictionary identity, metric key) of all inputs, oldest first, with
    `metric_key`, `identity` and `started_s` columns added. Raises InputError for no inputs."""
    if not sources:
        raise InputError("no inputs given")
    rows = pd.concat([read_source(path) for path in sources], ignore_index=True)
    rows = rows.reindex(columns=[*RESULT_COLUMNS,
                                 *(c for c in rows.columns if c not in RESULT_COLUMNS)])
    for column in _TEXT_COLUMNS:
        rows[column] = rows[column].map(_text)
    rows["metric_key"] = [metric_key(check, name) for check, name
                          in zip(rows["check_id"], rows["metric"], strict=True)]
    rows["identity"] = [identity(r) for r in rows.to_dict("records")]
    rows["started_s"] = started_seconds(rows["started_at"])
    order = np.lexsort((np.arange(len(rows)), rows["started_s"].to_numpy()))
    newest = rows.iloc[order].drop_duplicates(["identity", "metric_key"], keep="last")
    return newest.reset_index(drop=True)


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
    """One entry (dictionary at a hook of a model) from its rows, oldest first."""
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
        "identity": newest["identity"], "model_hash": newest["model_hash"],
        "layer": layer_of(newest["hook"]),
        "family": family_of(newest["dictionary"], newest["hook"]),
    }
    for r in records:
        key = r["metric_key"]
        entry |= {key: r["value"], f"{key}_ci_low": r["ci_low"], f"{key}_ci_high": r["ci_high"]}
    return entry


def _table_order(entries: pd.DataFrame) -> list[tuple[str, str]]:
    """(model, hook) pairs: by model, then by layer (hooks outside blocks last), then name."""
    pairs = dict.fromkeys(zip(entries["model"], entries["hook"], strict=True))
    return sorted(pairs, key=lambda p: (p[0], layer_of(p[1]) is None, layer_of(p[1]) or 0, p[1]))


def leaderboard_table(rows: pd.DataFrame, metric: str,
                      directions: Mapping[str, bool | None]) -> pd.DataFrame:
    """One row per entry (model, hook, dictionary identity), tables in order and each ranked
    by `metric`, with `pareto_<key>` marks for the frontier keys and value / interval columns
    per metric key."""
    keys = _key_order(list(dict.fromkeys(rows["metric_key"])), metric)
    grouped = rows.groupby(["model", "hook", "identity"], sort=False)
    entries = pd.DataFrame([_entry(group) for _, group in grouped])
    entries = entries.reindex(columns=[*ENTRY_COLUMNS, *(f"{k}{suffix}" for k in keys
                                                         for suffix in ("", "_ci_low",
                                                                        "_ci_high"))])
    entries = entries.astype({"d_sae": "Int64", "layer": "Int64"})
    tables = []
    for model, hook in _table_order(entries):
        table = entries[(entries["model"] == model) & (entries["hook"] == hook)]
        table = rank_entries(table, metric, bool(directions[metric]))
        for key in FRONTIERS:
            table[f"pareto_{key}"] = (
                pareto_front(table, L0_KEY, key, y_higher_better=directions.get(key) is not False)
                if key in keys and L0_KEY in keys else False)
        tables.append(table)
    board = pd.concat(tables, ignore_index=True)
    first = ["model", "hook", "rank", "dictionary", "architecture", "d_sae",
             *(f"pareto_{k}" for k in FRONTIERS)]
    return board[[*first, *(c for c in board.columns if c not in first)]]


# --------------------------------------------------------------------------- Markdown


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell: `|` escaped, line breaks as spaces."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _markdown_table(rows: list[list[Any]], headers: list[str], left: int) -> str:
    """A GitHub table whose first `left` columns are left-aligned, the others right."""
    align = ["left" if i < left else "right" for i in range(len(headers))]
    return tabulate([[_cell(c) for c in row] for row in rows], headers=headers,
                    tablefmt="github", disable_numparse=True, colalign=align)


def _arrow(higher_is_better: bool | None) -> str:
    return {True: " ↑", False: " ↓"}.get(higher_is_better, "")


def _header(key: str, higher_is_better: bool | None) -> str:
    if key == UNCENTRED_EV:
        return f"{key} (SAEBench's uncentred EV){_arrow(higher_is_better)}"
    return f"{key}{_arrow(higher_is_better)}"


def _shown(value: Any, low: Any, high: Any, imported: bool, interval: bool) -> str:
    """A value, with its interval when `interval` and known, marked † when imported."""
    text = format_value(value)
    if interval and not (is_missing(low) and is_missing(high)):
        text += f" {format_ci(low, high)}"
    return text + (f" {IMPORTED_MARK}" if imported and not is_missing(value) else "")


def _table_rows(table: pd.DataFrame, metric: str, others: list[str],
                columns: list[str]) -> list[list[str]]:
    rows = []
    for entry in table.to_dict("records"):
        imported = set(entry["imported"].split(";"))
        rows.append([
            format_value(entry["rank"]), entry["dictionary"],
            *(format_value(entry[c]) for c in columns),
            _shown(entry[metric], None, None, metric in imported, interval=False),
            format_ci(entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"]),
            *(_shown(entry[k], entry[f"{k}_ci_low"], entry[f"{k}_ci_high"], k in imported,
                     interval=True) for k in others),
            ", ".join(label for k, label in FRONTIERS.items() if entry[f"pareto_{k}"]),
            _source_cell(entry["source"], bool(entry["imported"])),
        ])
    return rows


def _source_cell(sources: str, imported: bool) -> str:
    """An entry's sources for the table: each once (a SAEBench import's without its prefix),
    "SAEBench core †" added when some of its values are imported, cut to a readable width.

    >>> _source_cell("rel:id; saebench-core:rel:id", True)
    'rel:id · SAEBench core †'
    """
    names = dict.fromkeys(s.removeprefix(SOURCE_PREFIX) for s in sources.split("; ") if s)
    text = "; ".join(names)
    text = text if len(text) <= _SOURCE_WIDTH else text[:_SOURCE_WIDTH - 1] + "…"
    return text + (f" · SAEBench core {IMPORTED_MARK}" if imported else "")


def _notes(table: pd.DataFrame, metric: str, higher_is_better: bool, keys: list[str]) -> str:
    """The sentences under a table: how it is ranked, ties, and what its marks mean."""
    notes = [
        f"Ranked by `{metric}` ({'higher' if higher_is_better else 'lower'} is better). An "
        "entry shares the rank of the one just above it when their difference is within "
        "noise: |Δ| ≤ 1.96·√(se₁² + se₂²), se = half the 95% interval's width / 1.96, the "
        "intervals taken as independent; entries without an interval share a rank only "
        "when exactly equal.",
        "Pareto (L0 vs loss recovered, vs KL score): no other entry here is at least as good "
        "on both L0 (lower) and the score (higher) and better on one.",
    ]
    if table["rank"].isna().any():
        notes.append(f"Entries without a value for `{metric}` are unranked (—).")
    if table["imported"].str.len().any():
        notes.append(f"{IMPORTED_MARK} imported from SAEBench core-eval results.")
    if UNCENTRED_EV in keys:
        notes.append(f"`{UNCENTRED_EV}` is SAEBench's explained variance, 1 − E‖x − x̂‖² / "
                     "E‖x‖²: uncentred, so it runs higher than saebench's centred "
                     "`explained_variance` when activations have a large mean; the two are not "
                     "comparable.")
    return " ".join(notes)


SHOWN = ("l0", "kl_div_score[zero]", "explained_variance", UNCENTRED_EV, "logit_diff_recovered[")
"""Metric keys the Markdown tables show beside the ranked one (prefixes; the CSV has all),
so a table stays readable at a laptop's width."""


def _in_markdown(key: str) -> bool:
    return key.startswith(SHOWN)


def _table_section(table: pd.DataFrame, metric: str, directions: Mapping[str, bool | None],
                   images: list[tuple[str, str]]) -> str:
    """A hook's heading, frontier images, ranked table and notes."""
    keys = [k for k in directions if k != metric and table[k].notna().any()
            and _in_markdown(k)]
    columns = [c for c in ("architecture", "d_sae") if table[c].map(_text).str.len().any()]
    headers = ["rank", "dictionary", *columns, _header(metric, directions[metric]), "95% CI",
               *(_header(k, directions[k]) for k in keys), "Pareto (L0 vs)", "source"]
    body = _markdown_table(_table_rows(table, metric, keys, columns), headers,
                           left=2 + len(columns))
    hook = " + ".join(f"`{h}`" for h in table["hook"].iloc[0].split(","))
    parts = [f"### {hook}", *(_image(caption, name) for caption, name in images), body,
             _notes(table, metric, bool(directions[metric]), keys)]
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- plots


def _image(caption: str, name: str) -> str:
    """A Markdown image of a PNG beside the Markdown, brackets in its caption escaped."""
    caption = caption.replace("[", "\\[").replace("]", "\\]")
    return f"![{caption}]({name})"


def _slug(text: str, width: int = 60) -> str:
    """A file-name-safe form of `text` (letters, digits, `.`, `-`; the rest `_`)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")[:width] or "_"


def _frontier_images(table: pd.DataFrame, number: int, out: Path,
                     directions: Mapping[str, bool | None]) -> list[tuple[str, str]]:
    """L0 frontier plots of one table (keys with two entries or more): (caption, file name)."""
    model, hook = table["model"].iloc[0], table["hook"].iloc[0]
    names = []
    for key, label in FRONTIERS.items():
        if key not in table or L0_KEY not in table or (
                table[[L0_KEY, key]].notna().all(axis=1).sum() < 2):
            continue
        name = f"frontier-{number:02d}-{_slug(model)}-{_slug(hook)}-{_slug(key)}.png"
        frontier_plot(table, L0_KEY, key, out / name, group="hook",
                      title=f"{model} · {hook}: L0 vs {label}", x_label="L0 (active features)",
                      y_label=key, y_higher_better=directions.get(key) is not False)
        names.append((f"L0 vs {label}", name))
    return names


def _layer_images(board: pd.DataFrame, metric: str, out: Path,
                  directions: Mapping[str, bool | None]) -> list[tuple[str, str]]:
    """Per model, for the ranking and frontier keys, curves across layers of the families
    measured at more than one layer (the best entry per family and layer): (caption, name)."""
    names = []
    for model, entries in board[board["layer"].notna()].groupby("model", sort=True):
        for key in dict.fromkeys([metric, *FRONTIERS]):
            if key not in entries:
                continue
            best = entries[entries[key].notna()].sort_values(
                key, ascending=directions.get(key) is False, kind="stable")
            best = best.drop_duplicates(["family", "layer"])
            curves = best[best.groupby("family")["layer"].transform("size") > 1]
            if len(curves):
                name = f"layers-{_slug(model)}-{_slug(key)}.png"
                layer_curves(curves, out / name, metric=key, title=f"{model}: {key} per layer")
                names.append((f"{key} per layer, {model}", name))
    return names


# --------------------------------------------------------------------------- building


def _output_dir(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _input_name(path: Path) -> str:
    """An input as the Markdown names it: its name, with its folder for a results.csv."""
    return f"{path.parent.name}/{path.name}" if path.name == RESULTS_FILE else path.name


def render(board: pd.DataFrame, metric: str, directions: Mapping[str, bool | None],
           out: Path, inputs: Sequence[Path]) -> str:
    """The Markdown of a leaderboard table (`leaderboard_table`), drawing its PNGs in `out`."""
    names = ", ".join(f"`{_input_name(Path(p))}`" for p in inputs)
    parts = ["# saebench leaderboard",
             f"{len(board)} entries from {len(inputs)} input(s): {names}. Ranked by "
             f"`{metric}`{_arrow(directions[metric])} within each model and hook."]
    numbers = count(1)
    for model, tables in board.groupby("model", sort=False):
        parts.append(f"## Model `{model or '(unnamed)'}`")
        for _, table in tables.groupby("hook", sort=False):
            images = _frontier_images(table, next(numbers), out, directions)
            parts.append(_table_section(table, metric, directions, images))
    layers = _layer_images(board, metric, out, directions)
    if layers:
        parts += ["## Per-layer curves",
                  "Dictionary families (names without their layer part) found at more than "
                  "one layer; the band is the 95% interval.",
                  *(_image(caption, name) for caption, name in layers)]
    return "\n\n".join(parts) + "\n"


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
