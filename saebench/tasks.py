"""Task-level faithfulness: per-prompt logit differences, remainder DLA and feature ablation.

A task is a list of `TaskPrompt(prompt, answer, distractor, pos)`: the model should prefer
`answer` over `distractor` at the answer position `pos` (default the prompt's last token;
negative values count from the end of the prompt's own tokens, BOS included).
`run_task` measures each `TaskRequest` (a dictionary, or a set spliced together) prompt by
prompt, with forward passes over right-padded batches that stop at the final residual
stream: only the answer positions go through the unembedding, a chunk of prompts at a time
(`EngineOptions.max_memory` / `chunk_positions`), so no [prompts, seq, vocab] logits exist:

    >>> prompts = loading.load_task("ioi")[:40]
    >>> d = as_dictionary(loading.load_zoo_dictionary("resid-L2-topk16"))
    >>> result = run_task(model, prompts, [TaskRequest("r2", (d,), dla=True, feature_k=3)])
    >>> summarize(get_metric("logit_diff_recovered"), result.terms["r2"])

Per prompt, LD = logit[answer] − logit[distractor] at the answer position, for the clean
run, the spliced run and each ablation baseline (through the two unembedding columns in
float64, so a half-precision model's LD is not the difference of two rounded logits).
With causal attention and right padding, the logits at a real position never see the
padding, so a prompt's numbers do not depend on the batch it lands in. Dictionaries are
spliced, and sites ablated, only at real (non-pad), non-special positions.

Terms (float64, one row per prompt; `saebench.metrics.task` aggregates them):
`n_prompts` (ones), `ld_clean`, `ld_spliced`, `ld_zero` / `ld_mean`, `sign_agree`
(1 where LD_spliced has the sign of LD_clean); with `dla`: `dla_original`,
`dla_reconstruction`, `dla_remainder`, `abs_dla_reconstruction`, `abs_dla_remainder`;
with `feature_k`: `ld_topk_zeroed` [n_prompts, K], column j the LD with the top j+1
features (by mean activation) zeroed jointly, and `feature_effect` [n_prompts, K], column j
LD_spliced − the LD with feature j alone zeroed (the feature table's effects).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from saebench.chunks import spans
from saebench.engine import (
    ABLATIONS,
    EngineOptions,
    check_requests,
    final_norm,
    health_terms,
    soft_cap_,
    special_token_ids,
    unembed,
)
from saebench.loading import TaskPrompt
from saebench.splice import (
    Dictionary,
    FeatureEdit,
    ablation_hooks,
    as_dictionary,
    hook_layer,
    reached_positions,
    splice_hooks,
)

HooksOf = Callable[["PromptBatch", dict], list]
"""Builds a pass's `fwd_hooks` for a batch; the dict collects what the hooks record."""
OnBatch = Callable[["PromptBatch", dict], None]

POSITION_MODES = ("all", "answer")
IDENTITY_WRITE_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out",
                        "hook_attn_out")
"""Hooks whose activation is itself the component's write to the residual stream."""
FINAL_SCALE_HOOK = "ln_final.hook_scale"


