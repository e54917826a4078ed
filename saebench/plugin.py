"""The pytest plugin: YAML suites become pytest items, run with `pytest -m eval`.

A suite file under a suite directory (`saebench_suite_dirs`, default `suites/` of the
invocation directory), given on the command line, or named with `--suite` is collected as
pytest's non-python tests are: one item per check, marked `eval`, with a readable id such
as `suites/toy.yaml::resid-L2-topk16::ce_loss_recovered[zero]`. Collecting a suite loads
and validates its model, data, tasks and dictionary configurations once, so bad input is a
located collection error (or, when one dictionary or task is bad, an `[error]` of just the
checks that use it). A check's group is computed lazily, once per session (per xdist
worker), and each finished check is appended to `reports/<run-id>/results.csv`;
`report.md` is written when the session ends.

    pytest -m eval                                  # every suite under suites/
    pytest -m eval --suite my_saes.yaml -k resid    # one suite, a selection of its checks
    pytest -m eval -n 2                             # pytest-xdist workers share one run dir
    pytest -m eval -n 4 --dist loadgroup --saebench-devices cuda:0,cuda:1,cuda:2,cuda:3
    pytest -m eval --saebench-shard 2/3             # one shard (`saebench merge` them)
    pytest -m eval --saebench-ray                   # prefix groups as Ray tasks
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from saebench import workers
from saebench.discovery import (  # noqa: F401
    is_suite_file,
    pytest_load_initial_conftests,
    suite_arg,
)
from saebench.progress import MODES, GroupProgress

STATE = pytest.StashKey["_State"]()
DTYPES = ("float32", "float16", "bfloat16", "float64", "float", "half", "double")
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("saebench", "saebench: SAE faithfulness suites")
    group.addoption("--suite", action="append", default=[], metavar="PATH|NAME",
                    help="collect this suite file, or the packaged suite of that name (toy); "
                         "repeatable; replaces the default paths")
    group.addoption("--saebench-device", default=None,
                    help="device for models and dictionaries: cpu, cuda, cuda:N or mps "
                         "(default: cuda, mps, cpu, the first available)")
    group.addoption("--saebench-dtype", default=None,
                    help=f"model dtype: {', '.join(DTYPES[:4])} (default: the model's)")
    group.addoption("--saebench-tokens", type=int, default=None,
                    help="evaluate on this many tokens (overrides each suite's data.n_tokens)")
    group.addoption("--saebench-report-dir", default="reports",
                    help="where run directories are written (default: reports)")
    group.addoption("--saebench-seed", type=int, default=None,
                    help="seed for bootstrap intervals (overrides each check's seed)")
    group.addoption("--saebench-resume", default=None, metavar="RUN_DIR",
                    help="continue an interrupted run: finished checks whose inputs are "
                         "unchanged are read, not recomputed")
    group.addoption("--saebench-progress", nargs="?", const="on", default="auto",
                    choices=MODES, help="a line per dictionary group while it is computed, "
                    "live in a terminal: auto (in a terminal, the default), on, off")
    group.addoption("--saebench-baseline", default=None, metavar="PATH",
                    help="compare every check with its row in this baseline (a run directory, "
                         "or a directory of baselines by suite name); a missing baseline is "
                         "written at the end of the run")
    group.addoption("--saebench-update-baseline", action="store_true",
                    help="rewrite the baseline with this run's rows instead of comparing")
    group.addoption("--saebench-allow-incomparable", action="store_true",
                    help="compare with a baseline of another model or saebench version "
                         "anyway (every compared check's message says so)")
    group.addoption("--saebench-strict", action="store_true",
                    help="fail noisy checks (worse than the baseline within noise) and a run "
                         "in which no check was measured (all skipped)")
    group.addoption("--saebench-max-memory", default=None, metavar="SIZE",
                    help="memory for one chunk of logits (positions x vocabulary), e.g. 2GiB, "
                         "512MB or bytes (default 1GiB); results do not depend on it")
    group.addoption("--saebench-chunk-positions", type=int, default=None, metavar="N",
                    help="positions per chunk of logits (overrides --saebench-max-memory)")
    group.addoption("--saebench-shard", default=None, metavar="I/N",
                    help="run shard I of N (1 <= I <= N): a balanced, deterministic share of "
                         "the selected checks, whole prefix groups; merge the shards' run "
                         "directories with `saebench merge`")
    group.addoption("--saebench-devices", default=None, metavar="LIST",
                    help="comma-separated devices for pytest-xdist workers, dealt round "
                         "robin (cuda:0,cuda:1): worker gwN runs on the N-th modulo their "
                         "number; without xdist, the first")
    group.addoption("--saebench-ray", nargs="?", const="local", default=None,
                    metavar="ADDRESS", help="compute each prefix group of checks as a Ray "
                    "task: on the cluster at ADDRESS (auto, ray://host:port), or on a local "
                    "cluster started for the run (no ADDRESS); needs saebench[ray]")
    group.addoption("--saebench-ray-gpus", type=float, default=None, metavar="N",
                    help="GPUs a Ray task requests (default: 1 when the cluster has GPUs, "
                         "else 0)")
    group.addoption("--saebench-ray-cpus", type=float, default=1.0, metavar="N",
                    help="CPUs a Ray task requests (default 1)")
    parser.addini("saebench_suite_dirs", "directories whose YAML files are suites",
                  type="paths", default=[])


def _check_options(config: pytest.Config) -> None:
    """Refuse option values that cannot work, before anything is collected."""
    opt = config.getoption
    device, dtype, n_tokens = (opt("--saebench-device"), opt("--saebench-dtype"),
                               opt("--saebench-tokens"))
    if device is not None and not _DEVICE_RE.match(device):
        raise pytest.UsageError(f"--saebench-device {device!r}: expected cpu, cuda, cuda:N "
                                "or mps")
    devices = opt("--saebench-devices")
    if devices is not None:
        if device is not None:
            raise pytest.UsageError("--saebench-device and --saebench-devices: give one")
        bad = [d for d in workers.device_list(devices) if not _DEVICE_RE.match(d)]
        if bad or not workers.device_list(devices):
            raise pytest.UsageError(f"--saebench-devices {devices!r}: expected a comma-"
                                    "separated list of cpu, cuda, cuda:N or mps")
    if opt("--saebench-ray") is not None and (opt("dist", "no") != "no"
                                             or hasattr(config, "workerinput")):
        raise pytest.UsageError("--saebench-ray and pytest-xdist (-n): use one; Ray spreads "
                                "the groups itself")
    for name in ("--saebench-ray-gpus", "--saebench-ray-cpus"):
        if opt(name) is not None and opt(name) < 0:
            raise pytest.UsageError(f"{name} {opt(name)}: expected a number >= 0")
    if opt("--saebench-shard") is not None:
        from saebench.shards import parse_shard

        try:
            parse_shard(opt("--saebench-shard"))
        except ValueError as err:
            raise pytest.UsageError(f"--saebench-shard {err}") from None
    if dtype is not None and dtype.removeprefix("torch.") not in DTYPES:
        raise pytest.UsageError(f"--saebench-dtype {dtype!r}: expected one of "
                                f"{', '.join(DTYPES)}")
    if n_tokens is not None and n_tokens < 1:
        raise pytest.UsageError(f"--saebench-tokens {n_tokens}: expected a positive number "
                                "of tokens")
    from saebench.chunks import check_positions, parse_size

    try:
        parse_size(opt("--saebench-max-memory"))
    except ValueError as err:
        raise pytest.UsageError(f"--saebench-max-memory: {err}") from None
    try:
        check_positions(opt("--saebench-chunk-positions"))
    except ValueError as err:
        raise pytest.UsageError(f"--saebench-chunk-positions: {err}") from None
    seed = opt("--saebench-seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise pytest.UsageError(f"--saebench-seed {seed}: expected an integer in [0, 2**63)")
    report_dir = Path(opt("--saebench-report-dir"))
    existing = next(p for p in (report_dir, *report_dir.parents) if p.exists())
    if not existing.is_dir():
        what = "not a directory" if existing == report_dir else f"{existing} is a file"
        raise pytest.UsageError(f"--saebench-report-dir {report_dir}: {what}")


class _State:
    """Per-process state: the run directory, settings, suite runs and resumable rows."""

    def __init__(self, config: pytest.Config) -> None:
        from saebench import results

        opt = config.getoption
        self.config = config
        resume = opt("--saebench-resume")
        worker = getattr(config, "workerinput", None)
        if worker is not None:
            self.run_dir = Path(worker["saebench_run_dir"])
        elif resume:
            self.run_dir = Path(resume)
            if not self.run_dir.is_dir():
                raise pytest.UsageError(f"--saebench-resume: no run directory {resume}")
        else:
            self.run_dir = Path(opt("--saebench-report-dir")) / results.new_run_id()
        self.run = results.RunDir(self.run_dir)
        self.run_id = self.run.run_id
        self.is_worker = worker is not None
        self.stored, self.seen = _stored_rows(self.run_dir) if resume else ({}, set())
        self.models: dict[Any, Any] = {}
        self.runs: dict[Path, Any] = {}
        self.selected: dict[Path, list] = {}
        self.pending: dict[Path, list] = {}
        self.resumed: Counter[str] = Counter()
        self.baseline_path = opt("--saebench-baseline")
        self.update_baseline = opt("--saebench-update-baseline")
        self.strict = opt("--saebench-strict")
        self.baselines: dict[Path, Any] = {}
        self.incomparable: dict[str, str] = {}
        """Suite -> why its baseline is of another model or saebench version, when
        `--saebench-allow-incomparable` compares anyway."""
        self.lost: list[str] = []
        """Baseline checks this run did not measure although it selected every check."""
        self.collected_files: list[SuiteFile] = []
        self.partial: dict[str, str] = {}
        """Suite -> how this run selected only some of its checks (`-k`, a shard, node ids)."""
        self.measured = 0
        self.progress = GroupProgress(config, "off" if self.is_worker
                                      else opt("--saebench-progress"))
        self.dispatcher: Any = None
        self.connected = False

    @functools.cached_property
    def settings(self):
        """The run-wide settings, built when a suite is first collected: saebench's engine
        (and torch with it) loads only in a session that has suites."""
        from saebench.checks import RunSettings
        from saebench.chunks import parse_size

        opt = self.config.getoption
        return RunSettings(device=workers.device(self.config), dtype=opt("--saebench-dtype"),
                           n_tokens=opt("--saebench-tokens"), seed=opt("--saebench-seed"),
                           max_memory=parse_size(opt("--saebench-max-memory")),
                           chunk_positions=opt("--saebench-chunk-positions"))

    def suite_run(self, suite):
        from saebench.checks import SuiteRun

        if suite.path not in self.runs:
            self.runs[suite.path] = SuiteRun(suite, self.settings, self.models)
        return self.runs[suite.path]

    def reusable(self, run, check) -> dict | None:
        """The stored row of `check`, brought up to date, when it may be reused."""
        row = self.stored.get((check.suite, check.id))
        return None if row is None else run.reuse(check, row)

    def baseline(self, suite):
        """The suite's baseline (`saebench.gate.Baseline`), None when there is none yet;
        loaded once. Only called with --saebench-baseline."""
        from saebench import gate

        if suite.path not in self.baselines:
            target = gate.locate(Path(self.baseline_path), suite.name)
            try:
                self.baselines[suite.path] = (None if self.update_baseline
                                              else gate.Baseline.load(target))
            except FileNotFoundError:
                self.baselines[suite.path] = None
            except ValueError as err:
                raise pytest.UsageError(f"--saebench-baseline {target}: {err}") from None
        return self.baselines[suite.path]

    def outcome(self, run, item: CheckItem):
        """The computed `checks.Outcome` of `item`'s check: from its group's Ray task under
        `--saebench-ray` (an error row when the task was lost), else computed here."""
        check = item.check
        if self.dispatcher is None:
            if not self.is_worker:
                self.compute_group(run, item.suite, check, item.nodeid)
            return run.outcome(check)
        key = (item.suite.path, item.prefix_group)
        if key not in self.dispatcher.finished:
            label = f"{item.suite.name}::{item.prefix_group} (a Ray task)"
            with self.progress.group(label, len(self.dispatcher.checks[key]), item.nodeid):
                self.dispatcher.outcomes(key)
        done = self.dispatcher.outcomes(key)
        if isinstance(done, str) or check.id not in done:
            run.fail(check, done if isinstance(done, str) else
                     f"the Ray task of {item.prefix_group} returned no row for {check.id}")
            return run.outcome(check)
        return done[check.id]

    def submit(self, items: list[pytest.Item]) -> None:
        """Under `--saebench-ray`: submit every prefix group of the selected checks that
        are not resumed as one Ray task each, in the order their first check runs."""
        from saebench.remote import Dispatcher, connect

        opt = self.config.getoption
        try:
            ray, self.connected = connect(opt("--saebench-ray"))
        except ImportError as err:
            raise pytest.UsageError(str(err)) from None
        except ConnectionError as err:
            raise pytest.UsageError(f"--saebench-ray {opt('--saebench-ray')}: cannot reach "
                                    f"a Ray cluster ({err})") from None
        self.dispatcher = Dispatcher(ray, opt("--saebench-ray-gpus"), opt("--saebench-ray-cpus"))
        groups: dict[tuple, list[str]] = {}
        for item in items:
            if isinstance(item, CheckItem) and self.reusable(
                    self.suite_run(item.suite), item.check) is None:
                groups.setdefault((item.suite.path, item.prefix_group), []).append(item.check.id)
        for (path, group), ids in groups.items():
            self.dispatcher.submit((path, group), group, path, self.settings, ids)

    def compute_group(self, run, suite, check, nodeid: str) -> None:
        """Compute the selected checks of `check`'s group (its dictionary or spliced set)
        that are neither reusable nor computed yet, showing progress: groups are computed
        one at a time, in the order their first check runs, so their rows are written (and
        resumable) as soon as each is done."""
        if suite.path not in self.pending:
            self.pending[suite.path] = [c for c in self.selected.get(suite.path, [check])
                                        if self.reusable(run, c) is None]
        group = run.uncomputed(c for c in self.pending[suite.path]
                               if c.dictionaries == check.dictionaries)
        if group:
            label = f"{suite.name}::{'+'.join(check.dictionaries)}"
            with self.progress.group(label, len(group), nodeid) as status:
                run.compute(group, status)


def _stored_rows(run_dir: Path) -> tuple[dict[tuple, dict], set[tuple]]:
    """The rows of a run directory that `--saebench-resume` may reuse, by (suite, check id),
    and the keys of every check with a row.

    A torn last line is dropped, rows that do not parse or contradict their own verdict are
    listed in a warning and recomputed, and a results.csv of another layout is refused.
    """
    from saebench import results
    from saebench.checks import contradiction

    path = run_dir / results.RESULTS_FILE
    if not path.is_file():
        return {}, set()
    try:
        refused: list[str] = []
        rows = results.read_results(run_dir, refused=refused)
    except ValueError as err:
        raise pytest.UsageError(f"--saebench-resume {run_dir}: {err}; start a new run "
                                "instead") from None
    stored = {}
    bad_ids = {line.split(": ", 2)[1] for line in refused if line.count(": ") >= 2}
    for row in rows.to_dict("records"):
        problem = contradiction(row)
        if problem is not None:
            refused.append(f"check {row['check_id']}: {problem}")
        elif row["verdict"] != "error" and row["check_id"] not in bad_ids:
            stored[results.row_key(row)] = row
    if refused:
        shown = "; ".join(refused[:5]) + (f"; and {len(refused) - 5} more"
                                          if len(refused) > 5 else "")
        warnings.warn(f"{path}: {len(refused)} row(s) refused and recomputed: {shown}",
                      stacklevel=2)
    seen = set(zip(rows["suite"], rows["check_id"], strict=True))
    return stored, seen | {(suite, i) for i in bad_ids for suite in {*rows["suite"], ""}}


def _check_baseline(state: _State, suite, provenance: dict) -> None:
    """Refuse (ValueError, one line) a baseline of another model or saebench version than
    this run of `suite`, unless --saebench-allow-incomparable (then remembered, and every
    compared check says so)."""
    from saebench import gate

    baseline = state.baseline(suite)
    if baseline is None:
        return
    where = gate.locate(Path(state.baseline_path), suite.name)
    problem = gate.incomparable(baseline, suite.name, provenance, where)
    if problem and not state.config.getoption("--saebench-allow-incomparable"):
        raise ValueError(f"--saebench-baseline: {problem}; --saebench-allow-incomparable "
                         "compares anyway, --saebench-update-baseline rewrites it")
    if problem:
        state.incomparable[suite.name] = problem


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "eval: a saebench suite check (`pytest -m eval`)")
    config.addinivalue_line("markers", "xdist_group(name): the checks sharing a clean prefix "
                                       "(pytest-xdist's marker; known without it too)")
    _check_options(config)
    config.stash[STATE] = _State(config)
    suites = config.getoption("--suite")
    if suites:
        explicit = config.args_source == pytest.Config.ArgsSource.ARGS
        config.args[:] = [*(config.args if explicit else []), *map(suite_arg, suites)]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist: every worker writes into the controller's run directory."""
    node.workerinput["saebench_run_dir"] = str(node.config.stash[STATE].run_dir)


