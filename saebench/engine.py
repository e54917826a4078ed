"""Run a model over token batches once and produce per-sequence metric terms for each variant.

Per batch: one clean pass caching only the hooks the requests need; one ablation pass per
(set of write hooks, ablation kind), shared by every request at those hooks; one spliced
pass per request. Ablation and spliced passes start at the first hook's layer from the
cached residual stream (`start_at_layer`), and a run that needs no logits stops early
(`stop_at_layer`). Ablating a whole residual stream at every position makes everything
after it independent of the tokens, so that pass is run once for one row and reused.

No pass materialises logits for the whole batch: every pass stops at the final residual
stream (`stop_at_layer=n_layers`, then the final norm), which is cheap to keep, and the
batch's clean and variant residuals then go through the unembedding together, a chunk of
positions at a time (`saebench.chunks`: `EngineOptions.max_memory` or `chunk_positions`):
the clean chunk's log-probs are computed once for all variants, and each variant's
per-token CE, KL and top-1 agreement against them (`_Unembedding`). Logits are upcast to
float32 at least before `log_softmax`, and every sum over positions is float64.

A request with `noise_draws > 0` also gets, per random baseline and draw, one pass
with the write-hook activation moved by a random ε of the spliced error's norm at each
spliced position (`pathological_error`, Gurnee 2024); the covariance-aware baseline needs
the activation's covariance, one float64 pre-pass over the tokens shared with the mean
activations of mean ablation. Draws come from one generator per sequence, seeded from
(`noise_seed`, the sequence's index in `tokens`): the same tokens and seed give the
same draws whatever the batch size (on one device type: CPU and CUDA streams differ).

The output is, per request, a dict of per-sequence sums (the term contract of
`saebench.metrics.registry`); `saebench.stats` turns them into values and intervals.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import operator
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from saebench import chunks
from saebench.metrics import tokens as tok_metrics
from saebench.metrics.registry import HEALTH_TERMS, NOISE_TERMS, BatchView, Probe
from saebench.splice import (
    Dictionary,
    FeatureEdit,
    ablation_hooks,
    hook_layer,
    position_mask,
    reached_positions,
    splice_hooks,
)

RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post")
ABLATIONS = ("zero", "mean")
FINAL_NORM = "ln_final."
"""The prefix of the hooks of the final norm: they fire after the blocks, in `final_norm`."""


@dataclass(frozen=True)
class Request:
    """One variant to measure: a dictionary, or a set spliced together, and its options.

    `downstream` asks for the clean/spliced/ablated CE and KL terms; `reconstruction` for
    the activation-level terms (L0, errors, norms, feature counts) of a single dictionary.
    `noise_draws` > 0 (single dictionary, downstream) adds, per baseline in
    `noise_baselines`, the term `kl_eps_iso` / `kl_eps_cov`: KL(clean ‖ clean + ε)
    summed over the KL positions and averaged over that many random draws of ε seeded by
    `noise_seed` (see `saebench.metrics.pathological`). `probes` are metrics' own
    computations (`saebench.metrics.registry.Probe`), told every batch; those reading the
    spliced pass's activations need `downstream=True`. `by_position` adds every spliced,
    ablation, layer and reconstruction term once more per bucket of token positions
    (`position_buckets`), named `@<first>-<last>:<term>`.
    """

    key: str
    dictionaries: tuple[Dictionary, ...]
    downstream: bool = True
    reconstruction: bool = True
    ablations: tuple[str, ...] = ("zero",)
    error_term: bool = False
    positions: int | Sequence[int] | None = None
    edits: tuple[FeatureEdit, ...] = ()
    noise_draws: int = 0
    noise_seed: int = 0
    noise_baselines: tuple[str, ...] = tuple(NOISE_TERMS)
    layers: bool = False
    probes: tuple[Probe, ...] = ()
    by_position: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.ablations) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"{self.key}: unknown ablation kind(s) {sorted(unknown)}; "
                             f"choose from {', '.join(ABLATIONS)}")
        if self.reconstruction and not self.single:
            raise ValueError(f"{self.key}: reconstruction metrics need exactly one dictionary "
                             "reading and writing one hook")
        if self.layers and not self.downstream:
            raise ValueError(f"{self.key}: per-layer errors need downstream=True")
        if any(p.spliced_hooks for p in self.probes) and not self.downstream:
            raise ValueError(f"{self.key}: a probe reading the spliced pass needs "
                             "downstream=True")
        self._check_pathological()

    def _check_pathological(self) -> None:
        draws = self.noise_draws
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 0:
            raise ValueError(f"{self.key}: noise_draws must be an integer >= 0 "
                             f"(0 = off), got {draws!r}")
        unknown = set(self.noise_baselines) - set(NOISE_TERMS)
        if unknown:
            raise ValueError(f"{self.key}: unknown noise baseline(s) {sorted(unknown)}; "
                             f"choose from {', '.join(NOISE_TERMS)}")
        if draws and (not self.single or not self.downstream):
            raise ValueError(f"{self.key}: random-noise passes need exactly one dictionary "
                             "writing one hook, and downstream=True")

    @property
    def single(self) -> bool:
        """Whether the request splices one dictionary that reads one hook and writes one."""
        return len(self.dictionaries) == 1 and self.dictionaries[0].single

    @property
    def write_hooks(self) -> tuple[str, ...]:
        """Every hook the request writes, once each, in the order of its dictionaries."""
        return tuple(dict.fromkeys(h for d in self.dictionaries for h in d.write_hooks))

    @property
    def start_layer(self) -> int | None:
        """The layer a spliced pass can start at; None when a hook sits before the blocks."""
        return _start_layer(h for d in self.dictionaries for h in d.hooks)


@dataclass
class RunMemo:
    """What engine runs over the same tokens share, so that runs done one dictionary at a
    time (the plugin's streaming) compute it once: activation means and covariances by
    ("mean" | "cov", hook), and, when `hooks` is given, every batch's clean pass (the
    activations at `hooks` and the final-normed residual), held in memory. A run whose
    hooks are not all among `hooks` makes its own clean pass. Size it with
    `clean_pass_bytes`."""

    hooks: frozenset[str] = frozenset()
    moments: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    passes: dict[tuple, tuple] = field(default_factory=dict)


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """Buckets of token positions, [first, last] inclusive, doubling in width (0, 1, 2-3,
    4-7, ...) as Gemma Scope reports delta loss by position; the last one ends the sequence.

        >>> position_buckets(10)
        [(0, 0), (1, 1), (2, 3), (4, 7), (8, 9)]
    """
    buckets, start = [], 0
    while start < seq_len:
        end = min(2 * start - 1 if start else 0, seq_len - 1)
        buckets.append((start, end))
        start = end + 1
    return buckets


def bucket_prefix(bucket: tuple[int, int]) -> str:
    """The prefix of a bucket's terms: `@4-7:`."""
    return f"@{bucket[0]}-{bucket[1]}:"


