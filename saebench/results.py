"""The result row and the run directory: columns and their types, provenance, dictionary
identity, appending and reading rows, and the per-sequence terms stored beside them.

Everything that reads or writes rows goes through here: the pytest plugin and `evaluate()`
build rows with `row`, gates, reports and leaderboards read them with `read_results`.
A run directory (`reports/<run-id>/`) holds

- `results.csv`: one row per check (`RESULT_COLUMNS`), appended as each check finishes;
- `per_prompt.csv`: prompt-level values of task metrics in *long* format
  (`PER_PROMPT_COLUMNS`: the prompt's identity, then one `quantity`/`value` pair per row);
- `features.csv`: feature-ablation tables (`FEATURE_COLUMNS`);
- `layers.csv`: per-layer values of `per_layer_error`, one row per write hook
  (`LAYER_COLUMNS`);
- `terms/<check>.npz`: the per-sequence (or per-prompt) terms of each check's metric, so a
  later run on the same tokens can be compared with it *paired* (`saebench.gate`).

    >>> run = RunDir.new(Path("reports"))
    >>> append_rows(run.results, [row(check_id="c1", value=0.93, verdict="pass")])
    >>> read_results(run.path)[["check_id", "value", "verdict"]]

Appends are safe across processes (pytest-xdist workers): each takes an exclusive
`fcntl.flock` on a lock file beside the CSV, repairs a tail torn by a killed writer (with a
warning), writes its rows in one piece and fsyncs. A file written by an older saebench,
with fewer columns, is rewritten with the new columns (atomically) on the first append, so
old runs stay readable and resumable. Missing numbers are written as empty fields and read
back as NaN (or `<NA>` in integer and boolean columns), never as a sentinel. No torch here.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import math
import os
import re
import secrets
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

RESULTS_FILE = "results.csv"
PER_PROMPT_FILE = "per_prompt.csv"
FEATURES_FILE = "features.csv"
LAYERS_FILE = "layers.csv"
BREAKDOWN_FILE = "breakdown.csv"

TERMS_DIR = "terms"
SELECTION_FILE = "selection.json"
"""Which checks of each suite a run selected and how (`-k`, a shard, node ids): what lets a
gate tell a check left out on purpose from one the run lost."""

IDENTITY_COLUMNS: list[str] = [
    "identity", "source", "architecture", "d_in", "d_sae", "read_hook", "write_hook",
    "weights_sha256", "model_hash",
]
"""Which dictionary (or spliced set, joined with `+`) and model a row measured. `identity`
is a short hash of everything that makes the dictionary's numbers (format, weights' hash,
`args:`, hook overrides, factory and arguments, every part of a set or replacement model):
two rows with different identities measured different dictionaries, whatever their names.
`model_hash` hashes the model's configuration and weights."""
BASELINE_COLUMNS: list[str] = [
    "vs_baseline", "baseline_value", "delta", "delta_ci_low", "delta_ci_high", "comparison",
    "tolerance",
]
"""A check compared with its baseline row (`saebench.gate`): its verdict there (same,
improved, regression, noisy, new), the baseline's value, Δ = new − baseline oriented so
that positive is better, Δ's 95% interval, how that was computed (paired or unpaired) and
the tolerance Δ was held to."""
PROVENANCE_COLUMNS: list[str] = [
    "saebench_version", "saebench_commit", "sae_lens_version", "transformer_lens_version",
    "torch_version", "device", "dtype", "token_set", "seed",
]
RANDOM_COLUMNS: list[str] = ["random_value", "margin", "margin_low", "margin_high"]
"""With `random_baseline`: the metric for a random-weight dictionary of the same shape, and
the margin over it (value − random_value, or the reverse when lower is better) with its
paired 95% interval; empty otherwise."""
RESULT_COLUMNS: list[str] = [
    "run_id", "suite", "check_id", "model", "dictionary", "hook", "metric", "task", "options",
    "value", "ci_low", "ci_high", "n", "threshold", "verdict", "message", *RANDOM_COLUMNS,
    *BASELINE_COLUMNS, *IDENTITY_COLUMNS, *PROVENANCE_COLUMNS,
    "parts", "higher_is_better", "started_at", "duration_s", "fingerprint", "resumed",
]
REQUIRED_COLUMNS = ("check_id", "metric", "value", "ci_low", "ci_high", "n", "threshold",
                    "verdict")