@pytest.hookimpl(tryfirst=True)
def pytest_collection(session: pytest.Session) -> None:
    """Before xdist's controller hook (which collects nothing): warn where workers would
    share a device."""
    workers.warn_if_shared(session.config)


SUPPORTED = {"transformer-lens": (3, 4)}
"""Library -> [first, last) major versions saebench runs with (sae_lens pins TransformerLens
3; its 4.0 removed HookedTransformer)."""


def incompatible_libraries() -> str | None:
    """One line saying which installed library saebench cannot run with, or None; checked
    before any of them is imported, so a bad environment is a message, not a traceback."""
    from importlib.metadata import PackageNotFoundError, version

    for name, (low, high) in SUPPORTED.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            return f"saebench needs {name} >= {low}, < {high}, which is not installed"
        major = int(re.match(r"\d+", installed)[0]) if re.match(r"\d+", installed) else 0
        if not low <= major < high:
            return (f"saebench needs {name} >= {low}, < {high} (what sae_lens supports); this "
                    f"environment has {installed}: pip install '{name}>={low},<{high}'")
    return None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if is_suite_file(file_path, parent.config):
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

        problem = incompatible_libraries()
        if problem:
            raise self.CollectError(problem)
        state: _State = self.config.stash[STATE]
        try:
            with _library_notices_off():
                suite = load_suite(self.path)
                run = state.suite_run(suite)
            run.prepare()
            if state.baseline_path is not None and run.provenance:
                _check_baseline(state, suite, run.provenance)
            self.suite = suite
            state.collected_files.append(self)
        except (SuiteError, ValueError, pytest.UsageError) as err:
            raise self.CollectError(str(err)) from None
        self.groups = {c.id: run.prefix_group(c) for c in suite.checks}
        scopes: dict[str, list] = {}
        for check in suite.checks:
            scope, sep, _ = check.id.partition("::")
            scopes.setdefault(scope if sep else "", []).append(check)
        for scope, checks in scopes.items():
            if scope:
                yield CheckGroup.from_parent(self, name=scope, suite=suite, checks=checks)
            else:
                yield from (CheckItem.within(self, c.id, suite, c) for c in checks)


