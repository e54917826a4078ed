"""Selected checks -> engine requests, from what each metric declares it needs.

One planner for the pytest path (`saebench.checks`) and `saebench.evaluate`: a request
is built from the merged `Needs` of the metrics sharing it (`Metric.needs_of`), never from
metric names, so a metric family registered in one module (its terms, options, needs,
probes and side tables) runs without touching any other.

    >>> wants = [(get_metric("ce_loss_recovered"), {"ablation": "mean"}),
    ...          (get_metric("l0"), {})]
    >>> request = token_request("r", (sae,), wants, Site((sae,)))
    >>> request.downstream, request.reconstruction, request.ablations
    (True, True, ('mean',))
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from saebench import engine, tasks
from saebench.metrics.registry import Metric, Needs, Site
from saebench.splice import Dictionary, FeatureEdit

Want = tuple[Metric, Mapping[str, Any]]
"""A metric and the options of one check (or one `evaluate` row) on it."""


@dataclass(frozen=True)
class Common:
    """The options every check takes that shape its passes: where it splices, whether the
    error term is added back, feature edits, the seed of its random draws, and whether its
    terms are also wanted per bucket of token positions (`by: position`)."""

    positions: Any = "all"
    error_term: bool = False
    edits: tuple[FeatureEdit, ...] = ()
    seed: int = 0
    by_position: bool = False


def needs(wants: Iterable[Want], site: Site) -> Needs:
    """Everything the `wants` need from one run on `site`, merged."""
    return functools.reduce(Needs.merge, (m.needs_of(o, site) for m, o in wants), Needs())


def token_request(key: str, dictionaries: tuple[Dictionary, ...], wants: Sequence[Want],
                  site: Site, common: Common = Common()) -> engine.Request:
    """The engine request measuring every want on the token data."""
    need = needs(wants, site)
    return engine.Request(
        key=key, dictionaries=dictionaries,
        downstream=need.spliced or need.layers or bool(need.noise_draws),
        reconstruction=need.reconstruction,
        layers=need.layers,
        ablations=tuple(sorted(need.ablations)),
        error_term=common.error_term,
        positions=None if common.positions == "all" else common.positions,
        edits=common.edits,
        noise_draws=need.noise_draws, noise_seed=common.seed,
        noise_baselines=tuple(sorted(need.noise_baselines)),
        probes=need.probes, by_position=common.by_position)


def random_request(key: str, dictionaries: tuple[Dictionary, ...], wants: Sequence[Want],
                   site: Site, common: Common = Common()) -> engine.Request:
    """The spliced run of random-weight `dictionaries` standing in for the real ones of
    `wants`: the spliced pass and its ablations only (`random_baseline`)."""
    need = needs(wants, site)
    return engine.Request(
        key=key, dictionaries=dictionaries, reconstruction=False,
        ablations=tuple(sorted(need.ablations)), error_term=common.error_term,
        positions=None if common.positions == "all" else common.positions,
        edits=common.edits, by_position=common.by_position)


def task_request(key: str, dictionaries: tuple[Dictionary, ...], wants: Sequence[Want],
                 site: Site, common: Common = Common()) -> tasks.TaskRequest:
    """The task request measuring every want on a task's prompts."""
    need = needs(wants, site)
    return tasks.TaskRequest(
        key=key, dictionaries=dictionaries,
        ablations=tuple(sorted(need.ablations)) or ("zero",),
        error_term=common.error_term, positions=common.positions, edits=common.edits,
        dla=need.dla, feature_k=need.feature_k)
