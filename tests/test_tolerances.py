"""The worst-case tolerances of `tolerances` hold for any data: random float32 and float64 sums
in different orders, ratios of moved parts, and log-probs computed in two precisions."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import f32_kl, f32_log_probs, f32_sum, f32_unembed, f64_sum, ratio

VALUES = st.floats(-(2.0**100), 2.0**100, width=32) | st.floats(-2.0, 2.0, width=32)


@settings(max_examples=300, deadline=None)
@given(st.lists(VALUES, min_size=1, max_size=300))
def test_float32_sums_in_any_order_stay_within_f32_sum(values):
    """Forward, backward, by magnitude (one rounding at a time) and torch's blocked sum."""
    terms = np.array(values, dtype=np.float32)

    def sequential(xs) -> float:
        total = np.float32(0)
        for x in xs:
            total = np.float32(total + x)
        return float(total)

    sums = [sequential(terms), sequential(terms[::-1]),
            sequential(sorted(terms, key=abs)), float(torch.from_numpy(terms).sum())]
    bound = f32_sum(len(terms)) * math.fsum(abs(float(x)) for x in terms)
    assert max(sums) - min(sums) <= bound


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1e300, 1e300, allow_nan=False), min_size=1, max_size=300))
def test_float64_sums_stay_within_f64_sum_of_the_exact_sum(values):
    terms = [v / len(values) for v in values]  # no overflow
    exact = math.fsum(terms)
    bound = f64_sum(len(terms)) * math.fsum(abs(x) for x in terms)
    for order in (terms, terms[::-1], sorted(terms, key=abs)):
        assert abs(sum(order) - exact) <= bound
    assert abs(float(torch.tensor(terms, dtype=torch.float64).sum()) - exact) <= bound


@given(st.fractions(-100, 100), st.fractions(-100, 100).filter(bool), st.data())
def test_a_ratio_of_moved_parts_stays_within_ratio(num, den, data):
    tol = data.draw(st.fractions(0, abs(den) * Fraction(99, 100)))
    a, b = (data.draw(st.fractions(-tol, tol)) for _ in range(2))
    value = num / den
    assert abs((num + a) / (den + b) - value) <= Fraction(ratio(float(value), float(den),
                                                                 float(tol))) * (1 + 1e-12)


@given(st.lists(st.floats(-30, 30), min_size=2, max_size=40), st.data())
def test_kl_spread_is_bounded_by_kl_and_pinsker(logits, data):
    """Σ p·|log p − log q| ≤ KL + √(2·KL), the step `f32_kl` rests on."""
    other = data.draw(st.lists(st.floats(-30, 30), min_size=len(logits), max_size=len(logits)))
    log_p = torch.tensor(logits, dtype=torch.float64).log_softmax(-1)
    log_q = torch.tensor(other, dtype=torch.float64).log_softmax(-1)
    p = log_p.exp()
    kl = float((p * (log_p - log_q)).sum())
    assert float((p * (log_p - log_q).abs()).sum()) <= kl + math.sqrt(2 * max(kl, 0)) + 1e-12


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 32), st.integers(2, 64), st.integers(0, 2**31 - 1), st.floats(0.01, 10))
def test_float32_log_probs_stay_within_f32_log_probs(d_model, d_vocab, seed, scale):
    """Unembedding and log_softmax in float32, against float64 (within either order's
    bound, so within the two orders' `f32_log_probs`), and the KL between two such."""
    g = torch.Generator().manual_seed(seed)
    x, w, b = (scale * torch.randn(*shape, generator=g)
               for shape in ((2, d_model), (d_model, d_vocab), (d_vocab,)))
    bound = float((x.abs() @ w.abs() + b.abs()).max())
    tol = f32_log_probs(d_vocab, bound, f32_unembed(d_model, bound))
    single = torch.nn.functional.linear(x, w.T, b).log_softmax(-1).double()
    exact = torch.nn.functional.linear(x.double(), w.T.double(), b.double()).log_softmax(-1)
    assert float((single - exact).abs().max()) <= tol
    kl = (exact[0].exp() * (exact[0] - exact[1])).sum()
    kl_single = (single[0].exp() * (single[0] - single[1])).sum()
    assert abs(float(kl_single - kl)) <= f32_kl(tol, float(kl), d_vocab)