def _prefixed(prefix: str, terms: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in terms.items()}


def clean_pass_bytes(model: HookedTransformer, n_tokens: int, widths: Iterable[int]) -> int:
    """Memory that `RunMemo` needs to keep the clean passes of `n_tokens` tokens with hooks
    of these widths: activations and the final-normed residual, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    act = torch.finfo(dtype).bits // 8
    return n_tokens * (sum(widths) + model.cfg.d_model) * act


def _start_layer(hooks: Iterable[str]) -> int | None:
    hooks = list(hooks)
    if any(not h.startswith("blocks.") for h in hooks):
        return None
    return min(hook_layer(h) for h in hooks)


def _suffix_pass(model, cache, batch, layer: int | None, fwd_hooks, rows: int | None = None):
    """The final-normed residual [rows, t, d_model] of a pass with `fwd_hooks`, started at
    `layer` from the cached residual (from the tokens when `layer` is None), over the first
    `rows` rows (all by default); `unembed` turns it into logits."""
    inputs = batch if layer is None else cache[f"blocks.{layer}.hook_resid_pre"]
    resid = model.run_with_hooks(inputs[:rows], start_at_layer=layer,
                                 stop_at_layer=model.cfg.n_layers, fwd_hooks=fwd_hooks)
    return final_norm(model, resid, fwd_hooks)


def final_norm(model: HookedTransformer, resid: Tensor, fwd_hooks: Sequence = ()) -> Tensor:
    """The final residual stream [..., d_model] through the model's final norm (`ln_final`;
    none without one): what the unembedding reads.

    Passes stop after the last block (`stop_at_layer`) so that no logits are made for a
    whole batch; the hooks of `fwd_hooks` at `ln_final.*` fire here instead, so that a
    dictionary spliced there, or an activation cached there (the final-LN scale), still
    sees the norm.
    """
    if model.cfg.normalization_type is None:
        return resid
    post = [(name, fn) for name, fn in fwd_hooks
            if isinstance(name, str) and name.startswith(FINAL_NORM)]
    if not post:
        return model.ln_final(resid)
    with model.hooks(fwd_hooks=post):
        return model.ln_final(resid)


def unembed(model: HookedTransformer, x: Tensor) -> Tensor:
    """Logits [..., d_vocab] of final-normed residuals `x` [..., d_model], upcast to float32
    at least, then soft-capped where the model caps its logits (Gemma 2).

    The matmul runs in the model's dtype, as the model's own unembedding does, but without
    the transposed copy of W_U (vocabulary-sized) that `model.unembed` makes on each call.
    """
    w_u = model.W_U
    logits = F.linear(x.to(device=w_u.device, dtype=w_u.dtype), w_u.T, model.b_U)
    return soft_cap_(model, logits.to(torch.promote_types(logits.dtype, torch.float32)))


def soft_cap_(model: HookedTransformer, logits: Tensor) -> Tensor:
    """`logits` soft-capped in place, cap · tanh(logits / cap), where the model caps its
    output logits (`output_logits_soft_cap` > 0, Gemma 2); unchanged otherwise."""
    cap = model.cfg.output_logits_soft_cap
    if cap is not None and cap > 0:
        logits = logits.div_(cap).tanh_().mul_(cap)
    return logits


def _log_probs(model: HookedTransformer, x: Tensor) -> Tensor:
    """Log-probs [n, d_vocab] (float32 at least) of final-normed residuals `x` [n, d_model];
    the logits are dropped on return, so one chunk holds at most two such tensors here."""
    return tok_metrics.log_probs(unembed(model, x))


@dataclass
class EngineOptions:
    """How the engine runs: batch size, device and dtype, special tokens, progress bar;
    `on_batch(done, total)` is called after each batch with the sequences done so far and
    the total (None for an iterable of batches). Dictionaries sharing a write hook are
    spliced in one suffix pass stacked along the batch, up to `stack_bytes` of the stacked
    pass's widest activation (0: one pass each; stacking can change results in the last
    bits).

    Logits go through the unembedding a chunk of positions at a time (`saebench.chunks`):
    `max_memory` is the bytes one chunk's logits-sized tensors may take, all together
    (None: `chunks.DEFAULT_MAX_MEMORY`, 1 GiB; a string such as "512MiB" is parsed), and
    also the most that variants' final residuals may take while they wait for the
    unembedding; `chunk_positions` sets the positions per chunk instead. Neither changes a
    result beyond float rounding.
    """

    batch_size: int = 16
    device: str | torch.device | None = None
    dtype: torch.dtype | str | None = None
    exclude_special_tokens: bool = True
    progress: bool = True
    special_token_ids: Sequence[int] | None = None
    on_batch: Callable[[int, int | None], None] | None = None
    stack_bytes: int = 1 << 30
    max_memory: int | None = None
    chunk_positions: int | None = None

    def __post_init__(self) -> None:
        self.max_memory = chunks.parse_size(self.max_memory)
        chunks.check_positions(self.chunk_positions)

    @property
    def memory_budget(self) -> int:
        """`max_memory` in bytes, the default when None."""
        return self.max_memory or chunks.DEFAULT_MAX_MEMORY

    def positions_per_chunk(self, model: HookedTransformer, bytes_per_value: int = 4,
                            tensors: int = chunks.LIVE_TENSORS) -> int:
        """Positions per chunk of `model`'s logits under these options."""
        return chunks.positions_per_chunk(model.cfg.d_vocab_out, max_memory=self.max_memory,
                                          chunk_positions=self.chunk_positions,
                                          bytes_per_value=bytes_per_value, tensors=tensors)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to use: the one given, else CUDA, then MPS, then CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device(device: torch.device) -> None:
    """Raise ValueError, saying why, when `device` cannot be used on this machine."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device}: CUDA is not available on this machine (torch "
                             f"{torch.__version__})")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {device}: this machine has {count} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device}: saebench runs on cpu, cuda or mps")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a name such as "float32" or "bfloat16" (None keeps the model's)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def special_token_ids(model: HookedTransformer) -> list[int]:
    """BOS/EOS/PAD (and the like) of the model's tokenizer, as sae_lens excludes them."""
    from sae_lens.util import get_special_token_ids

    return sorted(get_special_token_ids(model.tokenizer)) if model.tokenizer is not None else []