"""Columns without which a file is not a results file (any saebench version has them)."""
PER_PROMPT_BASE_COLUMNS: list[str] = [
    "run_id", "suite", "check_id", "dictionary", "task", "prompt_index", "prompt", "answer",
    "distractor",
]
PER_PROMPT_COLUMNS: list[str] = [*PER_PROMPT_BASE_COLUMNS, "quantity", "value"]
FEATURE_COLUMNS: list[str] = [
    "run_id", "suite", "check_id", "dictionary", "task", "table", "feature", "mean_activation",
    "active_share", "effect", "ci_low", "ci_high", "loss_effect", "read_dictionary",
    "read_feature", "correlation", "clamp_value", "max_activation", "contexts", "logit_top",
    "logit_bottom",
]
"""features.csv: one row per feature of a table (`table`: ablation, fidelity, clamp,
card). A card row holds a feature's density (`active_share`), mean and max activation, its
top contexts and logit-lens tokens (JSON lists)."""

LAYER_COLUMNS: list[str] = [
    "run_id", "suite", "check_id", "dictionary", "task", "layer", "hook", "value", "ci_low",
    "ci_high",
]

BREAKDOWN_COLUMNS: list[str] = [
    "run_id", "suite", "check_id", "dictionary", "task", "metric", "by", "bucket", "value",
    "ci_low", "ci_high", "n",
]
"""breakdown.csv: a check's value in each bucket of its `by:` breakdown (token positions
`4-7`, or a data source)."""


_COLUMNS_BY_FILE = {
    RESULTS_FILE: RESULT_COLUMNS,
    PER_PROMPT_FILE: PER_PROMPT_COLUMNS,
    FEATURES_FILE: FEATURE_COLUMNS,
    LAYERS_FILE: LAYER_COLUMNS,
    BREAKDOWN_FILE: BREAKDOWN_COLUMNS,
}
_FLOAT_COLUMNS = frozenset(
    {"value", "ci_low", "ci_high", "duration_s", "mean_activation", "active_share", "effect",
     "loss_effect", "correlation", "clamp_value", "max_activation", "baseline_value", "delta",
     "delta_ci_low", "delta_ci_high", "tolerance",
     *RANDOM_COLUMNS})
_INT_COLUMNS = frozenset({"n", "seed", "prompt_index", "feature", "read_feature", "d_in", "d_sae",
                          "layer"})
_BOOL_COLUMNS = frozenset({"higher_is_better"})
_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})

def new_run_id(now: datetime | None = None) -> str:
    """A run id: UTC time to the second (so ids sort) plus 4 random hex digits.

    >>> new_run_id(datetime(2026, 11, 23, 8, 15, 30))[:15]
    '20261123-081530'
    """
    now = datetime.now(timezone.utc) if now is None else now
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def is_missing(value: Any) -> bool:
    """Whether a cell value stands for "no value" (None, NaN, pd.NA)."""
    if value is None or isinstance(value, (str, Mapping, list, tuple)):
        return value is None
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False



def _encode_cell(column: str, value: Any) -> str:
    """The CSV text of one cell; raises ValueError when a value does not fit its column."""
    if is_missing(value) or (isinstance(value, str) and not value):
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


def _read_header(fd: int) -> list[str]:
    """The column names in an open CSV file's first line ([] for an empty file)."""
    first = b""
    while b"\n" not in first:
        chunk = os.pread(fd, 65536, len(first))
        if not chunk:
            break
        first += chunk
    line = first.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    return next(csv.reader([line]), []) if line else []


def _extend_header(fd: int, path: Path, header: list[str], columns: list[str]) -> list[str]:
    """The file's columns after adding the known `columns` it lacks (an older saebench wrote
    it): the file is rewritten with them, its rows padded, atomically. Returns the header."""
    wanted = [*header, *(c for c in columns if c not in header)]
    if wanted == header:
        return header
    text = os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8")
    records = list(csv.reader(io.StringIO(text, newline="")))[1:]
    body = "".join(_csv_line([*r, *[""] * (len(wanted) - len(r))]) for r in records)
    atomic_write(path, _csv_line(wanted) + body)
    return wanted


