"""The pytest plugin end to end: collection ids, verdicts, xfail, reports, resume, xdist."""

from __future__ import annotations

import re
import textwrap

import pandas as pd
import pytest

pytest_plugins = ["pytester"]

SUITE = """\
suite: mini
model: zoo
data: {source: zoo, n_tokens: 4096}
dictionaries:
  good: {zoo: resid-L2-topk16}
  poor: {zoo: resid-L2-poor}
defaults:
  options: {n_boot: 200, batch_size: 16}
checks:
  - metric: ce_loss_recovered
    dictionaries: [good]
    options: {ablation: zero}
    threshold: ">= 0.9"
  - metric: l0
    dictionaries: [good, poor]
    threshold: "<= 20"
  - metric: explained_variance
    dictionaries: [good]
    threshold: ">= 0.99"
  - metric: ce_loss_recovered
    dictionaries: [poor]
    options: {ablation: zero}
    threshold: "ci_low >= 0.9"
    expect: fail
"""
IDS = ["good::ce_loss_recovered[zero]", "good::l0", "poor::l0", "good::explained_variance",
       "poor::ce_loss_recovered[zero]"]


@pytest.fixture
def suite_dir(pytester):
    pytester.makefile(".yaml", mini=SUITE)
    return pytester.path


def results(pytester) -> pd.DataFrame:
    (run_dir,) = (pytester.path / "reports").iterdir()
    return pd.read_csv(run_dir / "results.csv")


def test_collects_one_readable_item_per_check(pytester, suite_dir):
    out = pytester.runpytest("--collect-only", "-q", "-m", "eval", "mini.yaml")
    for check_id in IDS:
        out.stdout.fnmatch_lines([f"mini.yaml::{check_id}"])
    assert "5 tests collected" in out.stdout.str()


def test_verdicts_messages_xfail_and_report(pytester, suite_dir):
    out = pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider")
    out.assert_outcomes(passed=3, failed=1, xfailed=1)
    out.stdout.fnmatch_lines([
        "*good::explained_variance: [[]fail[]] explained_variance = 0.9* [[]0.9*, 0.9*[]] "
        "(n=32) fails >= 0.99*",
    ])
    df = results(pytester)
    assert sorted(df["check_id"]) == sorted(IDS)
    verdicts = dict(zip(df["check_id"], df["verdict"], strict=True))
    assert verdicts["poor::ce_loss_recovered[zero]"] == "xfail"
    assert verdicts["good::explained_variance"] == "fail"
    assert set(df["run_id"]) == {df["run_id"][0]}
    (run_dir,) = (pytester.path / "reports").iterdir()
    report = (run_dir / "report.md").read_text()
    assert "good::ce_loss_recovered[zero]" in report


def test_expect_fail_that_passes_is_a_strict_xpass_failure(pytester):
    pytester.makefile(".yaml", mini=SUITE.replace('threshold: "ci_low >= 0.9"\n    expect',
                                                  'threshold: "<= 100"\n    expect'))
    out = pytester.runpytest("-m", "eval", "mini.yaml", "-k", "poor and ce_loss")
    out.assert_outcomes(failed=1)
    out.stdout.fnmatch_lines(["*XPASS(strict)*"])


def test_k_selection_computes_only_what_it_needs(pytester, suite_dir):
    out = pytester.runpytest("-m", "eval", "mini.yaml", "-k", "l0")
    out.assert_outcomes(passed=2)
    assert sorted(results(pytester)["check_id"]) == ["good::l0", "poor::l0"]


def test_resume_keeps_finished_rows_and_runs_the_rest(pytester, suite_dir):
    first = pytester.runpytest("-m", "eval", "mini.yaml", "-x")
    first.assert_outcomes(passed=2, failed=1)
    (run_dir,) = (pytester.path / "reports").iterdir()
    before = pd.read_csv(run_dir / "results.csv")
    assert sorted(before["check_id"]) == sorted(IDS[i] for i in (0, 1, 3))
    second = pytester.runpytest("-m", "eval", "mini.yaml", f"--saebench-resume={run_dir}")
    second.assert_outcomes(passed=3, failed=1, xfailed=1)
    after = pd.read_csv(run_dir / "results.csv")
    assert sorted(after["check_id"]) == sorted(IDS)
    kept = after.set_index("check_id").loc[before["check_id"], "started_at"]
    assert list(kept) == list(before["started_at"])


@pytest.mark.parametrize("failing", ["good::explained_variance",
                                     "good::explained_variance[strict]"])
