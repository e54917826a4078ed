"""Tests of saebench.report: CSV appends and reads, the Markdown report, the command line."""

from __future__ import annotations

import ast
import doctest
import math
import re
from pathlib import Path

import pytest

from saebench import report, results
from saebench.report import VERDICT_MARKS, render_report, write_report
from saebench.results import (
    FEATURE_COLUMNS,
    PER_PROMPT_BASE_COLUMNS,
    PER_PROMPT_COLUMNS,
    append_rows,
    new_run_id,
    read_per_prompt,
    read_results,
    read_table,
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
    shown = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".lock"))
    assert shown == [".results.csv.lock", "report.md", "results.csv"]  # no temporary left

    path.write_text("old report")

    def crash(*args) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_report(run_dir)
    assert path.read_text() == "old report"  # never half written
    shown = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".lock"))
    assert shown == [".results.csv.lock", "report.md", "results.csv"]  # no temporary left


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
    for function in (report.format_value, report.format_ci, results.new_run_id):
        module = results if function is results.new_run_id else report
        for test in doctest.DocTestFinder().find(function, globs=vars(module)):
            runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def imported_modules(module) -> set[str]:
    """The modules a module's source imports."""
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    return imported | {node.module for node in ast.walk(tree)
                       if isinstance(node, ast.ImportFrom) and node.module}


def test_report_imports_rows_only() -> None:
    imported = imported_modules(report) - {"saebench.results"}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "pytest", "saebench")}