@dataclass(frozen=True)
class TaskRequest:
    """One variant to measure on a task: dictionaries spliced together, and their options.

    `positions`: "all" (every real, non-special position), "answer" (each prompt's answer
    position only) or ints (per prompt; negative ones count from the end of the prompt's
    own tokens). `ablations` are the baselines (zero / mean) at the same write hook(s).
    `dla` asks for the remainder DLA and `feature_k` for the ablation of the top-k
    features; both need exactly one dictionary.

        >>> TaskRequest("r2", (d,), ablations=("zero", "mean"), positions="answer", dla=True)
    """

    key: str
    dictionaries: tuple[Dictionary, ...]
    ablations: tuple[str, ...] = ("zero",)
    error_term: bool = False
    positions: str | int | Sequence[int] = "all"
    edits: tuple[FeatureEdit, ...] = ()
    dla: bool = False
    feature_k: int | None = None

    def __post_init__(self) -> None:
        dictionaries = tuple(d if isinstance(d, Dictionary) else as_dictionary(d)
                             for d in self.dictionaries)
        object.__setattr__(self, "dictionaries", dictionaries)
        if not dictionaries:
            raise ValueError(f"{self.key}: a task request needs at least one dictionary")
        unknown = set(self.ablations) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"{self.key}: unknown ablation kind(s) {sorted(unknown)}; "
                             f"choose from {', '.join(ABLATIONS)}")
        if isinstance(self.positions, str):
            if self.positions not in POSITION_MODES:
                raise ValueError(f"{self.key}: positions must be one of {POSITION_MODES} or "
                                 f"integers, got {self.positions!r}")
        else:
            ints = [self.positions] if isinstance(self.positions, int) else list(self.positions)
            if not ints or any(isinstance(p, bool) or not isinstance(p, int) for p in ints):
                raise ValueError(f"{self.key}: positions must be one of {POSITION_MODES} or "
                                 f"a non-empty list of integers, got {self.positions!r}")
            object.__setattr__(self, "positions", tuple(ints))
        if (self.dla or self.feature_k is not None) and len(dictionaries) != 1:
            raise ValueError(f"{self.key}: remainder DLA and feature ablation need exactly one "
                             f"dictionary, got {len(dictionaries)}")
        if self.feature_k is not None:
            if isinstance(self.feature_k, bool) or not isinstance(self.feature_k, int) \
                    or self.feature_k < 1:
                raise ValueError(f"{self.key}: feature_k must be a positive integer, "
                                 f"got {self.feature_k!r}")
            if not dictionaries[0].has_features:
                raise ValueError(f"{self.key}: feature ablation needs a dictionary with "
                                 "encode/decode (feature activations)")
            d_sae = dictionaries[0].d_sae
            if d_sae is not None and self.feature_k > d_sae:
                raise ValueError(f"{self.key}: feature_k={self.feature_k} is more than the "
                                 f"dictionary's {d_sae} features")

    @property
    def write_hooks(self) -> tuple[str, ...]:
        """The write hooks of the request's dictionaries, in order, once each."""
        return tuple(dict.fromkeys(h for d in self.dictionaries for h in d.write_hooks))


@dataclass
class TaskResult:
    """What `run_task` measured, per request key.

    `terms`: term -> per-prompt tensor [n_prompts] or [n_prompts, k] (float64, CPU), as
    `saebench.stats.summarize` takes them. `per_prompt`: one row per prompt (prompt_index,
    prompt, answer, distractor, then the numbers). `features`: one row per top feature
    (feature, mean_activation, active_share, effect with its 95% bootstrap CI over prompts,
    loss_effect), for requests with `feature_k`.
    """

    terms: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    per_prompt: dict[str, list[dict]] = field(default_factory=dict)
    features: dict[str, list[dict]] = field(default_factory=dict)


@dataclass
class PromptBatch:
    """Right-padded prompts: tokens [b, t], where each prompt's tokens and answer lie.

    `keep` [b, t] is True at real (non-pad), non-special positions: where splicing and
    ablation may happen.
    """

    indices: list[int]
    tokens: Tensor
    lengths: Tensor
    answer_pos: Tensor
    answers: Tensor
    distractors: Tensor
    keep: Tensor

    def at_answer(self, x: Tensor) -> Tensor:
        """`x` [b, t, ...] at each prompt's answer position: [b, ...]."""
        return x[torch.arange(len(x), device=x.device), self.answer_pos]

    def splice_mask(self, positions: str | tuple[int, ...]) -> Tensor:
        """Where a request splices: `keep` restricted to `positions` (see `TaskRequest`)."""
        if positions == "all":
            return self.keep
        rows = torch.arange(len(self.tokens), device=self.tokens.device)
        chosen = torch.zeros_like(self.keep)
        if positions == "answer":
            chosen[rows, self.answer_pos] = True
            return self.keep & chosen
        for p in positions:
            idx = torch.full_like(self.lengths, p) if p >= 0 else self.lengths + p
            bad = (idx < 0) | (idx >= self.lengths)
            if bad.any():
                i = self.indices[int(bad.nonzero()[0])]
                raise IndexError(f"position {p} is outside prompt {i}, which has "
                                 f"{int(self.lengths[bad][0])} tokens")
            chosen[rows, idx] = True
        return self.keep & chosen