def atomic_write(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary file beside it, fsynced, then renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_rows(
    path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> None:
    """Append rows to a CSV file under an exclusive lock; header only into an empty file.

    `columns` defaults to the known columns of `results.csv`, `per_prompt.csv` or
    `features.csv` (by file name). Keys missing from a row are written empty; keys that
    are not columns raise ValueError naming them. A file with fewer columns (an older
    saebench) gains the new ones first; one with columns this version does not know keeps
    them (written empty). Rows for `per_prompt.csv` may be wide: every key beyond
    `PER_PROMPT_BASE_COLUMNS` becomes one long row (`quantity`, `value`).

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
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            header = _read_header(fd) if _repair_tail(fd, path) else []
            prefix = "" if header else _csv_line(columns)
            if header and header != columns:
                header = _extend_header(fd, path, header, columns)
                os.close(fd)
                fd = os.open(path, os.O_RDWR | os.O_APPEND)
            order = header or columns
            data = (prefix + "".join(_csv_line([_encode_cell(c, r.get(c)) for c in order])
                                     for r in rows)).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        os.close(lock)  # closing releases the lock


# --------------------------------------------------------------------------- reading rows


def _decode_cell(column: str, cell: str) -> Any:
    """The typed value of one cell: float, int or bool (missing: NaN / pd.NA), or the text.

    Raises ValueError for a cell that does not fit its column.
    """
    if column in _FLOAT_COLUMNS:
        return float(cell) if cell else math.nan
    if column in _INT_COLUMNS:
        return _integer(cell) if cell else pd.NA
    if column in _BOOL_COLUMNS:
        text = cell.strip().lower()
        if text and text not in _TRUE | _FALSE:
            raise ValueError("not a boolean")
        return text in _TRUE if text else pd.NA
    return cell


def _integer(cell: str) -> int:
    """An integer cell, also as pandas writes an integer column it read with a missing
    value (`128.0`); ValueError for text or a fraction.

    >>> _integer("128"), _integer("128.0")
    (128, 128)
    """
    try:
        return int(cell)
    except ValueError:
        number = float(cell)
        if not number.is_integer():
            raise ValueError(f"{cell!r} is not an integer") from None
        return int(number)


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
    data.pop("", None)  # the index column `DataFrame.to_csv` writes without index=False
    names = [c for c in names if c]
    data.update({c: _column(c, [_decode_cell(c, "")] * len(records))
                 for c in names[len(header):]})
    return pd.DataFrame(data, columns=names)


def check_results_header(path: Path) -> None:
    """Raise ValueError, in one sentence, when a file is not a saebench results.csv: it
    lacks a column that every version writes (fewer or more columns are fine)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path} is not a saebench results file: it has no "
                         f"{', '.join(missing)} column (its header: {_shorten(header)})")


def _shorten(header: list[str], limit: int = 120) -> str:
    """A header as one short printable line (a binary file's bytes shown as `?`)."""
    text = "".join(c if c.isprintable() and c != "\ufffd" else "?" for c in ",".join(header))
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _results_path(run_dir: Path) -> Path:
    """`run_dir/results.csv`, or `run_dir` itself when it is a file."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.is_file() else run_dir / RESULTS_FILE


ROW_KEY = ["suite", "check_id"]
"""What names one check's row in a run: check ids are unique within a suite, and one run may
hold several suites with the same check id."""


def row_key(row: Mapping[str, Any]) -> tuple[str, str]:
    """The (suite, check id) of a row, "" for a missing suite."""
    suite = row.get("suite")
    return ("" if is_missing(suite) else str(suite), str(row["check_id"]))


def read_results(run_dir: Path, refused: list[str] | None = None) -> pd.DataFrame:
    """The results of a run, one row per (suite, check): the last row of a check wins
    (resumed or retried checks), kept at the place of the check's first row. `run_dir` may
    also be the path of a results.csv; rows that do not parse are skipped (see
    `read_table`). A `pass` without a threshold, as saebench wrote before it had the
    `measured` verdict, reads as `measured`.

    >>> read_results(Path("reports/20261123-081530-ab12"))[["check_id", "value", "verdict"]]
    """
    path = _results_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} at {path}")
    check_results_header(path)
    table = read_table(path, RESULT_COLUMNS, refused)
    columns = [*RESULT_COLUMNS, *(c for c in table.columns if c not in RESULT_COLUMNS)]
    table["suite"] = table["suite"].map(lambda s: "" if is_missing(s) else str(s))
    unjudged = (table["verdict"] == "pass") & (table["threshold"].map(
        lambda t: is_missing(t) or not str(t).strip()))
    table.loc[unjudged, "verdict"] = "measured"
    order = table.drop_duplicates(ROW_KEY, keep="first")[ROW_KEY]
    last = table.drop_duplicates(ROW_KEY, keep="last").set_index(ROW_KEY)
    return last.loc[pd.MultiIndex.from_frame(order)].reset_index()[columns]


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


def read_selection(run_dir: Path) -> dict[str, Any]:
    """A run's `SELECTION_FILE`: {"suites": {suite: {"selected": n, "total": N}}, "how":
    text}; empty when the run has none (an older saebench: taken as complete). A damaged
    file raises `DamagedFile`."""
    path = _results_path(run_dir).parent / SELECTION_FILE
    if not path.is_file():
        return {}
    try:
        selection = json.loads(path.read_text(encoding="utf-8"))
        suites = selection["suites"]
        if not isinstance(suites, dict) or not all(
                isinstance(v, dict) and {"selected", "total"} <= set(v) for v in suites.values()):
            raise ValueError("suites must map a suite to its selected and total counts")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise DamagedFile(f"{path}: damaged selection record ({err})") from None
    return selection


def write_selection(run_dir: Path, counts: Mapping[str, tuple[int, int]], how: str) -> None:
    """Record, atomically, how many of each suite's checks a run selected (of how many)."""
    record = {"suites": {s: {"selected": n, "total": total} for s, (n, total) in counts.items()},
              "how": how}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(run_dir) / SELECTION_FILE, json.dumps(record, indent=1) + "\n")