@contextlib.contextmanager
def _library_notices_off() -> Iterator[None]:
    """Import saebench's engine without the deprecation notices sae_lens and TransformerLens
    raise about each other on import (TransformerLens 3's `utils` module, which sae_lens
    still uses): nothing a suite's author can act on, so a first run shows no warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                module=r"(sae_lens|transformer_lens)(\.|$)")
        yield


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
    """A check's verdict was fail: the message says value, interval, threshold and n."""


class CheckErrored(Exception):
    """A check could not be judged (error, unstable): never an expected failure."""


class CheckItem(pytest.Item):
    """One check: a metric on a dictionary (or set) against a threshold."""

    def __init__(self, *, suite, check, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.suite = suite
        self.check = check
        self.add_marker(pytest.mark.eval)
        self.add_marker(pytest.mark.xdist_group(self.prefix_group))
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

    def session_file(self) -> SuiteFile:
        """The suite file this check was collected from."""
        return next(n for n in self.iter_parents() if isinstance(n, SuiteFile))

    @property
    def prefix_group(self) -> str:
        """The checks sharing this check's clean prefix share this name (`saebench.shards`)."""
        return self.session_file().groups[self.check.id]

    def runtest(self) -> None:
        from saebench import results, verdicts

        state: _State = self.config.stash[STATE]
        run = state.suite_run(self.suite)
        key = (self.suite.name, self.check.id)
        row = state.reusable(run, self.check)
        fresh = row is None
        outcome = state.outcome(run, self) if fresh else None
        if outcome is not None:
            row = outcome.row
            row["resumed"] = "recomputed" if key in state.seen else ""
            results.write_terms(state.run, self.check.id, outcome.terms, self.suite.name)
        new_baseline = self._compare(state, row, outcome)
        if fresh or row["resumed"] == "re-judged":
            extra = outcome.extra if outcome is not None else {}
            results.append_rows(state.run.results, [{**row, "run_id": state.run_id}])
            for name, rows in extra.items():
                if rows:
                    results.append_rows(state.run_dir / name,
                                        [{"run_id": state.run_id, **r} for r in rows])
        if key in state.seen:
            state.resumed[row["resumed"]] += 1
        verdict, message = row["verdict"], row["message"]
        self.user_properties.append(("saebench_verdict", verdict))
        if verdict == "skipped":
            pytest.skip(message)
        state.measured += 1
        if verdict in verdicts.FAILED or (verdict == "noisy" and state.strict):
            raise CheckFailed(f"[{verdict}] {message}")
        if verdict not in ("pass", "measured", "xpass", "noisy"):
            raise CheckErrored(f"[{verdict}] {message}")
        if new_baseline:
            raise CheckErrored(f"[new baseline] {message}; no baseline row to compare with: "
                               f"this run's rows are written to {new_baseline} at its end, "
                               "run again to compare")

    def _compare(self, state: _State, row: dict, outcome) -> Path | None:
        """Judge `row` against the suite's baseline, in place, with the terms of `outcome`
        (the stored ones for a resumed row); the baseline directory to write when there is
        none yet (None otherwise, or without --saebench-baseline)."""
        import pandas as pd

        from saebench import checks, gate, results

        if state.baseline_path is None:
            return None
        baseline = state.baseline(self.suite)
        if baseline is None:
            if state.update_baseline:
                return None
            return gate.locate(Path(state.baseline_path), self.suite.name)
        suite, check_id = self.suite.name, self.check.id
        try:
            terms = (outcome.terms if outcome is not None
                     else results.read_terms(state.run, check_id, suite))
            base_terms = baseline.terms(check_id, suite)
        except results.DamagedFile as err:
            comparison = gate.Comparison("incomparable", message=str(err))
        else:
            absolute, relative = self.check.tolerance
            comparison = gate.compare(row, baseline.row(check_id, suite), terms, base_terms,
                                      options=checks.metric_options(self.check),
                                      tolerance=absolute, rel_tolerance=relative)
            problem = gate.terms_contradiction(baseline.row(check_id, suite) or {}, base_terms)
            if problem:
                comparison = gate.Comparison("incomparable", message=f"the baseline row: "
                                                                     f"{problem}")
        verdict, message = gate.judge(row["verdict"], row["message"], comparison)
        if state.incomparable.get(suite):
            message = f"INCOMPARABLE ({state.incomparable[suite]}): {message}"
        columns = comparison.columns()
        if row["resumed"] == "reused" and any(row.get(k) != v for k, v in columns.items()
                                             if not pd.isna(v)):
            row["resumed"] = "re-judged"
        row.update(columns, verdict=verdict, message=message)
        return None

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CheckFailed | CheckErrored):
            return f"{self.check.id}: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, self.check.line - 1, f"{self.suite.name}::{self.check.id}"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep this shard's checks (`--saebench-shard`), and remember the selected checks of
    each suite, so one engine run serves them all."""
    state: _State = config.stash[STATE]
    if config.getoption("--saebench-shard") is not None:
        _keep_shard(config, items)
    for item in items:
        if isinstance(item, CheckItem):
            state.selected.setdefault(item.suite.path, []).append(item.check)
    _record_selection(config, items)
    if config.getoption("--saebench-ray") is not None and not config.getoption("collectonly"):
        state.submit(items)
    if state.is_worker and getattr(config.option, "loadgroup", False):
        workers.write_groups(state.run_dir, {i.nodeid: i.prefix_group for i in items
                                             if isinstance(i, CheckItem)})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`: a prefix group's checks go to one worker (`workers.GROUPS_FILE`)."""
    if config.getoption("dist") != "loadgroup":
        return None
    return workers.group_scheduler(config.stash[STATE].run_dir)(config, log)


