"""Regression gates: the decision rule on hand-made terms, baselines on disk, the CLI, and the
toy suite against its committed baseline."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from saebench import gate, results
from saebench.metrics.registry import get_metric
from saebench.stats import summarize

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]
TOY_BASELINE = ROOT / "suites" / "baselines" / "toy"


def terms(n: int, spliced_shift: float, noise: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """ce_loss_recovered terms of n sequences: ablated 4, clean 1, spliced 1 + shift, with
    per-sequence noise shared by nothing else."""
    g = torch.Generator().manual_seed(seed)
    count = torch.full((n,), 100.0, dtype=torch.float64)
    wobble = noise * torch.randn(n, generator=g, dtype=torch.float64)
    return {"n_pred": count, "ce_clean": 100 * (1 + 0.1 * wobble.abs()),
            "ce_zero": 400 * torch.ones(n, dtype=torch.float64),
            "ce_spliced": 100 * (1 + spliced_shift + wobble)}


def row_of(t: dict, token_set: str = "tokens-a", **fields) -> dict:
    s = summarize(get_metric("ce_loss_recovered"), t, {"ablation": "zero"}, n_boot=500)
    return results.row(check_id="d::ce_loss_recovered[zero]", metric="ce_loss_recovered",
                       value=s.value, ci_low=s.ci_low, ci_high=s.ci_high, n=s.n,
                       verdict="pass", token_set=token_set, options='{"ablation": "zero"}',
                       **fields)


OPTIONS = {"ablation": "zero"}


def test_a_regression_beyond_tolerance_and_noise_is_a_regression():
    base, new = terms(64, 0.05, 0.01), terms(64, 0.4, 0.01)
    c = gate.compare(row_of(new), row_of(base), new, base, options=OPTIONS)
    assert c.verdict == "regression" and c.method == "paired"
    assert c.delta < -c.tolerance and c.ci_high < 0
    assert gate.judge("pass", "meets", c)[0] == "regression"
    assert gate.judge("fail", "fails", c) == ("fail", f"fails; {c.message}")


def shifted(base: dict, shift: float) -> dict:
    """`base` with every sequence's spliced CE raised by `shift` nats per token."""
    return {**base, "ce_spliced": base["ce_spliced"] + 100 * shift}


def test_worse_beyond_tolerance_but_within_noise_is_noisy():
    base = terms(12, 0.05, 0.3, seed=3)
    new = shifted(base, 0.06)
    c = gate.compare(row_of(new, token_set="other"), row_of(base), new, base, options=OPTIONS)
    assert c.verdict == "noisy" and c.method == "unpaired"
    assert c.delta < -c.tolerance and c.ci_low < 0 < c.ci_high
    assert gate.judge("pass", "meets", c)[0] == "noisy"


def test_pairing_sees_a_shift_that_unpaired_intervals_call_noise():
    """The same sequences, every one shifted a little: paired, a clear regression; compared
    as independent runs (another token set), the shift drowns in the sequences' spread."""
    base = terms(12, 0.05, 0.3, seed=3)
    new = shifted(base, 0.06)
    paired = gate.compare(row_of(new), row_of(base), new, base, options=OPTIONS)
    unpaired = gate.compare(row_of(new, token_set="other"), row_of(base), new, base,
                            options=OPTIONS)
    assert math.isclose(paired.delta, unpaired.delta)
    assert (paired.verdict, paired.method) == ("regression", "paired")
    assert (unpaired.verdict, unpaired.method) == ("noisy", "unpaired")


def test_an_improvement_passes_and_is_reported():
    base, new = terms(64, 0.4, 0.01), terms(64, 0.05, 0.01)
    c = gate.compare(row_of(new), row_of(base), new, base, options=OPTIONS)
    assert c.verdict == "improved" and c.delta > 0
    assert gate.judge("pass", "meets", c) == ("pass", f"meets; {c.message}")


def test_lower_is_better_metrics_are_oriented():
    base = results.row(metric="l0", value=16.0, ci_low=math.nan, ci_high=math.nan,
                       verdict="pass")
    worse = gate.compare({**base, "value": 20.0}, base)
    assert worse.delta == -4.0 and worse.tolerance == pytest.approx(0.8)  # 5% of 16
    assert worse.verdict == "regression" and worse.method == "none"
    assert gate.compare({**base, "value": 16.5}, base).verdict == "same"


