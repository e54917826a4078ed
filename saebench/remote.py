"""Ray: each prefix group of checks computed as one Ray task, the run directory written by
the driver alone.

    saebench run toy --ray                      # a local Ray cluster, started for the run
    saebench run toy --ray ray://head:10001     # a running cluster (or --ray auto)
    pytest -m eval --suite toy --saebench-ray auto --saebench-ray-gpus 1

The pytest session stays the driver: it collects and validates the suites as always, then
submits every selected group that is not resumed as a task (`compute_group`) requesting
`num_gpus` (default: 1 when the cluster has GPUs, else 0). Each check's item waits for its
group's task and writes its rows, terms and tables itself, so appending, `--saebench-resume`,
baselines and the report work exactly as in a serial run, and the rows are those of a serial
run. A task that fails (it raises, or its worker dies) is retried once; after that its checks
get `error` rows saying so, never nothing. Workers need the same saebench and the suite's
files at the same paths (a shared file system, or a Ray `runtime_env`), and pick their
device themselves (leave `--saebench-device` unset: Ray gives a task its GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from saebench.checks import Outcome, RunSettings, SuiteRun, short
from saebench.suite import load_suite

_RUNS: dict[tuple[str, RunSettings], SuiteRun] = {}
"""Suite runs a worker process has prepared, so its later tasks reuse the loaded model."""


def compute_group(suite_path: str, settings: RunSettings,
                  check_ids: Sequence[str]) -> dict[str, Outcome]:
    """Compute the checks `check_ids` of one prefix group of the suite at `suite_path`, in
    suite order, dictionary set by dictionary set as a serial run does; runs in a Ray task.
    Returns each check's `Outcome` by id."""
    key = (str(Path(suite_path).resolve()), settings)
    if key not in _RUNS:
        run = SuiteRun(load_suite(Path(suite_path)), settings)
        run.prepare()
        _RUNS[key] = run
    run = _RUNS[key]
    wanted = set(check_ids)
    checks = [c for c in run.suite.checks if c.id in wanted]
    for names in dict.fromkeys(c.dictionaries for c in checks):
        run.compute([c for c in checks if c.dictionaries == names])
    return {c.id: run.outcome(c) for c in checks}


def connect(address: str) -> tuple[Any, bool]:
    """The `ray` module, connected: to the cluster at `address` (`auto`, `ray://host:port`,
    `host:port`), or a local cluster started for the run when `address` is `local`; and
    whether this call connected (False when the process already was).

    Raises ImportError with the install line when Ray is missing."""
    try:
        import ray
    except ImportError:
        raise ImportError("--saebench-ray needs Ray: pip install 'saebench[ray]'") from None
    if ray.is_initialized():
        return ray, False
    ray.init(address=None if address == "local" else address, include_dashboard=False)
    return ray, True


class Dispatcher:
    """Groups submitted as Ray tasks, and their outcomes once finished.

    `task` is the function a task runs (default `compute_group`); a task is retried once,
    after which `outcomes` gives the error it failed with.
    """

    def __init__(self, ray: Any, num_gpus: float | None = None, num_cpus: float = 1,
                 task: Callable[..., dict[str, Outcome]] | None = None) -> None:
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        self.ray = ray
        self.remote = ray.remote(task or compute_group).options(
            num_gpus=num_gpus, num_cpus=num_cpus, max_retries=1, retry_exceptions=True)
        self.futures: dict[Hashable, Any] = {}
        self.labels: dict[Hashable, str] = {}
        self.checks: dict[Hashable, list[str]] = {}
        self.finished: dict[Hashable, dict[str, Outcome] | str] = {}

    def submit(self, key: Hashable, label: str, suite_path: Path, settings: RunSettings,
               check_ids: Sequence[str]) -> None:
        """Start computing `check_ids` (one prefix group of one suite, `label` in messages)
        as a task, found again by `key`."""
        self.labels[key], self.checks[key] = label, list(check_ids)
        self.futures[key] = self.remote.remote(str(suite_path), settings, list(check_ids))

    def outcomes(self, key: Hashable) -> dict[str, Outcome] | str:
        """The outcomes of the checks submitted under `key`, by id (waiting for the task),
        or, when the task failed twice, a one-line message saying why."""
        if key not in self.finished:
            try:
                self.finished[key] = self.ray.get(self.futures.pop(key))
            except Exception as err:  # noqa: BLE001 -- a lost task becomes its checks' errors
                cause = getattr(err, "cause", None) or err
                self.finished[key] = (f"the Ray task computing {self.labels[key]} failed "
                                      f"twice (retried once): {short(cause)}")
        return self.finished[key]
