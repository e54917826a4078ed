"""The pytest plugin: YAML suites become pytest items, run with `pytest -m eval`.

A suite file under a suite directory (`saebench_suite_dirs`, default `suites/`), given on
the command line, or named with `--suite` is collected as pytest's non-python tests are:
one item per check, marked `eval`, with a readable id such as
`suites/toy.yaml::resid-L2-topk16::ce_loss_recovered[zero]`. A check's group is computed
lazily, once per session (per xdist worker), and each finished check is appended to
`reports/<run-id>/results.csv`; `report.md` is written when the session ends.

    pytest -m eval                                  # every suite under suites/
    pytest -m eval --suite my_saes.yaml -k resid    # one suite, a selection of its checks
    pytest -m eval -n 2                             # pytest-xdist workers share one run dir
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

STATE = pytest.StashKey["_State"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("saebench", "saebench: SAE faithfulness suites")
    group.addoption("--suite", action="append", default=[], metavar="PATH",
                    help="collect this suite file (repeatable); replaces the default paths")
    group.addoption("--saebench-device", default=None,
                    help="device for models and dictionaries (default: cuda, mps, cpu)")
    group.addoption("--saebench-dtype", default=None, help="model dtype, e.g. float32, bfloat16")
    group.addoption("--saebench-tokens", type=int, default=None,
                    help="evaluate on this many tokens (overrides each suite's data.n_tokens)")
    group.addoption("--saebench-report-dir", default="reports",
                    help="where run directories are written (default: reports)")
    group.addoption("--saebench-seed", type=int, default=None,
                    help="seed for bootstrap intervals (overrides each check's seed)")
    group.addoption("--saebench-resume", default=None, metavar="RUN_DIR",
                    help="continue an interrupted run: finished checks are read, not recomputed")
    group.addoption("--saebench-progress", action="store_true",
                    help="show a progress bar for each engine run")
    parser.addini("saebench_suite_dirs", "directories whose YAML files are suites",
                  type="paths", default=[])


class _State:
    """Per-process state: the run directory, settings, shared models and suite runs."""

    def __init__(self, config: pytest.Config) -> None:
        from saebench import report
        from saebench.checks import RunSettings

        opt = config.getoption
        resume = opt("--saebench-resume")
        worker = getattr(config, "workerinput", None)
        if worker is not None:
            self.run_dir = Path(worker["saebench_run_dir"])
        elif resume:
            self.run_dir = Path(resume)
            if not self.run_dir.is_dir():
                raise pytest.UsageError(f"--saebench-resume: no run directory {resume}")
        else:
            self.run_dir = Path(opt("--saebench-report-dir")) / report.new_run_id()
        self.run_id = self.run_dir.name
        self.is_worker = worker is not None
        self.settings = RunSettings(device=opt("--saebench-device"), dtype=opt("--saebench-dtype"),
                                    n_tokens=opt("--saebench-tokens"), seed=opt("--saebench-seed"),
                                    progress=opt("--saebench-progress"))
        self.finished = _finished_rows(self.run_dir) if resume else {}
        self.models: dict[Any, Any] = {}
        self.runs: dict[Path, Any] = {}
        self.selected: dict[Path, list] = {}

    def suite_run(self, suite):
        from saebench.checks import SuiteRun

        if suite.path not in self.runs:
            self.runs[suite.path] = SuiteRun(suite, self.settings, self.models)
        return self.runs[suite.path]


def _finished_rows(run_dir: Path) -> dict[str, dict]:
    from saebench import report

    if not (run_dir / "results.csv").is_file():
        return {}
    done = report.finished_check_ids(run_dir)
    rows = report.read_results(run_dir)
    return {r["check_id"]: r for r in rows.to_dict("records") if r["check_id"] in done}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "eval: a saebench suite check (`pytest -m eval`)")
    config.stash[STATE] = _State(config)
    suites = config.getoption("--suite")
    if suites:
        explicit = config.args_source == pytest.Config.ArgsSource.ARGS
        config.args[:] = [*(config.args if explicit else []), *suites]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: every worker writes into the controller's run directory."""
    node.workerinput["saebench_run_dir"] = str(node.config.stash[STATE].run_dir)


