"""The Python API: `saebench.evaluate(model, dictionaries, tokens, metrics=[...])`.

    >>> from saebench import evaluate, loading
    >>> model = loading.load_zoo_model()
    >>> saes = {n: loading.load_zoo_dictionary(n) for n in ["resid-L1-topk16", "resid-L2-topk16"]}
    >>> tokens = loading.load_heldout_tokens()[:64]
    >>> df = evaluate(model, saes, tokens, metrics=["ce_loss_recovered", "l0"])
    >>> df[["dictionary", "metric", "value", "ci_low", "ci_high", "verdict"]]

One row per (dictionary, metric, options), with the columns of a suite's result row
(`saebench.results.RESULT_COLUMNS`): the value, its 95% bootstrap interval over sequences,
n, a verdict (`measured`: no threshold is judged here; or the statistic's `unstable`,
`nan`, `empty`) with its reason in `message`, the raw parts of ratios, the dictionary's identity and
provenance (library versions, device, dtype, token-set hash, seed), plus `error_term`.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from transformer_lens import HookedTransformer

from saebench import chunks, engine, plan, results
from saebench.identity import entry_identity, model_hash, module_hash, set_identity
from saebench.metrics.registry import METRICS, Metric, Site, get_metric
from saebench.splice import Dictionary, FeatureEdit, as_dictionary
from saebench.stats import summarize
from saebench.suite import check_id

DEFAULT_METRICS = (
    "ce_loss_recovered", "delta_ce", "kl_div", "kl_div_score", "l0", "explained_variance",
    "mse", "cossim", "l2_ratio", "relative_reconstruction_bias", "dead_fraction",
    "dense_fraction",
)


def token_set_hash(tokens: torch.Tensor) -> str:
    """A short sha256 of a token tensor's values (provenance: which tokens were evaluated)."""
    return results.short_hash(tokens.detach().to(torch.int64).cpu().numpy().tobytes())


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


