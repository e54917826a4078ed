"""Per-token functions against independent float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from saebench.metrics import tokens as tk


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_next_token_ce_matches_float64_cross_entropy():
    g = _gen()
    logits = torch.randn(3, 7, 11, generator=g) * 4
    toks = torch.randint(11, (3, 7), generator=g)
    ref = F.cross_entropy(logits[:, :-1].double().reshape(-1, 11), toks[:, 1:].reshape(-1),
                          reduction="none").view(3, 6)
    out = tk.next_token_ce(logits, toks)
    assert out.shape == (3, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_next_token_ce_upcasts_half_precision():
    g = _gen(1)
    logits = (torch.randn(2, 5, 50, generator=g) * 3).bfloat16()
    toks = torch.randint(50, (2, 5), generator=g)
    out = tk.next_token_ce(logits, toks)
    ref = F.cross_entropy(logits[:, :-1].double().reshape(-1, 50), toks[:, 1:].reshape(-1),
                          reduction="none").view(2, 4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_next_token_ce_keeps_float64():
    logits = torch.randn(1, 4, 6, dtype=torch.float64, generator=_gen(2))
    assert tk.next_token_ce(logits, torch.zeros(1, 4, dtype=torch.long)).dtype == torch.float64


def _np_kl(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_p, log_q = log_softmax(lp), log_softmax(lq)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def test_kl_div_matches_numpy_reference():
    g = _gen(3)
    p, q = torch.randn(2, 5, 13, generator=g) * 3, torch.randn(2, 5, 13, generator=g) * 3
    out = tk.kl_div(p, q)
    assert out.shape == (2, 5) and out.dtype == torch.float32
    ref = _np_kl(p.double().numpy(), q.double().numpy())
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    assert (out >= -1e-6).all()


def test_kl_div_of_a_distribution_with_itself_is_zero():
    p = torch.randn(4, 6, 100, generator=_gen(4)) * 10
    assert tk.kl_div(p, p).abs().max() <= 1e-7
    assert tk.kl_div(p, p + 5.0).abs().max() <= 1e-5  # a constant logit shift changes nothing


def test_kl_div_is_finite_for_extreme_logits():
    p = torch.tensor([[[0.0, -1e4, 50.0]]]).bfloat16()
    q = torch.tensor([[[-1e4, 0.0, 0.0]]]).bfloat16()
    out = tk.kl_div(p, q)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_active_count_counts_negative_activations():
    feats = torch.tensor([[0.0, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert tk.active_count(feats).tolist() == [2, 0]


def test_reconstruction_helpers_match_numpy():
    g = _gen(5)
    t, r = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    tn, rn = t.double().numpy(), r.double().numpy()
    np.testing.assert_allclose(tk.squared_error(t, r).numpy(), ((tn - rn) ** 2).sum(-1))
    np.testing.assert_allclose(tk.squared_norm(t).numpy(), (tn**2).sum(-1))
    np.testing.assert_allclose(tk.dot(t, r).numpy(), (tn * rn).sum(-1))
    norms_t, norms_r = np.linalg.norm(tn, axis=-1), np.linalg.norm(rn, axis=-1)
    np.testing.assert_allclose(tk.cosine(t, r).numpy(), (tn * rn).sum(-1) / (norms_t * norms_r))
    np.testing.assert_allclose(tk.norm_ratio(t, r).numpy(), norms_r / norms_t)
    assert tk.squared_error(t, r).dtype == torch.float64


def test_cosine_is_zero_for_zero_vectors():
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    r = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [6.0, 8.0]])
    out = tk.cosine(t, r)
    assert out.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0])
    assert torch.isfinite(out).all()


def test_norm_ratio_divides_by_one_below_the_floor():
    t = torch.tensor([[0.0, 0.0], [1e-5, 0.0], [3.0, 4.0]])
    r = torch.tensor([[3.0, 4.0], [2.0, 0.0], [0.0, 10.0]])
    assert tk.norm_ratio(t, r).tolist() == pytest.approx([5.0, 2.0, 2.0])


def test_reconstruction_helpers_reject_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        tk.dot(torch.zeros(2, 3), torch.zeros(2, 4))


def test_sequence_sums_masks_and_ignores_nan_at_excluded_positions():
    values = torch.tensor([[1.0, float("nan"), 3.0], [4.0, 5.0, float("inf")]])
    mask = torch.tensor([[True, False, True], [False, True, False]])
    out = tk.sequence_sums(values, mask)
    assert out.dtype == torch.float64 and out.tolist() == [4.0, 5.0]


def test_sequence_sums_of_vectors_in_slices(monkeypatch):
    g = _gen(6)
    values = torch.randn(3, 5, 7, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    ref = (values.double() * mask[..., None]).sum(1)
    torch.testing.assert_close(tk.sequence_sums(values, mask), ref)
    monkeypatch.setattr(tk, "_SUM_CHUNK_BYTES", 8 * 3 * 5 * 2)  # slices of 2 columns
    torch.testing.assert_close(tk.sequence_sums(values, mask), ref)


def test_sequence_sums_rejects_bad_shapes():
    with pytest.raises(ValueError, match="mask"):
        tk.sequence_sums(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))


def test_next_token_ce_uniform_logits_is_log_vocab():
    out = tk.next_token_ce(torch.zeros(1, 3, 5), torch.tensor([[0, 1, 2]]))
    assert out.flatten().tolist() == pytest.approx([math.log(5)] * 2)
