"""Tests of saebench.report: CSV appends and reads, the Markdown report, the command line."""

from __future__ import annotations

import ast
import doctest
import math
import multiprocessing
import re
import tempfile
import warnings
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saebench import report
from saebench.report import (
    FEATURE_COLUMNS,
    PER_PROMPT_BASE_COLUMNS,
    PER_PROMPT_COLUMNS,
    RESULT_COLUMNS,
    VERDICT_MARKS,
    append_rows,
    finished_check_ids,
    new_run_id,
    read_per_prompt,
    read_results,
    read_table,
    render_report,
    write_report,
)

PROVENANCE = {
    "run_id": "20261123-081530-ab12", "model": "toy", "hook": "blocks.2.hook_resid_post",
    "saebench_version": "0.1.0", "sae_lens_version": "6.50.0",
    "transformer_lens_version": "3.0.0", "torch_version": "2.4.0", "device": "cpu",
    "dtype": "float32", "token_set": "heldout", "seed": 0,
}


def result(check_id: str, verdict: str, value: float = 0.5, **fields) -> dict:
    """A results.csv row with provenance, an interval around `value` and n = 64."""
    row = {**PROVENANCE, "suite": "toy", "check_id": check_id, "dictionary": "resid-L2-topk16",
           "metric": "ce_loss_recovered", "value": value, "ci_low": value - 0.1,
           "ci_high": value + 0.1, "n": 64, "threshold": ">= 0.9", "verdict": verdict,
           "higher_is_better": True, "duration_s": 0.25}
    return {**row, **fields}


def table_lines(text: str, section: str) -> list[str]:
    """The table rows (lines starting with "|") from the heading `section` to the next one."""
    body = text.split(section + "\n", 1)[1].split("\n#", 1)[0]
    return [line for line in body.splitlines() if line.startswith("| ")][1:]


