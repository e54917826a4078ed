"""Per-token quantities: pure tensor functions that never reduce over tokens.

The engine turns them into per-sequence sums with `sequence_sums`; every aggregate metric
in `saebench.metrics.registry` is a function of those sums.

    >>> ce = next_token_ce(logits, tokens)                 # [b, t-1]
    >>> terms = {"ce_clean": sequence_sums(ce, mask[:, :-1]), "n_pred": mask[:, :-1].sum(-1)}

Log-probabilities are computed in float32 at least (half precision is upcast);
reconstruction quantities in float64 (float32 on MPS, which has no float64), since the
centred variance behind explained variance is a difference of two large sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

NORM_FLOOR = 1e-4
"""`norm_ratio` divides by 1 where ‖target‖ is below this, as sae_lens' `l2_ratio` does."""

_SUM_CHUNK_BYTES = 1 << 26


def _wide(device: torch.device) -> torch.dtype:
    """The widest float the device supports: float64, or float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


def _logit_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def log_probs(logits: Tensor) -> Tensor:
    """`log_softmax` over the vocabulary, upcast to at least float32: [..., v] -> [..., v].

    Computed once per pass and shared by `next_token_nll` and `kl_from_log_probs`.
    """
    return torch.log_softmax(logits.to(_logit_dtype(logits)), dim=-1)


def next_token_nll(logp: Tensor, tokens: Tensor) -> Tensor:
    """Cross-entropy of each next token from log-probs `logp` [b, t, v] -> [b, t-1]."""
    return -logp[:, :-1].gather(-1, tokens[:, 1:, None].to(torch.long)).squeeze(-1)


def kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per token from log-probs of both sides: [..., v] twice -> [...]."""
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Cross-entropy of each next token: position i of `logits` predicting `tokens[:, i+1]`.

    `logits` [b, t, v], `tokens` [b, t] -> [b, t-1] (float32, or float64 for float64 logits).

        >>> next_token_ce(torch.zeros(1, 3, 5), torch.tensor([[0, 1, 2]]))  # log(5) each
        tensor([[1.6094, 1.6094]])
    """
    return next_token_nll(log_probs(logits), tokens)


def kl_div(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p ‖ q) per token, with p = softmax(`logits_p`) and q = softmax(`logits_q`).

    [..., v] twice -> [...]. Both sides go through `log_softmax`, so the result is finite
    wherever the logits are, and KL(p ‖ p) is exactly 0.
    """
    dtype = _logit_dtype(logits_p, logits_q)
    return kl_from_log_probs(log_probs(logits_p.to(dtype)), log_probs(logits_q.to(dtype)))


def active_count(feats: Tensor) -> Tensor:
    """Number of nonzero features per position: [..., d_sae] -> [...] (int64).

    `!= 0` rather than `> 0`, so signed activations (AbsTopK and the like) count as active.
    """
    return (feats != 0).sum(-1)


def _pair(target: Tensor, recon: Tensor) -> tuple[Tensor, Tensor]:
    if target.shape != recon.shape:
        raise ValueError(f"target and reconstruction shapes differ: {tuple(target.shape)} "
                         f"vs {tuple(recon.shape)}")
    dtype = _wide(target.device)
    return target.to(dtype), recon.to(dtype)


def squared_error(target: Tensor, recon: Tensor) -> Tensor:
    """‖target − recon‖² per position: [..., d] twice -> [...]."""
    target, recon = _pair(target, recon)
    return (target - recon).pow(2).sum(-1)


def squared_norm(x: Tensor) -> Tensor:
    """‖x‖² per position: [..., d] -> [...]."""
    return x.to(_wide(x.device)).pow(2).sum(-1)


def dot(target: Tensor, recon: Tensor) -> Tensor:
    """⟨target, recon⟩ per position: [..., d] twice -> [...]."""
    target, recon = _pair(target, recon)
    return (target * recon).sum(-1)


def cosine(target: Tensor, recon: Tensor) -> Tensor:
    """Cosine similarity per position, 0 where either vector is zero: [..., d] -> [...].

    NaN propagates: a broken reconstruction must not pass as orthogonal.
    """
    target, recon = _pair(target, recon)
    norms = target.norm(dim=-1) * recon.norm(dim=-1)
    zero = norms == 0
    safe = torch.where(zero, torch.ones_like(norms), norms)
    return torch.where(zero, torch.zeros_like(norms), (target * recon).sum(-1) / safe)


def norm_ratio(target: Tensor, recon: Tensor) -> Tensor:
    """‖recon‖ / ‖target‖ per position: [..., d] -> [...].

    Where ‖target‖ < `NORM_FLOOR` the division is by 1 instead, as in sae_lens' `l2_ratio`.
    """
    target, recon = _pair(target, recon)
    target_norm = target.norm(dim=-1)
    target_norm = torch.where(target_norm < NORM_FLOOR, torch.ones_like(target_norm),
                              target_norm)
    return recon.norm(dim=-1) / target_norm


def sequence_sums(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of `values` over the positions where `mask` is True, per sequence, in float64.

    `values` [b, t] or [b, t, k], `mask` [b, t] (bool) -> [b] or [b, k]. Excluded positions
    never contribute, even when they hold NaN or inf. A wide last dimension is summed in
    slices to bound the float64 temporaries.

        >>> sequence_sums(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[True, False, True]]))
        tensor([4.], dtype=torch.float64)
    """
    if values.dim() not in (2, 3) or tuple(mask.shape) != tuple(values.shape[:2]):
        raise ValueError(f"values must be [b, t] or [b, t, k] with mask [b, t]; got values "
                         f"{tuple(values.shape)} and mask {tuple(mask.shape)}")
    dtype = _wide(values.device)
    mask = mask.to(device=values.device, dtype=torch.bool)
    if values.dim() == 2:
        return torch.where(mask, values.to(dtype), 0).sum(1)
    b, t, k = values.shape
    step = max(1, _SUM_CHUNK_BYTES // max(1, 8 * b * t))
    out = torch.zeros(b, k, dtype=dtype, device=values.device)
    for i in range(0, k, step):
        out[:, i:i + step] = torch.where(mask[..., None], values[..., i:i + step].to(dtype),
                                         0).sum(1)
    return out
