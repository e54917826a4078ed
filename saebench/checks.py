"""Compute suite checks: resolve a suite's objects once, run the engine, judge thresholds.

The pytest plugin goes through `SuiteRun`: it loads the suite's model, tokens,
dictionaries and tasks lazily and once, computes the checks it is asked for in as few runs
as possible (every requested token-level check of the suite that shares a batch size
shares one clean pass; task checks share one run per task), and turns each check into a
result row with a verdict.

    >>> run = SuiteRun(load_suite("suites/toy.yaml"), RunSettings(device="cpu"))
    >>> row = run.result(run.suite.checks[0])
    >>> row["verdict"], row["value"], row["message"]
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch

from saebench import engine, resolve, tasks
from saebench.api import provenance
from saebench.metrics.pathological import DEFAULT_DRAWS
from saebench.metrics.registry import get_metric
from saebench.splice import FeatureEdit
from saebench.stats import summarize
from saebench.suite import OPTIONS, Check, Suite, validate_resolved


@dataclass(frozen=True)
class RunSettings:
    """Run-wide settings (the plugin's `--saebench-*` options)."""

    device: str | None = None
    dtype: str | None = None
    n_tokens: int | None = None
    seed: int | None = None
    progress: bool = False


def _options(check: Check) -> dict[str, Any]:
    merged = {k: o.default for k, o in OPTIONS.items() if o.default is not None}
    return merged | dict(check.options)


METRIC_OPTIONS = ("ablation", "dense_threshold", "normalize", "share", "k", "baseline")
"""Check options read when a metric is summarised (the others shape the passes)."""


def _metric_options(check: Check) -> dict[str, Any]:
    opts = _options(check)
    return {k: opts[k] for k in METRIC_OPTIONS if k in opts}


def _needed_terms(check: Check) -> tuple[str, ...]:
    return get_metric(check.metric).terms(_metric_options(check))


def _request_key(check: Check) -> tuple:
    """Checks with the same key are one engine request (same set, same passes)."""
    opts = _options(check)
    return (check.dictionaries, check.task, opts["positions"], opts["error_term"],
            opts["edits"])


class SuiteRun:
    """A suite's resolved objects and the results of the checks computed so far.

    `models` is a cache shared between suites, so a session loads each model once.
    """

    def __init__(self, suite: Suite, settings: RunSettings,
                 models: dict[Any, Any] | None = None) -> None:
        self.suite = suite
        self.settings = settings
        self._models = models if models is not None else {}
        self._objects: dict[str, Any] | None = None
        self._unavailable: resolve.HubUnavailable | None = None
        self._terms: dict[tuple, dict[str, torch.Tensor]] = {}
        self._task_rows: dict[tuple, tuple[list[dict], list[dict]]] = {}

    def objects(self) -> dict[str, Any]:
        """The model, tokens, adapted dictionaries and tasks, loaded on first use.

        A hub that cannot be reached is tried once per suite, not once per check.
        """
        if self._unavailable is not None:
            raise self._unavailable
        if self._objects is None:
            try:
                self._objects = self._load()
            except resolve.HubUnavailable as err:
                self._unavailable = err
                raise
        return self._objects

    def _load(self) -> dict[str, Any]:
        suite, s = self.suite, self.settings
        device = engine.resolve_device(s.device)
        dtype = engine.resolve_dtype(s.dtype)
        key = (repr(suite.model), suite.path.parent, device, dtype)
        if key not in self._models:
            self._models[key] = resolve.resolve_model(
                suite.model, device=device, dtype=dtype, suite_path=suite.path,
                dictionaries=suite.dictionaries.values())
        model = self._models[key]
        data = suite.data
        if s.n_tokens is not None:
            data = replace(data, n_tokens=s.n_tokens)
        tokens = resolve.resolve_tokens(data, model, suite_path=suite.path)
        raw = {name: resolve.resolve_dictionary(spec, device=device, suite_path=suite.path,
                                                allow_factory=suite.allow_factory)
               for name, spec in suite.dictionaries.items()}
        tasks = {name: resolve.resolve_task(spec, suite_path=suite.path)
                 for name, spec in suite.tasks.items()}
        validate_resolved(suite, model, raw, tasks)
        dictionaries = {name: resolve.adapt(suite.dictionaries[name], obj)
                        for name, obj in raw.items()}
        return {"model": model, "tokens": tokens, "dictionaries": dictionaries,
                "tasks": tasks, "provenance": provenance(model, tokens, self._seed(None))}

    def _seed(self, check: Check | None) -> int:
        if self.settings.seed is not None:
            return self.settings.seed
        return _options(check)["seed"] if check is not None else 0

    def compute(self, checks: Iterable[Check]) -> None:
        """Compute every check among `checks` whose terms are not computed yet: one engine
        run per batch size over the token data (their clean pass is shared), one task run
        per task over its prompts."""
        pending = [c for c in checks
                   if not set(_needed_terms(c)) <= set(self._terms.get(_request_key(c), {}))]
        if not pending:
            return
        objs = self.objects()
        by_run: dict[tuple, dict[tuple, list[Check]]] = defaultdict(lambda: defaultdict(list))
        for check in pending:
            run_key = (check.task, _options(check)["batch_size"])
            by_run[run_key][_request_key(check)].append(check)
        for (task, batch_size), groups in by_run.items():
            options = engine.EngineOptions(batch_size=batch_size, progress=self.settings.progress)
            if task is None:
                requests = [self._request(i, key, group, objs)
                            for i, (key, group) in enumerate(groups.items())]
                terms = engine.run(objs["model"], objs["tokens"], requests, options)
            else:
                requests = [self._task_request(i, key, group, objs)
                            for i, (key, group) in enumerate(groups.items())]
                result = tasks.run_task(objs["model"], objs["tasks"][task], requests, options,
                                        seed=self._seed(next(iter(groups.values()))[0]))
                terms = result.terms
                for key, request in zip(groups, requests, strict=True):
                    self._task_rows[key] = (result.per_prompt.get(request.key, []),
                                            result.features.get(request.key, []))
            for key, request in zip(groups, requests, strict=True):
                self._terms.setdefault(key, {}).update(terms[request.key])

    def _task_request(self, index: int, key: tuple, group: list[Check],
                      objs: dict) -> tasks.TaskRequest:
        options = [_options(c) for c in group]
        metrics = {c.metric for c in group}
        return tasks.TaskRequest(
            key=f"{index}:" + "+".join(key[0]),
            dictionaries=tuple(objs["dictionaries"][name] for name in key[0]),
            ablations=tuple(sorted({o["normalize"] for o in options} - {"none"})) or ("zero",),
            error_term=options[0]["error_term"],
            positions=options[0]["positions"],
            edits=_feature_edits(key, options[0]),
            dla="remainder_dla" in metrics,
            feature_k=max((o.get("k") or 3 for o, c in zip(options, group, strict=True)
                           if c.metric == "feature_ablation"), default=None),
        )

    def extra_rows(self, check: Check) -> dict[str, list[dict[str, Any]]]:
        """Prompt-level and feature-level rows of a task check, for `per_prompt.csv` and
        `features.csv`: the logit differences with `logit_diff_recovered`, the DLA terms
        with `remainder_dla`, the feature table with `feature_ablation`."""
        per_prompt, features = self._task_rows.get(_request_key(check), ([], []))
        wanted = {"logit_diff_recovered": "ld_", "remainder_dla": "dla_"}.get(check.metric)
        base = {"suite": self.suite.name, "check_id": check.id,
                "dictionary": "+".join(check.dictionaries), "task": check.task or ""}
        out: dict[str, list[dict[str, Any]]] = {}
        if wanted:
            out["per_prompt.csv"] = [
                {**base, **{k: v for k, v in row.items()
                            if not isinstance(v, float) or k.startswith(wanted)}}
                for row in per_prompt]
        if check.metric == "feature_ablation":
            out["features.csv"] = [{**base, **row} for row in features]
        return out

    def _request(self, index: int, key: tuple, group: list[Check],
                 objs: dict) -> engine.Request:
        dictionaries = tuple(objs["dictionaries"][name] for name in key[0])
        metrics = [get_metric(c.metric) for c in group]
        options = [_options(c) for c in group]
        positions = options[0]["positions"]
        edits = _feature_edits(key, options[0])
        return engine.Request(
            key=f"{index}:" + "+".join(key[0]),
            dictionaries=dictionaries,
            downstream=any(m.kind == "downstream" for m in metrics),
            reconstruction=len(dictionaries) == 1
            and any(m.kind == "reconstruction" for m in metrics),
            ablations=tuple(sorted({o["ablation"] for o in options})),
            error_term=options[0]["error_term"],
            positions=None if positions == "all" else positions,
            edits=edits,
            **_pathological(group, options, self._seed(group[0])),
        )

    def result(self, check: Check) -> dict[str, Any]:
        """The result row of `check` (computing its request if needed)."""
        started = time.time()
        self.compute([check])
        objs = self.objects()
        opts = _options(check)
        metric = get_metric(check.metric)
        summary = summarize(metric, self._terms[_request_key(check)], _metric_options(check),
                            n_boot=opts["n_boot"], seed=self._seed(check))
        verdict, message = judge(check, summary.value, summary.ci_low, summary.ci_high,
                                 summary.n, summary.verdict, summary.reason)
        hooks = ",".join(dict.fromkeys(objs["dictionaries"][n].write_hook
                                       for n in check.dictionaries))
        return {
            "suite": self.suite.name, "check_id": check.id,
            "model": self.suite.model.name or self.suite.model.path or self.suite.model.kind,
            "dictionary": "+".join(check.dictionaries), "hook": hooks,
            "metric": check.metric, "task": check.task or "",
            "options": json.dumps({k: _jsonable(v) for k, v in check.options}, sort_keys=True),
            "value": summary.value, "ci_low": summary.ci_low, "ci_high": summary.ci_high,
            "n": summary.n, "threshold": str(check.threshold or ""), "verdict": verdict,
            "message": message, **objs["provenance"], "seed": self._seed(check),
            "parts": json.dumps(summary.parts, sort_keys=True),
            "higher_is_better": metric.higher_is_better,
            "started_at": started, "duration_s": round(time.time() - started, 4),
        }


def _pathological(group: list[Check], options: list[dict[str, Any]], seed: int) -> dict:
    """The engine request fields for the `pathological_error` checks of a group."""
    wanted = [o for c, o in zip(group, options, strict=True) if c.metric == "pathological_error"]
    if not wanted:
        return {}
    return {"pathological_draws": max(o.get("n_draws") or DEFAULT_DRAWS for o in wanted),
            "pathological_seed": seed,
            "pathological_baselines": tuple(sorted({o["baseline"] for o in wanted}))}


def _feature_edits(key: tuple, options: dict[str, Any]) -> tuple[FeatureEdit, ...]:
    return tuple(FeatureEdit(e.dictionary or key[0][0], e.features, e.value)
                 for e in options["edits"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    return value


def judge(check: Check, value: float, ci_low: float, ci_high: float, n: int,
          stat_verdict: str, reason: str) -> tuple[str, str]:
    """(verdict, message) of a check: pass/fail against its threshold, or `unstable`/`error`
    when the statistic itself is not usable; `expect: fail` turns them into xfail/xpass."""
    interval = ("no interval" if math.isnan(ci_low) and math.isnan(ci_high)
                else f"[{_fmt(ci_low)}, {_fmt(ci_high)}]")
    shown = f"{check.metric} = {_fmt(value)} {interval} (n={n})"
    if stat_verdict == "unstable":
        verdict, message = "unstable", f"{shown} is unstable: {reason}"
    elif stat_verdict != "ok":
        verdict, message = "error", f"{check.metric} could not be computed ({stat_verdict}): " \
                                    f"{reason}"
    elif check.threshold is None:
        verdict, message = "pass", f"{shown} (no threshold)"
    elif check.threshold.passes({"value": value, "ci_low": ci_low, "ci_high": ci_high}):
        verdict, message = "pass", f"{shown} meets {check.threshold}"
    else:
        verdict, message = "fail", f"{shown} fails {check.threshold}"
    if check.expect == "fail" and verdict != "error":
        verdict = "xpass" if verdict == "pass" else "xfail"
    return verdict, message


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"

