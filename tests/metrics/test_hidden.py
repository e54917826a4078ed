"""`transcoder_hidden_fidelity` against a float64 least-squares fit written here with plain
hooks, and its behaviour on an exact, a dead and a non-transcoder dictionary."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

import saebench
from saebench import loading
from saebench.engine import special_token_ids
from saebench.metrics import get_metric
from saebench.metrics.registry import Site
from saebench.splice import as_dictionary

METRIC = "transcoder_hidden_fidelity"
N_SEQ = 32


@pytest.fixture(scope="module")
def tokens():
    return loading.load_heldout_tokens()[:N_SEQ]


@pytest.fixture(scope="module")
def transcoder():
    return as_dictionary(loading.load_zoo_dictionary("transcoder-L3"), name="tc")


def evaluate(model, dictionary, tokens, **kwargs):
    """The one result row of the metric on `dictionary`."""
    frame = saebench.evaluate(model, {"tc": dictionary}, tokens, metrics=[METRIC], n_boot=50,
                              progress=False, **kwargs)
    assert len(frame) == 1
    return frame.iloc[0]


def brute_force_ev(model, dictionary, tokens, max_features: int, min_active: int = 5) -> float:
    """Fit h ≈ [z, 1] β by lstsq on the even sequences' features active on at least
    `min_active` of their positions (the most frequent `max_features`), and score
    1 − Σ‖h − ĥ‖² / Σ‖h − h̄‖² on the odd sequences."""
    pre = f"blocks.{dictionary.write_hook.split('.')[1]}.mlp.hook_pre"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[dictionary.read_hook, pre])
        z = dictionary.encode(cache[dictionary.read_hook]).double()
    h = cache[pre].double()
    evaluated = ~torch.isin(tokens, torch.tensor(special_token_ids(model)))
    fit = torch.arange(len(tokens)) % 2 == 0
    z_fit, h_fit = z[fit][evaluated[fit]], h[fit][evaluated[fit]]
    counts = (z_fit != 0).sum(0)
    top = torch.argsort(counts, descending=True, stable=True)[:max_features]
    live = top[counts[top] >= min_active]

    def design(feats):
        return torch.cat([feats[:, live], feats.new_ones(len(feats), 1)], dim=1)

    beta = torch.linalg.lstsq(design(z_fit), h_fit, driver="gelsd").solution
    z_score, h_score = z[~fit][evaluated[~fit]], h[~fit][evaluated[~fit]]
    err = (h_score - design(z_score) @ beta).pow(2).sum()
    return float(1 - err / (h_score - h_score.mean(0)).pow(2).sum())


class ExactMLPInput(torch.nn.Module):
    """A "transcoder" of layer `layer` whose features are the MLP's own pre-activations
    W_in x + b_in (decoding them is the MLP), so they explain all of their variance."""

    def __init__(self, model, layer: int) -> None:
        super().__init__()
        self.mlp = model.blocks[layer].mlp

    def encode(self, x):
        return x @ self.mlp.W_in + self.mlp.b_in

    def decode(self, feats):
        return torch.nn.functional.gelu(feats) @ self.mlp.W_out + self.mlp.b_out


class Dead(ExactMLPInput):
    """A transcoder none of whose features is ever active."""

    def encode(self, x):
        return torch.zeros_like(super().encode(x))


def mlp_transcoder(module, model, layer: int):
    return as_dictionary(module, name="tc", hook=f"blocks.{layer}.ln2.hook_normalized",
                         hook_out=f"blocks.{layer}.hook_mlp_out", d_in=model.cfg.d_model,
                         d_sae=model.cfg.d_mlp)


@pytest.mark.parametrize("max_features,min_active", [(64, 5), (128, 5), (128, 1)])
def test_matches_brute_force_lstsq(zoo_model, transcoder, tokens, max_features, min_active,
                                   no_grad_one_thread):
    row = evaluate(zoo_model, transcoder, tokens,
                   options={"max_features": max_features, "min_active": min_active})
    expected = brute_force_ev(zoo_model, transcoder, tokens, max_features, min_active)
    assert row.verdict == "measured", row.message
    assert row.value == pytest.approx(expected, abs=1e-6)
    assert row.ci_low <= row.value <= row.ci_high
    parts = json.loads(row.parts)
    evaluated = ~torch.isin(tokens, torch.tensor(special_token_ids(zoo_model)))
    assert parts["live_features"] == max_features
    assert parts["fit_positions"] == int(evaluated[0::2].sum())
    assert parts["hidden_n"] == int(evaluated[1::2].sum())
    assert parts["explained_variance_uncentred"] >= row.value


def test_too_few_positions_per_feature_warn(zoo_model, transcoder, tokens, no_grad_one_thread):
    with pytest.warns(UserWarning, match="fewer than 10 per regressor"):
        evaluate(zoo_model, transcoder, tokens)


def test_exact_pre_activations_explain_everything(zoo_model, tokens, no_grad_one_thread):
    exact = mlp_transcoder(ExactMLPInput(zoo_model, 1), zoo_model, 1)
    row = evaluate(zoo_model, exact, tokens, options={"max_features": 128})
    assert row.verdict == "measured", row.message
    assert row.value == pytest.approx(1.0, abs=1e-6)


def test_dead_transcoder_has_no_value(zoo_model, tokens, no_grad_one_thread):
    dead = mlp_transcoder(Dead(zoo_model, 1), zoo_model, 1)
    with pytest.warns(UserWarning, match="no feature of 'tc' is active"):
        row = evaluate(zoo_model, dead, tokens[:8])
    assert math.isnan(row.value)
    assert row.verdict == "nan"
    assert json.loads(row.parts)["live_features"] == 0


def test_non_transcoder_is_refused(zoo_model, tokens):
    sae = loading.load_zoo_dictionary("resid-L2-topk16")
    with pytest.raises(ValueError, match="needs a transcoder.*reads blocks.2.hook_resid_pre"):
        evaluate(zoo_model, sae, tokens[:4])


def test_model_without_mlp_is_refused(transcoder):
    site = Site((transcoder,), model=types.SimpleNamespace(hook_dict={}))
    with pytest.raises(ValueError, match="no hook 'blocks.3.mlp.hook_pre'"):
        get_metric(METRIC).needs_of({}, site)


@pytest.mark.parametrize("batch_size", [4, 5])
def test_batch_size_invariant(zoo_model, transcoder, tokens, batch_size, no_grad_one_thread):
    options = {"max_features": 64}
    small = evaluate(zoo_model, transcoder, tokens, options=options, batch_size=batch_size)
    large = evaluate(zoo_model, transcoder, tokens, options=options, batch_size=16)
    assert small.value == pytest.approx(large.value, abs=1e-9)


class OneNaN(ExactMLPInput):
    """The MLP's pre-activations, but NaN at one evaluated position of every batch's first
    sequence (a fitting one)."""

    def encode(self, x):
        feats = super().encode(x)
        feats[:1, 5] = math.nan
        return feats


def test_nan_feature_gives_no_value(zoo_model, tokens, no_grad_one_thread):
    row = evaluate(zoo_model, mlp_transcoder(OneNaN(zoo_model, 1), zoo_model, 1), tokens[:8],
                   options={"max_features": 16})
    assert math.isnan(row.value)
    assert row.verdict == "nan"
    assert "non-finite" in row.message
