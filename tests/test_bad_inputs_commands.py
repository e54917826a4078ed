"""The bad-input catalogue of the commands that read run directories (beside
`tests/test_bad_inputs.py`, which covers suites): a damaged or foreign input is answered
with one line and exit 2 (never a traceback, never the exit code of a regression), and no
command overwrites what it did not create.

| input | command | outcome |
|---|---|---|
| a damaged `shard.json` | `saebench merge` | exit 2, the file named |
| a truncated terms file in the baseline | `saebench gate` | exit 2, the file named |
| the same | `--saebench-baseline` | that check `[error]`, one line; the others compared |
| a results.csv of another program | `saebench report` | exit 2, its header shown |
| a binary file as a baseline's results.csv | `--saebench-baseline` | a printable collection error |
| baseline rows saebench cannot have written | `--saebench-baseline` | those checks `[error]` |
| no `--out`, a non-zoo directory, an installed package's zoo | `saebench zoo build` | exit 2 |
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from saebench import results
from saebench.cli import main
from saebench.zoo import paths

pytest_plugins = ["pytester"]

SUITE = """\
suite: mini
model: zoo
data: {source: zoo, n_tokens: 1024}
dictionaries: {good: {zoo: resid-L2-topk16}}
defaults: {options: {n_boot: 50}}
checks:
  - metric: ce_loss_recovered
    dictionaries: [good]
    options: {ablation: zero}
    threshold: ">= 0.9"
  - metric: l0
    dictionaries: [good]
    threshold: "<= 70"
"""


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    where = tmp_path_factory.mktemp("cmds")
    (where / "mini.yaml").write_text(SUITE)
    return where


@pytest.fixture(scope="module")
def run_dir(suite_dir) -> Path:
    from toys import run_suite_files

    return run_suite_files(suite_dir, ["mini.yaml"], "reports")


def _one_line(text: str, *expected: str) -> None:
    lines = [line for line in text.strip().splitlines() if line]
    assert len(lines) == 1, text
    assert "Traceback" not in text and all(e in lines[0] for e in expected), lines[0]


@pytest.mark.slow  # two shard runs, each its own process
def test_a_damaged_shard_record_is_refused_by_merge(suite_dir, tmp_path, capsys):
    from toys import run_suite_files

    two_groups = SUITE.replace("dictionaries: {good: {zoo: resid-L2-topk16}}",
                               "dictionaries: {good: {zoo: resid-L2-topk16}, "
                               "early: {zoo: resid-L1-topk16}}").replace("[good]", "[good, early]")
    (suite_dir / "two.yaml").write_text(two_groups)
    shards = [run_suite_files(suite_dir, ["two.yaml"], f"shards-{i}", "--saebench-shard",
                              f"{i}/2") for i in (1, 2)]
    record = shards[0] / "shard.json"
    record.write_text(record.read_text()[:20])
    assert main(["merge", *map(str, shards), "-o", str(tmp_path / "merged")]) == 2
    _one_line(capsys.readouterr().err, "saebench merge:", str(record), "damaged shard record")
    record.write_text('{"index": 3, "count": 2, "checks": []}')
    assert main(["merge", *map(str, shards), "-o", str(tmp_path / "merged")]) == 2
    _one_line(capsys.readouterr().err, "is not a shard I of N")


def _damaged_baseline(run_dir: Path, where: Path) -> Path:
    base = where / "base"
    shutil.copytree(run_dir, base)
    (terms,) = [p for p in (base / results.TERMS_DIR).iterdir() if "ce_loss" in p.name]
    terms.write_bytes(terms.read_bytes()[:100])
    return terms


def test_a_truncated_terms_file_in_a_baseline_is_an_input_error(run_dir, tmp_path, capsys):
    terms = _damaged_baseline(run_dir, tmp_path)
    assert main(["gate", str(run_dir), "--baseline", str(tmp_path / "base")]) == 2
    _one_line(capsys.readouterr().err, "saebench gate:", str(terms), "damaged stored terms")


def test_a_truncated_terms_file_fails_only_its_check_under_the_plugin(run_dir, suite_dir,
                                                                     pytester):
    pytester.makefile(".yaml", mini=SUITE)
    _damaged_baseline(run_dir, pytester.path)
    baseline = pytester.path / "base"
    out = pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider",
                             "--saebench-baseline", str(baseline))
    out.assert_outcomes(passed=1, failed=1)
    out.stdout.fnmatch_lines(["good::ce_loss_recovered[[]zero[]]: [[]error[]] *cannot compare "
                              "with the baseline: *damaged stored terms (BadZipFile*"])
    assert "Traceback" not in out.stdout.str()


def test_a_foreign_results_file_given_to_report_is_refused(tmp_path, capsys):
    (tmp_path / results.RESULTS_FILE).write_text("epoch,loss\n1,2.5\n")
    assert main(["report", str(tmp_path)]) == 2
    _one_line(capsys.readouterr().err, "saebench report:", "is not a saebench results file",
              "its header: epoch,loss")


def test_a_binary_baseline_is_a_printable_collection_error(pytester):
    pytester.makefile(".yaml", mini=SUITE)
    junk = pytester.path / "junk"
    junk.mkdir()
    (junk / results.RESULTS_FILE).write_bytes(bytes(range(256)) * 8)
    out = pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider",
                             "--saebench-baseline", str(junk))
    assert out.ret == pytest.ExitCode.INTERRUPTED
    (line,) = [line for line in out.stdout.lines if "is not a saebench results file" in line]
    assert line.isprintable() and len(line) < 400 and "Traceback" not in out.stdout.str()


def test_baseline_rows_saebench_cannot_have_written_fail_their_checks(run_dir, pytester):
    pytester.makefile(".yaml", mini=SUITE)
    rows = results.read_results(run_dir)
    rows.loc[rows["metric"] == "l0", "metric"] = "banana"
    rows.loc[rows["metric"] == "ce_loss_recovered", "verdict"] = "weird"
    results.append_rows(pytester.path / "odd" / results.RESULTS_FILE, rows.to_dict("records"))
    out = pytester.runpytest("-m", "eval", "mini.yaml", "-p", "no:cacheprovider",
                             "--saebench-baseline", "odd")
    out.assert_outcomes(failed=2)
    out.stdout.fnmatch_lines([
        "good::ce_loss_recovered[[]zero[]]: [[]error[]] *its baseline row has the verdict "
        "'weird', which saebench does not write",
        "good::l0: [[]error[]] *its baseline row measured 'banana', not 'l0'"])


def test_zoo_build_needs_out_and_never_overwrites_what_it_did_not_create(tmp_path,
                                                                         monkeypatch, capsys):
    done = subprocess.run([sys.executable, "-m", "saebench", "zoo", "build"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "the following arguments are required: --out" in \
        done.stderr
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("my files")
    assert main(["zoo", "build", "--out", str(other), "--tiny"]) == 2
    _one_line(capsys.readouterr().err, "holds files that are not a zoo (no manifest.json)")
    assert (other / "notes.txt").read_text() == "my files" and len(list(other.iterdir())) == 1
    installed = tmp_path / "site-packages" / "saebench" / "zoo" / "artifacts"
    installed.mkdir(parents=True)
    (installed / paths.MANIFEST).write_text("{}")
    monkeypatch.setattr(paths, "ARTIFACTS", installed)
    assert main(["zoo", "build", "--out", str(installed), "--tiny"]) == 2
    _one_line(capsys.readouterr().err, "is the installed saebench package's zoo")
    assert paths.build_target_problem(tmp_path / "new") is None
