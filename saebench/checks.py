"""Compute suite checks: resolve and validate a suite's objects once, run the engine, judge.

The pytest plugin goes through `SuiteRun`. `prepare` runs at collection: it loads the
model, the tokens and the tasks, reads every dictionary's configuration (and loads the
zoo's), and validates all of it, so a bad suite is refused before anything is computed.
A problem of the whole suite (model, data) raises a located `SuiteError`; a problem of one
dictionary, task or check is kept and fails only the checks that depend on it; a hub that
cannot be reached skips them. `compute` then measures the requested checks in as few runs
as possible (token-level checks sharing a batch size share one clean pass; task checks
share one run per task) and isolates a failing request so that it fails only its own
checks; `result` turns a check into a result row with a verdict.

    >>> run = SuiteRun(load_suite("suites/toy.yaml"), RunSettings(device="cpu"))
    >>> run.prepare()
    >>> row = run.result(run.suite.checks[0])
    >>> row["verdict"], row["value"], row["message"]
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from saebench import engine, plan, resolve, results, tasks, verdicts
from saebench.api import provenance
from saebench.cards import feature_cards
from saebench.dictionaries.circuit_tracer import coverage_problem
from saebench.identity import entry_identity, model_hash, module_hash, set_identity
from saebench.metrics.registry import (
    RANDOM,
    Metric,
    Site,
    TableContext,
    get_metric,
    margin_over_random,
)
from saebench.options import index_problem
from saebench.splice import Dictionary, FeatureEdit, hook_layer, position_mask, random_like
from saebench.stats import Summary, bootstrap_interval, summarize
from saebench.suite import (
    MARGIN_TARGETS,
    OPTIONS,
    Check,
    Suite,
    SuiteError,
    validate_dictionary,
    validate_task,
)

CLEAN_PASS_BUDGET = 2 << 30
"""Bytes of clean activations and log-probs a suite run may keep to run the clean model
once for all its groups (the toy suite needs about 0.5 GB); above it, each group runs it."""
MESSAGE_LIMIT = 600
"""A message in a result row or a failure is cut to about this many characters."""


@dataclass(frozen=True)
class RunSettings:
    """Run-wide settings (the plugin's `--saebench-*` options). `max_memory` (bytes) and
    `chunk_positions` size the chunks of positions sent through the unembedding
    (`engine.EngineOptions`); they change no result beyond float rounding, so they are not
    in a check's fingerprint."""

    device: str | None = None
    dtype: str | None = None
    n_tokens: int | None = None
    seed: int | None = None
    max_memory: int | None = None
    chunk_positions: int | None = None


Status = Callable[[str], None]
"""A callback told, as a short text, how far a computation is."""


class Outcome(NamedTuple):
    """A computed check: its result `row`, its side-table rows by file name (`extra`) and
    its per-sequence `terms` (float64 arrays), as the plugin writes them."""

    row: dict[str, Any]
    extra: dict[str, list[dict[str, Any]]]
    terms: dict[str, Any]


class Problem(NamedTuple):
    """Why checks cannot be computed: `verdict` "error" (bad input, a failed computation)
    or "skipped" (a hub that cannot be reached), and a short located message."""

    verdict: str
    message: str


def short(err: BaseException, limit: int = MESSAGE_LIMIT) -> str:
    """An exception as one short line: the first line of its message, after its type unless
    it is a located SuiteError, cut to `limit` characters.

        >>> short(ValueError("width 64 != 128\nlong traceback text"))
        'ValueError: width 64 != 128'
    """
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if not isinstance(err, SuiteError):
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


def contradiction(row: dict[str, Any]) -> str | None:
    """Why a stored result row cannot be what saebench wrote, or None: a verdict it does not
    know, a pass/fail verdict without a finite value, or one that its own value and
    threshold contradict.

        >>> contradiction({"verdict": "pass", "value": 0.5, "threshold": ">= 0.9", ...})
        'verdict pass, but value 0.5 fails >= 0.9'
    """
    from saebench.suite import parse_threshold

    verdict = row.get("verdict")
    if verdict not in verdicts.CHECK_VERDICTS:
        return f"unknown verdict {verdict!r}"
    if verdict not in verdicts.VALUED:
        return None
    values = {k: row.get(k) for k in ("value", "ci_low", "ci_high", *results.RANDOM_COLUMNS)}
    if not isinstance(values["value"], float) or not math.isfinite(values["value"]):
        return f"verdict {verdict} without a finite value"
    if verdict == "measured" or not row.get("threshold"):
        if bool(row.get("threshold")) == (verdict == "measured"):
            return f"verdict {verdict} {'with' if row.get('threshold') else 'without'} a " \
                   "threshold"
        return None
    try:
        threshold = parse_threshold(row["threshold"])
    except ValueError:
        return f"unreadable threshold {row['threshold']!r}"
    passes = threshold.passes(values)
    if passes != (verdict in ("pass", "xpass")):
        return f"verdict {verdict}, but value {values['value']:.4g} " \
               f"{'meets' if passes else 'fails'} {threshold}"
    return None


def _options(check: Check) -> dict[str, Any]:
    """Every effective option of `check`: the common defaults, its metric's, its own."""
    merged = {k: o.default for k, o in OPTIONS.items() if o.default is not None}
    return merged | get_metric(check.metric).defaults() | dict(check.options)


def metric_options(check: Check) -> dict[str, Any]:
    """The options of `check` that belong to its metric (with their defaults)."""
    metric = get_metric(check.metric)
    return metric.defaults() | {k: v for k, v in check.options if k in metric.options}


def _needed_terms(check: Check) -> tuple[str, ...]:
    return get_metric(check.metric).terms(metric_options(check))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    return value


class SuiteRun:
    """A suite's resolved objects, what is wrong with them, and the checks computed so far.

    `models` is a cache shared between suites, so a session loads each model once.
    """

    def __init__(self, suite: Suite, settings: RunSettings,
                 models: dict[Any, Any] | None = None) -> None:
        self.suite = suite
        self.settings = settings
        self._models = models if models is not None else {}
        self.model: Any = None
        self.tokens: torch.Tensor | None = None
        self.sources: tuple[str, ...] = ()
        self.prompts: dict[str, list] = {}
        self.infos: dict[str, resolve.DictionaryInfo] = {}
        self.provenance: dict[str, Any] = {}
        self.device: torch.device | None = None
        self._task_hashes: dict[str, str] = {}
        self._dictionaries: dict[str, tuple[Dictionary, ...]] = {}
        self._prompt_lengths: dict[str, list[int]] = {}
        self._problems: dict[str, Problem] = {}
        self._prepared = False
        self._terms: dict[tuple, dict[str, torch.Tensor]] = {}
        self._task_rows: dict[tuple, tuple[list[dict], list[dict]]] = {}
        self._probes: dict[tuple, dict] = {}
        self._cards_made: dict[tuple[str, int], dict | None] = {}
        """Cards made so far by (dictionary, feature), None for a feature that never fires:
        a card depends only on the model, the tokens and the dictionary, so checks (and
        `fresh` runs) naming the same feature share one pass."""
        self._compute_s: dict[str, float] = {}
        self._memo = engine.RunMemo()

    def fresh(self) -> SuiteRun:
        """A run over the same prepared objects that has computed nothing yet: what a check
        computed on its own sees (a test compares it with the whole suite's run)."""
        run = copy.copy(self)
        run._terms, run._task_rows, run._problems = {}, {}, dict(self._problems)
        run._probes = {}
        run._compute_s, run._memo = {}, engine.RunMemo(hooks=self._memo.hooks)
        return run

    # -- collection ------------------------------------------------------------------

    def prepare(self) -> None:
        """Load and validate everything that can be known before computing; once.

        Raises SuiteError (or a located ValueError) for a problem of the whole suite; keeps
        a `Problem` for each dictionary, task or check that cannot be used.
        """
        if self._prepared:
            return
        self._prepared = True
        suite, s = self.suite, self.settings
        device = self.device = engine.resolve_device(s.device)
        engine.check_device(device)
        dtype = engine.resolve_dtype(s.dtype)
        try:
            self.model = self._load_model(device, dtype)
            data = suite.data if s.n_tokens is None else replace(suite.data, n_tokens=s.n_tokens)
            self.tokens, self.sources = resolve.resolve_token_sources(data, self.model,
                                                                      suite_path=suite.path)
        except resolve.HubUnavailable as err:
            self._problems["suite"] = Problem("skipped", f"needs a model or dataset hub: {err}")
            return
        self.provenance = {**provenance(self.model, self.tokens, 0),
                           "model_hash": model_hash(self.model)}
        for name, spec in suite.tasks.items():
            self._prepare_task(name, spec)
        for name, spec in suite.dictionaries.items():
            self._prepare_dictionary(name, spec, device)
        for check in suite.checks:
            self._prepare_check(check)
        self._memo = engine.RunMemo(hooks=self._kept_hooks())

    def _kept_hooks(self) -> frozenset[str]:
        """The hooks whose clean activations are kept across the engine runs of the suite's
        groups (with the clean log-probs), so the clean model runs once per batch size: those
        of every dictionary whose hooks and widths are known before loading (not a release's
        or a factory's); none when they would take more than `CLEAN_PASS_BUDGET` bytes."""
        widths: dict[str, int] = {}
        for info in self.infos.values():
            for hook, width in (*((h, info.d_in) for h in info.read_hooks),
                                *((h, info.d_out) for h in info.write_hooks)):
                if width is None:
                    continue  # its runs make their own clean pass (`engine.RunMemo`)
                widths[hook] = width
                if hook.startswith("blocks."):
                    widths[f"blocks.{hook.split('.')[1]}.hook_resid_pre"] = self.model.cfg.d_model
        size = engine.clean_pass_bytes(self.model, self.tokens.numel(), widths.values())
        return frozenset(widths) if widths and size <= CLEAN_PASS_BUDGET else frozenset()

    def _load_model(self, device: torch.device, dtype: torch.dtype | None) -> Any:
        suite = self.suite
        key = (repr(suite.model), suite.path.parent, device, dtype)
        if key not in self._models:
            try:
                self._models[key] = resolve.resolve_model(
                    suite.model, device=device, dtype=dtype, suite_path=suite.path,
                    dictionaries=suite.dictionaries.values())
            except (resolve.HubUnavailable, SuiteError):
                raise
            except (ValueError, OSError, RuntimeError, KeyError, TypeError) as err:
                text = (str(err).strip().splitlines() or [""])[0]
                if isinstance(err, ValueError) and text.startswith(str(suite.path)):
                    raise ValueError(text) from None  # already located by `resolve`
                raise SuiteError(str(suite.path), suite.model.line, "model",
                                 f"cannot load the model ({short(err)})") from None
        return self._models[key]

    def _prepare_task(self, name: str, spec: Any) -> None:
        file = str(self.suite.path)
        try:
            prompts = resolve.resolve_task(spec, suite_path=self.suite.path)
            validate_task(file, spec, self.model, prompts)
            batches = tasks.encode_prompts(self.model, prompts, len(prompts), [])
        except SuiteError as err:
            self._problems[f"task:{name}"] = Problem("error", str(err))
            return
        except (ValueError, IndexError) as err:
            where = f"{file}:{spec.line}: tasks.{name}"
            self._problems[f"task:{name}"] = Problem("error", f"{where}: {spec.ref}: {err}")
            return
        self.prompts[name] = prompts
        self._prompt_lengths[name] = batches[0].lengths.tolist()
        text = json.dumps([[p.prompt, p.answer, p.distractor, p.pos] for p in prompts])
        self._task_hashes[name] = results.short_hash(text)

    def _prepare_dictionary(self, name: str, spec: Any, device: torch.device) -> None:
        file = str(self.suite.path)
        try:
            info = resolve.probe_dictionary(spec, suite_path=self.suite.path)
            self.infos[name] = info
            validate_dictionary(file, spec, self.model, (info.read_hook, info.d_in),
                                (info.write_hook, info.d_out))
            if spec.kind == "zoo":
                self._load_dictionary(name, device)
        except (SuiteError, ValueError) as err:
            self._problems[f"dictionary:{name}"] = Problem("error", short(err))

    def _load_dictionary(self, name: str, device: torch.device | str
                         ) -> tuple[Dictionary, ...]:
        """Load, adapt and validate one dictionary entry (its parts: one, or a replacement
        model's layers); a failure is kept as its Problem."""
        spec = self.suite.dictionaries[name]
        file, where = str(self.suite.path), f"dictionaries.{name}"
        try:
            raw = resolve.resolve_dictionary(spec, device=device, suite_path=self.suite.path,
                                             allow_factory=self.suite.allow_factory)
            parts = resolve.adapt(spec, raw)
            for part in parts:
                validate_dictionary(file, spec, self.model, (",".join(part.read_hooks), part.d_in),
                                    (",".join(part.write_hooks), part.d_out))
        except resolve.HubUnavailable as err:
            self._problems[f"dictionary:{name}"] = Problem(
                "skipped", f"needs a model or dataset hub: {short(err)}")
            raise
        except SuiteError as err:
            self._problems[f"dictionary:{name}"] = Problem("error", short(err))
            raise
        except Exception as err:  # noqa: BLE001 -- user code and files: any failure is theirs
            message = short(err)
            if not message.startswith(file):
                message = f"{file}:{spec.line}: {where}: cannot load ({message})"
            self._problems[f"dictionary:{name}"] = Problem("error", message)
            raise SuiteError(file, spec.line, where, message) from None
        self._dictionaries[name] = parts
        known = self.infos.get(name)
        d_sae = [p.d_sae for p in parts]
        self.infos[name] = resolve.DictionaryInfo(
            ",".join(dict.fromkeys(h for p in parts for h in p.read_hooks)),
            ",".join(dict.fromkeys(h for p in parts for h in p.write_hooks)),
            parts[0].d_in, parts[0].d_out, None if None in d_sae else sum(d_sae),
            known.identity if known is not None else {},
            known.architecture if len(parts) > 1 and known is not None
            else parts[0].architecture)
        return parts

    def _prepare_check(self, check: Check) -> None:
        """Check-level problems that need widths or token shapes: feature ids in range,
        `k` no larger than the dictionary, positions inside the sequences."""
        opts = _options(check)
        where = f"{self.suite.path}:{check.line}: {check.where or check.id}.options"
        problem = None
        for edit in opts["edits"]:
            d_sae = self.infos.get(edit.dictionary or check.dictionaries[0])
            d_sae = d_sae.d_sae if d_sae is not None else None
            bad = [f for f in edit.features if d_sae is not None and f >= d_sae]
            if bad:
                problem = (f"{where}.edits: features {bad} of {edit.dictionary!r} are outside "
                           f"0..{d_sae - 1} (d_sae={d_sae})")
        metric = get_metric(check.metric)
        info = self.infos.get(check.dictionaries[0])
        for name, option in metric.options.items():
            bound = getattr(info, option.at_most, None) if option.at_most else None
            if bound is not None and opts.get(name) is not None and opts[name] > bound:
                problem = (f"{where}.{name}: {name}={opts[name]} is more than the dictionary's "
                           f"{option.at_most} {bound}")
        positions = opts["positions"]
        if not isinstance(positions, str):
            problem = problem or self._position_problem(check, positions, where)
        several = [n for n in check.dictionaries if n in self.infos and not self.infos[n].single]
        if several and metric.one_hook:
            info = self.infos[several[0]]
            problem = problem or (
                f"{self.suite.path}:{check.line}: {check.where or check.id}: {check.metric} "
                f"needs a dictionary that reads one hook and writes one; {several[0]!r} is a "
                f"replacement model writing {len(info.write_hooks)} hooks (per_layer_error "
                "gives its error at each)")
        problem = problem or index_problem(
            {**metric.options, **OPTIONS}, opts, {n: self.infos.get(n) for n in check.dictionaries},
            where) or coverage_problem(self.suite, _entries(check), self.infos,
                                       self.model.cfg.n_layers)
        if problem:
            self._problems[f"check:{check.id}"] = Problem("error", problem)

    def _position_problem(self, check: Check, positions: Any, where: str) -> str | None:
        if check.task is None:
            try:
                position_mask(positions, 1, self.tokens.shape[1])
            except (IndexError, ValueError, RuntimeError) as err:
                return f"{where}.positions: {err}"
            return None
        for i, n in enumerate(self._prompt_lengths.get(check.task, [])):
            bad = [p for p in ([positions] if isinstance(positions, int) else positions)
                   if not -n <= p < n]
            if bad:
                return (f"{where}.positions: {bad} lie outside prompt {i} of task "
                        f"{check.task!r}, which has {n} tokens")
        return None

    def problem(self, check: Check) -> Problem | None:
        """What stops `check` from being computed, or None: the suite, one of its
        dictionaries, its task or its own options. Errors win over skips."""
        keys = ["suite", *(f"dictionary:{n}" for n in _entries(check)),
                *([f"task:{check.task}"] if check.task else []), f"check:{check.id}"]
        found = [self._problems[k] for k in keys if k in self._problems]
        errors = [p for p in found if p.verdict == "error"]
        return (errors or found or [None])[0]

    def prefix_group(self, check: Check) -> str:
        """The checks sharing a clean prefix share this name (`suite:data:Llayer`): the same
        suite (model), data (the tokens, or a task) and first spliced layer. Shards and
        xdist workers take whole groups (`saebench.shards`)."""
        return f"{self.suite.name}:{check.task or 'tokens'}:L{self._first_layer(check)}"

    def _first_layer(self, check: Check) -> int:
        """The earliest layer `check`'s dictionaries write at (0 where a format does not say
        before loading)."""
        hooks = [h for n in check.dictionaries if n in self.infos
                 for h in self.infos[n].write_hooks]
        return min((hook_layer(h) for h in hooks), default=0)

    def prefix_costs(self, checks: Iterable[Check]) -> dict[str, int]:
        """The estimated cost of each prefix group among `checks`, in token-layers (passes x
        layers x tokens): the clean pass over the group's data once, plus a suffix pass from
        the group's layer per distinct engine request its checks read."""
        n_layers = self.model.cfg.n_layers if self.model is not None else 1
        costs: dict[str, int] = {}
        requests: dict[str, set[tuple]] = defaultdict(set)
        for check in checks:
            group = self.prefix_group(check)
            n_tokens = self._n_tokens(check.task)
            costs.setdefault(group, n_layers * n_tokens)
            for key in self._keys(check):
                if key not in requests[group]:
                    requests[group].add(key)
                    costs[group] += max(n_layers - self._first_layer(check), 1) * n_tokens
        return costs

    def _n_tokens(self, task: str | None) -> int:
        """How many tokens a run over `task` (None: the token data) reads; 1 when unknown."""
        if task is None:
            return self.tokens.numel() if self.tokens is not None else 1
        return max(sum(self._prompt_lengths.get(task, [])), 1)

    # -- computing -------------------------------------------------------------------

    def _seed(self, check: Check) -> int:
        return self.settings.seed if self.settings.seed is not None else _options(check)["seed"]

    def _request_key(self, check: Check) -> tuple:
        """Checks with the same key are one engine request: the same set, the same passes,
        and the same values of every option that shapes their run (seeds included)."""
        opts = {**_options(check), "seed": self._seed(check)}
        shaping = tuple((k, opts.get(k)) for k in get_metric(check.metric).run_options)
        return (check.dictionaries, check.task, check.read, opts["positions"],
                opts["error_term"], opts["edits"], shaping)

    def _random_key(self, check: Check) -> tuple:
        """The request of `check`'s random baseline: its set, passes and ablations with
        random-weight dictionaries drawn from the check's seed."""
        return (*self._request_key(check)[:-1], (("random", self._seed(check)),))

    def _keys(self, check: Check) -> list[tuple]:
        """The requests whose terms `check` reads."""
        random = _options(check)["random_baseline"]
        return [self._request_key(check), *([self._random_key(check)] if random else [])]

    def uncomputed(self, checks: Iterable[Check]) -> list[Check]:
        """The checks among `checks` that `compute` would compute: no problem known yet,
        and terms not computed yet."""
        self.prepare()
        return [c for c in checks if self.problem(c) is None
                and not all(set(_needed_terms(c)) <= set(self._terms.get(key, {}))
                            for key in self._keys(c))]

    def compute(self, checks: Iterable[Check], status: Status | None = None) -> None:
        """Compute every check among `checks` that has no problem and whose terms are not
        computed yet: one engine run per batch size over the token data (their clean pass
        is shared), one task run per task. A run that fails is retried request by request,
        so a failure is kept only for the checks of the request that caused it.

        `status(text)` is told which run is going and how far its batches are. The wall
        time of the call is shared equally among the checks it computed (`duration_s`).
        """
        started = time.perf_counter()
        pending = self.uncomputed(checks)
        for name in dict.fromkeys(n for c in pending for n in _entries(c)):
            if name not in self._dictionaries and f"dictionary:{name}" not in self._problems:
                with contextlib.suppress(SuiteError, resolve.HubUnavailable):
                    self._load_dictionary(name, self.device)  # a failure is kept
        pending = [c for c in pending if self.problem(c) is None]
        by_run: dict[tuple, dict[tuple, list[Check]]] = defaultdict(lambda: defaultdict(list))
        for check in pending:
            run_key = (check.task, _options(check)["batch_size"])
            for key in self._keys(check):
                by_run[run_key][key].append(check)
        for i, ((task, batch_size), groups) in enumerate(by_run.items()):
            what = f"run {i + 1}/{len(by_run)}" if len(by_run) > 1 else "run"
            what += f" on task {task}" if task else ""
            if status is not None:
                status(what)
            # no stacking: a check's row must not depend, even in its last bits, on which
            # other dictionaries' checks were computed with it
            options = engine.EngineOptions(batch_size=batch_size, progress=False, stack_bytes=0,
                                           on_batch=_batch_status(status, what),
                                           max_memory=self.settings.max_memory,
                                           chunk_positions=self.settings.chunk_positions)
            self._run_isolated(task, options, groups)
        for check in pending:
            self._compute_s[check.id] = (time.perf_counter() - started) / len(pending)

    def _run_isolated(self, task: str | None, options: engine.EngineOptions,
                      groups: dict[tuple, list[Check]]) -> None:
        try:
            self._run(task, options, groups)
        except Exception as err:  # noqa: BLE001 -- a failure becomes its checks' error rows
            if len(groups) > 1:
                for key, group in groups.items():
                    self._run_isolated(task, options, {key: group})
                return
            (group,) = groups.values()
            for check in group:
                self._problems[f"check:{check.id}"] = Problem(
                    "error", f"the computation failed: {short(err)}")

    def _run(self, task: str | None, options: engine.EngineOptions,
             groups: dict[tuple, list[Check]]) -> None:
        if task is None:
            requests = [self._request(i, key, group) for i, (key, group) in
                        enumerate(groups.items())]
            terms = engine.run(self.model, self.tokens, requests, options, self._memo)
        else:
            requests = [self._task_request(i, key, group) for i, (key, group) in
                        enumerate(groups.items())]
            result = tasks.run_task(self.model, self.prompts[task], requests, options)
            terms = result.terms
            for key, request in zip(groups, requests, strict=True):
                self._task_rows[key] = (result.per_prompt.get(request.key, []),
                                        result.features.get(request.key, []))
        for key, request in zip(groups, requests, strict=True):
            self._terms.setdefault(key, {}).update(terms[request.key])
            probes = request.probes if isinstance(request, engine.Request) else ()
            self._probes[key] = {p.key: p for p in probes}

    def _parts(self, names: tuple[str, ...]) -> tuple[Dictionary, ...]:
        """The dictionaries spliced for a check on the entries `names` (every part of each)."""
        return tuple(part for name in names for part in self._dictionaries[name])

    def _want(self, index: int, key: tuple, group: list[Check]
              ) -> tuple[str, tuple[Dictionary, ...], list[plan.Want], Site, plan.Common]:
        """What the planner needs to build the request of `group` (checks sharing `key`)."""
        first, opts = group[0], _options(group[0])
        dictionaries = self._parts(key[0])
        read = self._parts((first.read,)) if first.read else ()
        common = plan.Common(positions=opts["positions"], error_term=opts["error_term"],
                             edits=_feature_edits(key, opts), seed=self._seed(first),
                             by_position=any(_options(c)["by"] == "position" for c in group))
        wants = [(get_metric(c.metric), metric_options(c)) for c in group]
        site = Site(dictionaries, read, self.model)
        return f"{index}:" + "+".join(key[0]), dictionaries, wants, site, common

    def _task_request(self, index: int, key: tuple, group: list[Check]) -> tasks.TaskRequest:
        return plan.task_request(*self._want(index, key, group))

    def _request(self, index: int, key: tuple, group: list[Check]) -> engine.Request:
        name, dictionaries, wants, site, common = self._want(index, key, group)
        if key[-1] and key[-1][0][0] == "random":
            randoms = tuple(random_like(d, key[-1][0][1]) for d in dictionaries)
            return plan.random_request(name.replace(":", ":random:", 1), randoms, wants,
                                       site, common)
        return plan.token_request(name, dictionaries, wants, site, common)

    def extra_rows(self, check: Check) -> dict[str, list[dict[str, Any]]]:
        """Prompt-, feature-, layer- and bucket-level rows of a check, for `per_prompt.csv`,
        `features.csv`, `layers.csv` and `breakdown.csv`: what its metric's `tables` make of
        its request, the cards of the features they name, and its `by:` breakdown."""
        metric = get_metric(check.metric)
        terms = self._terms.get(self._request_key(check))
        if not terms or self.problem(check) is not None:
            return {}
        per_prompt, features = self._task_rows.get(self._request_key(check), ([], []))
        n_boot, seed = _options(check)["n_boot"], self._seed(check)
        context = TableContext(
            terms=terms, options=metric_options(check), n_boot=n_boot, seed=seed,
            summarize=lambda m, o, t: summarize(m, t, o, n_boot=n_boot, seed=seed),
            interval=lambda values, counts=None: bootstrap_interval(values, n_boot, seed, counts),
            probes=self._probes.get(self._request_key(check), {}),
            write_hooks=tuple(dict.fromkeys(h for n in check.dictionaries
                                            for h in self.infos[n].write_hooks)),
            per_prompt=tuple(per_prompt), features=tuple(features))
        base = {"suite": self.suite.name, "check_id": check.id,
                "dictionary": "+".join(check.dictionaries), "task": check.task or ""}
        tables = metric.tables(context) if metric.tables is not None else {}
        if _options(check)["by"] != "none":
            tables[results.BREAKDOWN_FILE] = self._breakdown(check, metric, terms)
        features = tables.get(results.FEATURES_FILE, [])
        if features or _options(check)["features"]:
            tables[results.FEATURES_FILE] = [*features, *self._cards(check, features)]
        return {file: [{**base, **row} for row in rows] for file, rows in tables.items()}

    def _breakdown(self, check: Check, metric: Metric, terms: dict[str, torch.Tensor]
                   ) -> list[dict[str, Any]]:
        """A check's value in each bucket of its `by:` breakdown: each bucket of token
        positions (the engine's `@first-last:` terms), or each data source (its sequences)."""
        by = _options(check)["by"]
        if by == "position":
            prefixes = dict.fromkeys(k.split(":", 1)[0] + ":" for k in terms if k[0] == "@")
            parts = {p[1:-1]: {**{k: v for k, v in terms.items() if not k.startswith("@")},
                               **{k.removeprefix(p): v for k, v in terms.items()
                                  if k.startswith(p)}} for p in prefixes}
        else:
            names = list(dict.fromkeys(self.sources))
            parts = {name: {k: v[torch.tensor([s == name for s in self.sources])]
                            for k, v in terms.items()} for name in names}
        rows = []
        for bucket, bucket_terms in parts.items():
            summary = self._summarize(check, metric, bucket_terms)
            rows.append({"metric": check.metric, "by": by, "bucket": bucket,
                         "value": summary.value, "ci_low": summary.ci_low,
                         "ci_high": summary.ci_high, "n": summary.n})
        return rows

    def _cards(self, check: Check, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Feature cards over the suite's tokens for every feature a check's tables name (an
        ablated or clamped feature, a clamp's downstream feature) and its `features` option;
        only for dictionaries reading one hook and writing one."""
        wanted: dict[str, list[int]] = defaultdict(list)
        own = check.dictionaries[0] if len(check.dictionaries) == 1 else None
        for row in rows:
            if row.get("table") in ("ablation", "clamp") and own:
                wanted[own].append(row["feature"])
            if row.get("read_feature") is not None:
                wanted[check.read].append(row["read_feature"])
        if own:
            wanted[own] += _options(check)["features"]
        cards = []
        for name, features in wanted.items():
            parts = self._parts((name,))
            if len(parts) != 1 or not parts[0].single or not parts[0].has_features:
                continue
            ids = sorted(set(features))
            missing = [f for f in ids if (name, f) not in self._cards_made]
            if missing:
                made = {card["feature"]: card for card in feature_cards(
                    self.model, self.tokens, parts[0], missing,
                    batch_size=_options(check)["batch_size"])}
                self._cards_made.update({(name, f): made.get(f) for f in missing})
            cards += [{"dictionary": name, **self._cards_made[(name, f)]} for f in ids
                      if self._cards_made[(name, f)] is not None]
        return cards

    # -- rows ------------------------------------------------------------------------

    def fingerprint(self, check: Check) -> str:
        """A hash of everything a check's value depends on: metric, task and its prompts,
        every effective option and seed, the dictionaries' identities, the model, device,
        dtype and token set. A stored row is reused only while this is unchanged; the
        threshold and `expect` are not in it (a stored value is re-judged instead)."""
        opts = {**_options(check), "seed": self._seed(check)}
        content = {
            "metric": check.metric, "task": check.task,
            "prompts": self._task_hashes.get(check.task) if check.task else None,
            "options": {k: _jsonable(v) for k, v in sorted(opts.items())},
            "dictionaries": [self.entry_identity(n) if n in self.infos else n
                             for n in _entries(check)],
            "model": repr(self.suite.model), "model_hash": self.provenance.get("model_hash"),
            "device": str(self.provenance.get("device")).split(":")[0],  # cuda:1 = cuda
            **{k: self.provenance.get(k) for k in ("dtype", "token_set")},
        }
        text = json.dumps(content, sort_keys=True, default=str)
        return results.short_hash(text)

    def entry_identity(self, name: str) -> dict[str, Any]:
        """A dictionary entry's identity fields (`saebench.identity`): its format, the hash of
        its files (of its loaded tensors for a release or factory; its source before it is
        loaded), `args:`, hook overrides and factory."""
        spec, info = self.suite.dictionaries[name], self.infos.get(name)
        known = info.identity if info is not None else {}
        return entry_identity({
            "format": spec.kind, "weights": known.get("sha256") or self._loaded_hash(name)
            or known.get("source"), "args": spec.args or None, "hook": spec.hook,
            "hook_out": spec.hook_out, "factory": spec.ref if spec.kind == "factory" else None})

    def _loaded_hash(self, name: str) -> str:
        """The hash of a loaded entry's tensors (every part's), "" when it is not loaded or
        holds none."""
        parts = self._dictionaries.get(name, ())
        hashes = [module_hash(p.module) for p in parts]
        return "+".join(hashes) if hashes and all(hashes) else ""

    def _row(self, check: Check, **fields: Any) -> dict[str, Any]:
        """A result row of `check` with the identity and provenance columns filled in."""
        infos = [self.infos.get(n) for n in check.dictionaries]

        def joined(get) -> str:
            return "+".join(str(get(i) or "") if i is not None else "" for i in infos)

        single = infos[0] if len(infos) == 1 else None
        model = self.suite.model
        return results.row(
            suite=self.suite.name, check_id=check.id, model=model.name or model.path or model.kind,
            dictionary="+".join(check.dictionaries),
            hook=",".join(dict.fromkeys(i.write_hook or "" for i in infos if i is not None)),
            metric=check.metric, task=check.task or "",
            options=json.dumps({k: _jsonable(v) for k, v in check.options}, sort_keys=True),
            threshold=str(check.threshold or ""),
            **{**self.provenance, "seed": self._seed(check)},
            source=joined(lambda i: i.identity.get("source")),
            architecture=joined(lambda i: i.architecture),
            d_in=single.d_in if single else None, d_sae=single.d_sae if single else None,
            read_hook=joined(lambda i: i.read_hook), write_hook=joined(lambda i: i.write_hook),
            weights_sha256="+".join(
                (self.infos[n].identity.get("sha256") if n in self.infos else "")
                or self._loaded_hash(n) for n in check.dictionaries),
            identity=set_identity([self.entry_identity(n) for n in check.dictionaries
                                   if n in self.suite.dictionaries]),
            higher_is_better=get_metric(check.metric).higher_is_better,
            fingerprint=self.fingerprint(check), **fields)

    def terms_of(self, check: Check) -> dict[str, torch.Tensor]:
        """The per-sequence terms `check`'s metric reads (empty before it is computed), to
        store beside its row for paired comparisons."""
        computed = self._terms.get(self._request_key(check), {})
        metric = get_metric(check.metric)
        names = (metric.count_term, *metric.terms(metric_options(check)))
        return {n: computed[n] for n in dict.fromkeys(names) if n in computed}

    def result(self, check: Check) -> dict[str, Any]:
        """The result row of `check` (computing its request if needed); never raises for a
        problem of the check's inputs or computation, which becomes its verdict."""
        started = time.time()
        self.compute([check])
        own = time.perf_counter()

        def duration() -> float:
            return round(self._compute_s.get(check.id, 0.0) + time.perf_counter() - own, 4)

        problem = self.problem(check)
        if problem is not None:
            return self._row(check, verdict=problem.verdict, message=problem.message,
                             started_at=started, duration_s=duration())
        metric = get_metric(check.metric)
        summary = self._summarize(check, metric, self._terms[self._request_key(check)])
        values = {"value": summary.value, "ci_low": summary.ci_low, "ci_high": summary.ci_high}
        stat_verdict, reason = summary.verdict, summary.reason
        if _options(check)["random_baseline"]:
            random_terms = self._terms[self._random_key(check)]
            both = {**self._terms[self._request_key(check)],
                    **{RANDOM + k: v for k, v in random_terms.items()}}
            margin = self._summarize(check, margin_over_random(metric), both)
            random_value = summarize(metric, random_terms, metric_options(check), n_boot=0).value
            values.update(random_value=random_value,
                          margin=margin.value, margin_low=margin.ci_low,
                          margin_high=margin.ci_high)
            if stat_verdict == "ok" and check.threshold is not None \
                    and check.threshold.target in MARGIN_TARGETS:
                stat_verdict, reason = margin.verdict, f"the margin: {margin.reason}"
        verdict, message = judge(check, values, summary.n, stat_verdict, reason)
        return self._row(
            check, **values, n=summary.n, verdict=verdict, message=message,
            parts=json.dumps(summary.parts, sort_keys=True),
            started_at=started, duration_s=duration())

    def outcome(self, check: Check) -> Outcome:
        """Everything a finished check writes: its row, side tables and stored terms
        (computing its request if needed). Picklable, so a Ray task can return it."""
        row = self.result(check)
        terms = {k: v.double().cpu().numpy() for k, v in self.terms_of(check).items()}
        return Outcome(row, self.extra_rows(check), terms)

    def fail(self, check: Check, message: str) -> None:
        """Record that computing `check` failed outside the engine (a lost Ray task): its
        row becomes an error row with `message`."""
        self._problems[f"check:{check.id}"] = Problem("error", message[:MESSAGE_LIMIT])

    def _summarize(self, check: Check, metric: Metric, terms: dict[str, torch.Tensor]
                   ) -> Summary:
        return summarize(metric, terms, metric_options(check), n_boot=_options(check)["n_boot"],
                         seed=self._seed(check))

    def reuse(self, check: Check, row: dict[str, Any]) -> dict[str, Any] | None:
        """A stored row of `check` brought up to date, or None when it must be recomputed:
        its fingerprint differs (the check or its inputs changed). A stored value is
        re-judged against the check's current threshold and `expect`."""
        if row.get("fingerprint") != self.fingerprint(check):
            return None
        if row["verdict"] not in verdicts.VALUED:
            return {**row, "resumed": "reused"}
        values = {k: row.get(k) for k in ("value", "ci_low", "ci_high", *results.RANDOM_COLUMNS)}
        verdict, message = judge(check, values, int(row["n"]), "ok", "")
        changed = (verdict, str(check.threshold or "")) != (row["verdict"], row["threshold"])
        return {**row, "verdict": verdict, "message": message,
                "threshold": str(check.threshold or ""),
                "resumed": "re-judged" if changed else "reused"}


def _batch_status(status: Status | None, what: str) -> Callable[[int, int | None], None] | None:
    """The engine's `on_batch` callback that tells `status` how many sequences are done."""
    if status is None:
        return None
    return lambda done, total: status(f"{what}: {done}/{total or '?'} sequences")


def _entries(check: Check) -> tuple[str, ...]:
    """The dictionary entries `check` uses: those it splices, then the one it reads."""
    return (*check.dictionaries, *([check.read] if check.read else []))


def _feature_edits(key: tuple, options: dict[str, Any]) -> tuple[FeatureEdit, ...]:
    return tuple(FeatureEdit(e.dictionary or key[0][0], e.features, e.value)
                 for e in options["edits"])


def judge(check: Check, values: Mapping[str, float], n: int, stat_verdict: str,
          reason: str) -> tuple[str, str]:
    """(verdict, message) of a check from its `values` (value, ci_low, ci_high and, with a
    random baseline, random_value and margin*): pass/fail against its threshold, `unstable`
    when the statistic's denominator is not usable, `empty` when nothing was measured,
    `error` when it could not be computed; `expect: fail` turns pass/fail into xpass/xfail.

        >>> judge(check, {"value": 0.93, "ci_low": 0.92, "ci_high": 0.94}, 581, "ok", "")
        ('pass', 'ce_loss_recovered = 0.93 [0.92, 0.94] (n=581) meets >= 0.9')
    """
    shown = f"{check.metric} = {_shown(values, 'value', 'ci_low', 'ci_high')} (n={n})"
    if not _missing(values.get("random_value")):
        shown += (f", random {_fmt(values['random_value'])}, margin "
                  f"{_shown(values, 'margin', 'margin_low', 'margin_high')}")
    if stat_verdict == "unstable":
        verdict, message = "unstable", f"{shown} is unstable: {reason}"
    elif stat_verdict == "empty":
        verdict, message = "empty", f"nothing was measured for {check.metric}: {reason}"
    elif stat_verdict != "ok":
        verdict, message = "error", f"{check.metric} could not be computed ({stat_verdict}): " \
                                    f"{reason}"
    elif check.threshold is None:
        verdict, message = "measured", f"{shown} (measured: no threshold)"
    elif check.threshold.passes(values):
        verdict, message = "pass", f"{shown} meets {check.threshold}"
    else:
        verdict, message = "fail", f"{shown} fails {check.threshold}"
    if check.expect == "fail" and verdict in ("pass", "fail"):
        verdict = "xpass" if verdict == "pass" else "xfail"
    return verdict, message


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _shown(values: Mapping[str, float], value: str, low: str, high: str) -> str:
    """`0.93 [0.92, 0.94]`, or `0.93 no interval`."""
    lo, hi = values.get(low, math.nan), values.get(high, math.nan)
    interval = "no interval" if _missing(lo) and _missing(hi) else f"[{_fmt(lo)}, {_fmt(hi)}]"
    return f"{_fmt(values[value])} {interval}"


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"
