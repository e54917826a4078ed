"""Ray: a local cluster's run is the serial run row for row; a failing task is retried once,
then its checks are error rows."""

from __future__ import annotations

import pandas as pd
import pytest
from toys import MINI_SUITE, run_suite

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a local Ray cluster per test

pytest_plugins = ["pytester"]
PER_RUN = ["run_id", "started_at", "duration_s"]


def test_a_local_ray_run_is_the_serial_run_row_for_row(mini_serial):
    where = mini_serial.parent.parent
    run_suite(where, "ray", "--saebench-ray")
    (ray_dir,) = (where / "ray").iterdir()
    for name in ("results.csv", "per_prompt.csv", "features.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(ray_dir / name).drop(columns=PER_RUN, errors="ignore"),
            pd.read_csv(mini_serial / name).drop(columns=PER_RUN, errors="ignore"))
    assert (ray_dir / "report.md").is_file()


def test_a_task_that_keeps_failing_is_retried_once_then_error_rows(pytester, monkeypatch):
    import saebench.remote

    attempts = pytester.path / "attempts.txt"

    def broken(suite_path, settings, check_ids):
        with open(attempts, "a") as f:
            f.write(f"{','.join(check_ids)}\n")
        raise RuntimeError("out of memory on the worker")

    monkeypatch.setattr(saebench.remote, "compute_group", broken)
    pytester.makefile(".yaml", mini=MINI_SUITE)
    out = pytester.runpytest_inprocess("-m", "eval", "mini.yaml", "--saebench-ray",
                                       "-p", "no:cacheprovider")
    (run_dir,) = (pytester.path / "reports").iterdir()
    rows = pd.read_csv(run_dir / "results.csv")
    assert len(rows) == 8 and set(rows["verdict"]) == {"error"}
    assert rows["message"].str.contains(
        "the Ray task computing mini:tokens:L2 failed twice .retried once.: RuntimeError: "
        "out of memory on the worker").any()
    tries = attempts.read_text().splitlines()
    assert len(tries) == 2 * 5 and all(tries.count(t) == 2 for t in tries)  # 5 groups
    assert out.ret == pytest.ExitCode.TESTS_FAILED


def test_ray_and_xdist_together_are_refused(pytester):
    out = pytester.runpytest_inprocess("--saebench-ray", "-n", "2")
    assert out.ret == pytest.ExitCode.USAGE_ERROR
    assert "--saebench-ray and pytest-xdist (-n): use one" in out.stderr.str()
