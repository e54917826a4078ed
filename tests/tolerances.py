"""Named tolerances for the tests' numeric comparisons, each derived from the arithmetic it
covers, so that a comparison passes on any machine's float arithmetic and still fails on a
real bug.

Two computations of one quantity that differ only in the order of their float operations
(a chunk or batch size, the thread count, SIMD width, another kernel or library) are each
within a forward-error bound of the exact value, so within twice that bound of each other.
With u = eps/2 (round to nearest), a sum of n terms in any order is within
γ_(n−1)·Σ|xᵢ| of the exact sum, γ_k = k·u / (1 − k·u) (Higham, *Accuracy and Stability of
Numerical Algorithms*, 2002, §4.2); a dot product of k terms counts as a sum of k + 1 here
(each product rounds once more), k + 2 with a bias. These are worst cases, for any data
and any order. Two kinds are not: a whole forward pass, whose rounding reaches its outputs
through the model's gain, is measured against float64 (`f32_error`, `f32_activations`);
and a sum or mean over thousands of terms may use the typical case (`f32_sum_typical`,
`mean_typical`), which holds with overwhelming probability where rounding errors behave
as independent zero-mean variables.

Tests import this module as `from tolerances import ...`, as they import `toys`.
"""

from __future__ import annotations

import copy
import math

import torch
from transformer_lens import HookedTransformer

EPS32 = torch.finfo(torch.float32).eps
"""2⁻²³ ≈ 1.19e-7: the spacing of float32 numbers at 1 (twice the unit roundoff)."""
EPS64 = torch.finfo(torch.float64).eps
"""2⁻⁵² ≈ 2.22e-16: the same for float64."""


def _two_orders(roundings: int, eps: float) -> float:
    """2·γ_k for k = `roundings`: the most two orders of the computation can differ by,
    relative to the magnitude of its terms."""
    u = eps / 2
    return 2 * roundings * u / (1 - roundings * u)


def f32_sum(n_terms: int) -> float:
    """Bound, relative to Σ|xᵢ|, on how far two float32 sums of the same `n_terms` terms in
    any two orders differ: 2·γ_(n−1) ≈ (n − 1)·EPS32. Worst case (any signs, any order:
    sequential, pairwise, blocked or by SIMD lanes), so it holds on every machine."""
    return _two_orders(max(n_terms - 1, 0), EPS32)


def f64_sum(n_terms: int) -> float:
    """`f32_sum` for float64 sums: ≈ (n − 1)·EPS64."""
    return _two_orders(max(n_terms - 1, 0), EPS64)


def f32_sum_typical(n_terms: int) -> float:
    """The typical case of `f32_sum`, λ·√n·EPS32 with λ = 8: where the rounding errors
    behave as independent zero-mean variables (many terms of varied sizes, summed by
    another library in an order of its own), each order is within λ·√n·u·Σ|xᵢ| of the
    exact sum with probability at least 1 − 2n·exp(−λ²(1 − u)²/2), ≥ 1 − 3e-7 for
    n ≤ 10⁷ (Higham & Mary, SIAM J. Sci. Comput. 41, 2019). Below `f32_sum` from n = 66;
    used only for sums of thousands of terms, whose n·EPS32 would exceed 1e-4."""
    return 8 * math.sqrt(n_terms) * EPS32


F64_RECOMPUTE = f64_sum(4096)
"""≈ 9.1e-13: relative tolerance for a float64 recomputation, in another order, of a formula
of float64 sums (a matrix product, numpy against torch, a sum in slices, a mean by hand)
whose sums have up to 4,096 terms, all of one sign (counts, squared norms, weights ≥ 0)
or with |Σxᵢ| not far below Σ|xᵢ|; a test with a cancelling sum widens it by Σ|xᵢ|/|Σxᵢ|
and says so. A real bug (a wrong denominator, a dropped sequence) moves such values by
more than 1e-3 relative."""