def _selection_how(config: pytest.Config) -> str:
    """How the command line narrowed the checks: `-k …`, `-m …`, a shard, node ids, --lf."""
    opt = config.option
    parts = [f"-k {opt.keyword!r}" if getattr(opt, "keyword", "") else "",
             f"-m {opt.markexpr!r}" if getattr(opt, "markexpr", "").strip() not in ("", "eval")
             else "",
             f"--saebench-shard {config.getoption('--saebench-shard')}"
             if config.getoption("--saebench-shard") else "",
             "--lf" if getattr(opt, "lf", False) else "",
             "--deselect" if getattr(opt, "deselect", None) else "",
             "node ids" if any("::" in str(a) for a in config.args) else ""]
    return ", ".join(p for p in parts if p) or "a selection"


def _record_selection(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Write how many checks of each collected suite this run selected (of how many), so a
    gate can tell a check left out on purpose from one the run lost."""
    from saebench import results

    state: _State = config.stash[STATE]
    suites = {i.suite.name: i.suite for i in items if isinstance(i, CheckItem)}
    suites |= {f.suite.name: f.suite for f in state.collected_files}
    counts = {name: (sum(1 for i in items if isinstance(i, CheckItem) and i.suite is suite),
                     len(suite.checks)) for name, suite in suites.items()}
    how = _selection_how(config)
    state.partial = {name: how for name, (n, total) in counts.items() if n < total}
    if counts and not config.getoption("collectonly"):
        results.write_selection(state.run_dir, counts, how)


def _keep_shard(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the checks of other shards, in place, and record in the run directory which
    shard this is and every selected check in order (`saebench merge` checks the shards
    against it). Other items than checks are left to every shard."""
    from saebench import results, shards

    state: _State = config.stash[STATE]
    shard = shards.parse_shard(config.getoption("--saebench-shard"))
    checks = [item for item in items if isinstance(item, CheckItem)]
    costs: dict[str, int] = {}
    for path in dict.fromkeys(item.suite.path for item in checks):
        run = state.runs[path]
        costs |= run.prefix_costs(item.check for item in checks if item.suite.path == path)
    assigned = shards.assign(costs, shard.count)
    dropped = [i for i in checks if assigned[i.prefix_group] != shard.index]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        gone = set(map(id, dropped))
        items[:] = [item for item in items if id(item) not in gone]
    record = {"shard": str(shard), "index": shard.index, "count": shard.count,
              "groups": {g: assigned[g] for g in sorted(costs)},
              "costs": {g: costs[g] for g in sorted(costs)},
              "checks": [[i.suite.name, i.check.id] for i in checks]}
    if not config.getoption("collectonly"):
        state.run_dir.mkdir(parents=True, exist_ok=True)
        results.atomic_write(state.run_dir / shards.SHARD_FILE, json.dumps(record, indent=1))


def pytest_sessionfinish(session: pytest.Session) -> None:
    from saebench import report

    state: _State = session.config.stash[STATE]
    if state.connected:
        state.dispatcher.ray.shutdown()  # leaves the cluster; a local one stops with it
    if state.is_worker or not state.run.results.is_file():
        return
    if state.baseline_path is not None:
        _write_baselines(state)
    report.write_report(state.run_dir)
    if state.strict and state.selected and not state.measured and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if state.lost and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _write_baselines(state: _State) -> None:
    """Write the baselines this run made (missing ones, or all with --saebench-update-
    baseline), and note in the run directory which baseline rows it did not have."""
    from saebench import gate, results

    compared, missing, explained = [], [], {}
    for path, checks in state.selected.items():
        suite = checks[0].suite
        target = gate.locate(Path(state.baseline_path), suite)
        baseline = state.baselines.get(path)
        if baseline is None:
            gate.write_baseline(state.run, target, [(c.suite, c.id) for c in checks])
            continue
        ids = {c.id for c in checks}
        compared.append(str(target))
        gone = sorted(i for s, i in baseline.rows if s == suite and i not in ids)
        missing += gone
        if gone and suite in state.partial:
            explained[suite] = state.partial[suite]
        elif gone:
            state.lost += [f"{suite}::{i}" for i in gone]
    if compared:
        note = {"path": ", ".join(compared), "missing": missing, "not_selected": explained}
        results.atomic_write(state.run_dir / "baseline.json", json.dumps(note, indent=1))


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config
                             ) -> tuple[str, str, tuple[str, dict]] | None:
    """A check without a threshold is `measured`, not passed: its own letter (`m`), word
    (`MEASURED` under -v) and count in the summary line."""
    if report.when == "call" and report.passed and \
            ("saebench_verdict", "measured") in getattr(report, "user_properties", ()):
        return "measured", "m", ("MEASURED", {"cyan": True})
    return None


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    state: _State = config.stash[STATE]
    if state.resumed:
        counts = ", ".join(f"{n} {what}" for what, n in sorted(state.resumed.items()))
        terminalreporter.write_line(f"saebench resume of {state.run_dir}: {counts}")
    if not state.is_worker and (state.run_dir / "report.md").is_file():
        terminalreporter.write_line(f"saebench report: {state.run_dir / 'report.md'}")
    if state.lost:
        shown = ", ".join(state.lost[:5]) + (f" and {len(state.lost) - 5} more"
                                             if len(state.lost) > 5 else "")
        terminalreporter.write_line(f"saebench baseline: {len(state.lost)} check(s) of the "
                                    f"baseline were not measured by this run ({shown}): "
                                    "failed; --saebench-update-baseline if they were removed",
                                    red=True)