def _batches(tokens: torch.Tensor | Iterable[torch.Tensor], batch_size: int):
    if isinstance(tokens, torch.Tensor):
        for start in range(0, len(tokens), batch_size):
            yield tokens[start:start + batch_size]
    else:
        yield from tokens


def _is_whole_residual(hooks: Sequence[str]) -> bool:
    return len(hooks) == 1 and hooks[0].rsplit(".", 1)[-1] in RESIDUAL_HOOKS


@torch.no_grad()
def mean_activations(
    model: HookedTransformer,
    tokens: torch.Tensor | Iterable[torch.Tensor],
    hooks: Sequence[str],
    options: EngineOptions,
) -> dict[str, torch.Tensor]:
    """Mean activation at each hook over the non-special positions of `tokens` (float64)."""
    return _moments(model, tokens, hooks, (), options)[0]


@torch.no_grad()
def activation_covariances(
    model: HookedTransformer,
    tokens: torch.Tensor | Iterable[torch.Tensor],
    hooks: Sequence[str],
    options: EngineOptions,
) -> dict[str, torch.Tensor]:
    """Covariance [d, d] (float64) of each hook's activation over the non-special positions
    of `tokens`; per-head activations ([.., n_heads, d_head]) are flattened to one width."""
    return _moments(model, tokens, (), hooks, options)[1]


