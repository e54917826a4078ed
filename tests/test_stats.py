"""Bootstrap intervals, aggregation rule and verdicts of `saebench.stats`."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from tolerances import F64_RECOMPUTE

from saebench.metrics import get_metric
from saebench.stats import Summary, bootstrap_weights, ratio_of_means, summarize

F64 = torch.float64


def close(x: float, cancelling: float = 1.0):
    """`x` to `F64_RECOMPUTE`: the float64 arithmetic of `saebench.stats` done here in
    another order, widened by `cancelling` (Σ|xᵢ| / |Σxᵢ|) where a difference cancels."""
    return pytest.approx(x, rel=F64_RECOMPUTE * cancelling, abs=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _downstream(n: int, seed: int = 0, tokens: int = 20) -> dict[str, torch.Tensor]:
    """Well-behaved per-sequence CE/KL sums for n sequences of `tokens` prediction positions."""
    g = _gen(seed)
    n_pred = torch.full((n,), float(tokens), dtype=F64)
    clean = n_pred * (3 + 0.3 * torch.randn(n, generator=g, dtype=F64))
    spliced = clean + n_pred * (0.2 + 0.05 * torch.randn(n, generator=g, dtype=F64))
    zero = clean + n_pred * (4 + 0.5 * torch.randn(n, generator=g, dtype=F64))
    return {"n_pred": n_pred, "n_kl": n_pred.clone(), "ce_clean": clean,
            "ce_spliced": spliced, "ce_zero": zero,
            "kl_spliced": n_pred * 0.1 * torch.rand(n, generator=g, dtype=F64),
            "kl_zero": n_pred * (2 + torch.rand(n, generator=g, dtype=F64))}


def _features(n: int, d_sae: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    rate = torch.logspace(-4, -0.5, d_sae, dtype=F64)
    counts = (torch.rand(n, 32, d_sae, generator=g, dtype=F64) < rate).sum(1).to(F64)
    return {"n_act": torch.full((n,), 32.0, dtype=F64), "feature_counts": counts}


def test_ratio_of_means_is_not_the_mean_of_ratios():
    num, den = torch.tensor([1.0, 1.0], dtype=F64), torch.tensor([1.0, 3.0], dtype=F64)
    assert ratio_of_means(num, den).item() == close(0.5)
    assert (num / den).mean().item() == close(2 / 3)


def test_summarize_returns_the_ratio_of_pooled_means():
    # sequence 1 recovers 50% of a 1-nat gap, sequence 2 recovers 90% of a 9-nat gap
    terms = {"n_pred": torch.tensor([10.0, 10.0], dtype=F64),
             "ce_clean": torch.tensor([20.0, 20.0], dtype=F64),
             "ce_spliced": torch.tensor([25.0, 29.0], dtype=F64),
             "ce_zero": torch.tensor([30.0, 110.0], dtype=F64)}
    s = summarize(get_metric("ce_loss_recovered"), terms, n_boot=0)
    assert s.value == close((140 - 54) / (140 - 40))
    assert s.value != close((0.5 + 0.9) / 2)  # 0.16 away


def test_bootstrap_weights_are_resample_counts():
    w = bootstrap_weights(50, 200, seed=3)
    assert w.shape == (200, 50) and w.dtype == F64
    # exact: counts, and the same generator seeded the same way
    assert (w.sum(1) == 50).all() and (w == w.round()).all() and (w >= 0).all()
    assert torch.equal(w, bootstrap_weights(50, 200, seed=3))
    assert not torch.equal(w, bootstrap_weights(50, 200, seed=4))
    assert torch.equal(w[:64], bootstrap_weights(50, 64, seed=3))


def test_interval_is_the_percentile_of_resampled_aggregates():
    terms = _downstream(40)
    metric = get_metric("ce_loss_recovered")
    s = summarize(metric, terms, n_boot=500, seed=7)
    w = bootstrap_weights(40, 500, seed=7).numpy()
    t = {k: w @ v.numpy() for k, v in terms.items()}
    values = (t["ce_zero"] - t["ce_spliced"]) / (t["ce_zero"] - t["ce_clean"])
    lo, hi = np.percentile(values, [2.5, 97.5])
    # numpy's sums of 40 weighted terms against torch's; the differences of two sums cancel
    # by at most 3× here (CE 3-7 nats per token)
    assert (s.ci_low, s.ci_high) == close((lo, hi), cancelling=3)


@pytest.mark.parametrize("name", ["ce_loss_recovered", "delta_ce", "kl_div", "kl_div_score"])
def test_interval_contains_the_value_and_shrinks_with_n(name: str):
    metric = get_metric(name)
    small = summarize(metric, _downstream(30, seed=1))
    large = summarize(metric, _downstream(1000, seed=1))
    for s in (small, large):
        assert s.verdict == "ok" and s.reason == ""
        assert s.ci_low < s.value < s.ci_high
    assert (large.ci_high - large.ci_low) < 0.5 * (small.ci_high - small.ci_low)
    assert (small.n, large.n) == (30, 1000)


def test_same_seed_same_interval_other_seed_other_interval():
    terms, metric = _downstream(100), get_metric("kl_div")
    a, b, c = (summarize(metric, terms, seed=s) for s in (0, 0, 1))
    assert a == b
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.value == c.value


def test_paired_resampling_gives_zero_width_for_perfectly_correlated_parts():
    terms = _downstream(60)
    terms["ce_spliced"] = terms["ce_clean"] + 0.25 * (terms["ce_zero"] - terms["ce_clean"])
    metric = get_metric("ce_loss_recovered")
    s = summarize(metric, terms)
    # 0.75 by construction up to the rounding of the terms made here; every resample too
    assert s.value == close(0.75)
    assert s.ci_high - s.ci_low < 2 * F64_RECOMPUTE
    # unpaired resampling (independent weights per term) would give a wide interval
    w1, w2 = bootstrap_weights(60, 1000, 0), bootstrap_weights(60, 1000, 1)
    num = w1 @ (terms["ce_zero"] - terms["ce_spliced"])
    den = w2 @ (terms["ce_zero"] - terms["ce_clean"])
    assert (num / den).quantile(0.975) - (num / den).quantile(0.025) > 0.01


def test_unstable_when_the_denominator_interval_straddles_zero():
    g = _gen(5)
    terms = _downstream(50)
    terms["ce_zero"] = terms["ce_clean"] + 20 * (0.05 + torch.randn(50, generator=g, dtype=F64))
    s = summarize(get_metric("ce_loss_recovered"), terms)
    assert s.verdict == "unstable"
    assert "CE_abl − CE_clean" in s.reason and "CI [" in s.reason
    assert math.isfinite(s.value) and math.isfinite(s.ci_low)  # kept for the reader
    gap = terms["ce_zero"] - terms["ce_clean"]
    cancelling = float((terms["ce_zero"].abs() + terms["ce_clean"].abs()).sum() / gap.sum().abs())
    assert s.parts["denominator"] == close((gap.sum() / terms["n_pred"].sum()).item(),
                                           cancelling)


def test_unstable_when_the_denominator_is_tiny_even_with_a_tight_interval():
    terms = _downstream(50)
    terms["kl_zero"] = terms["n_pred"] * 1e-4
    terms["kl_spliced"] = terms["n_pred"] * 5e-5
    s = summarize(get_metric("kl_div_score"), terms)
    assert s.verdict == "unstable" and "KL_abl" in s.reason and "0.0001" in s.reason
    assert s.value == close(0.5) and s.ci_high - s.ci_low < 2 * F64_RECOMPUTE
    assert summarize(get_metric("kl_div_score"), terms, min_denominator=1e-5).verdict == "ok"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_verdict_names_the_offending_term(bad: float):
    terms = _downstream(20)
    terms["ce_spliced"][3] = bad
    s = summarize(get_metric("ce_loss_recovered"), terms)
    assert s.verdict == "nan" and math.isnan(s.value) and "'ce_spliced'" in s.reason
    assert math.isnan(s.ci_low) and math.isnan(s.ci_high)


def test_nan_verdict_for_an_undefined_value():
    terms = _downstream(20)
    terms["kl_zero"] = torch.zeros(20, dtype=F64)
    terms["kl_spliced"] = torch.zeros(20, dtype=F64)
    s = summarize(get_metric("kl_div_score"), terms)
    assert s.verdict == "nan" and math.isnan(s.value) and "denominator" in s.reason


def test_empty_for_no_sequences_and_for_no_positions():
    empty = {k: v[:0] for k, v in _downstream(5).items()}
    s = summarize(get_metric("kl_div"), empty)
    assert (s.verdict, s.n) == ("empty", 0) and math.isnan(s.value) and s.reason
    terms = _downstream(5)
    terms["n_kl"] = torch.zeros(5, dtype=F64)
    s = summarize(get_metric("kl_div"), terms)
    assert s.verdict == "empty" and "n_kl" in s.reason and math.isnan(s.value)


def test_empty_reconstruction_counts_name_n_act():
    terms = _features(4, 10)
    terms["n_act"] = torch.zeros(4, dtype=F64)
    terms["feature_counts"] = torch.zeros(4, 10, dtype=F64)
    s = summarize(get_metric("dead_fraction"), terms)
    assert s.verdict == "empty" and "n_act" in s.reason


def test_a_single_sequence_gives_no_interval():
    s = summarize(get_metric("kl_div"), _downstream(1))
    assert s.verdict == "unstable" and "single sequence" in s.reason
    assert math.isfinite(s.value) and math.isnan(s.ci_low)


def test_missing_term_raises_naming_it():
    terms = _downstream(5)
    del terms["ce_zero"]
    with pytest.raises(KeyError, match="ce_zero"):
        summarize(get_metric("ce_loss_recovered"), terms)


def test_options_reach_the_metric():
    terms = _downstream(30)
    terms["ce_mean"] = terms["ce_clean"] + 0.5 * (terms["ce_zero"] - terms["ce_clean"])
    metric = get_metric("ce_loss_recovered")
    zero, mean = summarize(metric, terms, {}), summarize(metric, terms, {"ablation": "mean"})
    assert mean.value < zero.value
    assert mean.parts["ce_abl"] < zero.parts["ce_abl"]
    with pytest.raises(ValueError, match="'resample'"):
        summarize(metric, terms, {"ablation": "resample"})


def test_no_bootstrap_gives_nan_bounds():
    s = summarize(get_metric("kl_div"), _downstream(10), n_boot=0)
    assert s.verdict == "ok" and math.isnan(s.ci_low) and math.isfinite(s.value)


def _reconstruction(n: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    x = 3 + torch.randn(n, 16, d, generator=g, dtype=F64)
    err = 0.5 * torch.randn(n, 16, d, generator=g, dtype=F64)
    return {"n_act": torch.full((n,), 16.0, dtype=F64), "sq_err": err.pow(2).sum((1, 2)),
            "sq_target": x.pow(2).sum((1, 2)), "sum_target": x.sum(1)}


@pytest.mark.parametrize("name", ["dense_fraction", "explained_variance", "mse"])
def test_chunked_wide_terms_equal_the_unchunked_result(name: str):
    metric = get_metric(name)
    terms = _features(40, 3000) if name == "dense_fraction" else _reconstruction(40, 300)
    whole = summarize(metric, terms, n_boot=300)
    chunked = summarize(metric, terms, n_boot=300, chunk_bytes=1)  # one weight block at a time
    assert whole == chunked
    assert whole.verdict == "ok" and whole.ci_low < whole.value < whole.ci_high
    w = bootstrap_weights(40, 300, 0)
    resampled = {k: w @ v for k, v in terms.items()}
    values = metric.aggregate(resampled, {})
    # the variance E‖x‖² − ‖E x‖² of activations 3 ± 1 cancels 10-fold
    assert (whole.ci_low, whole.ci_high) == close(
        tuple(values.quantile(torch.tensor([0.025, 0.975], dtype=F64)).tolist()), cancelling=10)


def test_dead_fraction_has_no_interval_because_resampling_biases_it():
    terms = _features(200, 2000)
    s = summarize(get_metric("dead_fraction"), terms)
    assert s.verdict == "ok" and 0 < s.value < 1
    assert math.isnan(s.ci_low) and math.isnan(s.ci_high)
    assert s.parts["n_dead"] == (terms["feature_counts"].sum(0) == 0).sum().item()
    biased = replace(get_metric("dead_fraction"), bootstrap=True)
    s = summarize(biased, terms)
    assert s.verdict == "unstable" and "outside its own bootstrap interval" in s.reason
    assert s.ci_low > s.value


def test_summary_is_a_plain_record():
    s = summarize(get_metric("delta_ce"), _downstream(10))
    assert isinstance(s, Summary)
    assert set(s.parts) == {"n_pred", "ce_clean", "ce_spliced"}
    spliced, clean = s.parts["ce_spliced"], s.parts["ce_clean"]
    assert s.value == close(spliced - clean, (spliced + clean) / (spliced - clean))
