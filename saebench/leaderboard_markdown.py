"""The Markdown page of a leaderboard (`saebench.leaderboard`) and the PNGs it links.

`render(board, ...)` writes, per model and hook, the ranked table of `leaderboard_table`, its
L0 frontier plots, the notes under it, and per-layer curves at the end. What a reader must
not miss is said on the page, not only in the CSV:

- a value that is missing shows "—" with a footnote mark (¹, ², …, numbered once per page)
  and the reason under the table: an import read as missing (SAEBench's -1 for NaN, a value
  outside its range, `compute_kl: false`, ...) or a check that measured nothing;
- a table whose entries were measured on different model weights (`model_hash`) or token
  sets has columns naming both (8 hex digits, "—" when not stated) and a note that its
  ranks compare numbers that are not like for like; two entries of one name there also
  show their entry key;
- imported values are marked †, SAEBench's uncentred explained variance is named so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from itertools import count
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from saebench.plots import frontier_plot, layer_curves
from saebench.report import format_ci, format_value
from saebench.results import RESULTS_FILE, is_missing
from saebench.saebench_core import SOURCE_PREFIX

L0_KEY = "l0"
FRONTIERS: dict[str, str] = {"ce_loss_recovered[zero]": "loss recovered",
                             "kl_div_score[zero]": "KL score"}
"""Metric keys drawn against L0 per hook, with their short names in tables."""
SAEBENCH_EV = {
    "explained_variance_uncentred": ("uncentred EV", "the uncentred explained variance, "
                                     "1 − E‖x − x̂‖² / E‖x‖²"),
    "explained_variance_saebench": ("SAEBench's EV", "SAEBench 0.6.0's explained variance, "
                                    "1 − E‖x − x̂‖² / (E‖x‖² − (E‖x‖²/d_in)²)"),
}
"""Imported explained variances that are not saebench's: header label and definition."""
IMPORTED_MARK = "†"
SHOWN = ("l0", "kl_div_score[zero]", "explained_variance", *SAEBENCH_EV, "logit_diff_recovered[")
"""Metric keys the Markdown tables show beside the ranked one (prefixes; the CSV has all),
so a table stays readable at a laptop's width."""
COMPARABILITY = {"model_hash": "model hash", "token_set": "token set"}
"""Columns that must agree for two entries' numbers to be like for like, with their headers."""
_DIFFERENT = {"model_hash": "models (weights or configuration: the model hash)",
              "token_set": "token sets"}
_SOURCE_WIDTH = 80
_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def _text(value: Any) -> str:
    return "" if is_missing(value) else str(value)