def test_a_checks_own_tolerance_wins_over_the_metrics():
    base, new = terms(64, 0.05, 0.01), terms(64, 0.4, 0.01)
    c = gate.compare(row_of(new), row_of(base), new, base, options=OPTIONS, tolerance=0.5)
    assert c.verdict == "same" and c.tolerance == 0.5
    c = gate.compare(row_of(new), row_of(base), new, base, options=OPTIONS, rel_tolerance=1.0)
    assert c.tolerance == pytest.approx(abs(row_of(base)["value"]))


def test_no_baseline_row_is_new_never_a_crash():
    new = terms(8, 0.1, 0.1)
    assert gate.compare(row_of(new), None).verdict == "new"
    errored = results.row(metric="ce_loss_recovered", value=math.nan, verdict="error")
    assert gate.compare(row_of(new), errored).verdict == "new"
    assert gate.judge("pass", "meets", gate.Comparison("new")) == ("pass", "meets")


def _run_dir(path: Path, rows: list[dict], stored: dict[str, dict] | None = None) -> Path:
    run = results.RunDir(path)
    results.append_rows(run.results, rows)
    for check_id, t in (stored or {}).items():
        results.write_terms(run, check_id, t)
    return path


def test_gate_command_exit_codes_and_missing_rows_both_ways(tmp_path, capsys):
    base, bad = terms(64, 0.05, 0.01), terms(64, 0.4, 0.01)
    old = _run_dir(tmp_path / "old", [row_of(base), {**row_of(base), "check_id": "gone"}],
                   {"d::ce_loss_recovered[zero]": base})
    same = _run_dir(tmp_path / "same", [row_of(base), {**row_of(base), "check_id": "added"}],
                    {"d::ce_loss_recovered[zero]": base})
    worse = _run_dir(tmp_path / "worse", [row_of(bad)], {"d::ce_loss_recovered[zero]": bad})

    def run(new: Path, baseline: Path, strict: bool = False) -> int:
        return gate.run(argparse.Namespace(new=new, baseline=baseline, strict=strict,
                                           allow_incomparable=False))

    assert run(same, old) == 1  # a check of the baseline that the run lost fails the gate
    out = capsys.readouterr().out
    assert "gone" in out and "missing" in out and "1 new" in out and "1 same" in out
    results.write_selection(same, {"": (2, 3)}, "-k 'not gone'")  # left out on purpose
    assert run(same, old) == 0
    out = capsys.readouterr().out
    assert "not selected" in out and "-k 'not gone'" in out and "1 same" in out
    assert run(worse, old) == 1
    out = capsys.readouterr().out
    assert "d::ce_loss_recovered[zero]" in out and "regression" in out and "paired" in out
    assert run(tmp_path / "nothing", old) == 2
    assert "saebench gate:" in capsys.readouterr().err


def test_write_baseline_keeps_other_rows_and_copies_terms(tmp_path):
    base = terms(8, 0.05, 0.1)
    run = _run_dir(tmp_path / "run", [row_of(base)], {"d::ce_loss_recovered[zero]": base})
    target = tmp_path / "baselines" / "toy"
    _run_dir(target, [{**row_of(base), "check_id": "kept", "value": 0.5}])
    gate.write_baseline(results.RunDir(run), target)
    assert sorted(p.name for p in target.iterdir()) == [".results.csv.lock", "results.csv",
                                                        "terms"]  # nothing staged is left
    loaded = gate.Baseline.load(target)
    assert set(loaded.rows) == {("", "kept"), ("", "d::ce_loss_recovered[zero]")}
    np.testing.assert_array_equal(loaded.terms("d::ce_loss_recovered[zero]")["ce_spliced"],
                                  base["ce_spliced"].numpy())
    assert gate.locate(tmp_path / "baselines", "toy") == target
    assert gate.locate(target, "other") == target  # holds a results.csv: used as it is


SUITE = """\
suite: mini
model: zoo
data: {source: zoo, n_tokens: 2048}
dictionaries:
  good: {zoo: DICT}
defaults: {options: {n_boot: 100}}
checks:
  - metric: ce_loss_recovered
    dictionaries: [good]
    options: {ablation: zero}
  - metric: l0
    dictionaries: [good]
    threshold: "<= 70"
    baseline: {rel_tolerance: 0.5}
"""


