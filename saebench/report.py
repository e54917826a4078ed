"""Result rows -> CSV files and a Markdown report.

A run writes into its run directory (`reports/<run-id>/`):

- `results.csv`: one row per check (`RESULT_COLUMNS`), appended as each check finishes;
- `per_prompt.csv`: prompt-level values of task metrics, in *long* format
  (`PER_PROMPT_COLUMNS`: the prompt's identity, then one `quantity`/`value` pair per row), so
  the column set never depends on which metrics a run happened to compute first;
- `features.csv`: feature-ablation tables (`FEATURE_COLUMNS`);
- `report.md`: rebuilt from those files, written atomically.

    >>> run_dir = Path("reports") / new_run_id()
    >>> append_rows(run_dir / RESULTS_FILE, [{"check_id": "c1", "value": 0.93, "verdict": "pass"}])
    >>> append_rows(run_dir / PER_PROMPT_FILE, [{"check_id": "c1", "prompt_index": 0,
    ...                                          "ld_clean": 3.1, "ld_spliced": 2.4}])
    >>> write_report(run_dir)  # reports/<run-id>/report.md

Appends are safe across processes (pytest-xdist workers): each one takes an exclusive
`fcntl.flock` on the CSV file itself, writes the header only into an empty file, writes its
rows in one piece and fsyncs. A tail left torn by a killed writer is cut off by the next
append (with a warning). Missing numbers are written as empty fields and read back as NaN
(or `<NA>` in integer and boolean columns), never as a sentinel; missing strings read back
as "". This module reads and writes rows only: no torch, no pytest, no engine.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import json
import math
import numbers
import os
import secrets
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

RESULTS_FILE = "results.csv"
PER_PROMPT_FILE = "per_prompt.csv"
FEATURES_FILE = "features.csv"
REPORT_FILE = "report.md"

RESULT_COLUMNS: list[str] = [
    "run_id", "suite", "check_id", "model", "dictionary", "hook", "metric", "task", "options",
    "value", "ci_low", "ci_high", "n", "threshold", "verdict", "message",
    "saebench_version", "sae_lens_version", "transformer_lens_version", "torch_version",
    "device", "dtype", "token_set", "seed",
    "parts", "higher_is_better", "started_at", "duration_s", "fingerprint", "resumed",
]
PER_PROMPT_BASE_COLUMNS: list[str] = [
    "run_id", "suite", "check_id", "dictionary", "task", "prompt_index", "prompt", "answer",
    "distractor",
]
PER_PROMPT_COLUMNS: list[str] = [*PER_PROMPT_BASE_COLUMNS, "quantity", "value"]
FEATURE_COLUMNS: list[str] = [
    "run_id", "suite", "check_id", "dictionary", "task", "feature", "mean_activation",
    "active_share", "effect", "ci_low", "ci_high", "loss_effect",
]

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

_COLUMNS_BY_FILE = {
    RESULTS_FILE: RESULT_COLUMNS,
    PER_PROMPT_FILE: PER_PROMPT_COLUMNS,
    FEATURES_FILE: FEATURE_COLUMNS,
}
_FLOAT_COLUMNS = frozenset(
    {"value", "ci_low", "ci_high", "duration_s", "mean_activation", "active_share", "effect",
     "loss_effect"})
_INT_COLUMNS = frozenset({"n", "seed", "prompt_index", "feature"})
_BOOL_COLUMNS = frozenset({"higher_is_better"})
_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})
_PROVENANCE = {
    "saebench_version": "saebench", "sae_lens_version": "sae_lens",
    "transformer_lens_version": "transformer_lens", "torch_version": "torch",
    "device": "device", "dtype": "dtype", "token_set": "token set", "seed": "seed",
}
_MESSAGE_WIDTH = 80
_PROMPT_WIDTH = 100
_NA = "—"


# --------------------------------------------------------------------------- ids and values


def new_run_id(now: datetime | None = None) -> str:
    """A run id: UTC time to the second (so ids sort) plus 4 random hex digits.

    >>> new_run_id(datetime(2026, 11, 23, 8, 15, 30))[:15]
    '20261123-081530'
    """
    now = datetime.now(timezone.utc) if now is None else now
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _missing(value: Any) -> bool:
    """Whether a cell value stands for "no value" (None, NaN, pd.NA)."""
    if value is None or isinstance(value, (str, Mapping, list, tuple)):
        return value is None
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def format_value(value: Any) -> str:
    """A number for a report: 4 significant digits, scientific when tiny or huge, "—" if missing.

    >>> [format_value(v) for v in (0.912345, 1234.56, 1.5e-6, 2.5e7, 12, float("nan"), None)]
    ['0.9123', '1235', '1.500e-06', '2.500e+07', '12', '—', '—']
    """
    if _missing(value) or (isinstance(value, str) and not value):
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
    if _missing(low) and _missing(high):
        return _NA
    return f"[{format_value(low)}, {format_value(high)}]"


# --------------------------------------------------------------------------- writing rows


def _encode_cell(column: str, value: Any) -> str:
    """The CSV text of one cell; raises ValueError when a value does not fit its column."""
    if _missing(value) or (isinstance(value, str) and not value):
        return ""
    try:
        if column in _FLOAT_COLUMNS:
            return repr(float(value))
        if column in _INT_COLUMNS:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return str(int(value))
        if column in _BOOL_COLUMNS:
            text = str(value).strip().lower()
            if text not in _TRUE | _FALSE:
                raise ValueError("not a boolean")
            return "True" if text in _TRUE else "False"
    except (TypeError, ValueError) as exc:
        raise ValueError(f"column {column!r}: cannot write {value!r} ({exc})") from None
    if isinstance(value, (Mapping, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=float)
    return str(value)


def _csv_line(cells: Sequence[str]) -> str:
    """One CSV record; a cell is quoted when it holds a comma, a quote, CR or LF."""
    quoted = (
        '"' + cell.replace('"', '""') + '"' if any(c in cell for c in ',"\r\n') else cell
        for cell in cells
    )
    return ",".join(quoted) + "\n"


def _melt_per_prompt(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Wide per-prompt rows (`ld_clean=…, ld_spliced=…`) -> long rows (`quantity`, `value`).

    Rows that already carry `quantity` pass through unchanged; a quantity that is not a
    number raises ValueError naming it.
    """
    base = set(PER_PROMPT_BASE_COLUMNS)
    long: list[dict[str, Any]] = []
    for row in rows:
        if "quantity" in row:
            long.append(dict(row))
            continue
        ids = {k: v for k, v in row.items() if k in base}
        for key, value in row.items():
            if key in base:
                continue
            try:
                _encode_cell("value", value)
            except ValueError:
                message = f"per-prompt quantity {key!r} is not a number: {value!r}"
                raise ValueError(message) from None
            long.append({**ids, "quantity": key, "value": value})
    return long