def _moments(model, tokens, mean_hooks: Sequence[str], cov_hooks: Sequence[str],
             options: EngineOptions) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Means (model dtype) and covariances (float64) in one streaming float64 pass.

    Covariances accumulate about a shift (the first non-empty batch's mean), so a large
    mean costs no precision.
    """
    hooks = sorted(set(mean_hooks) | set(cov_hooks))
    if not hooks:
        return {}, {}
    device = next(model.parameters()).device
    special = torch.tensor(options.special_token_ids or [], device=device)
    sums: dict[str, Tensor] = {}
    shift: dict[str, Tensor] = {}
    s1: dict[str, Tensor] = {}
    s2: dict[str, Tensor] = {}
    count = 0
    stop = max(hook_layer(h) for h in hooks) + 1
    for batch in _batches(tokens, options.batch_size):
        batch = batch.to(device)
        keep = ~torch.isin(batch, special)
        _, cache = model.run_with_cache(batch, names_filter=hooks,
                                        stop_at_layer=min(stop, model.cfg.n_layers))
        for hook in hooks:
            acts = cache[hook][keep].double()
            if hook in mean_hooks:
                total = acts.sum(0)
                sums[hook] = sums[hook] + total if hook in sums else total
            if hook in cov_hooks and len(acts):
                flat = acts.flatten(1)
                if hook not in shift:
                    shift[hook] = flat.mean(0)
                    s1[hook] = torch.zeros_like(shift[hook])
                    s2[hook] = torch.zeros(len(flat[0]), len(flat[0]), dtype=flat.dtype,
                                           device=device)
                centred = flat - shift[hook]
                s1[hook] += centred.sum(0)
                s2[hook] += centred.T @ centred
        count += int(keep.sum())
    dtype = next(model.parameters()).dtype
    means = {hook: (s / max(count, 1)).to(dtype) for hook, s in sums.items()}
    covs = {hook: (s2[hook] - torch.outer(s1[hook], s1[hook]) / count) / max(count - 1, 1)
            for hook in cov_hooks if hook in s2}
    return means, covs


def _kept_moments(model, tokens, mean_hooks: Sequence[str], cov_hooks: Sequence[str],
                  options: EngineOptions, kept: dict[tuple[str, str], Tensor]
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """`_moments`, computing only those not in `kept` and adding them to it."""
    means, covs = _moments(model, tokens, [h for h in mean_hooks if ("mean", h) not in kept],
                           [h for h in cov_hooks if ("cov", h) not in kept], options)
    kept.update({("mean", h): m for h, m in means.items()})
    kept.update({("cov", h): c for h, c in covs.items()})
    return ({h: kept[("mean", h)] for h in mean_hooks if ("mean", h) in kept},
            {h: kept[("cov", h)] for h in cov_hooks if ("cov", h) in kept})


def covariance_factor(cov: Tensor) -> Tensor:
    """F with F Fᵀ = `cov` (eigendecomposition; negative rounding eigenvalues clipped to 0),
    so `z @ F.T` for z ~ N(0, I) is distributed N(0, cov), also when `cov` is singular."""
    eigvals, eigvecs = torch.linalg.eigh(cov.double())
    return eigvecs * eigvals.clamp_min(0).sqrt()


class _TermLog:
    """Per-sequence terms, appended batch by batch on the device, concatenated at the end."""

    def __init__(self) -> None:
        self._parts: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add(self, **terms: torch.Tensor) -> None:
        for name, value in terms.items():
            self._parts[name].append(value.double())

    def finish(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(parts).cpu() for name, parts in self._parts.items()}


@torch.no_grad()
def run(
    model: HookedTransformer,
    tokens: torch.Tensor | Iterable[torch.Tensor],
    requests: Sequence[Request],
    options: EngineOptions | None = None,
    memo: RunMemo | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Evaluate every request over `tokens` ([n, seq] or an iterable of batches).

    `memo`, when given, holds what earlier runs over the same tokens computed (see
    `RunMemo`): the run reads it and adds what it computes.

    Returns `{request.key: {term: per-sequence tensor}}` (float64, on the CPU).
    """
    options = options or EngineOptions()
    device = next(model.parameters()).device
    if options.special_token_ids is None:
        options.special_token_ids = (special_token_ids(model)
                                     if options.exclude_special_tokens else [])
    special = torch.tensor(options.special_token_ids, device=device, dtype=torch.long)
    check_requests(model, requests)

    ablation_sets = sorted({(r.write_hooks, kind) for r in requests if r.downstream
                            for kind in r.ablations})
    mean_hooks = sorted({h for hooks, kind in ablation_sets if kind == "mean" for h in hooks})
    cov_hooks = sorted({r.write_hooks[0] for r in requests if r.noise_draws
                        and "covariance" in r.noise_baselines})
    memo = memo if memo is not None else RunMemo()
    means, covs = _kept_moments(model, tokens, mean_hooks, cov_hooks, options, memo.moments)
    factors = {hook: covariance_factor(cov).float() for hook, cov in covs.items()}

    logs = {r.key: _TermLog() for r in requests}
    ablation_logs = {a: _TermLog() for a in ablation_sets}
    token_independent: dict[tuple, torch.Tensor] = {}
    needs_logits = any(r.downstream for r in requests)
    start_layers = ({r.start_layer for r in requests if r.downstream or r.probes}
                    | {_start_layer(hooks) for hooks, _ in ablation_sets}) - {None}
    cache_hooks = sorted({f"blocks.{layer}.hook_resid_pre" for layer in start_layers}
                         | {h for r in requests for d in r.dictionaries for h in d.hooks}
                         | {h for r in requests for p in r.probes for h in p.clean_hooks})
    keep = isinstance(tokens, Tensor) and bool(memo.hooks) and set(cache_hooks) <= memo.hooks
    if keep:
        cache_hooks, needs_logits = sorted(memo.hooks), True
    stop = model.cfg.n_layers if needs_logits else min(
        model.cfg.n_layers, max(hook_layer(h) for h in cache_hooks) + 1)
    dtype = next(model.parameters()).dtype
    chunk = options.positions_per_chunk(model, max(4, dtype.itemsize))

    by_position = any(r.by_position for r in requests)

    def clean_pass(batch: Tensor, first_row: int) -> tuple[dict, Tensor | None, Tensor]:
        """(cached activations, final-normed clean residual or None, evaluated positions)."""
        batch = batch.to(device)
        act_mask = ~torch.isin(batch, special)
        kept = (options.batch_size, first_row, tuple(options.special_token_ids))
        if keep and kept in memo.passes:
            cache, clean = memo.passes[kept]
        else:
            resid, cache = model.run_with_cache(batch, names_filter=cache_hooks,
                                                stop_at_layer=stop)
            clean = None
            if needs_logits:
                store: dict[str, Tensor] = {}
                clean = final_norm(model, resid, [(h, _capture(store, h)) for h in cache_hooks])
                if store:
                    cache = {**cache.cache_dict, **store}
            del resid
            if keep:
                memo.passes[kept] = (cache, clean)
        return cache, clean, act_mask

    total = len(tokens) if isinstance(tokens, torch.Tensor) else None
    bar = tqdm(total=total, desc="saebench", unit="seq", disable=not options.progress)
    first_row = 0
    for batch in _batches(tokens, options.batch_size):
        batch = batch.to(device)
        cache, clean_resid, act_mask = clean_pass(batch, first_row)
        buckets = [(bucket_prefix(b), _in_bucket(b, batch)) for b in
                   position_buckets(batch.shape[1])] if by_position else []
        heads = (_Unembedding(model, batch, clean_resid, chunk, options.memory_budget)
                 if needs_logits else None)
        if needs_logits:
            for hooks, kind in ablation_sets:
                heads.add(("ablation", hooks, kind), _ablated_residual(
                    model, cache, batch, hooks, kind, means, token_independent), ("nll", "kl"))
        for stack in _stacks(requests, options.stack_bytes, _copy_bytes(model, batch)):
            masks = {r.key: act_mask & position_mask(r.positions, *batch.shape,
                                                     device=batch.device) for r in stack}
            records: dict[str, dict] = {r.key: {} for r in stack}
            stacked = (_stacked_spliced_residuals(model, cache, stack, masks, records)
                       if len(stack) > 1 else {})
            for request in stack:
                record, mask = records[request.key], masks[request.key]
                evaluated = act_mask
                captured: dict[str, Tensor] = {}
                if request.downstream:
                    spliced = stacked.pop(request.key, None)
                    written: dict[str, Tensor] = {}
                    if spliced is None:
                        spliced = _spliced_residual(model, cache, batch, request, mask, record,
                                                    written if request.layers else None,
                                                    captured)
                    heads.add(("spliced", request.key), spliced, ("nll", "kl", "agree"))
                    logs[request.key].add(**_spliced_counts(act_mask, mask))
                    if request.layers:
                        logs[request.key].add(**layer_terms(request, cache, written, mask))
                    for prefix, within in buckets if request.by_position else ():
                        logs[request.key].add(**_prefixed(
                            prefix, _spliced_counts(act_mask & within, mask)
                            | (layer_terms(request, cache, written, mask & within)
                               if request.layers else {})))
                    del spliced
                    if not request.reconstruction:
                        evaluated = mask
                if request.probes:
                    view = _view(model, cache, batch, request, first_row, act_mask, mask,
                                 captured)
                    logs[request.key].add(**_probe_terms(request, view, 0))
                if request.noise_draws:
                    _noise_passes(model, cache, batch, request, mask, record, factors,
                                  first_row, heads)
                if request.reconstruction:
                    if not record:
                        _record_from_cache(cache, request, act_mask, record)
                    rec = record[request.dictionaries[0].name]
                    logs[request.key].add(**_reconstruction_terms(rec, act_mask))
                    for prefix, within in buckets if request.by_position else ():
                        logs[request.key].add(**_prefixed(
                            prefix, _reconstruction_terms(rec, act_mask & within)))
                logs[request.key].add(**health_terms(record, evaluated))
        if needs_logits:
            _log_unembedded(heads, act_mask, buckets, requests, ablation_sets, logs, ablation_logs)
        bar.update(len(batch))
        first_row += len(batch)
        if options.on_batch is not None:
            options.on_batch(first_row, total)
    bar.close()
    _later_sweeps(model, tokens, requests, options, clean_pass, logs)

    results = {}
    for request in requests:
        terms = logs[request.key].finish()
        if request.downstream:
            for kind in request.ablations:
                abl = ablation_logs[(request.write_hooks, kind)].finish()
                terms.update({k: v for k, v in abl.items()
                              if k.rsplit(":", 1)[-1] in (f"ce_{kind}", f"kl_{kind}")
                              and (request.by_position or ":" not in k)})
        results[request.key] = terms
    return results


def _log_unembedded(heads: _Unembedding, act_mask: Tensor, buckets: list[tuple[str, Tensor]],
                    requests: Sequence[Request], ablation_sets: Sequence[tuple],
                    logs: dict[str, _TermLog], ablation_logs: dict[tuple, _TermLog]) -> None:
    """Log a batch's logit-derived terms once they are unembedded: each ablation's and each
    request's CE and KL (and per bucket of positions), the spliced top-1 agreement and the
    clean CE, and the noise passes' KLs averaged over draws. A batch without variants (a
    run of reconstruction metrics keeping its clean pass for later runs) logs nothing."""
    heads.finish()
    if heads.clean_nll is None:
        return
    clean = _Clean(heads.clean_nll, act_mask)
    for hooks, kind in ablation_sets:
        values = heads.values(("ablation", hooks, kind))
        ablation_logs[(hooks, kind)].add(**clean.terms(values, kind))
        for prefix, within in buckets:
            ablation_logs[(hooks, kind)].add(**_prefixed(
                prefix, clean.restricted(within).terms(values, kind)))
    for request in requests:
        if request.downstream:
            values = heads.values(("spliced", request.key))
            logs[request.key].add(**clean.terms(values, "spliced"))
            for prefix, within in buckets if request.by_position else ():
                logs[request.key].add(**_prefixed(
                    prefix, clean.restricted(within).terms(values, "spliced")))
        if request.noise_draws:
            logs[request.key].add(**{
                NOISE_TERMS[kind]: torch.stack([
                    clean.kl_sums(heads.values(("noise", request.key, kind, draw)))
                    for draw in range(request.noise_draws)]).mean(0)
                for kind in request.noise_baselines})


def _in_bucket(bucket: tuple[int, int], batch: Tensor) -> Tensor:
    """[b, t] mask of the positions in `bucket` (inclusive)."""
    positions = torch.arange(batch.shape[1], device=batch.device)
    return ((positions >= bucket[0]) & (positions <= bucket[1])).expand_as(batch)


class _Unembedding:
    """The logit-derived per-token values of one batch's variants, each measured against
    the batch's clean pass, a chunk of positions at a time.

    A variant (an ablation, a spliced or a noise pass) is added as its final-normed
    residual [b, t, d_model], or [1, t, d_model] for a token-independent pass standing for
    every row. A run walks the batch's b × t positions in row-major chunks of `chunk`
    (so a chunk may split a sequence): per chunk it computes the clean log-probs once,
    then each variant's log-probs and values against them, and drops them before the next
    chunk, so at most `chunks.LIVE_TENSORS` logits-sized tensors live at once. Variants
    wait until their residuals would take more than `hold_bytes`; then a run starts early
    (`finish` runs the last).

    Values, in the log-probs' dtype (float32 at least): `nll` [b, t-1] (position i
    predicting token i + 1), `kl` [b, t] (KL(clean ‖ variant)), `agree` [b, t] (1 where the
    top-1 tokens agree), each only where asked for; `clean_nll` [b, t-1] the clean pass's.
    """

    def __init__(self, model: HookedTransformer, batch: Tensor, clean: Tensor, chunk: int,
                 hold_bytes: int) -> None:
        self.model, self.shape, self.chunk, self.hold_bytes = model, batch.shape, chunk, hold_bytes
        self.clean = clean.flatten(0, 1)
        self.dtype = torch.promote_types(model.W_U.dtype, torch.float32)  # of the log-probs
        b, t = batch.shape
        self.next_tokens = torch.cat([batch[:, 1:], batch[:, -1:]], 1).flatten().long()
        self.columns = torch.arange(t, device=batch.device).repeat(b)
        self.clean_nll: Tensor | None = None
        self._pending: list[tuple[Hashable, Tensor, tuple[str, ...]]] = []
        self._held = 0
        self._values: dict[Hashable, dict[str, Tensor]] = {}

    def add(self, key: Hashable, resid: Tensor, wants: tuple[str, ...]) -> None:
        """Measure the variant `key` with final-normed residual `resid` for `wants` (of
        nll, kl, agree) in a coming run."""
        size = resid.numel() * resid.element_size()
        if self._pending and self._held + size > self.hold_bytes:
            self.finish()
        self._pending.append((key, resid, wants))
        self._held += size

    def values(self, key: Hashable) -> dict[str, Tensor]:
        """The per-token values of variant `key` (after `finish`)."""
        return self._values[key]

    def finish(self) -> None:
        """Run the waiting variants through the unembedding, if any."""
        if not self._pending:
            return
        n = len(self.clean)
        device = self.clean.device
        first = self.clean_nll is None
        if first:
            self.clean_nll = torch.empty(n, dtype=self.dtype, device=device)
        out = {key: {name: torch.empty(n, dtype=self.dtype, device=device) for name in wants}
               for key, _, wants in self._pending}
        need_top1 = any("agree" in wants for _, _, wants in self._pending)
        for start, stop in chunks.spans(n, self.chunk):
            log_p = _log_probs(self.model, self.clean[start:stop])
            following = self.next_tokens[start:stop, None]
            if first:
                self.clean_nll[start:stop] = -log_p.gather(-1, following)[:, 0]
            top1 = log_p.argmax(-1) if need_top1 else None
            p = log_p.exp()
            for key, resid, wants in self._pending:
                log_q = self._variant_log_probs(resid, start, stop)
                values = out[key]
                if "nll" in wants:
                    values["nll"][start:stop] = -log_q.gather(-1, following)[:, 0]
                if "agree" in wants:
                    values["agree"][start:stop] = log_q.argmax(-1) == top1
                if "kl" in wants:
                    # KL(p ‖ q) = Σ p (log p − log q), as F.kl_div(log_target=True), in place
                    values["kl"][start:stop] = log_q.neg_().add_(log_p).mul_(p).sum(-1)
                del log_q
            del log_p, p
        b, t = self.shape
        for key, values in out.items():
            self._values[key] = {name: v.view(b, t)[:, :-1] if name == "nll" else v.view(b, t)
                                 for name, v in values.items()}
        if first:
            self.clean_nll = self.clean_nll.view(b, t)[:, :-1]
        self._pending, self._held = [], 0

    def _variant_log_probs(self, resid: Tensor, start: int, stop: int) -> Tensor:
        """A variant's log-probs at the flat positions [start, stop): of its own rows, or,
        for a one-row (token-independent) residual, of the columns those positions are at,
        each computed once."""
        if len(resid) == self.shape[0]:
            return _log_probs(self.model, resid.flatten(0, 1)[start:stop])
        wanted = self.columns[start:stop]
        columns, where = torch.unique(wanted, return_inverse=True)
        log_q = _log_probs(self.model, resid[0, columns])
        return log_q if torch.equal(columns, wanted) else log_q[where]


class _Clean:
    """The clean pass's per-token CE, and the CE/KL terms of a variant against it.

    CE is summed over prediction positions (input token not special, a next token exists),
    KL over every position whose input token is not special, as sae_lens does; so is the
    spliced run's top-1 agreement with the clean one (`agree_spliced`). The per-token
    values come from the batch's `_Unembedding`.
    """

    def __init__(self, nll: Tensor, act_mask: Tensor) -> None:
        self.nll = nll
        self._count(act_mask)

    def _count(self, act_mask: Tensor) -> None:
        """Count the positions of `act_mask` [b, t]: the masks and the clean CE sums."""
        self.act_mask = act_mask
        self.pred_mask = act_mask[:, :-1]
        self.shared = {
            "ce_clean": tok_metrics.sequence_sums(self.nll, self.pred_mask),
            "n_pred": self.pred_mask.sum(-1),
            "n_kl": act_mask.sum(-1),
        }

    def restricted(self, within: Tensor) -> _Clean:
        """The same per-token clean CE, counting only the positions `within` [b, t] (a
        bucket of positions)."""
        part = copy.copy(self)
        part._count(self.act_mask & within)
        return part

    def terms(self, values: dict[str, Tensor], label: str) -> dict[str, Tensor]:
        """`ce_<label>` and `kl_<label>` sums of a variant's per-token `values`; for the
        spliced pass also its top-1 agreement and the clean CE and counts."""
        terms = {f"ce_{label}": tok_metrics.sequence_sums(values["nll"], self.pred_mask),
                 f"kl_{label}": tok_metrics.sequence_sums(values["kl"], self.act_mask)}
        if label != "spliced":
            return terms
        return terms | self.shared | {
            "agree_spliced": tok_metrics.sequence_sums(values["agree"], self.act_mask)}

    def kl_sums(self, values: dict[str, Tensor]) -> Tensor:
        """Per-sequence sums of KL(clean ‖ variant) over the KL positions."""
        return tok_metrics.sequence_sums(values["kl"], self.act_mask)


def _spliced_counts(act_mask: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The guard terms: per sequence, the counted CE and KL positions (of `act_mask`) at or
    after a spliced position (`mask`), the only ones whose prediction the splice can change."""
    reached = reached_positions(mask)
    return {"n_pred_spliced": (act_mask[:, :-1] & reached[:, :-1]).sum(-1),
            "n_kl_spliced": (act_mask & reached).sum(-1)}


def _ablated_residual(model, cache, batch, hooks, kind, means, token_independent) -> Tensor:
    """The final-normed residual with `hooks` ablated at every position; one row shared
    across the batch when the ablation makes it independent of the tokens."""
    layer = _start_layer(hooks)
    fwd_hooks = [hook for h in hooks for hook in ablation_hooks(h, kind, mean=means.get(h))]
    if layer is not None and _is_whole_residual(hooks):
        key = (hooks, kind, batch.shape[1])
        if key not in token_independent:
            token_independent[key] = _suffix_pass(model, cache, batch, layer, fwd_hooks, rows=1)
        return token_independent[key]
    return _suffix_pass(model, cache, batch, layer, fwd_hooks)


def _spliced_residual(model, cache, batch, request: Request, mask, record,
                      written: dict | None = None, captured: dict | None = None) -> Tensor:
    hooks = splice_hooks(request.dictionaries, error_term=request.error_term, mask=mask,
                         edits=request.edits, record=record, written=written)
    wanted = sorted({h for p in request.probes for h in p.spliced_hooks})
    if captured is not None:
        hooks += [(h, _capture(captured, h)) for h in wanted]
    return _suffix_pass(model, cache, batch, request.start_layer, hooks)


def _capture(store: dict, name: str):
    def hook_fn(act: Tensor, hook) -> None:
        store[name] = act

    return hook_fn


def _view(model, cache, batch, request: Request, first_row: int, act_mask, mask,
          captured: dict[str, Tensor]) -> BatchView:
    """What the request's probes see of this batch: clean and spliced activations, and a
    way to run one more spliced pass with feature edits."""
    def rerun(edits: tuple[FeatureEdit, ...], hooks: tuple[str, ...]) -> dict[str, Tensor]:
        store: dict[str, Tensor] = {}
        fwd = splice_hooks(request.dictionaries, error_term=request.error_term, mask=mask,
                           edits=(*request.edits, *edits))
        fwd += [(h, _capture(store, h)) for h in hooks]
        layer = request.start_layer
        inputs = batch if layer is None else cache[f"blocks.{layer}.hook_resid_pre"]
        stop = min(model.cfg.n_layers, max(hook_layer(h) for h in hooks) + 1)
        model.run_with_hooks(inputs, start_at_layer=layer, stop_at_layer=stop, fwd_hooks=fwd)
        return store

    return BatchView(tokens=batch, first_row=first_row, act_mask=act_mask, splice_mask=mask,
                     reached=act_mask & reached_positions(mask), clean=cache,
                     spliced=captured, rerun=rerun)


def _probe_terms(request: Request, view: BatchView, sweep: int) -> dict[str, Tensor]:
    """The terms of the request's probes still running at `sweep`; two probes may not
    write one term."""
    terms: dict[str, Tensor] = {}
    for probe in request.probes:
        if probe.sweeps > sweep:
            out = probe.batch(view, sweep)
            clash = set(out) & set(terms)
            if clash:
                raise ValueError(f"{request.key}: probes of one request both write the terms "
                                 f"{', '.join(sorted(clash))}")
            terms.update(out)
    return terms


def _later_sweeps(model, tokens, requests: Sequence[Request], options: EngineOptions,
                  clean_pass: Callable, logs: dict[str, _TermLog]) -> None:
    """The passes over the data after the first, for probes that ask for more (`sweeps`):
    each sees the clean activations and may rerun the spliced pass; `end_sweep` follows
    every pass."""
    sweeps = max((p.sweeps for r in requests for p in r.probes), default=1)
    if sweeps > 1 and not isinstance(tokens, Tensor | Sequence):
        raise ValueError(f"a probe needs {sweeps} passes over the tokens: give a tensor or a "
                         "list of batches, not a one-shot iterator")
    for sweep in range(sweeps):
        if sweep:
            first_row = 0
            for batch in _batches(tokens, options.batch_size):
                cache, _, act_mask = clean_pass(batch, first_row)
                batch = batch.to(act_mask.device)
                for request in requests:
                    mask = act_mask & position_mask(request.positions, *batch.shape,
                                                    device=batch.device)
                    if any(p.sweeps > sweep for p in request.probes):
                        view = _view(model, cache, batch, request, first_row, act_mask, mask, {})
                        logs[request.key].add(**_probe_terms(request, view, sweep))
                first_row += len(batch)
        for request in requests:
            for probe in request.probes:
                if probe.sweeps > sweep:
                    probe.end_sweep(sweep)


def _stackable(request: Request) -> tuple | None:
    """What requests must share to be spliced in one stacked pass (one dictionary, not a
    transcoder, without edits, error term or per-layer errors, from a cached layer), or
    None."""
    if not request.downstream or len(request.dictionaries) != 1 or request.edits \
            or request.error_term or request.start_layer is None or request.probes \
            or request.layers:
        return None
    d = request.dictionaries[0]
    if d.is_transcoder:
        return None
    positions = request.positions if request.positions is None or isinstance(
        request.positions, int) else tuple(request.positions)
    return (d.write_hook, request.start_layer, positions)


def _copy_bytes(model: HookedTransformer, batch: Tensor) -> int:
    """About what one more copy of `batch` adds to a stacked suffix pass: its widest
    activation (the attention pattern [b, heads, t, t], the MLP hidden [b, t, d_mlp] or the
    residual [b, t, d_model]) in float32. The pass makes no logits (see `_Unembedding`)."""
    b, t = batch.shape
    cfg = model.cfg
    return b * t * max(cfg.d_model, cfg.d_mlp or 0, cfg.n_heads * t) * 4


def _stacks(requests: Sequence[Request], budget: int, copy_bytes: int) -> list[list[Request]]:
    """`requests` in groups spliced in one stacked suffix pass each, in request order: those
    sharing a write hook, start layer and positions (`_stackable`), as many at a time as
    keep the stacked copies (`copy_bytes` each) within `budget` bytes; every other request
    alone."""
    per_stack = max(1, budget // max(copy_bytes, 1))
    stacks: list[list[Request]] = []
    open_stacks: dict[tuple, list[Request]] = {}
    for request in requests:
        key = _stackable(request)
        stack = open_stacks.get(key) if key is not None else None
        if stack is not None and len(stack) < per_stack:
            stack.append(request)
            continue
        stacks.append([request])
        if key is not None:
            open_stacks[key] = stacks[-1]
    return stacks


def _stacked_spliced_residuals(model, cache, stack: list[Request], masks: dict[str, Tensor],
                               records: dict[str, dict]) -> dict[str, Tensor]:
    """The spliced final-normed residual of each request of `stack` from one suffix pass
    over the cached residual repeated once per request, each copy through its own
    dictionary."""
    layer = stack[0].start_layer
    inputs = cache[f"blocks.{layer}.hook_resid_pre"]
    rows = len(inputs)
    splices = [splice_hooks(r.dictionaries, mask=masks[r.key], record=records[r.key])[0][1]
               for r in stack]

    def hook_fn(act: Tensor, hook) -> Tensor:
        return torch.cat([fn(act[i * rows:(i + 1) * rows], hook)
                          for i, fn in enumerate(splices)])

    resid = model.run_with_hooks(inputs.repeat(len(stack), *([1] * (inputs.dim() - 1))),
                                 start_at_layer=layer, stop_at_layer=model.cfg.n_layers,
                                 fwd_hooks=[(stack[0].dictionaries[0].write_hook, hook_fn)])
    resid = final_norm(model, resid)
    return {r.key: resid[i * rows:(i + 1) * rows] for i, r in enumerate(stack)}


def _sequence_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for sequence `index` under the run's `seed`."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sequence_generators(seed: int, first_row: int, n: int,
                        device: torch.device | str) -> list[torch.Generator]:
    """One generator per sequence `first_row .. first_row + n - 1`, seeded from (seed, index)."""
    return [torch.Generator(device=device).manual_seed(_sequence_seed(seed, first_row + i))
            for i in range(n)]


def random_directions(z: Tensor, factor: Tensor | None = None) -> Tensor:
    """g from standard normal `z` [..., d]: z itself (isotropic) or z @ factorᵀ, distributed
    N(0, factor factorᵀ) (covariance-aware, with `covariance_factor`)."""
    return z if factor is None else z @ factor.T.to(z.dtype)


def rescaled(g: Tensor, norm: Tensor) -> Tensor:
    """`g` [..., d] rescaled to length `norm` [...] at each position (0 where g is 0)."""
    return g * (norm / g.norm(dim=-1).clamp_min(torch.finfo(g.dtype).tiny))[..., None]


def _perturb_hook(eps: Tensor, mask: Tensor):
    """A write-hook function adding `eps` (flat width) where `mask` [b, t] is True."""

    def hook_fn(act: Tensor, hook) -> Tensor:
        keep = mask.reshape(*mask.shape, *([1] * (act.dim() - 2)))
        return torch.where(keep, act + eps.reshape(act.shape).to(act.dtype), act)

    return hook_fn


def _noise_passes(model, cache, batch, request: Request, mask, record,
                  factors: dict[str, Tensor], first_row: int, heads: _Unembedding) -> None:
    """The passes with the clean activation moved by ε, one per draw and requested baseline,
    added to `heads` for their KL(clean ‖ clean + ε) (`_log_unembedded` averages draws).

    ε has the norm of what the splice changed at each masked position (‖x̂ − target‖ there;
    0 elsewhere). The baselines share each draw's z (common random numbers). A covariance
    is missing only when no position of the data counts, and then every ε is 0.
    """
    d = request.dictionaries[0]
    rec = record[d.name]
    target = rec["target"].flatten(2)
    err_norm = (rec["out"].flatten(2).float() - target.float()).norm(dim=-1)
    err_norm = torch.where(mask, err_norm, 0)
    dtype = torch.promote_types(torch.float32, target.dtype)
    gens = sequence_generators(request.noise_seed, first_row, len(batch), batch.device)
    for draw in range(request.noise_draws):
        z = torch.stack([torch.randn(target.shape[1:], generator=g, device=batch.device,
                                     dtype=dtype) for g in gens])
        for kind in request.noise_baselines:
            factor = factors.get(d.write_hook) if kind == "covariance" else None
            eps = rescaled(random_directions(z, factor), err_norm.to(dtype))
            heads.add(("noise", request.key, kind, draw), _suffix_pass(
                model, cache, batch, request.start_layer,
                [(d.write_hook, _perturb_hook(eps, mask))]), ("kl",))


def health_terms(record: dict, evaluated: Tensor) -> dict[str, Tensor]:
    """Per row, the evaluated positions (`evaluated` [b, t]) where a recorded dictionary's
    reconstruction or features are not finite, and the first such position (−1 if none):
    the `nonfinite:<name>` / `nonfinite_at:<name>` terms of the registry."""
    count_prefix, at_prefix = HEALTH_TERMS
    terms = {}
    for name, rec in record.items():
        recons = rec["recon"] if isinstance(rec["recon"], tuple) else (rec["recon"],)
        bad = functools.reduce(operator.or_, (~torch.isfinite(r).flatten(2).all(-1)
                                              for r in recons))
        if rec.get("feats") is not None:
            bad |= ~torch.isfinite(rec["feats"]).all(-1).reshape(bad.shape)
        bad &= evaluated.to(bad.device)
        first = torch.where(bad.any(-1), bad.int().argmax(-1), -1)
        terms[count_prefix + name] = bad.sum(-1)
        terms[at_prefix + name] = first
    return terms


def layer_terms(request: Request, cache, written: dict[str, Tensor], mask: Tensor
                ) -> dict[str, Tensor]:
    """Per sequence, at each write hook of the request in order, the error of what the
    spliced pass wrote against the clean model's activation there, over the spliced
    positions `mask`: `layer_sq_err` [b, L], `layer_sq_target` [b, L], `layer_sum_target`
    [b, L, d] and the count `n_layer` (the `per_layer_error` terms of the registry)."""
    hooks = request.write_hooks
    widths = {cache[h].flatten(2).shape[-1] for h in hooks}
    if len(widths) != 1:
        raise ValueError(f"{request.key}: per-layer errors need write hooks of one width; "
                         f"{', '.join(hooks)} have widths {sorted(widths)}")
    sums = tok_metrics.sequence_sums
    target = torch.stack([cache[h].flatten(2) for h in hooks], dim=2)  # [b, t, L, d]
    out = torch.stack([written[h].flatten(2) for h in hooks], dim=2)
    keep = mask.to(target.device)
    # the difference in float64: in half precision x̂ − x would round before squaring
    return {"n_layer": keep.sum(-1),
            "layer_sq_err": sums((out.double() - target.double()).pow(2).sum(-1), keep),
            "layer_sq_target": sums(target.double().pow(2).sum(-1), keep),
            "layer_sum_target": sums(target.double().flatten(2), keep).unflatten(
                -1, (len(hooks), -1))}


def _record_from_cache(cache, request: Request, act_mask, record) -> None:
    d = request.dictionaries[0]
    recon, feats = d.reconstruct(cache[d.read_hook], like=cache[d.write_hook],
                                 edits=request.edits)
    record[d.name] = {"x": cache[d.read_hook], "target": cache[d.write_hook],
                      "recon": recon, "feats": feats}


def _reconstruction_terms(rec: dict, act_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    target = rec["target"].flatten(2) if rec["target"].dim() > 3 else rec["target"]
    recon = rec["recon"].reshape(target.shape)
    sums = tok_metrics.sequence_sums
    terms = {
        "n_act": act_mask.sum(-1),
        "sq_err": sums(tok_metrics.squared_error(target, recon), act_mask),
        "sq_target": sums(tok_metrics.squared_norm(target), act_mask),
        "sum_target": sums(target, act_mask),
        "sq_recon": sums(tok_metrics.squared_norm(recon), act_mask),
        "dot": sums(tok_metrics.dot(target, recon), act_mask),
        "cossim": sums(tok_metrics.cosine(target, recon), act_mask),
        "l2_ratio": sums(tok_metrics.norm_ratio(target, recon), act_mask),
    }
    feats = rec["feats"]
    if feats is not None:
        terms["l0"] = sums(tok_metrics.active_count(feats), act_mask)
        terms["feature_counts"] = sums((feats != 0).to(torch.float32), act_mask)
    return terms


def check_requests(model: HookedTransformer, requests: Sequence) -> None:
    """Request keys are unique and every dictionary's hooks exist in the model (token and
    task requests alike: anything with `key` and `dictionaries`)."""
    keys = [r.key for r in requests]
    if len(set(keys)) != len(keys):
        raise ValueError(f"request keys must be unique; got {keys}")
    for request in requests:
        for d in request.dictionaries:
            for hook in d.hooks:
                if hook not in model.hook_dict:
                    raise ValueError(f"{request.key}: dictionary {d.name!r} uses hook {hook!r}, "
                                     "which the model does not have")
                if hook.startswith("unembed."):
                    raise ValueError(f"{request.key}: dictionary {d.name!r} uses hook {hook!r} "
                                     "inside the unembedding, which runs in chunks of "
                                     "positions; splice at ln_final.* or an earlier hook")