def _single_token(model: HookedTransformer, text: str, index: int, role: str) -> int:
    ids = model.to_tokens(text, prepend_bos=False)[0]
    if len(ids) != 1:
        raise ValueError(f"prompt {index}: {role} {text!r} is {len(ids)} tokens; answers and "
                         "distractors must be single tokens")
    return int(ids[0])


def encode_prompts(
    model: HookedTransformer,
    prompts: Sequence[TaskPrompt],
    batch_size: int,
    special_ids: Sequence[int],
) -> list[PromptBatch]:
    """Tokenize `prompts` (`model.to_tokens`, BOS prepended) into right-padded batches.

    Padding uses the tokenizer's pad id (0 without one); it is never spliced or counted.
    """
    if model.tokenizer is None:
        raise ValueError("task prompts need a model with a tokenizer")
    device = next(model.parameters()).device
    pad = model.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    special = torch.tensor(list(special_ids), dtype=torch.long, device=device)
    encoded = []
    for i, p in enumerate(prompts):
        toks = model.to_tokens(p.prompt, truncate=False)[0].to(device)
        n = len(toks)
        if n > model.cfg.n_ctx:
            raise ValueError(f"prompt {i} has {n} tokens, more than the model's n_ctx "
                             f"({model.cfg.n_ctx})")
        pos = n - 1 if p.pos is None else p.pos + n if p.pos < 0 else p.pos
        if not 0 <= pos < n:
            raise IndexError(f"prompt {i}: answer position {p.pos} is outside its {n} tokens")
        encoded.append((i, toks, pos, _single_token(model, p.answer, i, "answer"),
                        _single_token(model, p.distractor, i, "distractor")))
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        lengths = torch.tensor([len(c[1]) for c in chunk], device=device)
        tokens = torch.full((len(chunk), int(lengths.max())), pad, dtype=torch.long,
                            device=device)
        for row, c in enumerate(chunk):
            tokens[row, :len(c[1])] = c[1]
        real = torch.arange(tokens.shape[1], device=device) < lengths[:, None]
        batches.append(PromptBatch(
            indices=[c[0] for c in chunk], tokens=tokens, lengths=lengths,
            answer_pos=torch.tensor([c[2] for c in chunk], device=device),
            answers=torch.tensor([c[3] for c in chunk], device=device),
            distractors=torch.tensor([c[4] for c in chunk], device=device),
            keep=real & ~torch.isin(tokens, special)))
    return batches


def write_out(model: HookedTransformer, hook: str, act: Tensor) -> Tensor:
    """The residual-stream write [..., d_model] of an activation at `hook` (no bias).

    Identity for residual, `hook_mlp_out` and `hook_attn_out`; `x @ W_out[L]` for
    `mlp.hook_post`; `Σ_h z_h @ W_O[L, h]` for `attn.hook_z` ([..., n_heads, d_head]).
    """
    if hook.rsplit(".", 1)[-1] in IDENTITY_WRITE_HOOKS:
        return act
    if hook.endswith("mlp.hook_post"):
        return act @ model.blocks[hook_layer(hook)].mlp.W_out.to(act.dtype)
    if hook.endswith("attn.hook_z"):
        w_o = model.blocks[hook_layer(hook)].attn.W_O.to(act.dtype)
        return torch.einsum("...hd,hdm->...m", act, w_o)
    raise ValueError(f"no write-out map to the residual stream for hook {hook!r}; remainder "
                     f"DLA supports {', '.join(IDENTITY_WRITE_HOOKS)}, mlp.hook_post and "
                     "attn.hook_z")


