"""The engine: invariants of the core metrics, and its shortcuts equal the plain passes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import (
    F64_RECOMPUTE,
    downstream,
    f32_activations,
    f32_error,
    f32_kl,
    f32_log_probs,
    f32_unembed,
    logit_bound,
    sequence_sums,
)
from toys import HOOKS, Identity, Scaled, Zero, lossy, tiny_model, tokens_for, width

from saebench import engine, evaluate
from saebench.splice import as_dictionary, splice_hooks

pytestmark = pytest.mark.usefixtures("no_grad_one_thread")
D_VOCAB = 29  # tiny_config's


def wrap(obj, model, hook):
    return as_dictionary(obj, hook=hook, d_in=width(model, hook), d_sae=width(model, hook))


def values(df) -> dict[str, float]:
    return {(m if o == "{}" else f"{m}{o}"): v
            for m, o, v in zip(df["metric"], df["options"], df["value"], strict=True)}


def parts(df) -> dict[str, dict[str, float]]:
    """Each value's parts (`Summary.parts`), keyed as `values` keys the values."""
    return {(m if o == "{}" else f"{m}{o}"): json.loads(p)
            for m, o, p in zip(df["metric"], df["options"], df["parts"], strict=True)}


def pass_tolerance(model, tokens) -> float:
    """How far one token's log-probs may move between two float32 passes of `model` over
    `tokens` that compute the same function in different orders (`f32_error`)."""
    return f32_log_probs(model.cfg.d_vocab, logit_bound(model), f32_error(model, tokens))