def test_last_failed_reruns_only_the_failed_check(pytester, failing):
    pytester.makefile(".yaml", mini=SUITE.replace(
        "metric: explained_variance\n", f"metric: explained_variance\n    id: {failing!r}\n"))
    pytester.runpytest("-m", "eval", "mini.yaml").assert_outcomes(passed=3, failed=1,
                                                                  xfailed=1)
    out = pytester.runpytest("-m", "eval", "mini.yaml", "--lf")
    out.assert_outcomes(failed=1, deselected=4)
    assert f"FAILED mini.yaml::{failing}" in out.stdout.str()


def test_node_paths_select_a_set_or_one_check(pytester, suite_dir):
    out = pytester.runpytest("--collect-only", "-q", "-m", "eval", "mini.yaml::good",
                             "mini.yaml::poor::ce_loss_recovered[zero]")
    wanted = [i for i in IDS if i.startswith("good::")] + ["poor::ce_loss_recovered[zero]"]
    assert sorted(out.stdout.lines[:4]) == sorted(f"mini.yaml::{i}" for i in wanted)
    assert "4 tests collected" in out.stdout.str()


def test_a_custom_id_without_a_set_is_an_item_of_the_file(pytester):
    pytester.makefile(".yaml", mini=SUITE.replace("metric: l0\n", "metric: l0\n    id: sparsity\n")
                      .replace("[good, poor]", "[good]"))
    out = pytester.runpytest("--collect-only", "-q", "-m", "eval", "mini.yaml")
    out.stdout.fnmatch_lines(["mini.yaml::sparsity"])
    assert "4 tests collected" in out.stdout.str()


def test_schema_errors_are_collection_errors_naming_file_line_and_field(pytester):
    pytester.makefile(".yaml", bad=SUITE.replace("metric: l0", "metric: l00"))
    out = pytester.runpytest("-m", "eval", "bad.yaml")
    out.stdout.fnmatch_lines(["*bad.yaml:14: checks[[]1[]].metric: *unknown metric*"])
    assert "Traceback" not in out.stdout.str()


def test_hub_suites_are_skipped_with_a_reason_offline(pytester, monkeypatch):
    from saebench import resolve

    def offline(*args, **kwargs):
        raise resolve.HubUnavailable("gpt2-small: no network")

    monkeypatch.setattr(resolve, "resolve_model", offline)
    pytester.makefile(".yaml", hub=textwrap.dedent("""\
        model: gpt2-small
        dictionaries:
          "L{layer}": {release: gpt2-small-res-jb, sae_id: "blocks.{layer}.hook_resid_pre",
                       for: {layer: "0..1"}}
        checks:
          - metric: l0
            dictionaries: ["L*"]
            threshold: "<= 100"
        """))
    out = pytester.runpytest_inprocess("-m", "eval", "hub.yaml", "-rs")
    out.assert_outcomes(skipped=2)
    out.stdout.fnmatch_lines(["*needs a model or dataset hub*no network*"])


@pytest.mark.slow  # two xdist workers, each loading the model
def test_xdist_gives_the_same_rows_as_a_serial_run_a_group_per_worker(pytester, suite_dir):
    pytester.makefile(".yaml", mini=SUITE.replace(
        "  poor: {zoo: resid-L2-poor}\n", "  poor: {zoo: resid-L2-poor}\n  early: {zoo: "
        "resid-L1-topk16}\n").replace("dictionaries: [good, poor]", "dictionaries: [good, "
                                       "poor, early]"))
    serial = pytester.runpytest_subprocess("-m", "eval", "mini.yaml",
                                           "--saebench-report-dir=serial")
    serial.assert_outcomes(passed=4, failed=1, xfailed=1)
    parallel = pytester.runpytest_subprocess("-m", "eval", "mini.yaml", "-n", "2", "-v",
                                             "--dist", "loadgroup",
                                             "--saebench-report-dir=parallel")
    parallel.assert_outcomes(passed=4, failed=1, xfailed=1)
    ran = re.findall(r"\[(gw\d)\].* (?:PASSED|FAILED|XFAIL) mini.yaml::(\w+)::",
                     parallel.stdout.str())
    layer = {"good": "L2", "poor": "L2", "early": "L1"}
    workers: dict[str, set[str]] = {}
    for worker, dictionary in ran:
        workers.setdefault(layer[dictionary], set()).add(worker)
    assert len(ran) == 6 and set(workers) == {"L1", "L2"}
    assert all(len(w) == 1 for w in workers.values())  # each prefix group on one worker
    frames = []
    for name in ("serial", "parallel"):
        (run_dir,) = (pytester.path / name).iterdir()
        df = pd.read_csv(run_dir / "results.csv").set_index("check_id").sort_index()
        frames.append(df[["metric", "value", "ci_low", "ci_high", "n", "verdict"]])
        assert (run_dir / "report.md").is_file()
    pd.testing.assert_frame_equal(frames[0], frames[1], rtol=1e-6)


