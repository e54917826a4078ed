"""`pathological_error`: the random-noise baselines the engine draws, and the metric on them."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import (
    EPS32,
    EPS64,
    F64_RECOMPUTE,
    f32_error,
    f32_log_probs,
    f32_sum,
    logit_bound,
    sequence_sums,
)
from toys import Identity, Scaled, tiny_model, tokens_for

from saebench import engine, evaluate, loading
from saebench.metrics import get_metric
from saebench.splice import as_dictionary
from saebench.stats import summarize

METRIC = get_metric("pathological_error")
HOOKS = ("blocks.1.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.0.mlp.hook_post")


pytestmark = pytest.mark.usefixtures("no_grad_one_thread")


class IsotropicNoise:
    """A 'dictionary' whose reconstruction is x plus isotropic noise of norm rel·‖x‖."""

    def __init__(self, rel: float, seed: int):
        self.rel, self.gen = rel, torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.randn(x.shape, generator=self.gen)
        return x + self.rel * x.norm(dim=-1, keepdim=True) * g / g.norm(dim=-1, keepdim=True)


def request(d, draws: int = 4, seed: int = 0, **kwargs) -> engine.Request:
    return engine.Request("d", (d,), reconstruction=False, ablations=(),
                          noise_draws=draws, noise_seed=seed, **kwargs)


def run(model, tokens, req, **options) -> dict[str, torch.Tensor]:
    options.setdefault("progress", False)
    return engine.run(model, tokens, [req], engine.EngineOptions(**options))[req.key]


@pytest.mark.parametrize("hook", HOOKS)
def test_isotropic_noise_dictionary_is_not_pathological(hook):
    """The spliced error is one isotropic draw of the baseline's norm, so the ratio is ~1.

    Over 768 tokens, 8 dictionary seeds gave 0.996 ± 0.022 (sd) at resid_pre and mlp_out;
    0.1 is ~4.5 sd. A wrong ε norm (e.g. ‖x‖ instead of ‖x̂ − x‖) or a perturbation at other
    positions moves the ratio far from 1.
    """
    model = tiny_model()
    d = as_dictionary(IsotropicNoise(0.5, seed=1), hook=hook)
    terms = run(model, tokens_for(model, 64, 0), request(d), batch_size=64)
    summary = summarize(METRIC, terms, {"baseline": "isotropic"}, n_boot=100)
    assert summary.verdict == "ok", summary.reason
    assert summary.value == pytest.approx(1.0, abs=0.1)
    assert summary.parts["kl_spliced"] > 0.01


def test_identity_dictionary_has_no_error_and_an_undefined_ratio():
    model = tiny_model()
    d = as_dictionary(Identity(), hook="blocks.1.hook_resid_pre", d_in=16, d_sae=16)
    terms = run(model, tokens_for(model, 8, 1), request(d))
    # exact: no error, so no noise either, and every pass repeats the clean arithmetic
    for name in ("kl_spliced", "kl_eps_iso", "kl_eps_cov"):
        assert torch.equal(terms[name], torch.zeros(8, dtype=torch.float64)), name
    df = evaluate(model, {"id": d}, tokens_for(model, 8, 1), ["pathological_error"],
                  n_boot=20, progress=False)
    assert len(df) == 2
    for _, row in df.iterrows():
        assert row["verdict"] in ("nan", "unstable") and row["message"]
        assert row["verdict"] != "nan" or math.isnan(row["value"])


@pytest.mark.parametrize("hook", HOOKS)
def test_perturbed_passes_move_masked_positions_by_the_error_norm_only(hook, monkeypatch):
    """Capture the write-hook activation each pass ends up with (a hook after the engine's)."""
    model = tiny_model()
    tokens = tokens_for(model, 5, 2)
    tokens[:, 4] = 0
    tokens[1, 7] = 0
    captured: list[torch.Tensor] = []
    plain_pass = engine._suffix_pass

    def spy(model_, cache, batch, layer, fwd_hooks, rows=None):
        def grab(act, hook):
            captured.append(act.flatten(2).clone())

        return plain_pass(model_, cache, batch, layer, [*fwd_hooks, (hook, grab)], rows)

    monkeypatch.setattr(engine, "_suffix_pass", spy)
    width = 32 if "mlp" in hook else 16
    d = as_dictionary(Scaled(), hook=hook, d_in=width, d_sae=width)
    req = request(d, draws=3, positions=[2, 4, 7, -1])
    run(model, tokens, req, special_token_ids=[0])
    assert len(captured) == 1 + 3 * 2
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    target = cache[hook].flatten(2)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, [2, 4, 7, 11]] = True
    mask &= tokens != 0
    error_norm = (captured[0] - target).norm(dim=-1)
    # exact outside the mask: the activation is left as it is
    assert (error_norm[mask] > 1e-3).all() and (error_norm[~mask] == 0).all()
    perturbations = [act - target for act in captured[1:]]
    # ‖(x + ε) − x‖ against ‖x̂ − x‖: the float32 sum and difference round once per element
    # (≤ EPS32·(‖x‖ + ‖ε‖) in norm), and the norms of ≤ 32 squares, their square roots and
    # the scaling of the direction add f32_sum(width + 4) relative. A wrong ε norm (‖x‖
    # for ‖x̂ − x‖) would be off by O(1).
    atol = EPS32 * float(target.norm(dim=-1).max() + error_norm.max())
    for eps in perturbations:
        assert torch.equal(eps[~mask], torch.zeros_like(eps[~mask]))
        torch.testing.assert_close(eps.norm(dim=-1)[mask], error_norm[mask],
                                   rtol=f32_sum(width + 4), atol=atol)
    for a, b in zip(perturbations, perturbations[1:], strict=False):
        assert (a[mask] - b[mask]).abs().max() > 10 * atol
    cos = torch.nn.functional.cosine_similarity(perturbations[0][mask],
                                                (captured[0] - target)[mask], dim=-1)
    # a random direction's |cos| with a fixed one averages √(2 / (π·d)) ≤ 0.2 for d ≥ 16;
    # an ε along the error would give 1
    assert cos.abs().mean() < 0.5