def direct_logit_attribution(model: HookedTransformer, component: Tensor, scale: Tensor | None,
                             answers: Tensor, distractors: Tensor) -> Tensor:
    """DLA of residual-stream writes [b, d_model] onto logit[answer] − logit[distractor].

    Through the final norm as it acted in the clean run: centred over d_model for
    LayerNorm (LN, LNPre), divided by the cached `ln_final.hook_scale` [b, 1] (None: no
    final norm) and multiplied by the norm's weight where it has one (1 once folded), as
    TransformerLens' `ActivationCache.logit_attrs` does for folded models. Float64.
    """
    x = component.double()
    if model.cfg.normalization_type in ("LN", "LNPre"):
        x = x - x.mean(-1, keepdim=True)
    if scale is not None:
        x = x / scale.double()
    weight = getattr(model.ln_final, "w", None) if hasattr(model, "ln_final") else None
    if isinstance(weight, Tensor):
        x = x * weight.double()
    w_u = model.W_U  # only the columns read are widened, never the whole vocabulary
    return (x * (w_u[:, answers].double() - w_u[:, distractors].double()).T).sum(-1)


def _logit_diff(model: HookedTransformer, at: Tensor, batch: PromptBatch, chunk: int
                ) -> tuple[Tensor, Tensor]:
    """(LD, −log p(answer)), float64 [b] each, from the final-normed residuals at the answer
    positions `at` [b, d_model].

    LD goes through the answer's and the distractor's unembedding columns in float64; the
    NLL's log-sum-exp goes through the whole vocabulary, `chunk` prompts at a time, from
    logits (`saebench.engine.unembed`) widened to float64.
    """
    x = at.double()
    w_u, b_u = model.W_U, model.b_U

    def logit(tokens: Tensor) -> Tensor:
        raw = (x * w_u[:, tokens].T.double()).sum(-1) + b_u[tokens].double()
        return soft_cap_(model, raw)

    ld = logit(batch.answers) - logit(batch.distractors)
    nll = torch.empty(len(at), dtype=torch.float64, device=at.device)
    for start, stop in spans(len(at), chunk):
        logits = unembed(model, at[start:stop]).double()
        rows = torch.arange(stop - start, device=at.device)
        nll[start:stop] = (torch.logsumexp(logits, -1)
                           - logits[rows, batch.answers[start:stop]])
        del logits
    return ld, nll


class _Runner:
    """The passes of one `run_task` call over its encoded batches; `chunk` answer positions
    at a time go through the unembedding."""

    def __init__(self, model: HookedTransformer, batches: list[PromptBatch], n: int,
                 chunk: int) -> None:
        self.model = model
        self.batches = batches
        self.n = n
        self.chunk = chunk

    def collect(self, fwd_hooks_of: HooksOf, on_batch: OnBatch | None = None
                ) -> tuple[Tensor, Tensor]:
        """(LD, NLL) per prompt [n] of a pass whose hooks `fwd_hooks_of(batch)` gives."""
        ld = torch.empty(self.n, dtype=torch.float64)
        nll = torch.empty(self.n, dtype=torch.float64)
        model = self.model
        for batch in self.batches:
            extra: dict = {}
            hooks = fwd_hooks_of(batch, extra)
            resid = model.run_with_hooks(batch.tokens, fwd_hooks=hooks,
                                         stop_at_layer=model.cfg.n_layers)
            at = batch.at_answer(final_norm(model, resid, hooks))
            del resid
            b_ld, b_nll = _logit_diff(model, at, batch, self.chunk)
            ld[batch.indices], nll[batch.indices] = b_ld.cpu(), b_nll.cpu()
            if on_batch is not None:
                on_batch(batch, extra)
        return ld, nll

    def splice(self, request: TaskRequest, edits: tuple[FeatureEdit, ...],
               on_batch: OnBatch | None = None) -> tuple[Tensor, Tensor]:
        """(LD, NLL) of the spliced run with `edits`; `on_batch` sees each batch's record."""
        def hooks(batch: PromptBatch, record: dict) -> list:
            return splice_hooks(request.dictionaries, error_term=request.error_term,
                                mask=batch.splice_mask(request.positions), edits=edits,
                                record=record if on_batch is not None else None)

        return self.collect(hooks, on_batch)