def assert_downstream_close(got: dict[str, float], want: dict[str, float],
                            want_parts: dict[str, dict], token: float) -> None:
    """Each downstream value of `want` within its `downstream` tolerance in `got`."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        metric = key.split("{")[0]
        tol = downstream(metric, value, want_parts[key], token, D_VOCAB)
        assert got[key] == pytest.approx(value, rel=0, abs=tol), key


def run_metrics(model, dictionaries, tokens, **kwargs):
    kwargs.setdefault("n_boot", 20)
    return evaluate(model, dictionaries, tokens, progress=False, **kwargs)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hook=st.sampled_from(HOOKS), layer=st.integers(0, 1), seed=st.integers(0, 5))
def test_identity_dictionary_recovers_everything(hook, layer, seed):
    model = tiny_model(seed=seed)
    hook = hook.format(l=layer)
    df = run_metrics(model, {"id": wrap(Identity(), model, hook)}, tokens_for(model, 4, seed),
                     metrics=["ce_loss_recovered", "kl_div", "kl_div_score", "explained_variance",
                              "mse", "cossim", "next_token_agreement"])
    v = values(df)
    # Exact: the identity hands back the activation's own values, so the spliced pass repeats
    # the clean pass's arithmetic (the same ops on the same values, in the same order) and
    # its CE, KL, top-1 and reconstruction error are the clean ones to the bit.
    assert v['ce_loss_recovered{"ablation": "zero"}'] == 1.0
    assert v["next_token_agreement"] == 1.0
    assert v["kl_div"] == 0.0
    assert v["explained_variance"] == 1.0
    assert v["mse"] == 0.0
    # a float64 ⟨x, x⟩ / (‖x‖·‖x‖): the square roots round
    assert v["cossim"] == pytest.approx(1, rel=0, abs=F64_RECOMPUTE)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hook=st.sampled_from(HOOKS), layer=st.integers(0, 1), seed=st.integers(0, 5))
def test_zero_dictionary_recovers_nothing_under_zero_ablation(hook, layer, seed):
    model = tiny_model(seed=seed)
    hook = hook.format(l=layer)
    tokens = tokens_for(model, 4, seed)
    df = run_metrics(model, {"zero": wrap(Zero(), model, hook)}, tokens,
                     metrics=["ce_loss_recovered", "kl_div_score"])
    # The spliced pass writes zeros as the zero ablation does, but a whole residual is
    # ablated in a one-row pass: other matrix shapes, so `pass_tolerance` per token. Were the
    # zeros not spliced (or spliced elsewhere), both values would be near 1.
    token = pass_tolerance(model, tokens)
    v, p = values(df), parts(df)
    for key in ('ce_loss_recovered{"ablation": "zero"}', 'kl_div_score{"ablation": "zero"}'):
        tol = downstream(key.split("{")[0], 0.0, p[key], token, D_VOCAB)
        assert v[key] == pytest.approx(0, abs=tol), key


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hook=st.sampled_from(HOOKS), layer=st.integers(0, 1), seed=st.integers(0, 5))
def test_error_term_gives_the_clean_model_exactly(hook, layer, seed):
    model = tiny_model(seed=seed)
    hook = hook.format(l=layer)
    df = run_metrics(model, {"lossy": wrap(Scaled(), model, hook)},
                     tokens_for(model, 4, seed), metrics=["delta_ce", "kl_div",
                                                          "next_token_agreement"],
                     error_term=True)
    v = values(df)
    # Exact: with the error term the splice adds nothing, so no hook runs and the spliced
    # pass is the clean pass's arithmetic
    assert v["delta_ce"] == 0.0
    assert v["kl_div"] == 0.0
    assert v["next_token_agreement"] == 1.0


@pytest.mark.parametrize("hook", [h.format(l=1) for h in HOOKS])
def test_results_do_not_depend_on_batch_size(hook):
    model = tiny_model()
    tokens = tokens_for(model, 12, 1)
    dicts = {"lossy": wrap(Scaled(), model, hook)}
    metrics = ["ce_loss_recovered", "kl_div", "l0", "explained_variance", "cossim"]
    runs = [run_metrics(model, {k: wrap(Scaled(), model, hook) for k in dicts}, tokens,
                        metrics=metrics, batch_size=b) for b in (1, 5, 12)]
    by_batch = [values(df) for df in runs]
    first, first_parts = by_batch[0], parts(runs[0])
    moved = f32_activations(model, tokens, hook)  # relative, per position
    downstream_keys = ['ce_loss_recovered{"ablation": "zero"}', "kl_div"]
    for other in by_batch[1:]:
        assert_downstream_close({k: other[k] for k in downstream_keys},
                                {k: first[k] for k in downstream_keys}, first_parts,
                                pass_tolerance(model, tokens))
        # nonzero counts: rounding moves no activation to or from exactly 0
        assert other["l0"] == first["l0"]
        assert other["explained_variance"] == pytest.approx(
            first["explained_variance"], rel=0,
            abs=ev_tolerance(first_parts["explained_variance"], moved))
        # a cosine of two unit vectors each turned by at most 2r moves by at most 4r
        assert other["cossim"] == pytest.approx(first["cossim"], rel=0, abs=4 * moved)


def ev_tolerance(parts: dict[str, float], r: float) -> float:
    """How far explained variance 1 − E/V moves when the activations x move by at most r·‖x‖
    (and x̂ = lossy(x), 0.7-Lipschitz in x − x̂): with S = E‖x‖² = E/(1 − EV_uncentred),
    E moves by at most 2·√E·0.7r√S + (0.7r)²S and V = E‖x‖² − ‖E x‖² by 4r·S + 2r²S,
    so EV by (ΔE + (E/V)·ΔV)/(V − ΔV). A batch that mixed up rows or positions would move
    it by far more: every x̂ would pair with another x."""
    err, var = parts["sq_err_per_position"], parts["variance_per_position"]
    sq = err / (1 - parts["explained_variance_uncentred"])
    d_err = 2 * math.sqrt(err * sq) * 0.7 * r + (0.7 * r) ** 2 * sq
    d_var = 4 * r * sq + 2 * r**2 * sq
    return (d_err + err / var * d_var) / (var - d_var)


@pytest.mark.parametrize("hook", [h.format(l=1) for h in HOOKS])
def test_prefix_cached_pass_equals_the_full_pass(hook):
    model = tiny_model()
    tokens = tokens_for(model, 3, 2)
    d = wrap(Scaled(), model, hook)
    full = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d]))
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_pre"])
    d = wrap(Scaled(), model, hook)
    suffix = engine.unembed(model, engine._suffix_pass(model, cache, tokens, 1,
                                                       splice_hooks([d])))
    # The same final residual (block 1 and the splice on the same values); the unembedding
    # runs with another matrix layout. A pass started at the wrong layer moves logits by O(1).
    bound = logit_bound(model)
    torch.testing.assert_close(suffix, full, rtol=0, atol=f32_unembed(16, bound))


@pytest.mark.parametrize("kind", ["zero", "mean"])
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_post",
                                  "blocks.1.hook_resid_mid"])
def test_token_independent_ablation_shortcut_equals_the_plain_pass(kind, hook):
    """Ablating a whole residual stream at every position: one row stands for all."""
    from saebench.splice import ablation_hooks

    model = tiny_model()
    tokens = tokens_for(model, 6, 3)
    options = engine.EngineOptions(special_token_ids=[])
    means = engine.mean_activations(model, tokens, [hook], options) if kind == "mean" else {}
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre",
                                                          "blocks.1.hook_resid_pre"])
    shortcut = engine.unembed(model, engine._ablated_residual(model, cache, tokens, (hook,),
                                                              kind, means, {}))
    assert shortcut.shape[0] == 1
    plain = model.run_with_hooks(tokens, fwd_hooks=ablation_hooks(hook, kind,
                                                                  mean=means.get(hook)))
    # one row against the whole batch: other matrix shapes in every block after the hook;
    # a shortcut that fed a row's own tokens through would move logits by O(1)
    torch.testing.assert_close(shortcut.expand_as(plain), plain, rtol=0,
                               atol=f32_error(model, tokens))


def test_shortcut_and_plain_engine_runs_give_the_same_numbers(monkeypatch):
    model = tiny_model()
    tokens = tokens_for(model, 8, 4)
    hook = "blocks.1.hook_resid_pre"
    metrics = ["ce_loss_recovered", "kl_div_score"]
    fast = run_metrics(model, {"d": wrap(Scaled(), model, hook)}, tokens, metrics=metrics,
                       ablation=("zero", "mean"))
    monkeypatch.setattr(engine, "_is_whole_residual", lambda hooks: False)
    plain = values(run_metrics(model, {"d": wrap(Scaled(), model, hook)}, tokens,
                               metrics=metrics, ablation=("zero", "mean")))
    assert_downstream_close(plain, values(fast), parts(fast), pass_tolerance(model, tokens))


def test_several_dictionaries_spliced_together():
    model = tiny_model()
    tokens = tokens_for(model, 4, 5)
    pair = [wrap(Identity(), model, "blocks.0.hook_resid_pre"),
            wrap(Zero(), model, "blocks.1.hook_mlp_out")]
    metrics = ["delta_ce", "kl_div"]
    v = values(run_metrics(model, {"pair": pair}, tokens, metrics=metrics))
    single = run_metrics(model, {"z": wrap(Zero(), model, "blocks.1.hook_mlp_out")}, tokens,
                         metrics=metrics)
    # the pair's pass starts a layer earlier: `pass_tolerance` per token; a pair that
    # dropped its second splice would have KL 0, far outside it
    token = pass_tolerance(model, tokens)
    assert_downstream_close(v, values(single), parts(single), token)
    assert v["kl_div"] > 10 * f32_kl(token, v["kl_div"], D_VOCAB)


def test_all_special_tokens_give_an_empty_verdict_not_a_number():
    model = tiny_model()
    tokens = torch.zeros(3, model.cfg.n_ctx, dtype=torch.long)
    df = evaluate(model, {"id": wrap(Identity(), model, "blocks.0.hook_resid_pre")}, tokens,
                  ["ce_loss_recovered", "l0"], exclude_special_tokens=[0], progress=False,
                  n_boot=10)
    assert set(df["verdict"]) == {"empty"}
    assert all(math.isnan(v) for v in df["value"])


def test_nan_reconstruction_gives_a_nan_verdict():
    class Broken(Identity):
        def decode(self, f):
            return f * float("nan")

    model = tiny_model()
    df = run_metrics(model, {"nan": wrap(Broken(), model, "blocks.0.hook_resid_pre")},
                     tokens_for(model, 3, 6), metrics=["ce_loss_recovered", "cossim"])
    assert set(df["verdict"]) == {"nan"}
    assert df["message"].str.len().min() > 0


def test_identity_at_a_site_that_barely_matters_is_unstable():
    """Zero-ablating a near-silent site changes the loss by ~0: the ratio is undefined."""
    model = tiny_model()
    hook = "blocks.1.hook_attn_out"
    model.blocks[1].attn.W_O.data.mul_(1e-7)
    model.blocks[1].attn.b_O.data.zero_()
    df = run_metrics(model, {"id": wrap(Scaled(), model, hook)}, tokens_for(model, 8, 7),
                     metrics=["ce_loss_recovered"])
    assert df["verdict"].item() == "unstable"
    assert "CE_abl" in df["message"].item()


def test_request_validation():
    model = tiny_model()
    d = wrap(Identity(), model, "blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="unknown ablation"):
        engine.Request("x", (d,), ablations=("resample",))
    missing = as_dictionary(Identity(), hook="blocks.7.hook_resid_pre", d_in=16, d_sae=16)
    with pytest.raises(ValueError, match="does not have"):
        engine.run(model, tokens_for(model, 2, 0), [engine.Request("x", (missing,))])


def test_device_and_dtype_resolution():
    assert engine.resolve_device("cpu") == torch.device("cpu")
    assert engine.resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        engine.resolve_dtype("float7")


def test_callable_dictionary_skips_feature_metrics_with_a_warning():
    model = tiny_model()
    d = as_dictionary(lambda x: 0.5 * x, hook="blocks.0.hook_resid_pre")
    with pytest.warns(UserWarning, match="l0 skipped"):
        df = run_metrics(model, {"half": d}, tokens_for(model, 3, 8),
                         metrics=["ce_loss_recovered", "l0", "cossim"])
    assert list(df["metric"]) == ["ce_loss_recovered", "cossim"]
    # ⟨x, x/2⟩ / (‖x‖·‖x/2‖) in float64: halving is exact, the square roots round
    assert df.set_index("metric").loc["cossim", "value"] == pytest.approx(
        1.0, rel=0, abs=F64_RECOMPUTE)


def test_evaluate_refuses_task_metrics_with_a_pointer_to_run_task():
    model = tiny_model()
    with pytest.raises(ValueError, match="logit_diff_recovered are measured on a task's "
                                         "prompts.*run_task"):
        run_metrics(model, {"id": wrap(Identity(), model, "blocks.0.hook_resid_pre")},
                    tokens_for(model, 2, 0), metrics=["l0", "logit_diff_recovered"])


def test_a_memo_runs_the_clean_model_once_and_changes_no_term(monkeypatch):
    """Runs one dictionary at a time sharing a `RunMemo` give the terms of separate runs, and
    only the first runs the clean model; a run whose hooks the memo lacks runs its own."""
    model = tiny_model(seed=1)
    tokens = tokens_for(model, 6, 1)
    hooks = ("blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out")
    requests = [engine.Request(key=h, dictionaries=(wrap(Scaled(), model, h),),
                               ablations=("zero", "mean")) for h in hooks]
    options = engine.EngineOptions(batch_size=4, progress=False)
    alone = [engine.run(model, tokens, [r], options) for r in requests]
    clean_passes = []
    real = model.run_with_cache
    monkeypatch.setattr(model, "run_with_cache",
                        lambda *a, **k: clean_passes.append(1) or real(*a, **k))
    memo = engine.RunMemo(hooks=frozenset({*hooks, "blocks.1.hook_resid_pre"}))
    for request, expected in zip(requests, alone, strict=True):
        shared = engine.run(model, tokens, [request], options, memo)
        for name, term in expected[request.key].items():
            assert torch.equal(shared[request.key][name], term), name
    batches = 2
    moments = batches * 2  # the mean pre-pass of each hook, once each
    assert len(clean_passes) == batches + moments
    other = engine.Request(key="other", dictionaries=(wrap(Scaled(), model,
                                                           "blocks.1.hook_resid_post"),))
    engine.run(model, tokens, [other], options, memo)
    assert len(clean_passes) == 2 * batches + moments


@pytest.mark.parametrize("hook", [h.format(l=1) for h in HOOKS])
def test_next_token_agreement_is_the_share_of_unchanged_top1_tokens(hook):
    """Against a plain full forward pass with the splice hooked in, counted by hand."""
    model = tiny_model(seed=3)
    tokens = tokens_for(model, 6, 3)
    d = wrap(Scaled(), model, hook)
    spliced = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d]))
    expected = (spliced.argmax(-1) == model(tokens).argmax(-1)).double().mean().item()
    df = run_metrics(model, {"lossy": wrap(Scaled(), model, hook)}, tokens,
                     metrics=["next_token_agreement"], exclude_special_tokens=False)
    assert 0 < expected < 1
    # Exact: the same final residuals (the same ops on the same values), unembedded with
    # another layout, so logits move by at most f32_unembed (2e-5 here) and no top-1 token
    # flips, every top-2 gap being wider (checked); then both sides divide one count by one
    # count, rounding once.
    gap = min(float((lg.topk(2).values[..., 0] - lg.topk(2).values[..., 1]).min())
              for lg in (spliced, model(tokens)))
    assert gap > 2 * f32_unembed(16, logit_bound(model))
    assert values(df)["next_token_agreement"] == expected


@pytest.mark.parametrize("per_stack", [4, 3])
def test_a_stacked_sweep_gives_the_numbers_of_one_suffix_per_dictionary(per_stack):
    """Dictionaries at one write hook spliced in one pass stacked along the batch (all four,
    or three at a time within a smaller budget) match one suffix pass per dictionary."""
    model = tiny_model(seed=2)
    tokens = tokens_for(model, 5, 2)
    hook = "blocks.1.hook_resid_pre"
    budget = per_stack * engine._copy_bytes(model, tokens[:4])  # a copy of 4 rows each

    class Shrunk(Identity):
        def __init__(self, scale: float) -> None:
            self.scale = scale

        def decode(self, f):
            return self.scale * lossy(f)

    def sweep():
        return {f"s{i}": wrap(Shrunk(0.5 + 0.1 * i), model, hook) for i in range(4)}

    calls = []
    real = model.run_with_hooks
    model.run_with_hooks = lambda *a, **k: calls.append(len(a[0])) or real(*a, **k)
    stacked = engine.run(model, tokens, [engine.Request(key=n, dictionaries=(d,))
                                         for n, d in sweep().items()],
                         engine.EngineOptions(batch_size=4, progress=False, stack_bytes=budget))
    del model.run_with_hooks
    assert max(calls) == per_stack * 4  # the first batch's rows, once per stacked dictionary
    alone = engine.run(model, tokens, [engine.Request(key=n, dictionaries=(d,))
                                       for n, d in sweep().items()],
                       engine.EngineOptions(batch_size=4, progress=False, stack_bytes=0))
    # Stacking changes the batch dimension of the suffix pass: per-token values move as
    # between two passes (`pass_tolerance`), each term summing 12 positions. The rest is
    # exact: counts, reconstruction terms (from the shared clean pass), and top-1
    # agreement, which only a top-2 gap within that rounding (~1e-5; none here) could flip.
    # A stack that paired a dictionary with another's rows would move CE sums by whole nats.
    token = pass_tolerance(model, tokens)
    for name in alone:
        for term, value in alone[name].items():
            tol = sequence_sums(term, value, token, model.cfg.n_ctx, D_VOCAB)
            torch.testing.assert_close(stacked[name][term], value, rtol=0, atol=tol, msg=term)