def _is_suite_file(file_path: Path, config: pytest.Config) -> bool:
    if file_path.suffix not in (".yaml", ".yml"):
        return False
    resolved = file_path.resolve()
    explicit = {Path(a.split("::")[0]).resolve() for a in config.args}
    if resolved in explicit:
        return True
    dirs = config.getini("saebench_suite_dirs") or [config.rootpath / "suites"]
    return any(resolved.is_relative_to(Path(d).resolve()) for d in dirs)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if _is_suite_file(file_path, parent.config):
        return SuiteFile.from_parent(parent, path=file_path)
    return None


class SuiteFile(pytest.File):
    """A YAML suite: a `CheckGroup` per dictionary set, holding one `CheckItem` per check.

    A check id `set::metric[task]` becomes the node path `file::set::metric[task]`, so
    `pytest suites/toy.yaml::resid-L2-topk16` selects one dictionary's checks, and a custom
    id without `::` is an item directly under the file.
    """

    def collect(self):
        from saebench.suite import SuiteError, load_suite

        try:
            suite = load_suite(self.path)
        except SuiteError as err:
            raise self.CollectError(str(err)) from None
        scopes: dict[str, list] = {}
        for check in suite.checks:
            scope, sep, _ = check.id.partition("::")
            scopes.setdefault(scope if sep else "", []).append(check)
        for scope, checks in scopes.items():
            if scope:
                yield CheckGroup.from_parent(self, name=scope, suite=suite, checks=checks)
            else:
                yield from (CheckItem.within(self, c.id, suite, c) for c in checks)


class CheckGroup(pytest.Collector):
    """The checks of one dictionary (or spliced set) within a suite, in suite order."""

    def __init__(self, *, suite, checks, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.suite = suite
        self.checks = checks

    def collect(self):
        return [CheckItem.within(self, c.id.partition("::")[2], self.suite, c)
                for c in self.checks]


class CheckFailed(Exception):
    """A check's verdict was not a pass; the message says value, interval, threshold, n."""


class CheckItem(pytest.Item):
    """One check: a metric on a dictionary (or set) against a threshold."""

    def __init__(self, *, suite, check, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.suite = suite
        self.check = check
        self.add_marker(pytest.mark.eval)
        if check.expect == "fail":
            self.add_marker(pytest.mark.xfail(
                reason="expect: fail (the gate must reject this)", strict=True,
                raises=CheckFailed))

    @classmethod
    def within(cls, parent: pytest.Collector, name: str, suite, check) -> CheckItem:
        """The item for `check` named `name` under `parent`.

        The node id is given as a string, as pytest stores it for `--lf`: pytest >= 9.2
        parses ids at `::` and `[`, and an id built from the tree would not match.
        """
        return cls.from_parent(parent, name=name, nodeid=f"{parent.nodeid}::{name}",
                               suite=suite, check=check)

    def runtest(self) -> None:
        from saebench import report
        from saebench.resolve import HubUnavailable

        state: _State = self.config.stash[STATE]
        row = state.finished.get(self.check.id)
        if row is None:
            run = state.suite_run(self.suite)
            try:
                if not state.is_worker:
                    run.compute(state.selected.get(self.suite.path, [self.check]))
                row = run.result(self.check)
            except HubUnavailable as err:
                pytest.skip(f"needs a model or dataset hub: {err}")
            report.append_rows(state.run_dir / "results.csv",
                               [{"run_id": state.run_id, **row}])
            for name, rows in run.extra_rows(self.check).items():
                if rows:
                    report.append_rows(state.run_dir / name,
                                       [{"run_id": state.run_id, **r} for r in rows])
        if row["verdict"] not in ("pass", "xpass"):
            raise CheckFailed(f"[{row['verdict']}] {row['message']}")

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CheckFailed):
            return f"{self.check.id}: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, self.check.line - 1, f"{self.suite.name}::{self.check.id}"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Remember the selected checks of each suite, so one engine run serves them all."""
    selected = config.stash[STATE].selected
    for item in items:
        if isinstance(item, CheckItem):
            selected.setdefault(item.suite.path, []).append(item.check)


def pytest_sessionfinish(session: pytest.Session) -> None:
    from saebench import report

    state: _State = session.config.stash[STATE]
    if not state.is_worker and (state.run_dir / "results.csv").is_file():
        report.write_report(state.run_dir)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    state: _State = config.stash[STATE]
    if not state.is_worker and (state.run_dir / "report.md").is_file():
        terminalreporter.write_line(f"saebench report: {state.run_dir / 'report.md'}")