@torch.no_grad()
def run_task(
    model: HookedTransformer,
    prompts: Sequence[TaskPrompt],
    requests: Sequence[TaskRequest],
    options: EngineOptions | None = None,
) -> TaskResult:
    """Measure every request on `prompts`: terms, per-prompt rows and feature tables.

    `options` gives the batch size, the special tokens (BOS/EOS/PAD of the model's
    tokenizer unless `special_token_ids` or `exclude_special_tokens=False` says otherwise)
    and the unembedding's chunks (`max_memory`, `chunk_positions`); the model's own device
    and dtype are used. Deterministic.
    """
    options = options or EngineOptions()
    check_requests(model, requests)
    if not prompts:
        raise ValueError("no task prompts")
    special = options.special_token_ids
    if special is None:
        special = special_token_ids(model) if options.exclude_special_tokens else []
    batches = encode_prompts(model, prompts, options.batch_size, special)
    # per chunk: the logits, widened to float64, and log-sum-exp's temporary
    runner = _Runner(model, batches, len(prompts),
                     options.positions_per_chunk(model, bytes_per_value=8, tensors=3))

    ablation_sets = sorted({(r.write_hooks, kind) for r in requests for kind in r.ablations})
    mean_hooks = sorted({h for hooks, kind in ablation_sets if kind == "mean" for h in hooks})
    dla_hooks = {h for r in requests if r.dla
                 for h in (r.dictionaries[0].read_hook, r.dictionaries[0].write_hook)}
    cached = sorted(set(mean_hooks) | dla_hooks)
    if dla_hooks and FINAL_SCALE_HOOK in model.hook_dict:
        cached.append(FINAL_SCALE_HOOK)
    caches: list[dict[str, Tensor]] = []

    def clean_hooks(batch: PromptBatch, extra: dict) -> list:
        return [(h, _store(extra, h)) for h in cached]

    def keep_cache(batch: PromptBatch, extra: dict) -> None:
        caches.append(extra)

    ld_clean, _ = runner.collect(clean_hooks, keep_cache)
    means = _means(batches, caches, mean_hooks)
    baselines = {}
    for hooks, kind in ablation_sets:
        def abl_hooks(batch: PromptBatch, extra: dict, hooks=hooks, kind=kind) -> list:
            return [fn for h in hooks for fn in ablation_hooks(h, kind, mean=means.get(h),
                                                                mask=batch.keep)]
        baselines[(hooks, kind)] = runner.collect(abl_hooks)[0]

    result = TaskResult()
    for request in requests:
        terms = _request_terms(runner, request, ld_clean, baselines, caches)
        rows = [{"prompt_index": i, "prompt": p.prompt, "answer": p.answer,
                 "distractor": p.distractor} for i, p in enumerate(prompts)]
        if request.feature_k is not None:
            table, alone, joint = _feature_ablation(runner, request, terms["ld_spliced"])
            result.features[request.key] = table
            terms["feature_effect"], terms["ld_topk_zeroed"] = alone, joint
        for name, values in terms.items():
            if name.startswith(("n_", "abs_")) or ":" in name:
                continue
            if name == "feature_effect":
                continue
            if name == "ld_topk_zeroed":
                for j in range(values.shape[1]):
                    for row, v in zip(rows, values[:, j].tolist(), strict=True):
                        row[f"ld_top{j + 1}_zeroed"] = v
                continue
            for row, v in zip(rows, values.tolist(), strict=True):
                row[name] = v
        result.terms[request.key] = terms
        result.per_prompt[request.key] = rows
    return result


def _store(store: dict, name: str) -> Callable[..., None]:
    def hook_fn(act: Tensor, hook) -> None:
        store[name] = act

    return hook_fn


def _means(batches: list[PromptBatch], caches: list[dict[str, Tensor]],
           hooks: Sequence[str]) -> dict[str, Tensor]:
    """Mean activation at each hook over the prompts' real, non-special positions."""
    means = {}
    count = sum(int(b.keep.sum()) for b in batches)
    if hooks and count == 0:
        raise ValueError("mean ablation: the prompts have no real, non-special position")
    for hook in hooks:
        total = sum(cache[hook][b.keep].double().sum(0) for b, cache in
                    zip(batches, caches, strict=True))
        means[hook] = (total / count).to(caches[0][hook].dtype)
    return means