# --------------------------------------------------------------------------- the report


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run with two suites, every kind of verdict and a NaN value."""
    rows = [
        result("toy::a::l0", "pass", 16.0, metric="l0", higher_is_better=False),
        result("toy::a::ce", "fail", 0.5, message="0.5 < 0.9 | see\nthe parts",
               parts={"ce_clean": 3.2, "ce_spliced": 3.5}, options={"ablation": "zero"}),
        result("toy::a::kl", "error", math.nan, metric="kl_div", ci_low=math.nan,
               ci_high=math.nan, n=None, message="KL is not finite"),
        result("toy::b::ce", "xfail", 0.2, dictionary="resid-L2-poor"),
        result("toy::b::ev", "unstable", 0.81234567, metric="explained_variance"),
        result("toy::b::l0", "pass", 4.0, dictionary="resid-L2-poor", metric="l0"),
        result("big::a::ce", "skipped", math.nan, suite="big", model="gpt2"),
    ]
    append_rows(tmp_path / "results.csv", rows[:3])
    append_rows(tmp_path / "results.csv", rows[3:])
    return tmp_path


def test_report_summary_and_provenance(run_dir: Path) -> None:
    text = render_report(run_dir)
    assert text.startswith("# saebench report 20261123-081530-ab12\n")
    assert ("7 checks: 2 ✅ pass, 1 ❌ fail, 1 ❎ xfail, 1 💥 error, 1 ❓ unstable, "
            "1 ⏩ skipped") in text
    assert text.count("Provenance:") == 1
    assert ("Provenance: saebench 0.1.0 · sae_lens 6.50.0 · transformer_lens 3.0.0 · "
            "torch 2.4.0 · device cpu · dtype float32 · token set heldout · seed 0") in text


def test_report_tables(run_dir: Path) -> None:
    text = render_report(run_dir)
    results = read_results(run_dir)
    assert all(check_id in text for check_id in results["check_id"])
    assert text.index("## Suite toy") < text.index("## Suite big")
    checks = table_lines(text, "## Suite toy")
    order = [line.split("|")[2].strip() for line in checks]
    assert order == ["toy::a::ce", "toy::a::kl", "toy::b::ev",  # problems first, in order
                     "toy::a::l0", "toy::b::ce", "toy::b::l0"]
    fail, error, unstable = checks[:3]
    assert fail.startswith("| ❌ fail") and "[0.4, 0.6]" in fail
    assert "0.5 < 0.9 \\| see the parts" in fail  # escaped, on one line
    assert error.startswith("| 💥 error")
    assert [cell.strip() for cell in error.split("|")[4:7]] == ["—", "—", "—"]  # value, CI, n
    assert "0.8123" in unstable and "[0.7123, 0.9123]" in unstable
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert not re.search(r"(?<![\w.-])-1\b", text)  # no sentinel
    metrics = table_lines(text, "### resid-L2-topk16")
    assert [line.split("|")[1].strip() for line in metrics] == ["l0", "ce_loss_recovered",
                                                               "kl_div", "explained_variance"]
    assert "| ↓ " in metrics[0] and "| ↑ " in metrics[1]
    assert "ablation=zero" in metrics[1] and "ce_clean=3.2, ce_spliced=3.5" in metrics[1]
    assert "### resid-L2-poor" in text


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


def test_finished_check_ids(tmp_path: Path) -> None:
    assert finished_check_ids(tmp_path / "missing") == set()
    append_rows(tmp_path / "results.csv", [
        result("retried", "error"), result("failed", "fail"), result("broke", "pass"),
        result("retried", "pass"), result("broke", "error"), result("skip", "skipped"),
    ])
    assert finished_check_ids(tmp_path) == {"retried", "failed", "skip"}


# --------------------------------------------------------------------------- appends


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
    with pytest.raises(ValueError, match="header"):
        append_rows(path, [{"check_id": "c9"}], columns=["check_id"])
    with pytest.raises(ValueError, match="pass `columns`"):
        append_rows(tmp_path / "other.csv", [{"check_id": "c9"}])
    assert len(path.read_text().splitlines()) == 4  # failed appends wrote nothing


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
    for row in table.itertuples():
        worker, i = map(int, re.fullmatch(r"w(\d)-(\d+)", row.check_id).groups())
        assert row.message == _message(worker, i) and row.value == i / 7
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
    if name in ("value", "ci_low", "ci_high", "duration_s"):
        return _float
    if name in ("n", "seed"):
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


# --------------------------------------------------------------------------- per prompt, features


def test_worst_prompts(tmp_path: Path) -> None:
    losses = [0.1, 2.0, 0.5, 3.0, -1.0, 1.0]
    ids = {"run_id": "r", "suite": "toy", "check_id": "ioi::ld", "task": "ioi",
           "answer": " Mary", "distractor": " John"}
    rows = [{**ids, "dictionary": "d1", "prompt_index": i, "prompt": f"p{i}: a|b\nc",
             "ld_clean": 4.0, "ld_spliced": 4.0 - loss, "ld_ablated": 0.5}
            for i, loss in enumerate(losses)]
    rows.append({**ids, "dictionary": "d2", "prompt_index": 0, "prompt": "other",
                 "ld_clean": 4.0, "ld_spliced": -10.0})
    append_rows(tmp_path / "per_prompt.csv", rows)
    append_rows(tmp_path / "per_prompt.csv", [{**ids, "check_id": "ioi::dla", "dictionary": "d1",
                                               "prompt_index": 3, "prompt": "p3: a|b\nc",
                                               "dla_remainder": 0.25}])
    append_rows(tmp_path / "results.csv", [result("ioi::ld", "pass")])
    header = (tmp_path / "per_prompt.csv").read_text().split("\n", 1)[0]
    assert header.split(",") == PER_PROMPT_COLUMNS  # long format
    wide = read_per_prompt(tmp_path)
    assert list(wide.columns) == [*PER_PROMPT_BASE_COLUMNS, "ld_clean", "ld_spliced",
                                  "ld_ablated", "dla_remainder"]
    text = render_report(tmp_path, worst_prompts=3)
    lines = table_lines(text, "### toy · ioi · d1")
    assert [line.split("|")[1].strip() for line in lines] == ["3", "1", "5"]
    assert lines[0].split(" | ")[1].strip() == "p3: a\\|b↵c"
    assert "0.25" in lines[0]  # the other check's quantity joins the same prompt
    assert len(table_lines(text, "### toy · ioi · d2")) == 1
    assert "## Worst prompts" not in render_report(tmp_path, worst_prompts=0)
    with pytest.raises(ValueError, match="quantity 'promt'"):
        append_rows(tmp_path / "per_prompt.csv", [{**ids, "promt": "typo"}])


def test_features_section(tmp_path: Path) -> None:
    append_rows(tmp_path / "results.csv", [result("fa", "pass", metric="feature_ablation")])
    ids = {"run_id": "r", "suite": "toy", "check_id": "fa", "dictionary": "d1", "task": "ioi"}
    append_rows(tmp_path / "features.csv", [
        {**ids, "feature": f, "mean_activation": 1.0 / (f + 1), "active_share": 0.5,
         "effect": -0.25, "ci_low": -0.5, "ci_high": math.nan} for f in (7, 3)
    ])
    assert list(read_table(tmp_path / "features.csv").columns) == FEATURE_COLUMNS
    lines = table_lines(render_report(tmp_path), "### fa")
    assert [line.split("|")[1].strip() for line in lines] == ["7", "3"]
    assert "[-0.5, —]" in lines[0] and "0.25" in lines[1]


def test_no_optional_sections_without_their_files(run_dir: Path) -> None:
    text = render_report(run_dir)
    assert "## Worst prompts" not in text and "## Feature ablations" not in text


# --------------------------------------------------------------------------- files, command line


def test_write_report_replaces_atomically(run_dir: Path, monkeypatch) -> None:
    (run_dir / "report.md").write_text("old report")
    path = write_report(run_dir)
    assert path == run_dir / "report.md" and path.read_text() == render_report(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.md", "results.csv"]

    path.write_text("old report")

    def crash(*args) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_report(run_dir)
    assert path.read_text() == "old report"  # never half written
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.md", "results.csv"]


def test_main(run_dir: Path, tmp_path_factory, capsys) -> None:
    missing = tmp_path_factory.mktemp("other") / "nope"
    assert report.main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    missing.mkdir()
    assert report.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert "results.csv" in err and str(missing) in err
    assert report.main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.md")
    assert (run_dir / "report.md").read_text().startswith("# saebench report")
    assert report.main([str(run_dir / "results.csv"), "--worst-prompts", "0"]) == 0


# --------------------------------------------------------------------------- small pieces


def test_new_run_id_sorts_by_time() -> None:
    from datetime import datetime

    early = new_run_id(datetime(2026, 1, 2, 3, 4, 5))
    late = new_run_id(datetime(2026, 1, 2, 3, 4, 6))
    assert re.fullmatch(r"20260102-030405-[0-9a-f]{4}", early) and early < late
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", new_run_id())
    assert len({new_run_id() for _ in range(20)}) > 1


def test_marks_cover_every_verdict() -> None:
    assert set(VERDICT_MARKS) == {"pass", "fail", "xfail", "xpass", "error", "empty",
                                  "unstable", "skipped"}
    assert len(set(VERDICT_MARKS.values())) == len(VERDICT_MARKS)


def test_docstring_examples_of_formatters() -> None:
    runner = doctest.DocTestRunner()
    for function in (report.format_value, report.format_ci, report.new_run_id):
        for test in doctest.DocTestFinder().find(function, globs=vars(report)):
            runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_report_imports_rows_only() -> None:
    tree = ast.parse(Path(report.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m and m.split(".")[0] in ("torch", "pytest", "saebench")}