def _option_sets(metric: Metric, given: Mapping[str, Any]) -> list[dict]:
    """The options each row of `metric` is computed with (one row per option set): for each
    of its options, the values `given` (a list or tuple: one row each), else every allowed
    value of an option marked `each`, else its default; validated."""
    choices = {}
    for name, option in metric.options.items():
        if name in given:
            value = given[name]
            choices[name] = list(value) if isinstance(value, list | tuple) else [value]
        elif option.each:
            choices[name] = list(option.choices)
    sets = [dict(zip(choices, values, strict=True))
            for values in itertools.product(*choices.values())]
    for opts in sets:
        for name, option in metric.options.items():
            option.value(opts, name)
    return sets


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
    n_draws: int | None = None,
    stack: bool | None = None,
    options: Mapping[str, Any] | None = None,
    read: Any = None,
    max_memory: int | str | None = None,
    chunk_positions: int | None = None,
) -> pd.DataFrame:
    """Evaluate dictionaries spliced into `model` on `tokens` [n_sequences, seq_len].

    `dictionaries`: one dictionary, a list, or a mapping name -> dictionary or list of
    dictionaries spliced together. Each dictionary is a sae_lens SAE/transcoder or anything
    `saebench.splice.as_dictionary` adapts. `exclude_special_tokens`: True takes BOS/EOS/PAD
    from the tokenizer (as sae_lens does), False excludes nothing, a list gives the ids.
    `options`: metric options by name (`{"k": 5, "dense_threshold": 0.05}`), each applied to
    the metrics that take it; a list gives one row per value, as `ablation` does; an option
    left out takes its default, or one row per value for those that report every value
    (pathological_error's `baseline`). `n_draws` is the option of that name. `read`: the
    dictionaries (same forms as `dictionaries`) that metrics reading a dictionary without
    splicing it (feature_fidelity) read, one row each.
    `seed` seeds the bootstrap and the random draws of `pathological_error`.
    `stack`: dictionaries sharing a write hook (a sweep) are spliced in one pass stacked
    along the batch where memory allows (values then agree to float rounding, ~1e-7); by
    default on CUDA only (on a CPU it pays off only for small batches:
    benchmarks/sweep_stacking.py).
    `max_memory` (bytes, or a size such as "512MiB", "2GB"; default 1 GiB) bounds the
    logits-sized tensors of one chunk of positions sent through the unembedding, and
    `chunk_positions` sets the positions per chunk instead (`saebench.chunks`); results
    agree to float rounding whatever the chunk.
    Returns a DataFrame of result rows.
    """
    max_memory = chunks.parse_size(max_memory)  # bad sizes are refused before any work
    chunks.check_positions(chunk_positions)
    metric_objs = [get_metric(m) for m in metrics]
    task_metrics = [m.name for m in metric_objs if m.kind == "task"]
    if task_metrics:
        raise ValueError(f"{', '.join(task_metrics)} are measured on a task's prompts, not on "
                         "token data: use saebench.tasks.run_task(model, prompts, requests) "
                         "(or a suite check with task:)")
    unknown = set(options or {}) - {k for m in METRICS.values() for k in m.options}
    if unknown:
        raise ValueError(f"no metric takes the option(s) {', '.join(sorted(unknown))}")
    given = {"ablation": ablation, **({} if n_draws is None else {"n_draws": n_draws}),
             **(options or {})}
    rows_of = {m.name: _option_sets(m, given) for m in metric_objs}
    sets = _as_sets(dictionaries)
    reads = _as_sets(read) if read is not None else {}
    readers = [m.name for m in metric_objs if m.reads]
    if readers and not reads:
        raise ValueError(f"{', '.join(readers)} read a dictionary they do not splice: pass "
                         "read={name: dictionary}")
    device = engine.resolve_device(device)
    torch_dtype = engine.resolve_dtype(dtype)
    model = model.to(device) if torch_dtype is None else model.to(device).to(torch_dtype)
    for group in (*sets.values(), *reads.values()):
        for d in group:
            if hasattr(d.module, "to"):
                d.module.to(device)
    common = plan.Common(positions=positions, error_term=error_term, edits=tuple(edits),
                         seed=seed)
    requests, wanted = [], {}
    for name, group in sets.items():
        for read_name in (None, *reads):
            site = Site(group, reads[read_name] if read_name else (), model)
            runs: list[tuple[dict, list]] = []  # (run-shaping option values, wants)
            for m in metric_objs:
                if m.reads != bool(read_name) or not _measurable(m, group, name):
                    continue
                for o in rows_of[m.name]:
                    shaping = {k: o.get(k) for k in m.run_options if k != "seed"}
                    run = next((r for r in runs if all(r[0].get(k, v) == v
                                                       for k, v in shaping.items())), None)
                    if run is None:
                        runs.append(run := ({}, []))
                    run[0].update(shaping)
                    run[1].append((m, o, read_name))
            for i, (_, wants) in enumerate(runs):
                key = (name if read_name is None else f"{name}->{read_name}") + f"#{i}" * bool(i)
                requests.append(plan.token_request(key, group, [(m, o) for m, o, _ in wants],
                                                   site, common))
                wanted[key] = (name, wants)
    engine_options = engine.EngineOptions(
        batch_size=batch_size, device=device, dtype=torch_dtype,
        exclude_special_tokens=bool(exclude_special_tokens),
        special_token_ids=_special_ids(exclude_special_tokens), progress=progress,
        stack_bytes=_stack_bytes(stack, device), max_memory=max_memory,
        chunk_positions=chunk_positions)
    terms = engine.run(model, tokens, requests, engine_options) if requests else {}
    base = {**provenance(model, tokens, seed), "model_hash": model_hash(model)}
    rows = []
    for request in requests:
        name, wants = wanted[request.key]
        identity = _identity(request.dictionaries)
        for metric, opts, read_name in wants:
            missing = set(metric.terms(opts)) - set(terms[request.key])
            if missing:
                warnings.warn(f"{name}: {metric.name} skipped: the dictionary exposes no "
                              f"feature activations ({', '.join(sorted(missing))})",
                              stacklevel=2)
                continue
            summary = summarize(metric, terms[request.key], opts, n_boot=n_boot, seed=seed)
            rows.append(results.row(
                check_id=check_id((name,), metric.name, None, opts, read_name),
                dictionary=name, metric=metric.name,
                options=json.dumps({**opts, **({"read": read_name} if read_name else {})},
                                   sort_keys=True),
                value=summary.value, ci_low=summary.ci_low, ci_high=summary.ci_high,
                n=summary.n, verdict=_verdict(summary.verdict), message=summary.reason,
                higher_is_better=metric.higher_is_better,
                parts=json.dumps(summary.parts, sort_keys=True), **identity, **base))
    frame = pd.DataFrame(rows, columns=results.RESULT_COLUMNS)
    frame["error_term"] = error_term
    return frame


def _verdict(statistic: str) -> str:
    """A row's verdict from its statistic's (`saebench.stats`): a usable value with no
    threshold to judge it is `measured`; `unstable`, `nan` and `empty` stay as they are."""
    return "measured" if statistic == "ok" else statistic


def _measurable(metric: Metric, group: tuple[Dictionary, ...], name: str) -> bool:
    """Whether `metric` applies to the spliced set `group`: a metric of one dictionary's
    reconstruction is left out on a set silently, another one-hook metric with a warning."""
    if not metric.one_hook or (len(group) == 1 and group[0].single):
        return True
    if metric.kind != "reconstruction":
        warnings.warn(f"{name}: {metric.name} skipped: it needs a single dictionary reading "
                      "one hook and writing one", stacklevel=3)
    return False


def _identity(group: tuple[Dictionary, ...]) -> dict[str, Any]:
    """The identity columns of a spliced set, joined with `+`: what the objects tell (an
    object passed in has no source file, so `source` stays empty; its weights' hash is
    that of its tensors, empty for a plain callable, which leaves `identity` empty too)."""
    def joined(values) -> str:
        return "+".join(str(v) for v in values)

    weights = [module_hash(d.module) for d in group]
    return {"weights_sha256": joined(weights),
            "identity": set_identity([entry_identity({"format": d.kind, "weights": w})
                                      if w else {} for d, w in zip(group, weights,
                                                                    strict=True)]),
            "hook": joined(dict.fromkeys(h for d in group for h in d.write_hooks)),
            "architecture": joined(d.architecture for d in group),
            "d_in": group[0].d_in if len(group) == 1 else None,
            "d_sae": group[0].d_sae if len(group) == 1 else None,
            "read_hook": joined(",".join(d.read_hooks) for d in group),
            "write_hook": joined(",".join(d.write_hooks) for d in group)}
