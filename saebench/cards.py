"""Feature cards: what a dictionary's feature is, from one streaming pass over tokens.

A card holds a feature's density (share of positions where it is nonzero), its mean and
max activation, its top-activating contexts and its logit lens (the decoder direction,
written to the residual stream, read through the unembedding). Statistics accumulate on
the device batch by batch and the top contexts are merged into a running top-k, so no
activation is kept beyond its batch:

    >>> d = as_dictionary(loading.load_zoo_dictionary("resid-L2-topk16"))
    >>> rows = feature_cards(model, loading.load_heldout_tokens()[:32], d, [3, 17])
    >>> append_rows(run.path / "features.csv", rows)

Cards are `features.csv` rows with `table` "card"; the report shows them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from saebench.chunks import spans
from saebench.engine import special_token_ids as model_special_token_ids
from saebench.splice import Dictionary, hook_layer
from saebench.tasks import write_out

_LENS_SLICE_BYTES = 1 << 26
"""The logit lens widens W_U to float64 in vocabulary slices of at most this many bytes
(the whole of a 256k-token W_U in float64 would be gigabytes)."""


def _stop_layer(model: HookedTransformer, hooks: Sequence[str]) -> int | None:
    """The `stop_at_layer` of a pass that needs only `hooks` (None: the whole model)."""
    try:
        return min(max(hook_layer(h) for h in hooks) + 1, model.cfg.n_layers)
    except ValueError:
        return None


class _Stream:
    """Per-feature sums over the evaluated positions and the running top-k contexts, kept
    on the device. Candidates are the evaluated positions where the feature is nonzero,
    ranked by activation; ties go to the earliest (row, position), since the running top-k
    (earlier rows) and then the batch in (row, position) order are merged by a stable sort
    (torch.topk leaves the order of ties unspecified)."""

    def __init__(self, n_features: int, k: int, seq_len: int, device: torch.device) -> None:
        self.k, self.seq_len = k, seq_len
        self.positions = 0
        self.dtype: torch.dtype | None = None  # of the features, for decoding them
        self.count = torch.zeros(n_features, dtype=torch.long, device=device)
        self.total = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.peak = torch.full((n_features,), -torch.inf, dtype=torch.float64, device=device)
        self.top_value = torch.empty(n_features, 0, dtype=torch.float64, device=device)
        self.top_index = torch.empty(n_features, 0, dtype=torch.long, device=device)

    def add(self, acts: Tensor, keep: Tensor, first_row: int) -> None:
        """Fold in one batch: `acts` [b, seq, n_features], `keep` [b, seq] (evaluated)."""
        self.dtype, acts = acts.dtype, acts.double()
        kept = acts[keep]
        self.positions += len(kept)
        if len(kept):
            self.count += (kept != 0).sum(0)
            self.total += kept.sum(0)
            self.peak = torch.maximum(self.peak, kept.max(0).values)
        skip = ~keep.unsqueeze(-1) | (acts == 0)
        scores = acts.masked_fill(skip, -torch.inf).flatten(0, 1).T
        index = first_row * self.seq_len + torch.arange(scores.shape[1], device=scores.device)
        values = torch.cat([self.top_value, scores], 1)
        indices = torch.cat([self.top_index, index.expand_as(scores)], 1)
        order = values.sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        self.top_value, self.top_index = values.gather(1, order), indices.gather(1, order)


def _logit_lens(model: HookedTransformer, tokens: Tensor, dictionary: Dictionary,
                features: list[int], dtype: torch.dtype, lens_k: int
                ) -> list[tuple[list, list]]:
    """Per feature, the top and bottom `lens_k` [token, value] of its decoder direction
    decode(e_f) − decode(0) (features of `dtype`; a zero input where decoding needs one),
    written to the residual stream and multiplied by W_U in float64. Empty lists where the
    write hook has no map to the residual stream or the direction is not finite."""
    hooks = list(dictionary.hooks)
    device = next(model.parameters()).device
    _, cache = model.run_with_cache(tokens[:1, :1].to(device), names_filter=hooks,
                                    stop_at_layer=_stop_layer(model, hooks))
    read, written = cache[dictionary.read_hook], cache[dictionary.write_hook]
    n = len(features) + 1  # the last row decodes no feature
    one_hot = torch.zeros(n, dictionary.d_sae, dtype=dtype, device=read.device)
    one_hot[torch.arange(len(features), device=read.device), features] = 1
    recon = dictionary.decode(one_hot, written.new_zeros(n, *written.shape[2:]),
                              x=read.new_zeros(n, *read.shape[2:]))
    try:
        direction = write_out(model, dictionary.write_hook, recon[:-1] - recon[-1:])
    except ValueError:
        return [([], [])] * len(features)
    w_u, direction = model.W_U, direction.double()
    logits = direction.new_empty(len(direction), w_u.shape[1])
    step = max(1, _LENS_SLICE_BYTES // (8 * w_u.shape[0]))
    for start, stop in spans(w_u.shape[1], step):  # W_U widened a slice at a time
        logits[:, start:stop] = direction @ w_u[:, start:stop].double()
    lens_k = min(lens_k, logits.shape[-1])
    lens = []
    for row in logits:
        if not torch.isfinite(row).all():
            lens.append(([], []))
            continue
        top, bottom = row.topk(lens_k), row.topk(lens_k, largest=False)
        lens.append(([[_token(model, int(i)), float(v)] for v, i in zip(*top, strict=True)],
                     [[_token(model, int(i)), float(v)] for v, i in zip(*bottom, strict=True)]))
    return lens


def _token(model: HookedTransformer, token_id: int) -> str:
    """One token as text."""
    return model.to_single_str_token(token_id)


def _context(model: HookedTransformer, tokens: Tensor, index: int, value: float, window: int,
             names: dict[int, str]) -> dict[str, Any]:
    """One top context: `window` tokens before the activating one and up to `window // 2`
    after it, decoded one token each (`names` caches the decoded ids)."""
    row, position = divmod(index, tokens.shape[1])
    start = max(position - window, 0)
    ids = tokens[row, start: position + window // 2 + 1].tolist()
    for i in ids:
        if i not in names:
            names[i] = _token(model, i)
    return {"row": row, "position": position, "activation": value,
            "tokens": [names[i] for i in ids], "at": position - start}


@torch.no_grad()
def feature_cards(
    model: HookedTransformer,
    tokens: Tensor,
    dictionary: Dictionary,
    features: Sequence[int],
    *,
    k: int = 5,
    window: int = 8,
    batch_size: int = 16,
    special_token_ids: Sequence[int] | None = None,
    lens_k: int = 5,
) -> list[dict[str, Any]]:
    """One `features.csv` card row per requested feature that fires on `tokens`.

    `tokens` [n_seq, seq_len] are run in batches of `batch_size` up to the read hook;
    positions whose token is special (None: the tokenizer's BOS/EOS/PAD) are left out.
    A row holds `active_share` and `mean_activation` over the evaluated positions,
    `max_activation`, and as JSON the top `k` `contexts` (`row`, `position`, `activation`,
    `tokens` around it, `at`: the activating token's index in them; ties go to the
    earliest position) and the logit lens's `logit_top` / `logit_bottom` `lens_k` tokens
    (`[[token, value], …]`; empty where the write hook has no map to the residual stream).
    A feature that never fires gets no row.
    """
    if not dictionary.single or not dictionary.has_features:
        raise ValueError(f"dictionary {dictionary.name!r}: feature cards need a dictionary "
                         "with encode/decode that reads one hook and writes one")
    features = [int(f) for f in dict.fromkeys(features)]
    bad = [f for f in features if not 0 <= f < dictionary.d_sae]
    if bad:
        raise IndexError(f"features {bad} are outside 0..{dictionary.d_sae - 1} of "
                         f"dictionary {dictionary.name!r}")
    if not features:
        return []
    device = next(model.parameters()).device
    special = torch.tensor(model_special_token_ids(model) if special_token_ids is None
                           else list(special_token_ids), dtype=torch.long, device=device)
    hook = dictionary.read_hook
    stop = _stop_layer(model, [hook])
    selected = torch.tensor(features, device=device)
    stream = _Stream(len(features), k, tokens.shape[1], device)
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start: start + batch_size].to(device)
        _, cache = model.run_with_cache(batch, names_filter=[hook], stop_at_layer=stop)
        acts = dictionary.encode(cache[hook])[..., selected]
        stream.add(acts, ~torch.isin(batch, special), start)
    fired = [i for i, c in enumerate(stream.count.tolist()) if c > 0]
    if not fired:
        return []
    lens = _logit_lens(model, tokens, dictionary, [features[i] for i in fired], stream.dtype,
                       lens_k)
    count, total = stream.count.cpu(), stream.total.cpu()
    peak, top_value, top_index = stream.peak.cpu(), stream.top_value.cpu(), stream.top_index.cpu()
    names: dict[int, str] = {}
    rows = []
    for i, (top, bottom) in zip(fired, lens, strict=True):
        contexts = [_context(model, tokens, int(j), float(v), window, names)
                    for v, j in zip(top_value[i], top_index[i], strict=True)
                    if v > -torch.inf]
        rows.append({
            "table": "card", "feature": features[i],
            "active_share": int(count[i]) / stream.positions,
            "mean_activation": float(total[i]) / stream.positions,
            "max_activation": float(peak[i]), "contexts": json.dumps(contexts),
            "logit_top": json.dumps(top), "logit_bottom": json.dumps(bottom),
        })
    return rows