def logit_bound(model: HookedTransformer) -> float:
    """B ≥ Σᵢ|xᵢ·W_U[i, j]| + |b_U[j]| for every logit j of every input: the size of the
    terms of a logit. The final norm leaves ‖x̂‖₂ ≤ √d_model (LayerNorm and RMSNorm divide
    by the root mean square, before their weight w and bias b), so by Cauchy–Schwarz
    Σᵢ|xᵢW_U[i, j]| ≤ √d_model·‖w ⊙ W_U[:, j]‖₂ + Σᵢ|bᵢW_U[i, j]|. In float64."""
    if model.cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        raise ValueError(f"no bound without a final norm: {model.cfg.normalization_type}")
    w_u = model.W_U.detach().double()
    w = getattr(model.ln_final, "w", None)
    b = getattr(model.ln_final, "b", None)
    w = torch.ones(len(w_u), dtype=torch.float64) if w is None else w.detach().double()
    b = torch.zeros(len(w_u), dtype=torch.float64) if b is None else b.detach().double()
    per_logit = ((w[:, None] * w_u).norm(dim=0) * math.sqrt(len(w_u))
                 + (b[:, None] * w_u).abs().sum(0) + model.b_U.detach().double().abs())
    return float(per_logit.max())


def f32_unembed(d_model: int, bound: float) -> float:
    """Absolute bound on how far two float32 computations of one logit from the same final
    residual differ (another chunk of positions, matrix layout or kernel): a dot product of
    `d_model` terms and a bias, whose terms sum to at most `bound` (`logit_bound`)."""
    return f32_sum(d_model + 2) * bound


def f32_log_probs(d_vocab: int, bound: float, logits: float) -> float:
    """Absolute bound on how far two float32 computations of one token's log-probs (so its
    NLL) differ when their logits differ by at most `logits` and are at most `bound` in size.

    A log-prob moves by at most twice its logits' largest move (the gradient of
    log_softmax has ℓ1 norm ≤ 2). Each side's own log_softmax rounds zⱼ − max z (≤ 2B) and
    that again in exp's argument, each exp, the sum of the d_vocab exps (γ_(V−1), relative,
    which the log turns absolute), the log of a sum ≤ V and the last subtraction: with
    first-order terms only, f32_sum(V) + EPS32·(6B + 2 + 2·ln V) for the two sides.
    """
    own = f32_sum(d_vocab) + EPS32 * (6 * bound + 2 + 2 * math.log(d_vocab))
    return 2 * logits + own


def f32_kl(log_probs: float, kl: float, d_vocab: int) -> float:
    """Absolute bound on how far two float32 computations of a mean KL(p ‖ q) = mean over
    tokens of Σⱼ pⱼ·dⱼ, dⱼ = log pⱼ − log qⱼ, of value `kl` differ when every log-prob
    differs by at most `log_probs` (first order).

    Per token the log-probs move the KL by Σ p·(δlog p − δlog q) ≤ 2t and, through
    p = exp(log p), by t·Σ p|d|; each side rounds the d_vocab products and their sum,
    f32_sum(V + 2)·Σ p|d|. Σ p|d| = KL + 2·Σ_(p<q) p·log(q/p) ≤ KL + 2·TV ≤ KL + √(2·KL)
    (log x ≤ x − 1, then Pinsker), and the mean over tokens of that is at most
    kl + √(2·kl) (Jensen).
    """
    spread = kl + math.sqrt(2 * max(kl, 0.0))
    return 2 * log_probs + (log_probs + f32_sum(d_vocab + 2)) * spread


PASS_MARGIN = 4
"""Another order's rounding errors are another realisation of the same roundings (the same
sums of the same magnitudes): their largest over a pass's many outputs stays within 2× of
the measured one's, and the two passes' errors add: 4×. Across these tests, under AVX-512,
AVX2 and scalar kernels, MKL's default and compatible code paths and 1 or 2 threads, two
orders differed by at most 1.5× the measured error."""


