"""The Python API: `saebench.evaluate(model, dictionaries, tokens, metrics=[...])`.

    >>> from saebench import evaluate, loading
    >>> model = loading.load_zoo_model()
    >>> saes = {n: loading.load_zoo_dictionary(n) for n in ["resid-L1-topk16", "resid-L2-topk16"]}
    >>> tokens = loading.load_heldout_tokens()[:64]
    >>> df = evaluate(model, saes, tokens, metrics=["ce_loss_recovered", "l0"])
    >>> df[["dictionary", "metric", "value", "ci_low", "ci_high", "verdict"]]

One row per (dictionary, metric, options), with the columns of a suite's result row
(`saebench.results.RESULT_COLUMNS`): the value, its 95% bootstrap interval over sequences,
n, a verdict of the statistic (`ok`, `unstable`, `nan`, `empty`; no threshold is judged
here) with its reason in `message`, the raw parts of ratios, the dictionary's identity and
provenance (library versions, device, dtype, token-set hash, seed), plus `error_term`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from saebench import engine, results
from saebench.metrics import pathological as patho
from saebench.metrics.registry import LAYER_TERMS, Metric, get_metric
from saebench.splice import Dictionary, FeatureEdit, as_dictionary
from saebench.stats import summarize
from saebench.suite import check_id

DEFAULT_METRICS = (
    "ce_loss_recovered", "delta_ce", "kl_div", "kl_div_score", "l0", "explained_variance",
    "mse", "cossim", "l2_ratio", "relative_reconstruction_bias", "dead_fraction",
    "dense_fraction",
)
ABLATION_METRICS = ("ce_loss_recovered", "kl_div_score")


def token_set_hash(tokens: torch.Tensor) -> str:
    """A short sha256 of a token tensor's values (provenance: which tokens were evaluated)."""
    return results.short_hash(tokens.detach().to(torch.int64).cpu().numpy().tobytes())


def model_hash(model: HookedTransformer) -> str:
    """A short hash of the model's configuration (which model a row measured)."""
    return results.short_hash(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str))


def provenance(model: HookedTransformer, tokens: torch.Tensor, seed: int) -> dict[str, Any]:
    """The provenance columns (`saebench.results.provenance`) of an evaluation."""
    param = next(model.parameters())
    return results.provenance(str(param.device), str(param.dtype).removeprefix("torch."),
                              token_set_hash(tokens), seed)


def _as_sets(dictionaries: Any) -> dict[str, tuple[Dictionary, ...]]:
    """Normalise the accepted forms to {name: tuple of Dictionary spliced together}."""
    if isinstance(dictionaries, Mapping):
        items = dictionaries.items()
    else:
        seq = dictionaries if isinstance(dictionaries, Sequence) else [dictionaries]
        items = [(None, d) for d in seq]
    sets: dict[str, tuple[Dictionary, ...]] = {}
    for name, entry in items:
        members = entry if isinstance(entry, list | tuple) else [entry]
        group = tuple(m if isinstance(m, Dictionary) else
                      as_dictionary(m, name=name if len(members) == 1 else None) for m in members)
        key = name or "+".join(d.name for d in group)
        if key in sets:
            raise ValueError(f"two dictionaries are named {key!r}; pass a mapping of names")
        sets[key] = group
    return sets


def _option_sets(metric: Metric, ablations: tuple[str, ...], n_draws: int) -> list[dict]:
    """The options each row of `metric` is computed with (one row per option set)."""
    if metric.name in ABLATION_METRICS:
        return [{"ablation": kind} for kind in ablations]
    if metric.name == patho.NAME:
        return [{"baseline": kind, "n_draws": n_draws} for kind in patho.BASELINE_TERMS]
    return [{}]


def _special_ids(exclude: bool | Sequence[int]) -> list[int] | None:
    """Explicit token ids to exclude, or None to take them from the model's tokenizer."""
    if isinstance(exclude, bool):
        return None if exclude else []
    return [int(t) for t in exclude]


def _stack_bytes(stack: bool | None, device: torch.device) -> int:
    """The engine's stacking budget for `evaluate(stack=...)`: None stacks on CUDA only."""
    wanted = device.type == "cuda" if stack is None else stack
    return engine.EngineOptions.stack_bytes if wanted else 0