class Footnotes:
    """The reasons of missing values on one page, numbered in order of first use."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def mark(self, reason: str) -> str:
        """The superscript number of a reason (a new one gets the next number)."""
        number = self.numbers.setdefault(reason, len(self.numbers) + 1)
        return str(number).translate(_SUPERSCRIPTS)

    def listed(self, reasons: Sequence[str]) -> str:
        """The footnotes of some reasons, one line each, in number order."""
        used = sorted(dict.fromkeys(reasons), key=lambda r: self.numbers[r])
        return "\n".join(f"- {self.mark(r)} {_cell(r)}" for r in used)


# --------------------------------------------------------------------------- cells


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell: `|` escaped, line breaks as spaces."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _markdown_table(rows: list[list[Any]], headers: list[str], left: int) -> str:
    """A GitHub table whose first `left` columns are left-aligned, the others right."""
    align = ["left" if i < left else "right" for i in range(len(headers))]
    return tabulate([[_cell(c) for c in row] for row in rows], headers=headers,
                    tablefmt="github", disable_numparse=True, colalign=align)


def arrow(higher_is_better: bool | None) -> str:
    """` ↑` / ` ↓` after a key whose direction is known."""
    return {True: " ↑", False: " ↓"}.get(higher_is_better, "")


def _header(key: str, higher_is_better: bool | None) -> str:
    if key in SAEBENCH_EV:
        return f"{key} ({SAEBENCH_EV[key][0]}){arrow(higher_is_better)}"
    return f"{key}{arrow(higher_is_better)}"


def _shown(entry: Mapping[str, Any], key: str, imported: set[str], missing: Mapping[str, str],
           notes: Footnotes, interval: bool) -> str:
    """A value, with its interval when `interval` and known, marked † when imported; a
    missing one "—" with the mark of its footnote."""
    if key in missing:
        return f"— {notes.mark(missing[key])}"
    text = format_value(entry[key])
    low, high = entry[f"{key}_ci_low"], entry[f"{key}_ci_high"]
    if interval and not (is_missing(low) and is_missing(high)):
        text += f" {format_ci(low, high)}"
    return text + (f" {IMPORTED_MARK}" if key in imported and not is_missing(entry[key]) else "")


def _short(value: Any) -> str:
    """A hash, or each hash in an entry key, as its first 8 hex digits; "—" when not stated.

    >>> _short("1adb42a56b00646d"), _short("identity:c0ffee0012345678"), _short("")
    ('1adb42a5', 'identity:c0ffee00', '—')
    """
    text = re.sub(r"[0-9a-f]{9,}", lambda match: match.group()[:8], _text(value))
    return text[:48] or "—"


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


# --------------------------------------------------------------------------- one table


def _table_rows(table: pd.DataFrame, metric: str, others: list[str], columns: list[str],
                notes: Footnotes) -> list[list[str]]:
    rows = []
    for entry in table.to_dict("records"):
        imported = set(entry["imported"].split(";"))
        missing = json.loads(entry["missing"] or "{}")
        rows.append([
            format_value(entry["rank"]), entry["dictionary"],
            *(_short(entry[c]) if c in (*COMPARABILITY, "entry") else format_value(entry[c])
              for c in columns),
            _shown(entry, metric, imported, missing, notes, interval=False),
            format_ci(entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"]),
            *(_shown(entry, k, imported, missing, notes, interval=True) for k in others),
            ", ".join(label for k, label in FRONTIERS.items() if entry[f"pareto_{k}"]),
            _source_cell(entry["source"], bool(entry["imported"])),
        ])
    return rows


def _mixed(table: pd.DataFrame) -> list[str]:
    """The comparability columns whose values differ among a table's entries."""
    return [c for c in COMPARABILITY if table[c].map(_text).nunique() > 1]


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
    mixed = _mixed(table)
    if mixed:
        named = " and on different ".join(_DIFFERENT[c] for c in mixed)
        notes.append(f"**Not like for like:** these entries were measured on different "
                     f"{named} (columns {', '.join(COMPARABILITY[c] for c in mixed)}; — "
                     "where an input does not state it), so their ranks and Pareto marks "
                     "set side by side numbers that were not measured on the same model and "
                     "tokens.")
    if table["rank"].isna().any():
        notes.append(f"Entries without a value for `{metric}` are unranked (—).")
    if table["imported"].str.len().any():
        notes.append(f"{IMPORTED_MARK} imported from SAEBench core-eval results.")
    notes += [f"`{key}` is {definition}: it runs higher than saebench's centred "
              "`explained_variance` when activations have a large mean; the two are not "
              "comparable." for key, (_, definition) in SAEBENCH_EV.items() if key in keys]
    return " ".join(notes)


def _in_markdown(key: str) -> bool:
    return key.startswith(SHOWN)


