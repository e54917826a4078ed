"""clamp_effect against a float64 computation with plain hooks, and its invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saebench import engine, evaluate, loading, plan
from saebench.metrics.registry import Site, get_metric
from saebench.splice import as_dictionary

N_SEQ, TOP_N, PAIRS = 8, 16, 3
OPTIONS = {"top_n": TOP_N, "pairs": PAIRS}


@pytest.fixture(scope="module")
def zoo():
    model = loading.load_zoo_model()
    tokens = loading.load_heldout_tokens()[:N_SEQ]
    a = loading.load_zoo_dictionary("resid-L1-topk16")
    b = loading.load_zoo_dictionary("resid-L3-topk16")
    return model, tokens, a, b


def run_probe(model, tokens, a, b, options):
    """The engine's terms and the probe (its chosen pairs) of one clamp_effect request."""
    site = Site((as_dictionary(a),), (as_dictionary(b),), model)
    request = plan.token_request("c", site.dictionaries, [(get_metric("clamp_effect"), options)],
                                 site)
    terms = engine.run(model, tokens, [request], engine.EngineOptions(progress=False))["c"]
    return terms, request.probes[0]


def brute_force(model, tokens, a, b, value):
    """Top pairs by clean correlation among the most frequent features, and each pair's mean
    change of the downstream feature when the upstream one is clamped, from plain hooks."""
    hook_a, hook_b = a.cfg.metadata.hook_name, b.cfg.metadata.hook_name
    mask = ~torch.isin(tokens, torch.tensor(engine.special_token_ids(model)))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook_a, hook_b])
        fa = a.encode(cache[hook_a])[mask].double().numpy()
        fb = b.encode(cache[hook_b])[mask].double().numpy()
    top_a = np.argsort(-(fa != 0).sum(0), kind="stable")[:TOP_N]
    top_b = np.argsort(-(fb != 0).sum(0), kind="stable")[:TOP_N]
    r = np.corrcoef(fa[:, top_a].T, fb[:, top_b].T)[:TOP_N, TOP_N:]
    flat = np.argsort(-np.abs(r).flatten(), kind="stable")[:PAIRS]
    pairs = [(int(top_a[f // TOP_N]), int(top_b[f % TOP_N]), r.flatten()[f]) for f in flat]

    def downstream(clamp: tuple[int, float] | None):
        seen = {}

        def splice(act, hook):
            feats = a.encode(act)
            if clamp is not None:
                feats[..., clamp[0]] = clamp[1]
            return torch.where(mask[..., None], a.decode(feats), act)

        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[
                (hook_a, splice), (hook_b, lambda act, hook: seen.setdefault("b", act))])
            return b.encode(seen["b"])[mask].double().numpy()

    base = downstream(None)
    deltas = []
    for i, j, _ in pairs:
        v = fa[:, i].max() if value == "max" else value
        deltas.append((downstream((i, v))[:, j] - base[:, j]).mean())
    return pairs, deltas


@pytest.mark.parametrize("value", ["max", 0.0])
def test_pairs_and_effects_match_a_float64_computation(zoo, value):
    model, tokens, a, b = zoo
    terms, probe = run_probe(model, tokens, a, b, {**OPTIONS, "value": value})
    pairs, deltas = brute_force(model, tokens, a, b, value)
    assert [(i, j) for i, j, *_ in probe.pairs] == [(i, j) for i, j, _ in pairs]
    assert [p[2] for p in probe.pairs] == pytest.approx([r for *_, r in pairs], abs=1e-6)
    effects = (terms["clamp_delta"].sum(0) / terms["clamp_n"].sum()).tolist()
    assert effects == pytest.approx(deltas, abs=1e-5)


class Ignored:
    """A dictionary at a residual hook whose decoder ignores its last feature."""

    def __init__(self, sae):
        self.sae = sae

    def encode(self, x):
        return self.sae.encode(x)

    def decode(self, f):
        return self.sae.decode(torch.cat([f[..., :-1], torch.zeros_like(f[..., -1:])], -1))


def test_a_clamp_the_decoder_ignores_has_no_effect_and_moves_nothing(zoo):
    model, tokens, a, b = zoo
    ignored = as_dictionary(Ignored(a), hook=a.cfg.metadata.hook_name, d_sae=a.cfg.d_sae)
    site = Site((ignored,), (as_dictionary(b),), model)
    request = plan.token_request("c", site.dictionaries,
                                 [(get_metric("clamp_effect"), {**OPTIONS, "value": 5.0})], site)
    probe = request.probes[0]
    chosen = probe.end_sweep

    def end_sweep(sweep: int) -> None:
        chosen(sweep)
        if sweep == 1:  # clamp the ignored feature in place of the chosen upstream ones
            probe.pairs = [(a.cfg.d_sae - 1, j, r, 5.0, 1.0) for _, j, r, _, _ in probe.pairs]

    probe.end_sweep = end_sweep
    terms = engine.run(model, tokens, [request], engine.EngineOptions(progress=False))["c"]
    assert not terms["clamp_delta"].any()
    value = get_metric("clamp_effect").aggregate({k: v.sum(0) for k, v in terms.items()}, {})
    assert float(value) == 0.0


def test_the_poor_dictionary_fails_where_a_good_one_passes(zoo):
    model, tokens, a, _ = zoo
    poor = loading.load_zoo_dictionary("resid-L2-poor")
    good = loading.load_zoo_dictionary("resid-L2-topk16")
    b = loading.load_zoo_dictionary("resid-L3-topk16")
    df = evaluate(model, {"good": good, "poor": poor}, tokens, ["clamp_effect"],
                  read={"b": b}, options=OPTIONS, n_boot=50, progress=False)
    values = dict(zip(df["dictionary"], df["value"], strict=True))
    assert values["good"] > 0.6 > values["poor"]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 10**400, "big"])
def test_a_clamp_value_no_computation_can_use_is_refused(value):
    option = get_metric("clamp_effect").options["value"]
    with pytest.raises(ValueError, match=r"must be max or a finite number, got "):
        option.parse(value)
    assert option.parse("max") == "max" and option.parse(-2) == -2.0


@settings(max_examples=60, deadline=None)
@given(deltas=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64),
                       min_size=1, max_size=6),
       signs=st.lists(st.sampled_from([-1.0, 0.0, 1.0]), min_size=6, max_size=6))
def test_the_value_is_the_share_of_pairs_moved_as_predicted_or_nan(deltas, signs):
    """The aggregate against numpy: the share of pairs whose summed change has the sign the
    correlation predicts; NaN when a change is not finite (an overflowing clamp), never a
    count of such a pair as not moved."""
    k = len(deltas)
    terms = {"clamp_delta": torch.tensor(deltas, dtype=torch.float64),
             "clamp_sign": torch.tensor(signs[:k], dtype=torch.float64),
             "clamp_n": torch.tensor(10.0, dtype=torch.float64)}
    value = float(get_metric("clamp_effect").aggregate(terms, {}))
    d, s = np.array(deltas), np.array(signs[:k])
    if not np.isfinite(d).all():
        assert np.isnan(value)
    else:
        assert value == pytest.approx(float(np.mean(d * np.sign(s) > 0)), abs=1e-15)