# --------------------------------------------------------------------------- building rows


def row(**fields: Any) -> dict[str, Any]:
    """A result row: every column of `RESULT_COLUMNS`, `fields` filled in, the rest missing.

    Unknown names raise ValueError, so a typo cannot create a column.

        >>> row(check_id="good::l0", value=16.0, verdict="pass")["ci_low"]
        nan
    """
    unknown = sorted(set(fields) - set(RESULT_COLUMNS))
    if unknown:
        raise ValueError(f"unknown result column(s) {', '.join(unknown)}")
    empty = {c: math.nan if c in _FLOAT_COLUMNS else None for c in RESULT_COLUMNS}
    return empty | fields


def _git_commit() -> str:
    """The git commit of the saebench checkout this runs from, when it is one ("" if not)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return ""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


_COMMIT: list[str] = []


def provenance(device: str, dtype: str, token_set: str, seed: int) -> dict[str, Any]:
    """The provenance columns of a row: library versions, saebench's git commit when it runs
    from a checkout, device, dtype, token-set hash and seed."""
    if not _COMMIT:
        _COMMIT.append(_git_commit())
    versions = {f"{pkg.replace('-', '_')}_version": version(pkg)
                for pkg in ("saebench", "sae-lens", "transformer-lens", "torch")}
    return {**versions, "saebench_commit": _COMMIT[0], "device": device, "dtype": dtype,
            "token_set": token_set, "seed": seed}


def short_hash(data: bytes | str) -> str:
    """The first 16 hex digits of a sha256: enough to tell files, token sets, configs apart."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


# --------------------------------------------------------------------------- run directories


@dataclass(frozen=True)
class RunDir:
    """A run directory: where one run's rows, tables, terms and report live.

        >>> run = RunDir.new(Path("reports"))       # reports/20261201-153000-ab12
        >>> run.results, run.terms_file("good::l0")
    """

    path: Path

    @classmethod
    def new(cls, parent: Path) -> RunDir:
        """A fresh run directory under `parent`, named by a new run id (not created yet)."""
        return cls(Path(parent) / new_run_id())

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def results(self) -> Path:
        return self.path / RESULTS_FILE

    def terms_file(self, check_id: str, suite: str = "") -> Path:
        """Where a check's terms are stored: a readable name plus a hash of the exact suite
        and id (saebench before 0.2 hashed the id alone; `read_terms` still finds those)."""
        readable = re.sub(r"[^\w.+=-]+", "_", check_id)[:80]
        exact = f"{suite}::{check_id}" if suite else check_id
        return self.path / TERMS_DIR / f"{readable}-{short_hash(exact)[:8]}.npz"


TERMS_LIMIT = 1 << 16
"""A vector term wider than this many numbers in all is not stored (a dictionary's feature
counts over every sequence would dwarf the rest); checks needing it compare unpaired."""


def write_terms(run: RunDir, check_id: str, terms: Mapping[str, Any], suite: str = ""
                ) -> Path | None:
    """Store a check's per-sequence terms (float64 arrays, one entry per term), atomically;
    None when nothing fits (`TERMS_LIMIT`)."""
    arrays = {name: np.asarray(value, dtype=np.float64) for name, value in terms.items()}
    arrays = {name: a for name, a in arrays.items() if a.ndim == 1 or a.size <= TERMS_LIMIT}
    if not arrays:
        return None
    target = run.terms_file(check_id, suite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


class DamagedFile(ValueError):
    """A file of a run directory that exists but cannot be read (truncated, not what its
    name says); its message is one line naming the file."""


def stored_terms_path(run: RunDir, check_id: str, suite: str = "") -> Path | None:
    """The file holding a check's terms (the older name, by id alone, as a fallback); None
    when the run stored none."""
    for path in dict.fromkeys((run.terms_file(check_id, suite), run.terms_file(check_id))):
        if path.is_file():
            return path
    return None


def read_terms(run: RunDir, check_id: str, suite: str = "") -> dict[str, np.ndarray] | None:
    """A check's stored terms, or None when the run has none for it. A file that exists but
    cannot be read raises `DamagedFile`: comparing without it would hide the damage."""
    path = stored_terms_path(run, check_id, suite)
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            terms = {name: data[name] for name in data.files}
    except Exception as err:  # noqa: BLE001 -- zipfile, zlib, numpy: any failure is damage
        raise DamagedFile(f"{path}: damaged stored terms ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:120]})") from None
    bad = [n for n, a in terms.items() if a.dtype.kind != "f"]
    if bad:
        raise DamagedFile(f"{path}: stored terms {', '.join(bad)} are not floating-point")
    return terms