def _table_section(table: pd.DataFrame, metric: str, directions: Mapping[str, bool | None],
                   images: list[tuple[str, str]], notes: Footnotes) -> str:
    """A hook's heading, frontier images, ranked table, notes and footnotes."""
    missing = [json.loads(text or "{}") for text in table["missing"]]
    keys = [k for k in directions if k != metric and _in_markdown(k)
            and (table[k].notna().any() or any(k in m for m in missing))]
    columns = [c for c in ("architecture", "d_sae") if table[c].map(_text).str.len().any()]
    mixed = _mixed(table)
    columns += mixed + (["entry"] if table[["dictionary", *mixed]].duplicated().any() else [])
    headers = ["rank", "dictionary",
               *(COMPARABILITY.get(c, c) for c in columns), _header(metric, directions[metric]),
               "95% CI", *(_header(k, directions[k]) for k in keys), "Pareto (L0 vs)", "source"]
    body = _markdown_table(_table_rows(table, metric, keys, columns, notes), headers,
                           left=2 + len(columns))
    hook = " + ".join(f"`{h}`" for h in table["hook"].iloc[0].split(","))
    parts = [f"### {hook}", *(_image(caption, name) for caption, name in images), body,
             _notes(table, metric, bool(directions[metric]), keys)]
    shown = {metric, *keys}
    reasons = [why for m in missing for key, why in m.items() if key in shown]
    if reasons:
        parts.append("Missing values (—):\n\n" + notes.listed(reasons))
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
    """Per model (and model hash and token set, when it has several), for the ranking and
    frontier keys, curves across layers of the families measured at more than one layer
    (the best entry per family and layer): (caption, file name)."""
    names = []
    board = board[board["layer"].notna()]
    for (model, *measured), entries in board.groupby(["model", *COMPARABILITY], sort=True):
        several = board.loc[board["model"] == model, list(COMPARABILITY)].drop_duplicates()
        on = f" on {' · '.join(map(_short, measured))}" if len(several) > 1 else ""
        for key in dict.fromkeys([metric, *FRONTIERS]):
            if key not in entries:
                continue
            best = entries[entries[key].notna()].sort_values(
                key, ascending=directions.get(key) is False, kind="stable")
            best = best.drop_duplicates(["family", "layer"])
            curves = best[best.groupby("family")["layer"].transform("size") > 1]
            if len(curves):
                name = f"layers-{_slug(model + on.replace(' · ', '-'))}-{_slug(key)}.png"
                layer_curves(curves, out / name, metric=key,
                             title=f"{model}{on}: {key} per layer")
                names.append((f"{key} per layer, {model}{on}", name))
    return names


# --------------------------------------------------------------------------- the page


def input_name(path: Path) -> str:
    """An input as the page names it: its folder or file name (with its folder for a
    results.csv), never empty: `.` and `dir/` are named by the folder they stand for.

    >>> input_name(Path("reports/run-a/results.csv")), input_name(Path("board/"))
    ('run-a/results.csv', 'board')
    """
    path = Path(path)
    full = path.resolve()
    if path.name == RESULTS_FILE:
        return f"{full.parent.name or full.parent}/{path.name}"
    return path.name if path.name not in ("", ".", "..") else (full.name or str(full))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def render(board: pd.DataFrame, metric: str, directions: Mapping[str, bool | None],
           out: Path, inputs: Sequence[Path]) -> str:
    """The Markdown of a leaderboard table (`leaderboard_table`), drawing its PNGs in `out`."""
    names = ", ".join(f"`{input_name(Path(p))}`" for p in inputs)
    entries = "1 entry" if len(board) == 1 else f"{len(board)} entries"
    parts = ["# saebench leaderboard",
             f"{entries} from {_plural(len(inputs), 'input')}: {names}. Ranked by "
             f"`{metric}`{arrow(directions[metric])} within each model and hook."]
    numbers, notes = count(1), Footnotes()
    for model, tables in board.groupby("model", sort=False):
        parts.append(f"## Model `{model or '(unnamed)'}`")
        for _, table in tables.groupby("hook", sort=False):
            images = _frontier_images(table, next(numbers), out, directions)
            parts.append(_table_section(table, metric, directions, images, notes))
    layers = _layer_images(board, metric, out, directions)
    if layers:
        parts += ["## Per-layer curves",
                  "Dictionary families (names without their layer part) found at more than "
                  "one layer; the band is the 95% interval.",
                  *(_image(caption, name) for caption, name in layers)]
    return "\n\n".join(parts) + "\n"
