"""Result rows and run directories: columns and types, appends, reads, stored terms."""

from __future__ import annotations

import math
import multiprocessing
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_report import imported_modules, result

from saebench import results
from saebench.results import (
    RESULT_COLUMNS,
    TERMS_LIMIT,
    RunDir,
    append_rows,
    check_results_header,
    read_results,
    read_table,
    read_terms,
    row,
    write_terms,
)


def test_nan_survives_the_csv_round_trip(tmp_path: Path) -> None:
    append_rows(tmp_path / "results.csv", [
        result("c1", "error", math.nan, ci_low=-math.inf, ci_high=math.inf, n=None,
               higher_is_better=None, seed=None),
    ])
    row = read_results(tmp_path).iloc[0]
    assert math.isnan(row["value"]) and row["ci_low"] == -math.inf and row["ci_high"] == math.inf
    assert row["n"] is pd.NA and row["seed"] is pd.NA and row["higher_is_better"] is pd.NA
    record = (tmp_path / "results.csv").read_text().splitlines()[1].split(",")
    assert record[RESULT_COLUMNS.index("value")] == ""
    assert "-1" not in record and "nan" not in record


def test_read_results_types_and_last_row_wins(tmp_path: Path) -> None:
    append_rows(tmp_path / "results.csv", [result("c1", "error", math.nan), result("c2", "pass"),
                                           result("c1", "pass", 0.9)])
    results = read_results(tmp_path)
    assert list(results.columns) == RESULT_COLUMNS
    assert list(results["check_id"]) == ["c1", "c2"]  # c1 stays first
    assert results.loc[0, "value"] == 0.9 and results.loc[0, "verdict"] == "pass"
    assert results["value"].dtype == "float64" and results["n"].dtype == "Int64"
    assert results["higher_is_better"].dtype == "boolean"
    assert read_results(tmp_path / "results.csv").equals(results)  # a file path works too