def evaluate(
    model: HookedTransformer,
    dictionaries: Any,
    tokens: torch.Tensor,
    metrics: Iterable[str] = DEFAULT_METRICS,
    *,
    ablation: str | Sequence[str] = "zero",
    error_term: bool = False,
    positions: int | Sequence[int] | None = None,
    edits: Sequence[FeatureEdit] = (),
    batch_size: int = 16,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    exclude_special_tokens: bool | Sequence[int] = True,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    n_draws: int = patho.DEFAULT_DRAWS,
    stack: bool | None = None,
) -> pd.DataFrame:
    """Evaluate dictionaries spliced into `model` on `tokens` [n_sequences, seq_len].

    `dictionaries`: one dictionary, a list, or a mapping name -> dictionary or list of
    dictionaries spliced together. Each dictionary is a sae_lens SAE/transcoder or anything
    `saebench.splice.as_dictionary` adapts. `exclude_special_tokens`: True takes BOS/EOS/PAD
    from the tokenizer (as sae_lens does), False excludes nothing, a list gives the ids.
    `seed` seeds the bootstrap and the random draws of `pathological_error` (`n_draws` per
    baseline; one row per baseline, isotropic and covariance; single dictionaries only).
    `stack`: dictionaries sharing a write hook (a sweep) are spliced in one pass stacked
    along the batch where memory allows (values then agree to float rounding, ~1e-7); by
    default on CUDA only (on a CPU it pays off only for small batches:
    benchmarks/sweep_stacking.py).
    Returns a DataFrame of result rows.
    """
    metric_objs = [get_metric(m) for m in metrics]
    task_metrics = [m.name for m in metric_objs if m.kind == "task"]
    if task_metrics:
        raise ValueError(f"{', '.join(task_metrics)} are measured on a task's prompts, not on "
                         "token data: use saebench.tasks.run_task(model, prompts, requests) "
                         "(or a suite check with task:)")
    kinds = (ablation,) if isinstance(ablation, str) else tuple(ablation)
    sets = _as_sets(dictionaries)
    device = engine.resolve_device(device)
    torch_dtype = engine.resolve_dtype(dtype)
    model = model.to(device) if torch_dtype is None else model.to(device).to(torch_dtype)
    for group in sets.values():
        for d in group:
            if hasattr(d.module, "to"):
                d.module.to(device)
    downstream = any(m.kind == "downstream" for m in metric_objs)
    pathological = any(m.name == patho.NAME for m in metric_objs)
    if pathological:
        patho.n_draws({"n_draws": n_draws})
    requests = [
        engine.Request(
            key=name, dictionaries=group, downstream=downstream,
            reconstruction=len(group) == 1 and group[0].single
            and any(m.kind == "reconstruction" for m in metric_objs),
            layers=any(set(LAYER_TERMS) <= set(m.terms({})) for m in metric_objs),
            ablations=kinds, error_term=error_term, positions=positions, edits=tuple(edits),
            pathological_draws=n_draws if pathological and len(group) == 1 else 0,
            pathological_seed=seed,
        )
        for name, group in sets.items()
    ]
    options = engine.EngineOptions(batch_size=batch_size, device=device, dtype=torch_dtype,
                                   exclude_special_tokens=bool(exclude_special_tokens),
                                   special_token_ids=_special_ids(exclude_special_tokens),
                                   progress=progress,
                                   stack_bytes=_stack_bytes(stack, device))
    terms = engine.run(model, tokens, requests, options)
    base = {**provenance(model, tokens, seed), "model_hash": model_hash(model),
            "error_term": error_term}
    rows = []
    for request in requests:
        identity = _identity(request.dictionaries)
        for metric in metric_objs:
            if metric.kind == "reconstruction" and not request.reconstruction:
                continue
            missing = set(metric.terms({})) - set(terms[request.key])
            if missing:
                why = ("it needs a single dictionary" if metric.name == patho.NAME
                       else "the dictionary exposes no feature activations")
                warnings.warn(f"{request.key}: {metric.name} skipped: {why} "
                              f"({', '.join(sorted(missing))})", stacklevel=2)
                continue
            for opts in _option_sets(metric, kinds, n_draws):
                summary = summarize(metric, terms[request.key], opts, n_boot=n_boot, seed=seed)
                rows.append(results.row(
                    check_id=check_id((request.key,), metric.name, None, opts),
                    dictionary=request.key, metric=metric.name,
                    options=json.dumps(opts, sort_keys=True),
                    value=summary.value, ci_low=summary.ci_low, ci_high=summary.ci_high,
                    n=summary.n, verdict=summary.verdict, message=summary.reason,
                    higher_is_better=metric.higher_is_better,
                    parts=json.dumps(summary.parts, sort_keys=True), **identity,
                    **{k: v for k, v in base.items() if k != "error_term"}))
    frame = pd.DataFrame(rows, columns=results.RESULT_COLUMNS)
    frame["error_term"] = error_term
    return frame


def _identity(group: tuple[Dictionary, ...]) -> dict[str, Any]:
    """The identity columns of a spliced set, joined with `+`: what the objects tell (an
    object passed in has no source file, so `source` and `weights_sha256` stay empty)."""
    def joined(values) -> str:
        return "+".join(str(v) for v in values)

    return {"hook": joined(dict.fromkeys(h for d in group for h in d.write_hooks)),
            "architecture": joined(d.architecture for d in group),
            "d_in": group[0].d_in if len(group) == 1 else None,
            "d_sae": group[0].d_sae if len(group) == 1 else None,
            "read_hook": joined(",".join(d.read_hooks) for d in group),
            "write_hook": joined(",".join(d.write_hooks) for d in group)}