def test_covariance_baseline_draws_have_the_activation_covariance():
    model = tiny_model()
    hook = "blocks.0.mlp.hook_post"
    tokens = tokens_for(model, 20, 3)
    options = engine.EngineOptions(batch_size=3, special_token_ids=[0], progress=False)
    cov = engine.activation_covariances(model, tokens, [hook], options)[hook]
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    flat = cache[hook][tokens != 0].double()
    # float64 sums of the ≤ 240 positions' products, streamed by batch against torch.cov: a
    # covariance is a difference E[xy] − E[x]E[y], so its rounding is relative to E[x²]
    torch.testing.assert_close(cov, torch.cov(flat.T), rtol=0,
                               atol=F64_RECOMPUTE * float(flat.pow(2).mean(0).max()))

    def factor_tolerance(c: torch.Tensor) -> float:
        """eigh is backward stable: V·Λ·Vᵀ is within p(d)·EPS64·‖C‖₂ of C, p a low-degree
        polynomial (taken as d²), and the negative rounding eigenvalues clipped to 0 are
        as small."""
        return len(c) ** 2 * EPS64 * float(torch.linalg.matrix_norm(c, 2))

    factor = engine.covariance_factor(cov)
    torch.testing.assert_close(factor @ factor.T, cov, rtol=0, atol=factor_tolerance(cov))
    z = torch.randn(200_000, cov.shape[0], generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    draws = engine.random_directions(z, factor)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # Monte-Carlo error of a sample covariance of n Gaussian draws: E‖Ĉ − C‖²_F =
    # (‖C‖²_F + tr(C)²) / n ≤ (1 + d)·‖C‖²_F / n; 3 × its root, 0.038, is far below the 0.5
    # between this covariance and the isotropic one (a factor that ignored it)
    monte_carlo = 3 * math.sqrt((1 + len(cov)) / len(z))
    assert rel(torch.cov(draws.T), cov) < monte_carlo
    isotropic = torch.eye(len(cov), dtype=torch.float64) * cov.trace() / len(cov)
    assert rel(isotropic, cov) > 0.5
    assert rel(torch.cov(engine.random_directions(z).T),
               torch.eye(len(cov)).double()) < monte_carlo

    low_rank = flat[:5].T @ flat[:5]
    factor = engine.covariance_factor(low_rank)
    torch.testing.assert_close(factor @ factor.T, low_rank, rtol=0,
                               atol=factor_tolerance(low_rank))


def test_draws_are_deterministic_per_seed_and_do_not_depend_on_batch_size():
    model = tiny_model()
    tokens = tokens_for(model, 12, 4)
    d = as_dictionary(Scaled(), hook="blocks.1.hook_resid_pre", d_in=16, d_sae=16)
    first = run(model, tokens, request(d, draws=2, seed=7), batch_size=5)
    again = run(model, tokens, request(d, draws=2, seed=7), batch_size=5)
    other = run(model, tokens, request(d, draws=2, seed=8), batch_size=5)
    whole = run(model, tokens, request(d, draws=2, seed=7), batch_size=12)
    # another batch size: per-token log-probs move as between two passes (`f32_error` of
    # the logits), summed over 12 positions (`sequence_sums`); draws seeded per sequence
    # would otherwise differ by O(KL) itself
    bound = logit_bound(model)
    token = f32_log_probs(model.cfg.d_vocab, bound, f32_error(model, tokens))
    for name in ("kl_spliced", "kl_eps_iso", "kl_eps_cov"):
        assert torch.equal(first[name], again[name]), name  # exact: the same run twice
        tol = sequence_sums(name, first[name], token, model.cfg.n_ctx, model.cfg.d_vocab)
        torch.testing.assert_close(whole[name], first[name], rtol=0, atol=tol)
        if name != "kl_spliced":
            assert (first[name] - other[name]).abs().max() > 10 * tol, name
    # exact: the seed moves only the noise passes
    assert torch.equal(first["kl_spliced"], other["kl_spliced"])


def test_request_and_option_validation():
    model = tiny_model()
    d = as_dictionary(Scaled(), hook="blocks.1.hook_resid_pre", d_in=16, d_sae=16)
    e = as_dictionary(Scaled(), hook="blocks.0.hook_mlp_out", d_in=16, d_sae=16)
    with pytest.raises(ValueError, match="exactly one dictionary"):
        engine.Request("x", (d, e), reconstruction=False, noise_draws=2)
    with pytest.raises(ValueError, match="downstream"):
        engine.Request("x", (d,), downstream=False, noise_draws=2)
    with pytest.raises(ValueError, match=">= 0"):
        engine.Request("x", (d,), noise_draws=-1)
    with pytest.raises(ValueError, match="unknown noise baseline"):
        engine.Request("x", (d,), noise_draws=1, noise_baselines=("pca",))
    with pytest.raises(ValueError, match="option baseline: must be one of isotropic, covariance"):
        METRIC.terms({"baseline": "pca"})
    with pytest.raises(ValueError, match="n_draws"):
        METRIC.terms({"n_draws": 0})
    with pytest.raises(ValueError, match="n_draws"):
        evaluate(model, {"d": d}, tokens_for(model, 2, 0), ["pathological_error"], n_draws=0,
                 progress=False)
    only_iso = run(model, tokens_for(model, 2, 0),
                   request(d, draws=1, noise_baselines=("isotropic",)))
    assert "kl_eps_iso" in only_iso and "kl_eps_cov" not in only_iso
    with pytest.warns(UserWarning, match="single dictionary"):
        df = evaluate(model, {"pair": [d, e]}, tokens_for(model, 2, 0),
                      ["pathological_error", "kl_div"], n_boot=10, progress=False)
    assert list(df["metric"]) == ["kl_div"]


def test_zoo_dictionary_against_both_baselines(zoo_model):
    tokens = loading.load_heldout_tokens()[:32]
    d = loading.load_zoo_dictionary("resid-L2-topk16")
    df = evaluate(zoo_model, {"topk16": d}, tokens, ["pathological_error"], n_boot=200,
                  progress=False, n_draws=4)
    assert [row["options"] for _, row in df.iterrows()] == [
        '{"baseline": "isotropic", "n_draws": 4}', '{"baseline": "covariance", "n_draws": 4}']
    for _, row in df.iterrows():
        assert row["verdict"] == "measured", row["message"]
        assert math.isfinite(row["value"]) and row["value"] > 0
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
