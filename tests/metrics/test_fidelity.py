"""feature_fidelity, feature_jaccard, feature_l0_drift against a float64 computation with
plain hooks, and their invariants (identity splice, a feature that never fires)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toys import Identity

from saebench import engine, evaluate, loading
from saebench.splice import as_dictionary

N_SEQ = 12


@pytest.fixture(scope="module")
def zoo():
    model = loading.load_zoo_model()
    tokens = loading.load_heldout_tokens()[:N_SEQ]
    names = ("resid-L1-topk16", "resid-L2-poor", "mlp_out-L2-relu")
    return model, tokens, {n: loading.load_zoo_dictionary(n) for n in names}


def brute_force(model, tokens, upstream, read) -> dict[str, float]:
    """The three values from plain hooks: splice `upstream` at its hook, encode `read`'s
    hook clean and spliced, and compute in float64 over the non-special positions (the
    special ones are not spliced either)."""
    hook_a, hook_b = upstream.cfg.metadata.hook_name, read.cfg.metadata.hook_name
    seen: dict[str, torch.Tensor] = {}
    mask = ~torch.isin(tokens, torch.tensor(engine.special_token_ids(model)))

    def splice(act, hook):
        return torch.where(mask[..., None], upstream.decode(upstream.encode(act)), act)

    def keep(act, hook):
        seen["b"] = act

    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook_b])
        model.run_with_hooks(tokens, fwd_hooks=[(hook_a, splice), (hook_b, keep)])
        x = read.encode(cache[hook_b]).double()
        y = read.encode(seen["b"]).double()
    x, y = x[mask].numpy(), y[mask].numpy()
    counts = (x != 0).sum(0)
    total = weights = 0.0
    for f in range(x.shape[1]):
        if counts[f] == 0 or x[:, f].std() == 0:
            continue
        r = 0.0 if y[:, f].std() == 0 else np.corrcoef(x[:, f], y[:, f])[0, 1]
        total += counts[f] * r
        weights += counts[f]
    on_x, on_y = x != 0, y != 0
    union = (on_x | on_y).sum(1)
    jaccard = np.where(union > 0, (on_x & on_y).sum(1) / np.maximum(union, 1), 1.0)
    return {"feature_fidelity": total / weights, "feature_jaccard": jaccard.mean(),
            "feature_l0_drift": abs(on_y.sum(1).mean() / on_x.sum(1).mean() - 1)}


@pytest.mark.parametrize("upstream,read", [("resid-L1-topk16", "mlp_out-L2-relu"),
                                           ("resid-L2-poor", "mlp_out-L2-relu")])
def test_values_match_a_float64_computation_with_plain_hooks(zoo, upstream, read):
    model, tokens, saes = zoo
    df = evaluate(model, {"a": saes[upstream]}, tokens,
                  ["feature_fidelity", "feature_jaccard", "feature_l0_drift"],
                  read={"b": saes[read]}, n_boot=50, progress=False)
    expected = brute_force(model, tokens, saes[upstream], saes[read])
    got = dict(zip(df["metric"], df["value"], strict=True))
    assert got == pytest.approx(expected, abs=1e-6)
    assert (df["verdict"] == "measured").all() and df["check_id"].str.contains(r"\[read=b\]").all()


def test_identity_splice_keeps_every_feature(zoo):
    model, tokens, saes = zoo
    identity = as_dictionary(Identity(), hook="blocks.1.hook_resid_pre", d_sae=model.cfg.d_model)
    df = evaluate(model, {"id": identity}, tokens,
                  ["feature_fidelity", "feature_jaccard", "feature_l0_drift"],
                  read={"b": saes["mlp_out-L2-relu"]}, n_boot=20, progress=False)
    values = dict(zip(df["metric"], df["value"], strict=True))
    assert values["feature_fidelity"] == pytest.approx(1.0, abs=1e-9)
    assert values["feature_jaccard"] == pytest.approx(1.0, abs=1e-12)
    assert values["feature_l0_drift"] == pytest.approx(0.0, abs=1e-12)


class Silent(Identity):
    """A later dictionary whose features never fire."""

    def encode(self, x):
        return torch.zeros_like(x)


def test_a_dictionary_whose_features_never_fire_has_no_fidelity(zoo):
    model, tokens, saes = zoo
    silent = as_dictionary(Silent(), hook="blocks.3.hook_resid_pre", d_sae=model.cfg.d_model)
    df = evaluate(model, {"a": saes["resid-L1-topk16"]}, tokens, ["feature_fidelity"],
                  read={"b": silent}, n_boot=20, progress=False)
    assert df["verdict"].item() == "nan" and np.isnan(df["value"].item())


def test_a_dictionary_read_before_the_splice_is_refused(zoo):
    model, tokens, saes = zoo
    with pytest.raises(ValueError, match="before the spliced set first writes"):
        evaluate(model, {"a": saes["mlp_out-L2-relu"]}, tokens, ["feature_fidelity"],
                 read={"b": saes["resid-L1-topk16"]}, progress=False)
    with pytest.raises(ValueError, match="read=\\{name: dictionary\\}"):
        evaluate(model, {"a": saes["resid-L1-topk16"]}, tokens, ["feature_fidelity"],
                 progress=False)


def test_values_do_not_depend_on_the_batch_size(zoo):
    model, tokens, saes = zoo
    runs = [evaluate(model, {"a": saes["resid-L2-poor"]}, tokens, ["feature_fidelity"],
                     read={"b": saes["mlp_out-L2-relu"]}, batch_size=b, n_boot=0,
                     progress=False)["value"].item() for b in (5, 12)]
    assert runs[0] == pytest.approx(runs[1], abs=1e-9)