def test_task_checks_write_prompt_and_feature_rows(pytester):
    pytester.makefile(".yaml", tasks=textwrap.dedent("""\
        model: zoo
        data: {source: zoo, n_tokens: 2048}
        tasks: {quote: {zoo: closing_quote}}
        dictionaries: {good: {zoo: resid-L2-topk16}}
        defaults: {options: {n_boot: 100}}
        checks:
          - metric: logit_diff_recovered
            dictionaries: [good]
            task: quote
            threshold: ">= 0.8"
          - metric: feature_ablation
            dictionaries: [good]
            task: quote
            options: {k: 2}
        """))
    out = pytester.runpytest("-m", "eval", "tasks.yaml")
    out.assert_outcomes(passed=1)  # feature_ablation has no threshold: measured
    assert "1 passed, 1 measured" in out.stdout.str()
    (run_dir,) = (pytester.path / "reports").iterdir()
    prompts = pd.read_csv(run_dir / "per_prompt.csv")
    assert {"ld_clean", "ld_spliced", "ld_zero"} <= set(prompts["quantity"])
    assert all(q.startswith("ld_") for q in prompts["quantity"])
    assert prompts["prompt_index"].nunique() == 300
    features = pd.read_csv(run_dir / "features.csv")
    assert set(features["check_id"]) == {"good::feature_ablation[quote,k=2]"}
    ablated = features[features["table"] == "ablation"]
    cards = features[features["table"] == "card"]
    assert len(ablated) == 2 and set(cards["feature"]) <= set(ablated["feature"])
    report = (run_dir / "report.md").read_text()
    assert "## Worst prompts" in report and "## Feature ablations" in report
    assert ("## Feature cards" in report) == (len(cards) > 0)


def test_an_existing_report_dir_given_space_separated_is_not_taken_for_a_path(
        pytester, tmp_path_factory):
    """pytest decides its rootdir before our options are known; `--saebench-report-dir DIR`
    with DIR an existing directory elsewhere must still find the project's suites and ini."""
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\naddopts = "-k l0"\n')
    (pytester.path / "suites").mkdir()
    (pytester.path / "suites" / "mini.yaml").write_text(SUITE)
    elsewhere = tmp_path_factory.mktemp("ci-reports")
    out = pytester.runpytest_subprocess("-m", "eval", "--saebench-report-dir", str(elsewhere))
    out.assert_outcomes(passed=2)
    assert f"rootdir: {pytester.path}" in out.stdout.str()
    (run_dir,) = elsewhere.iterdir()
    assert sorted(pd.read_csv(run_dir / "results.csv")["check_id"]) == ["good::l0", "poor::l0"]


def test_an_unrelated_project_imports_no_torch_transformer_lens_or_sae_lens(pytester):
    pytester.makepyfile(test_ok="def test_ok():\n    assert 1\n")
    pytester.makeconftest(
        "import sys\n\n\ndef pytest_unconfigure(config):\n"
        "    heavy = [m for m in ('torch', 'transformer_lens', 'sae_lens') if m in sys.modules]\n"
        "    print('HEAVY', heavy)\n")
    out = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    out.assert_outcomes(passed=1)
    assert "HEAVY []" in out.stdout.str()


def test_an_incompatible_transformer_lens_is_one_line_not_an_internal_error(pytester,
                                                                              monkeypatch):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "4.3.0" if name == "transformer-lens" else real(name))
    pytester.makefile(".yaml", mini=SUITE)
    out = pytester.runpytest_inprocess("-m", "eval", "mini.yaml", "-p", "no:cacheprovider")
    assert out.ret == pytest.ExitCode.INTERRUPTED
    out.stdout.fnmatch_lines(["*saebench needs transformer-lens >= 3, < 4*has 4.3.0*"])
    assert "INTERNALERROR" not in out.stdout.str() and "Traceback" not in out.stdout.str()