def test_append_writes_the_header_once_and_checks_keys(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "results.csv"
    for i in range(3):
        append_rows(path, [result(f"c{i}", "pass")])
    append_rows(path, [])
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(RESULT_COLUMNS) and len(lines) == 4
    with pytest.raises(ValueError, match="'bogus', 'valeu'"):
        append_rows(path, [{"check_id": "c9", "valeu": 1.0, "bogus": 2}])
    with pytest.raises(ValueError, match="column 'n'"):
        append_rows(path, [{"check_id": "c9", "n": 2.5}])
    append_rows(path, [{"check_id": "c9", "value": 2.0}], columns=["check_id", "value"])
    assert read_results(path).set_index("check_id").loc["c9", "value"] == 2.0
    with pytest.raises(ValueError, match="pass `columns`"):
        append_rows(tmp_path / "other.csv", [{"check_id": "c9"}])
    assert len(path.read_text().splitlines()) == 5  # failed appends wrote nothing


def _message(worker: int, i: int) -> str:
    return f"worker {worker}, row {i}: " + 'a "quoted", comma\nand a line\n' * 200


def _append_worker(path: str, worker: int, rows: int) -> None:
    for i in range(rows):
        append_rows(Path(path), [result(f"w{worker}-{i}", "pass", i / 7,
                                        message=_message(worker, i))])


def test_concurrent_appends_from_processes(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    workers = [context.Process(target=_append_worker, args=(str(path), w, 50)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no malformed rows
        table = read_table(path)
    assert len(table) == 200 and table["check_id"].is_unique
    for record in table.itertuples():
        worker, i = map(int, re.fullmatch(r"w(\d)-(\d+)", record.check_id).groups())
        assert record.message == _message(worker, i) and record.value == i / 7
    assert path.read_text().count("run_id,suite,check_id") == 1


def test_a_torn_last_row_is_cut_off_by_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    append_rows(path, [result("c1", "pass")])
    with open(path, "a") as f:
        f.write('20261123,toy,c2,toy,resid,hook,l0,,"{""a"":\n1')  # killed mid-row
    with pytest.warns(UserWarning, match="torn"):
        append_rows(path, [result("c3", "pass")])
    assert list(read_results(tmp_path)["check_id"]) == ["c1", "c3"]


# --------------------------------------------------------------------------- round trip


_text = st.one_of(st.text(max_size=20), st.sampled_from(
    ["", "NA", "nan", "None", "-1", " lead", 'say "hi", then\r\nbye', "a|b", "é☃🙂", "\r"]))
_float = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
_int = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1))
_bool = st.one_of(st.none(), st.booleans())


def _column(name: str) -> st.SearchStrategy:
    if name in ("value", "ci_low", "ci_high", "duration_s", "baseline_value", "delta",
                "delta_ci_low", "delta_ci_high", "tolerance", "random_value", "margin",
                "margin_low", "margin_high"):
        return _float
    if name in ("n", "seed", "d_in", "d_sae"):
        return _int
    return _bool if name == "higher_is_better" else _text


_rows = st.lists(st.fixed_dictionaries({c: _column(c) for c in RESULT_COLUMNS}), max_size=6,
                 unique_by=lambda row: row["check_id"])


def _same(written, read) -> bool:
    if written is None or (isinstance(written, float) and math.isnan(written)):
        return read == "" if isinstance(read, str) else bool(pd.isna(read))
    return type(written)(read) == written


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=_rows, split=st.integers(min_value=0, max_value=6))
def test_arbitrary_rows_round_trip(rows: list[dict], split: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        append_rows(Path(directory) / "results.csv", rows[:split])
        append_rows(Path(directory) / "results.csv", rows[split:])
        if not rows:
            assert not (Path(directory) / "results.csv").exists()
            return
        back = read_results(Path(directory)).to_dict("records")
    assert len(back) == len(rows)
    for written, read in zip(rows, back, strict=True):
        for column in RESULT_COLUMNS:
            assert _same(written[column], read[column]), (column, written[column], read[column])




# --------------------------------------------------------------------------- layouts


def test_an_older_results_file_gains_the_new_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    old_columns = [c for c in RESULT_COLUMNS if c not in ("fingerprint", "source", "delta")]
    path = tmp_path / "results.csv"
    append_rows(path, [result("old", "pass", 0.7)], columns=old_columns)
    assert "fingerprint" not in path.read_text().splitlines()[0]
    append_rows(path, [result("new", "pass", 0.8, fingerprint="abc", source="zoo:x")])
    lines = path.read_text().splitlines()
    assert lines[0].split(",")[-3:] == ["delta", "source", "fingerprint"]
    table = read_results(tmp_path).set_index("check_id")
    assert table.loc["old", "value"] == 0.7 and table.loc["old", "fingerprint"] == ""
    assert table.loc["new", "fingerprint"] == "abc" and table.loc["new", "source"] == "zoo:x"


def test_a_file_that_is_not_a_results_file_is_refused_in_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="not a saebench results file: it has no check_id"):
        check_results_header(path)
    with pytest.raises(ValueError, match="not a saebench results file"):
        read_results(tmp_path)


def test_row_fills_every_column_and_refuses_unknown_ones() -> None:
    filled = row(check_id="c", value=1.0)
    assert list(filled) == RESULT_COLUMNS and math.isnan(filled["ci_low"])
    assert filled["verdict"] is None
    with pytest.raises(ValueError, match="valeu"):
        row(check_id="c", valeu=1.0)


def test_terms_round_trip_and_skip_what_is_too_wide(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    n = 7
    terms = {"n_pred": np.arange(n, dtype=float), "ce_clean": np.linspace(0, 1, n),
             "feature_counts": np.ones((n, TERMS_LIMIT // n + 1))}
    path = write_terms(run, "good::ce_loss_recovered[zero]", terms)
    assert path.parent == run.path / "terms" and path.suffix == ".npz"
    back = read_terms(run, "good::ce_loss_recovered[zero]")
    assert set(back) == {"n_pred", "ce_clean"}
    np.testing.assert_array_equal(back["ce_clean"], terms["ce_clean"])
    assert read_terms(run, "good::other") is None
    assert run.terms_file("a/b::c") != run.terms_file("a_b::c")  # ids never collide


def test_results_imports_no_torch_pytest_or_saebench() -> None:
    assert not {m for m in imported_modules(results)
                if m.split(".")[0] in ("torch", "pytest", "saebench")}