def test_missing_baseline_is_written_update_regenerates_and_a_substitution_regresses(pytester):
    def suite(dictionary: str) -> None:
        pytester.makefile(".yaml", mini=SUITE.replace("DICT", dictionary))

    def run(*extra: str):
        return pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider",
                                  "--saebench-baseline", "baselines", *extra)

    suite("resid-L2-topk16")
    first = run()
    first.assert_outcomes(failed=2)
    first.stdout.fnmatch_lines(["*[[]new baseline[]]*written to baselines/mini*"])
    assert (pytester.path / "baselines" / "mini" / "results.csv").is_file()
    second = run()
    second.assert_outcomes(passed=1)  # the other check has no threshold: measured
    assert "1 passed, 1 measured" in second.stdout.str()
    suite("resid-L2-poor")
    worse = run()
    worse.assert_outcomes(passed=1, failed=1)  # L0 is within its 50% tolerance
    worse.stdout.fnmatch_lines(["*good::ce_loss_recovered[[]zero[]]: [[]regression[]]*"
                                "vs baseline*paired bootstrap*"])
    run("--saebench-update-baseline").assert_outcomes(passed=1)
    before = set((pytester.path / "reports").iterdir())
    run().assert_outcomes(passed=1)
    (last,) = set((pytester.path / "reports").iterdir()) - before  # ids may share a second
    assert set(results.read_results(last)["vs_baseline"]) == {"same"}


def test_an_old_results_csv_without_the_new_columns_is_read_and_resumed(pytester):
    pytester.makefile(".yaml", mini=SUITE.replace("DICT", "resid-L2-topk16"))
    first = pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider")
    first.assert_outcomes(passed=1)
    (run_dir,) = (pytester.path / "reports").iterdir()
    frame = pd.read_csv(run_dir / "results.csv", dtype=str, keep_default_na=False)
    old = frame.drop(columns=[*results.IDENTITY_COLUMNS, *results.BASELINE_COLUMNS,
                              "saebench_commit"])
    old.to_csv(run_dir / "results.csv", index=False)
    again = pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider",
                               f"--saebench-resume={run_dir}")
    again.assert_outcomes(passed=1)
    assert "2 reused" in again.stdout.str()
    back = results.read_results(run_dir)
    assert set(results.RESULT_COLUMNS) <= set(back.columns) and len(back) == 2


TOY_SUBSTITUTE = ("dl-L2-topk16: {zoo: dl-L2-topk16}", "dl-L2-topk16: {zoo: resid-L2-poor}")


@pytest.mark.parametrize("substituted", [False, True], ids=["unchanged", "poor-substituted"])
def test_the_toy_suite_against_its_committed_baseline(pytester, substituted, capsys):
    """One dictionary's checks of the toy suite against suites/baselines/toy: unchanged they
    pass the gate; with the poor SAE under the same name they fail it, with a table."""
    text = (ROOT / "suites" / "toy.yaml").read_text()
    if substituted:
        assert TOY_SUBSTITUTE[0] in text
        text = text.replace(*TOY_SUBSTITUTE)
    pytester.makefile(".yaml", toy=text)
    out = pytester.runpytest("-m", "eval", "toy.yaml", "-p", "no:cacheprovider", "-k",
                             "dl-L2-topk16", "--saebench-baseline", str(TOY_BASELINE))
    (run_dir,) = (pytester.path / "reports").iterdir()
    code = gate.run(argparse.Namespace(new=run_dir, baseline=TOY_BASELINE, strict=False,
                                       allow_incomparable=False))
    table = capsys.readouterr().out
    if substituted:
        assert out.ret != 0 and code == 1
        assert "dl-L2-topk16::ce_loss_recovered[zero]" in table and "regression" in table
    else:
        out.assert_outcomes(passed=len(results.read_results(run_dir)))
        assert code == 0, table
        assert "not selected" in table and "-k 'dl-L2-topk16'" in table  # the others


def test_the_ci_example_uses_options_that_exist(pytestconfig):
    workflow = yaml.safe_load((ROOT / "examples" / "github-actions" /
                               "gate-new-sae.yml").read_text())
    steps = " ".join(str(step.get("run", "")) for step in workflow["jobs"]["gate"]["steps"])
    used = set(re.findall(r"--saebench-[\w-]+", steps))
    known = {name for action in pytestconfig._parser.optparser._actions
             for name in action.option_strings}
    assert used and used <= known, used - known
    assert "saebench gate" in steps and "--strict" in steps