def _complete_prefix(data: bytes) -> int:
    """Length of the part of a CSV file made of complete records (ends at a newline outside
    quotes)."""
    end = prev = quotes = 0
    while (pos := data.find(b"\n", prev)) != -1:
        quotes += data.count(b'"', prev, pos)
        prev = pos + 1
        if quotes % 2 == 0:
            end = prev
    return end


def _repair_tail(fd: int, path: Path) -> int:
    """Cut off a record torn by a killed writer; returns the file's size afterwards."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    keep = _complete_prefix(os.pread(fd, size, 0))
    os.ftruncate(fd, keep)
    warnings.warn(f"{path}: removed {size - keep} bytes of a torn last row", stacklevel=3)
    return keep


def _check_header(fd: int, path: Path, header: str) -> None:
    """Raise ValueError when an existing file's header is not `header`."""
    first = os.pread(fd, len(header.encode()) + 4096, 0).split(b"\n", 1)[0] + b"\n"
    if first.decode("utf-8", errors="replace") != header:
        found = first.decode("utf-8", errors="replace").strip()
        raise ValueError(f"{path} has the header {found!r}, not the expected {header.strip()!r}")


def append_rows(
    path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> None:
    """Append rows to a CSV file under an exclusive lock; header only into an empty file.

    `columns` defaults to the known columns of `results.csv`, `per_prompt.csv` or
    `features.csv` (by file name). Keys missing from a row are written empty; keys that
    are not columns raise ValueError naming them. Rows for `per_prompt.csv` may be wide:
    every key beyond `PER_PROMPT_BASE_COLUMNS` becomes one long row (`quantity`, `value`).

    >>> append_rows(run_dir / "results.csv", [{"check_id": "c1", "value": float("nan")}])
    """
    path = Path(path)
    if columns is None:
        if path.name not in _COLUMNS_BY_FILE:
            raise ValueError(f"{path}: unknown file name; pass `columns`")
        columns = _COLUMNS_BY_FILE[path.name]
    columns = list(columns)
    if columns == PER_PROMPT_COLUMNS:
        rows = _melt_per_prompt(rows)
    if not rows:
        return
    known = set(columns)
    extra = sorted({key for row in rows for key in row if key not in known})
    if extra:
        raise ValueError(f"{path}: unknown column(s) {', '.join(map(repr, extra))}")
    data = "".join(
        _csv_line([_encode_cell(c, row.get(c)) for c in columns]) for row in rows
    ).encode()
    header = _csv_line(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _repair_tail(fd, path) == 0:
            data = header.encode() + data
        else:
            _check_header(fd, path, header)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)  # closing releases the lock


# --------------------------------------------------------------------------- reading rows


def _decode_cell(column: str, cell: str) -> Any:
    """The typed value of one cell: float, int or bool (missing: NaN / pd.NA), or the text.

    Raises ValueError for a cell that does not fit its column.
    """
    if column in _FLOAT_COLUMNS:
        return float(cell) if cell else math.nan
    if column in _INT_COLUMNS:
        return int(cell) if cell else pd.NA
    if column in _BOOL_COLUMNS:
        text = cell.strip().lower()
        if text and text not in _TRUE | _FALSE:
            raise ValueError("not a boolean")
        return text in _TRUE if text else pd.NA
    return cell


def _column(column: str, values: list[Any]) -> Any:
    """A column of decoded values with its type: float64, nullable Int64 / boolean, or str."""
    if column in _INT_COLUMNS:
        return pd.array(values, dtype="Int64")
    if column in _BOOL_COLUMNS:
        return pd.array(values, dtype="boolean")
    return values


def _complete_text(path: Path) -> str:
    """The text of a CSV file without a last record torn by a killed writer (warned)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = _complete_prefix(data)
        warnings.warn(f"{path}: dropped a torn last row ({len(data) - keep} bytes)",
                      stacklevel=3)
        data = data[:keep]
    return data.decode("utf-8", errors="replace")


def read_table(path: Path, columns: Sequence[str] = (),
               refused: list[str] | None = None) -> pd.DataFrame:
    """All rows of a CSV file written by `append_rows`, with their types restored.

    Columns in `columns` that the file lacks are added empty (older files). A torn last
    row is dropped; a row with the wrong number of fields or a cell that does not fit its
    column is skipped, described as `line N: <check id>: why` in `refused` (or in a warning
    when no list is given).

    >>> read_table(run_dir / "features.csv", FEATURE_COLUMNS)
    """
    path = Path(path)
    reader = csv.reader(io.StringIO(_complete_text(path), newline=""))
    header = next(reader, [])
    id_at = header.index("check_id") if "check_id" in header else None
    problems: list[str] = []
    records = []
    for record in reader:
        ident = record[id_at] if id_at is not None and id_at < len(record) else "?"
        if len(record) != len(header):
            problems.append(f"line {reader.line_num}: {ident}: {len(record)} fields, not "
                            f"{len(header)}")
            continue
        values = []
        for column, cell in zip(header, record, strict=True):
            try:
                values.append(_decode_cell(column, cell))
            except ValueError:
                problems.append(f"line {reader.line_num}: {ident}: column {column!r} holds "
                                f"{cell[:40]!r}")
                break
        else:
            records.append(values)
    if refused is not None:
        refused.extend(problems)
    elif problems:
        warnings.warn(f"{path}: skipped {len(problems)} malformed row(s): "
                      f"{'; '.join(problems[:3])}", stacklevel=2)
    names = [*header, *(c for c in columns if c not in header)]
    data = {c: _column(c, [r[i] for r in records]) for i, c in enumerate(header)}
    data.update({c: _column(c, [_decode_cell(c, "")] * len(records))
                 for c in names[len(header):]})
    return pd.DataFrame(data, columns=names)


def check_results_header(path: Path) -> None:
    """Raise ValueError, in one sentence, when a results.csv does not have the columns this
    version of saebench writes (a resumed run appends to it)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    if header != RESULT_COLUMNS:
        missing = [c for c in RESULT_COLUMNS if c not in header]
        extra = [c for c in header if c not in RESULT_COLUMNS]
        what = "; ".join(part for part in (
            f"missing {', '.join(missing)}" if missing else "",
            f"unknown {', '.join(extra[:5])}" if extra else "",
            "the same columns in another order" if not missing and not extra else "") if part)
        raise ValueError(f"{path} does not have the columns of a saebench results file "
                         f"({what})")


def _results_path(run_dir: Path) -> Path:
    """`run_dir/results.csv`, or `run_dir` itself when it is a file."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.is_file() else run_dir / RESULTS_FILE


def read_results(run_dir: Path, refused: list[str] | None = None) -> pd.DataFrame:
    """The results of a run, one row per check: the last row of a check wins (resumed or
    retried checks), kept at the place of the check's first row. `run_dir` may also be the
    path of a results.csv; rows that do not parse are skipped (see `read_table`).

    >>> read_results(Path("reports/20261123-081530-ab12"))[["check_id", "value", "verdict"]]
    """
    path = _results_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} at {path}")
    table = read_table(path, RESULT_COLUMNS, refused)
    if "check_id" not in table.columns or "verdict" not in table.columns:
        raise ValueError(f"{path} is not a saebench results file (no check_id and verdict "
                         "columns)")
    columns = [*RESULT_COLUMNS, *(c for c in table.columns if c not in RESULT_COLUMNS)]
    order = table.drop_duplicates("check_id", keep="first")["check_id"]
    last = table.drop_duplicates("check_id", keep="last").set_index("check_id")
    return last.loc[order].reset_index()[columns]


def read_per_prompt(run_dir: Path) -> pd.DataFrame:
    """Per-prompt values in wide form: the identity columns, then one column per quantity.

    The last value of a (check, prompt, quantity) wins. Empty when the run has no
    per_prompt.csv.

    >>> read_per_prompt(run_dir)[["prompt", "ld_clean", "ld_spliced"]]
    """
    path = Path(run_dir) / PER_PROMPT_FILE
    if not path.is_file():
        return pd.DataFrame(columns=PER_PROMPT_BASE_COLUMNS)
    long = read_table(path, PER_PROMPT_COLUMNS)
    key = ["suite", "check_id", "dictionary", "task", "prompt_index"]
    wide: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in long.to_dict("records"):
        ident = tuple(row[k] for k in key)
        entry = wide.setdefault(ident, {})
        entry.update({c: row[c] for c in PER_PROMPT_BASE_COLUMNS})
        entry[row["quantity"]] = row["value"]
    quantities = list(dict.fromkeys(long["quantity"]))
    frame = pd.DataFrame(list(wide.values()), columns=[*PER_PROMPT_BASE_COLUMNS, *quantities])
    frame["prompt_index"] = frame["prompt_index"].astype("Int64")
    return frame.astype({q: "float64" for q in quantities})


def finished_check_ids(run_dir: Path) -> set[str]:
    """Checks whose last row has a final verdict (anything but "error"), for `--resume`.

    Empty when the run has no results yet.

    >>> finished_check_ids(Path("reports/20261123-081530-ab12"))
    {'toy::resid-L2-topk16::l0', ...}
    """
    try:
        results = read_results(run_dir)
    except FileNotFoundError:
        return set()
    done = results[(results["verdict"] != "") & (results["verdict"] != "error")]
    return set(done["check_id"])


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
    return "" if _missing(higher_is_better) else ("↑" if higher_is_better else "↓")


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
    text = render_report(run_dir, worst_prompts)
    target = run_dir / REPORT_FILE
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{REPORT_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
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