def test_the_unit_tests_never_read_a_suite_unless_eval_is_selected(pytester):
    """A broken suite saved under suites/ does not break a plain `pytest -m 'not eval'`, and
    `pytest -m eval` reports it."""
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\naddopts = "-m \'not eval\'"\n')
    (pytester.path / "suites").mkdir()
    (pytester.path / "suites" / "mine.yaml").write_text(SUITE.replace("metric: l0", "metric: l00"))
    pytester.makepyfile(test_unit="def test_unit():\n    assert 1\n")
    plain = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    plain.assert_outcomes(passed=1)
    assert "mine.yaml" not in plain.stdout.str()
    evals = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "eval")
    evals.stdout.fnmatch_lines(["*mine.yaml:14: checks[[]1[]].metric: *unknown metric*"])


@pytest.mark.slow  # a run in its own process, killed, then resumed
def test_a_run_killed_after_its_first_group_leaves_its_rows_and_resumes(pytester, suite_dir):
    """Groups are computed and written one at a time: a SIGKILL right after the last check
    of the first group (`good`) leaves that group's rows, which a resume reuses."""
    pytester.makeconftest(
        "import os, signal\n\n\ndef pytest_runtest_logfinish(nodeid):\n"
        "    if nodeid.endswith('good::explained_variance'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = pytester.runpytest_subprocess("-m", "eval", "mini.yaml", "-p", "no:cacheprovider")
    assert killed.ret == -9
    (run_dir,) = (pytester.path / "reports").iterdir()
    good = ["good::ce_loss_recovered[zero]", "good::l0", "good::explained_variance"]
    assert sorted(pd.read_csv(run_dir / "results.csv")["check_id"]) == sorted(good)
    (pytester.path / "conftest.py").unlink()
    resumed = pytester.runpytest_subprocess("-m", "eval", "mini.yaml", "-p", "no:cacheprovider",
                                            f"--saebench-resume={run_dir}")
    resumed.assert_outcomes(passed=3, failed=1, xfailed=1)
    resumed.stdout.fnmatch_lines([f"saebench resume of {run_dir}: 3 reused"])
    assert sorted(pd.read_csv(run_dir / "results.csv")["check_id"]) == sorted(IDS)


def test_progress_names_each_group_without_capture_off_and_durations_share_its_time(
        pytester, suite_dir):
    quiet = pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider")
    assert "saebench ▸" not in quiet.stdout.str()  # auto: live only in a terminal
    shown = pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider",
                               "--saebench-progress", "--saebench-report-dir=shown")
    shown.assert_outcomes(passed=3, failed=1, xfailed=1)
    shown.stdout.fnmatch_lines(["saebench ▸ mini::good: 3 checks computed in * s",
                                "mini.yaml ..F",
                                "saebench ▸ mini::poor: 2 checks computed in * s",
                                "mini.yaml .x*"])
    (run_dir,) = (pytester.path / "shown").iterdir()
    df = pd.read_csv(run_dir / "results.csv")
    for group in ("good", "poor"):
        line = next(t for t in shown.outlines if t.startswith(f"saebench ▸ mini::{group}:"))
        seconds = float(line.split(" computed in ")[1].removesuffix(" s"))
        durations = df.loc[df["check_id"].str.startswith(f"{group}::"), "duration_s"]
        assert (durations > 0).all()
        assert seconds - 0.06 <= durations.sum() < seconds + 1


@pytest.mark.slow  # two xdist workers
def test_xdist_on_cpu_warns_once_on_the_controller_that_workers_share_the_device(
        pytester, suite_dir):
    out = pytester.runpytest_subprocess("-m", "eval", "mini.yaml", "-n", "2", "-k", "l0",
                                        "--saebench-device", "cpu", "-p", "no:cacheprovider")
    out.assert_outcomes(passed=2)
    out.stdout.fnmatch_lines(["*SaebenchWarning: the xdist workers share one device (cpu): "
                              "xdist is slower there, as each worker loads the model*"])
    # the warnings summary lists a location per warning issued; a worker's would add one
    assert sum(bool(re.fullmatch(r"\S*saebench/workers\.py:\d+", line))
               for line in out.outlines) == 1


def test_a_serial_run_does_not_warn_about_xdist(pytester, suite_dir):
    out = pytester.runpytest("-m", "eval", "mini.yaml", "-k", "good and l0",
                             "--saebench-device", "cpu", "-p", "no:cacheprovider")
    out.assert_outcomes(passed=1)
    assert "SaebenchWarning" not in out.stdout.str()