def float64_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of `module`, the reference of a measured tolerance: through `.to`,
    which TransformerLens models and sae_lens SAEs extend to update the dtype in their
    configs (they cast their inputs to it)."""
    double = copy.deepcopy(module)
    if isinstance(double, HookedTransformer):
        return double.to(torch.float64, print_details=False)
    return double.to(torch.float64)


def f32_error(module: torch.nn.Module, *inputs: torch.Tensor, method: str = "forward"
              ) -> float:
    """Absolute tolerance on an output of two float32 computations of `module.<method>` on
    `inputs` in different orders (another batch layout or start layer, another
    implementation, one rounding more at a hook): `PASS_MARGIN` × the largest rounding error
    of the float32 computation, measured against a float64 copy of `module` on the same
    inputs (widened). Measure on enough outputs (hundreds) for the largest to be typical.

    Measured, not a bound: a deep computation's rounding reaches its output through its own
    gain, which no a-priori bound knows (worst-case sums along a toy model's path overstate
    its logits' ~1e-6 some 500-fold). A splice in the wrong place or a wrong reconstruction
    moves logits by more than 1e-2."""
    wide = [x.double() if x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        exact = getattr(float64_copy(module), method)(*wide)
        error = getattr(module, method)(*inputs).double() - exact
    return PASS_MARGIN * float(error.abs().max())


def f32_activations(model: HookedTransformer, tokens: torch.Tensor, hook: str) -> float:
    """Relative tolerance, per position (‖Δx‖ / ‖x‖), on the activation at `hook` of two
    float32 passes of `model` over `tokens` as in `f32_error`: `PASS_MARGIN` × the float32
    pass's largest."""
    with torch.no_grad():
        _, single = model.run_with_cache(tokens, names_filter=[hook])
        _, double = float64_copy(model).run_with_cache(tokens, names_filter=[hook])
    x, exact = single[hook].flatten(2).double(), double[hook].flatten(2)
    return PASS_MARGIN * float(((x - exact).norm(dim=-1) / exact.norm(dim=-1)).max())


def ratio(value: float, denominator: float, part_tol: float) -> float:
    """How far a ratio N/D of `value` moves when N and D each move by at most `part_tol`:
    |Δ| ≤ part_tol·(1 + |N/D|) / (|D| − part_tol), exact while part_tol < |D| (infinite
    otherwise: the ratio is then not determined to that precision)."""
    if part_tol >= abs(denominator):
        return math.inf
    return part_tol * (1 + abs(value)) / (abs(denominator) - part_tol)


def mean_typical(bound: float, n: int) -> float:
    """The typical case of a mean over n tokens of errors each within ±`bound`: λ·bound/√n,
    λ = 6. Two orders' roundings of different tokens are independent and symmetric about
    0, so by Hoeffding's inequality the mean exceeds this with probability at most
    2·exp(−λ²/2) ≈ 3e-8. Used only for means over thousands of tokens."""
    return 6 * bound / math.sqrt(n)


def downstream(metric: str, value: float, parts: dict[str, float], log_probs: float,
               d_vocab: int) -> float:
    """Tolerance of a downstream metric's `value`, from its `parts` (`Summary.parts`), when
    every token's log-probs move by at most `log_probs`: a mean NLL moves by at most that
    (its sum over tokens is float64), a mean KL by `f32_kl`, a difference of two means by
    their sum and a ratio by `ratio`."""
    if metric == "delta_ce":
        return 2 * log_probs
    if metric == "ce_loss_recovered":
        return ratio(value, parts["denominator"], 2 * log_probs)
    if metric == "kl_div":
        return f32_kl(log_probs, value, d_vocab)
    if metric == "kl_div_score":
        moved = sum(f32_kl(log_probs, parts[k], d_vocab) for k in ("kl_spliced", "kl_abl"))
        return ratio(value, parts["denominator"], moved)
    raise ValueError(f"no downstream tolerance for {metric}")


def sequence_sums(name: str, value: torch.Tensor, log_probs: float, n_positions: int,
                  d_vocab: int) -> float:
    """Tolerance of an engine term `name` (per sequence, a float64 sum over at most
    `n_positions` positions; `value` its values, any bucket prefix `@a-b:` ignored) when
    every token's log-probs move by at most `log_probs`: n·log_probs for a CE sum (`ce_*`),
    n·`f32_kl` at the largest sequence's mean for a KL sum (`kl_*`), and 0 for the rest
    (counts, top-1 agreement, reconstruction terms), which do not read the log-probs."""
    base = name.rsplit(":", 1)[-1]
    if base.startswith("ce_"):
        return n_positions * log_probs
    if base.startswith("kl_"):
        return n_positions * f32_kl(log_probs, float(value.max()) / n_positions, d_vocab)
    return 0.0