def _request_terms(runner: _Runner, request: TaskRequest, ld_clean: Tensor,
                   baselines: dict, caches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    guards: dict[str, Tensor] = {}

    def check(batch: PromptBatch, record: dict) -> None:
        mask = batch.splice_mask(request.positions)
        reached = reached_positions(mask)
        for name, values in {"n_prompts_spliced": batch.at_answer(reached).double(),
                             **health_terms(record, mask)}.items():
            guards.setdefault(name, torch.zeros(runner.n, dtype=torch.float64))
            guards[name][batch.indices] = values.double().cpu()

    ld_spliced, _ = runner.splice(request, request.edits, check)
    terms = {"n_prompts": torch.ones(runner.n, dtype=torch.float64), "ld_clean": ld_clean,
             "ld_spliced": ld_spliced, **guards}
    for kind in request.ablations:
        terms[f"ld_{kind}"] = baselines[(request.write_hooks, kind)]
    terms["sign_agree"] = (torch.sign(ld_spliced) == torch.sign(ld_clean)).double()
    if request.dla:
        terms.update(_dla_terms(runner, request, caches))
    return terms


def _dla_terms(runner: _Runner, request: TaskRequest,
               caches: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """DLA of the original write, its reconstruction and the remainder, per prompt."""
    d = request.dictionaries[0]
    model = runner.model
    out = {name: torch.empty(runner.n, dtype=torch.float64)
           for name in ("dla_original", "dla_reconstruction", "dla_remainder")}
    for batch, cache in zip(runner.batches, caches, strict=True):
        target = batch.at_answer(cache[d.write_hook])
        recon, _ = d.reconstruct(batch.at_answer(cache[d.read_hook]), like=target,
                                 edits=request.edits)
        scale = batch.at_answer(cache[FINAL_SCALE_HOOK]) if FINAL_SCALE_HOOK in cache else None
        target = target.double()
        parts = {"dla_original": target, "dla_reconstruction": recon.double(),
                 "dla_remainder": target - recon.double()}
        for name, act in parts.items():
            resid = write_out(model, d.write_hook, act)
            out[name][batch.indices] = direct_logit_attribution(
                model, resid, scale, batch.answers, batch.distractors).cpu()
    out["abs_dla_reconstruction"] = out["dla_reconstruction"].abs()
    out["abs_dla_remainder"] = out["dla_remainder"].abs()
    return out


def _feature_ablation(runner: _Runner, request: TaskRequest, ld_spliced: Tensor
                      ) -> tuple[list[dict], Tensor, Tensor]:
    """The top-k feature table, each top feature's per-prompt effect (LD_spliced − LD with
    it zeroed) [n, k], and the LDs with the top 1..k features zeroed jointly [n, k]."""
    d = request.dictionaries[0]
    n = runner.n
    sums = torch.zeros(d.d_sae, dtype=torch.float64)
    active = torch.zeros(n, d.d_sae, dtype=torch.bool)
    count = 0

    def accumulate(batch: PromptBatch, record: dict) -> None:
        nonlocal sums, count
        feats = record[d.name]["feats"]
        mask = batch.splice_mask(request.positions)
        sums += feats[mask].double().sum(0).cpu()
        count += int(mask.sum())
        active[batch.indices] = ((feats != 0) & mask[..., None]).any(1).cpu()

    _, nll_spliced = runner.splice(request, request.edits, accumulate)
    mean_act = sums / count
    k = request.feature_k
    top = torch.sort(mean_act, descending=True, stable=True).indices[:k].tolist()
    table = []
    alone = torch.empty(n, k, dtype=torch.float64)
    joint = torch.empty(n, k, dtype=torch.float64)
    for j, f in enumerate(top):
        ld_f, nll_f = runner.splice(request, (*request.edits, FeatureEdit(d.name, (f,), 0.0)))
        alone[:, j] = ld_spliced - ld_f
        table.append({"feature": f, "mean_activation": float(mean_act[f]),
                      "active_share": float(active[:, f].double().mean()),
                      "effect": float(alone[:, j].mean()),
                      "loss_effect": float((nll_f - nll_spliced).mean())})
        joint[:, j] = ld_f if j == 0 else runner.splice(
            request, (*request.edits, FeatureEdit(d.name, tuple(top[:j + 1]), 0.0)))[0]
    return table, alone, joint
