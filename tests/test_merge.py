"""`saebench merge`: shards merged give the serial run row for row; mismatched runs are refused."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from toys import run_suite

from saebench import results
from saebench.cli import main
from saebench.merge import MergeError, merge

pytestmark = pytest.mark.slow  # three shard runs and a serial one, each its own process

PER_RUN = ["run_id", "started_at", "duration_s"]
"""Columns that differ between any two runs of the same checks."""


@pytest.fixture(scope="module")
def shards(mini_serial):
    """The mini suite's three shards' run directories."""
    where = mini_serial.parent.parent
    for i in (1, 2, 3):
        run_suite(where, f"shard{i}", f"--saebench-shard={i}/3")
    return [next((where / f"shard{i}").iterdir()) for i in (1, 2, 3)]


def _table(run_dir, name: str) -> pd.DataFrame:
    return pd.read_csv(run_dir / name).drop(columns=PER_RUN, errors="ignore")


def test_three_shards_merged_are_the_serial_run_row_for_row(mini_serial, shards, tmp_path):
    sizes = [len(pd.read_csv(s / "results.csv")) for s in shards]
    assert all(sizes) and sum(sizes) == len(pd.read_csv(mini_serial / "results.csv"))
    out = merge(list(reversed(shards)), tmp_path / "merged")
    for name in ("results.csv", "per_prompt.csv", "features.csv"):
        pd.testing.assert_frame_equal(_table(out, name), _table(mini_serial, name))
    assert set(pd.read_csv(out / "results.csv")["run_id"]) == {"merged"}
    stored = sorted(p.name for p in (mini_serial / "terms").iterdir())
    assert sorted(p.name for p in (out / "terms").iterdir()) == stored
    for name in stored:
        with np.load(out / "terms" / name) as a, np.load(mini_serial / "terms" / name) as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
    report = (out / "report.md").read_text()
    assert "good::ce_loss_recovered[zero]" in report and "early" in report


def _copy(run_dir, tmp_path, name: str):
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


def _edit(run_dir, column: str, value: str) -> None:
    frame = results.read_results(run_dir)
    frame[column] = value
    (run_dir / "results.csv").unlink()
    results.append_rows(run_dir / "results.csv",
                        [{k: None if results.is_missing(v) else v for k, v in row.items()}
                         for row in frame.to_dict("records")])


@pytest.mark.parametrize(("column", "value", "message"), [
    ("saebench_version", "0.0.9", "differ in saebench version"),
    ("token_set", "0123456789abcdef", "differ in token set of suite 'mini'"),
])
def test_runs_of_other_versions_or_token_sets_are_refused(shards, tmp_path, column, value,
                                                          message):
    other = _copy(shards[1], tmp_path, "other")
    _edit(other, column, value)
    with pytest.raises(MergeError, match=message):
        merge([shards[0], other, shards[2]], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_missing_duplicate_and_foreign_shards_are_refused(mini_serial, shards, tmp_path):
    with pytest.raises(MergeError, match=r"shard\(s\) 2/3 missing"):
        merge([shards[0], shards[2]], tmp_path / "a")
    partial = merge([shards[0], shards[2]], tmp_path / "b", allow_partial=True)
    assert len(pd.read_csv(partial / "results.csv")) == sum(
        len(pd.read_csv(s / "results.csv")) for s in (shards[0], shards[2]))
    with pytest.raises(MergeError, match="are both shard 1/3"):
        merge([shards[0], _copy(shards[0], tmp_path, "again"), shards[1]], tmp_path / "c")
    with pytest.raises(MergeError, match="is not a shard"):
        merge([*shards, mini_serial], tmp_path / "d")
    with pytest.raises(MergeError, match="already holds results.csv"):
        merge(shards, partial)


def test_plain_runs_of_different_suites_or_the_same_checks_are_refused(mini_serial, tmp_path):
    other = _copy(mini_serial, tmp_path, "other")
    with pytest.raises(MergeError, match=r"ce_loss_recovered\[zero\] of suite mini is in both"):
        merge([mini_serial, other], tmp_path / "a")
    _edit(other, "suite", "other")
    with pytest.raises(MergeError, match="differ in suites"):
        merge([mini_serial, other], tmp_path / "b")


def test_the_command_merges_and_refuses_with_exit_codes(shards, tmp_path, capsys):
    assert main(["merge", *map(str, shards), "-o", str(tmp_path / "m")]) == 0
    assert "3 run(s)" in capsys.readouterr().out
    assert main(["merge", str(shards[0]), "-o", str(tmp_path / "n")]) == 2
    assert "saebench merge: shard(s) 2/3, 3/3 missing" in capsys.readouterr().err
    assert main(["merge", str(tmp_path), "-o", str(tmp_path / "o")]) == 2
    assert "not a run directory" in capsys.readouterr().err
