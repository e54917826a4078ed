"""The one verdict vocabulary (`saebench.verdicts`), and `measured` — a check without a
threshold — through every surface: the pytest line and summary, results.csv, the report, the
gate and `evaluate()`. A measurement is never shown as a pass."""

from __future__ import annotations

import argparse

import pytest

from saebench import gate, report, results, verdicts

pytest_plugins = ["pytester"]

SUITE = """\
suite: mini
model: zoo
data: {source: zoo, n_tokens: 1024}
dictionaries: {good: {zoo: DICT}}
defaults: {options: {n_boot: 50}}
checks:
  - metric: mse
    dictionaries: [good]
  - metric: l0
    dictionaries: [good]
    threshold: "<= 70"
"""


def test_every_verdict_has_one_mark_and_meaning_and_the_groups_are_consistent():
    assert set(verdicts.MARKS) == set(verdicts.MEANINGS) == set(verdicts.VERDICTS)
    assert len(set(verdicts.MARKS.values())) == len(verdicts.MARKS)
    assert verdicts.MARKS["measured"] != verdicts.MARKS["pass"]
    assert "measured" in verdicts.VALUED and "measured" not in verdicts.JUDGED
    assert not set(verdicts.FINE) & set(verdicts.FAILING)
    assert not set(verdicts.FAILED) & set(verdicts.FINE) - {"xfail"}
    assert verdicts.mark("nonsense") == "❔ nonsense"


def test_a_check_without_a_threshold_is_measured_everywhere(pytester, capsys):
    pytester.makefile(".yaml", mini=SUITE.replace("DICT", "resid-L2-topk16"))
    out = pytester.runpytest("-m", "eval", "mini.yaml", "-v", "-p", "no:cacheprovider")
    out.stdout.fnmatch_lines(["*mini.yaml::good::mse MEASURED*", "*mini.yaml::good::l0 PASSED*",
                              "*= 1 passed, 1 measured in *"])
    runs = sorted((pytester.path / "reports").iterdir())
    rows = results.read_results(runs[-1]).set_index("check_id")
    assert rows.loc["good::mse", "verdict"] == "measured"
    assert rows.loc["good::mse", "message"].endswith("(measured: no threshold)")
    assert rows.loc["good::l0", "verdict"] == "pass"
    markdown = report.render_report(runs[-1])
    (mse_line,) = [line for line in markdown.splitlines() if line.startswith("| good::mse ")]
    assert "✅" not in mse_line and "📏\N{NO-BREAK SPACE}measured" in mse_line
    assert "1 ✅ pass, 1 📏 measured" in markdown
    pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider",
                       "--saebench-baseline", "base")  # writes base/mini
    before = set((pytester.path / "reports").iterdir())
    again = pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider",
                               "--saebench-baseline", "base")
    again.assert_outcomes(passed=1)
    assert "1 passed, 1 measured" in again.stdout.lines[-1]
    (last,) = set((pytester.path / "reports").iterdir()) - before  # ids may share a second
    compared = results.read_results(last)
    assert set(compared["vs_baseline"]) == {"same"}  # a measurement is gated on its baseline
    table = gate.gate_runs(runs[-1], pytester.path / "base" / "mini")
    assert set(table["vs_baseline"]) == {"same"}


def test_a_measured_check_that_got_worse_regresses(pytester):
    pytester.makefile(".yaml", mini=SUITE.replace("DICT", "resid-L2-topk16"))
    pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider",
                       "--saebench-baseline", "base")
    pytester.makefile(".yaml", mini=SUITE.replace("DICT", "resid-L2-poor"))
    before = set((pytester.path / "reports").iterdir())
    worse = pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider",
                               "--saebench-baseline", "base")
    worse.stdout.fnmatch_lines(["*good::mse: [[]regression[]] mse = *(measured: no "
                                "threshold); vs baseline*"])
    assert worse.ret == 1
    (last,) = set((pytester.path / "reports").iterdir()) - before
    code = gate.run(argparse.Namespace(new=last, baseline=pytester.path / "base" / "mini",
                                       strict=False, allow_incomparable=False))
    assert code == 1


def test_an_older_results_file_with_pass_and_no_threshold_reads_as_measured(tmp_path):
    results.append_rows(tmp_path / results.RESULTS_FILE, [
        results.row(suite="s", check_id="a::mse", metric="mse", value=0.1, verdict="pass"),
        results.row(suite="s", check_id="a::l0", metric="l0", value=16.0, threshold="<= 70",
                    verdict="pass")])
    rows = results.read_results(tmp_path).set_index("check_id")
    assert rows.loc["a::mse", "verdict"] == "measured"
    assert rows.loc["a::l0", "verdict"] == "pass"


@pytest.mark.parametrize("verdict", ["measured", "pass"])
def test_a_stored_row_must_agree_with_its_threshold(verdict):
    from saebench.checks import contradiction

    row = {"verdict": verdict, "value": 1.0, "ci_low": 0.9, "ci_high": 1.1, "threshold": ""}
    assert (contradiction(row) is None) == (verdict == "measured")
    assert contradiction({**row, "threshold": "<= 2"}) is None if verdict == "pass" else \
        "with a threshold" in contradiction({**row, "threshold": "<= 2"})


def test_evaluate_rows_say_measured(zoo_model):
    from saebench import evaluate, loading

    tokens = loading.load_heldout_tokens()[:8]
    frame = evaluate(zoo_model, {"good": loading.load_zoo_dictionary("resid-L2-topk16")},
                     tokens, metrics=["l0", "mse"], n_boot=20)
    assert set(frame["verdict"]) == {"measured"}
