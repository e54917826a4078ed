"""Every registered metric against an independent float64 reference on raw per-token data.

Raw data (targets, reconstructions, feature activations, per-token CE and KL) is generated
per token, turned into per-sequence terms with `sequence_sums` (as the engine does), and
each metric's aggregate is compared with numpy on the flattened, masked tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saebench.dictionaries import DictionaryInfo
from saebench.metrics import METRICS, Metric, get_metric, metric_names, parts, register_metric
from saebench.metrics import tokens as tk
from saebench.metrics.registry import (
    DOWNSTREAM_TERMS,
    KINDS,
    RECONSTRUCTION_TERMS,
    VECTOR_TERMS,
)
from saebench.options import Option, index_problem

LENGTHS = (5, 9, 1, 12, 7)
D, D_SAE = 6, 20
OPTION_SETS = ({}, {"ablation": "mean"}, {"dense_threshold": 0.3})
FAST = settings(max_examples=25, deadline=None)

# The core metrics registered by `saebench.metrics.registry` itself; task and pathological
# metrics have their own tests (tests/test_tasks.py, tests/test_pathological.py).
CORE = ["ce_loss_recovered", "delta_ce", "kl_div", "kl_div_score", "next_token_agreement",
        "l0", "explained_variance", "mse", "cossim", "l2_ratio", "relative_reconstruction_bias",
        "dead_fraction", "dense_fraction"]


def _raw(seed: int, n_tokens: int, mean: float = 0.0, recon: str = "noisy") -> dict:
    """Flat per-token data [n_tokens, ...] in float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, D, generator=g, dtype=torch.float64) + mean
    if recon == "noisy":
        r = 0.8 * x + 0.3 * torch.randn(n_tokens, D, generator=g, dtype=torch.float64)
    elif recon == "identity":
        r = x.clone()
    else:
        r = torch.zeros_like(x)
    f = torch.randn(n_tokens, D_SAE, generator=g, dtype=torch.float64)
    f = f * (torch.rand(n_tokens, D_SAE, generator=g) < torch.linspace(0, 0.9, D_SAE))
    ce_clean = 2 + torch.rand(n_tokens, generator=g, dtype=torch.float64)
    ce = {"ce_clean": ce_clean,
          "ce_spliced": ce_clean + 0.5 * torch.rand(n_tokens, generator=g, dtype=torch.float64),
          "ce_zero": ce_clean + 5 + torch.rand(n_tokens, generator=g, dtype=torch.float64),
          "ce_mean": ce_clean + 2 + torch.rand(n_tokens, generator=g, dtype=torch.float64)}
    kl = {f"kl_{k}": torch.rand(n_tokens, generator=g, dtype=torch.float64) * s
          for k, s in (("spliced", 0.2), ("zero", 3.0), ("mean", 1.0), ("eps_iso", 0.1),
                       ("eps_cov", 0.4))}
    agree = (torch.rand(n_tokens, generator=g) < 0.9).double()
    return {"x": x, "r": r, "f": f, **ce, **kl, "agree_spliced": agree}


def _pad(flat: torch.Tensor, lengths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split flat [N, ...] into sequences of `lengths`, padded with NaN: ([b, t, ...], mask)."""
    t = max(lengths)
    out = torch.full((len(lengths), t, *flat.shape[1:]), float("nan"), dtype=flat.dtype)
    mask = torch.zeros(len(lengths), t, dtype=torch.bool)
    start = 0
    for i, n in enumerate(lengths):
        out[i, :n], mask[i, :n] = flat[start:start + n], True
        start += n
    return out, mask


def _terms(raw: dict, lengths: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per-sequence terms, built as the engine builds them."""
    x, mask = _pad(raw["x"], lengths)
    r, _ = _pad(raw["r"], lengths)
    f, _ = _pad(raw["f"], lengths)
    f = torch.nan_to_num(f)
    s = tk.sequence_sums
    terms = {name: s(_pad(raw[name], lengths)[0], mask)
             for name in DOWNSTREAM_TERMS if name not in ("n_pred", "n_kl")}
    terms |= {
        "n_pred": mask.sum(-1).double(), "n_kl": mask.sum(-1).double(),
        "n_act": mask.sum(-1).double(),
        "l0": s(tk.active_count(f), mask), "sq_err": s(tk.squared_error(x, r), mask),
        "sq_target": s(tk.squared_norm(x), mask), "sum_target": s(x, mask),
        "sq_recon": s(tk.squared_norm(r), mask), "dot": s(tk.dot(x, r), mask),
        "cossim": s(tk.cosine(x, r), mask), "l2_ratio": s(tk.norm_ratio(x, r), mask),
        "feature_counts": s((f != 0).double(), mask),
    }
    return terms


def _reference(raw: dict, name: str, options: dict) -> float:
    """The metric computed directly with numpy on the flat per-token data."""
    np_ = {k: v.numpy() for k, v in raw.items()}
    x, r, f = np_["x"], np_["r"], np_["f"]
    abl = options.get("ablation", "zero")
    ce = {k: np_[k].mean() for k in ("ce_clean", "ce_spliced", "ce_zero", "ce_mean")}
    kl = {k: np_[k].mean() for k in ("kl_spliced", "kl_zero", "kl_mean")}
    nx, nr = np.linalg.norm(x, axis=1), np.linalg.norm(r, axis=1)
    refs = {
        "ce_loss_recovered": lambda: (ce[f"ce_{abl}"] - ce["ce_spliced"])
        / (ce[f"ce_{abl}"] - ce["ce_clean"]),
        "delta_ce": lambda: ce["ce_spliced"] - ce["ce_clean"],
        "kl_div": lambda: kl["kl_spliced"],
        "kl_div_score": lambda: (kl[f"kl_{abl}"] - kl["kl_spliced"]) / kl[f"kl_{abl}"],
        "next_token_agreement": lambda: np_["agree_spliced"].mean(),
        "l0": lambda: (f != 0).sum(1).mean(),
        "explained_variance": lambda: 1 - ((x - r) ** 2).sum(1).mean()
        / ((x - x.mean(0)) ** 2).sum(1).mean(),
        "mse": lambda: ((x - r) ** 2).mean(),
        "cossim": lambda: ((x * r).sum(1) / (nx * nr)).mean(),
        "l2_ratio": lambda: (nr / nx).mean(),
        "relative_reconstruction_bias": lambda: (nr**2).mean() / (x * r).sum(1).mean(),
        "dead_fraction": lambda: ((f != 0).sum(0) == 0).mean(),
        "dense_fraction": lambda: ((f != 0).mean(0) > options.get("dense_threshold", 0.01))
        .mean(),
    }
    return float(refs[name]())


def _value(name: str, terms: dict, options: dict) -> float:
    metric = get_metric(name)
    return float(metric.aggregate({k: terms[k].sum(0) for k in metric.terms(options)}, options))


def test_registry_holds_the_designed_metrics_in_order():
    assert metric_names()[:len(CORE)] == CORE
    for name in CORE:
        metric = METRICS[name]
        assert metric.description and metric.kind in ("downstream", "reconstruction")
        assert set(metric.terms({})) <= set(DOWNSTREAM_TERMS + RECONSTRUCTION_TERMS)
        assert metric.count_term in metric.terms({})
    for metric in METRICS.values():
        assert metric.description and metric.kind in KINDS
        assert metric.count_term in metric.terms({})


@pytest.mark.parametrize("options", OPTION_SETS, ids=str)
@pytest.mark.parametrize("name", CORE)
def test_metric_matches_float64_reference(name: str, options: dict):
    raw = _raw(0, sum(LENGTHS))
    value = _value(name, _terms(raw, LENGTHS), options)
    assert value == pytest.approx(_reference(raw, name, options), rel=1e-10, abs=1e-10)


def test_reference_data_exercises_dead_and_dense_features():
    raw = _raw(0, sum(LENGTHS))
    terms = _terms(raw, LENGTHS)
    assert 0 < _value("dead_fraction", terms, {}) < 1
    assert 0 < _value("dense_fraction", terms, {"dense_threshold": 0.3}) < 1


def test_explained_variance_is_centred_not_the_uncentred_bug():
    raw = _raw(1, sum(LENGTHS), mean=5.0)
    terms = _terms(raw, LENGTHS)
    x, r = raw["x"].numpy(), raw["r"].numpy()
    centred = 1 - ((x - r) ** 2).sum(1).mean() / ((x - x.mean(0)) ** 2).sum(1).mean()
    uncentred = 1 - ((x - r) ** 2).sum(1).mean() / (x**2).sum(1).mean()
    value = _value("explained_variance", terms, {})
    assert value == pytest.approx(centred, rel=1e-10)
    assert uncentred - value > 0.1  # a large mean inflates the uncentred form
    summed = {k: v.sum(0) for k, v in terms.items()}
    got = parts(get_metric("explained_variance"), summed, {})
    assert got["explained_variance_uncentred"] == pytest.approx(uncentred, rel=1e-10)


def test_mse_is_per_element_and_sae_lens_mse_is_d_times_it():
    raw = _raw(2, sum(LENGTHS))
    terms = _terms(raw, LENGTHS)
    x, r = raw["x"].numpy(), raw["r"].numpy()
    sae_lens_mse = ((x - r) ** 2).sum(-1).mean()  # per-token sum over dims, mean over tokens
    value = _value("mse", terms, {})
    assert value * D == pytest.approx(sae_lens_mse, rel=1e-12)
    got = parts(get_metric("mse"), {k: v.sum(0) for k, v in terms.items()}, {})
    assert got["sq_err_per_position"] == pytest.approx(sae_lens_mse, rel=1e-12)
    assert got["d"] == D


def test_ce_loss_recovered_parts_are_per_token_means():
    raw = _raw(3, sum(LENGTHS))
    summed = {k: v.sum(0) for k, v in _terms(raw, LENGTHS).items()}
    got = parts(get_metric("ce_loss_recovered"), summed, {"ablation": "mean"})
    assert got["ce_clean"] == pytest.approx(raw["ce_clean"].mean().item(), rel=1e-12)
    assert got["ce_spliced"] == pytest.approx(raw["ce_spliced"].mean().item(), rel=1e-12)
    assert got["ce_abl"] == pytest.approx(raw["ce_mean"].mean().item(), rel=1e-12)
    assert got["n_pred"] == sum(LENGTHS)
    assert got["denominator"] == pytest.approx(got["ce_abl"] - got["ce_clean"], rel=1e-12)
    kl = parts(get_metric("kl_div_score"), summed, {})
    assert kl["kl_abl"] == pytest.approx(raw["kl_zero"].mean().item(), rel=1e-12)
    assert kl["kl_spliced"] == pytest.approx(raw["kl_spliced"].mean().item(), rel=1e-12)


@pytest.mark.parametrize("name", CORE)
def test_aggregate_is_vectorised_over_leading_dimensions(name: str):
    metric = get_metric(name)
    raws = [_terms(_raw(seed, sum(LENGTHS)), LENGTHS) for seed in range(6)]
    sums = [{k: v.sum(0) for k, v in terms.items()} for terms in raws]
    stacked = {k: torch.stack([s[k] for s in sums]).view(2, 3, *sums[0][k].shape)
               for k in metric.terms({})}
    out = metric.aggregate(stacked, {})
    assert out.shape == (2, 3)
    expected = torch.stack([metric.aggregate(s, {}) for s in sums]).view(2, 3)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    if metric.denominator is not None:
        assert metric.denominator(stacked, {}).shape == (2, 3)


def test_unknown_metric_error_lists_known_names():
    with pytest.raises(KeyError, match="ce_loss_recovered") as info:
        get_metric("ce_los_recovered")
    assert "ce_los_recovered" in str(info.value) and "dense_fraction" in str(info.value)


@pytest.mark.parametrize("name", ["ce_loss_recovered", "kl_div_score"])
def test_unknown_ablation_raises(name: str):
    metric = get_metric(name)
    with pytest.raises(ValueError, match="'resample'"):
        metric.terms({"ablation": "resample"})
    summed = {k: torch.tensor(1.0, dtype=torch.float64) for k in DOWNSTREAM_TERMS}
    with pytest.raises(ValueError, match="'resample'"):
        metric.aggregate(summed, {"ablation": "resample"})


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.01", True])
def test_bad_dense_threshold_raises(bad):
    with pytest.raises(ValueError, match="dense_threshold"):
        get_metric("dense_fraction").terms({"dense_threshold": bad})


def test_register_metric_refuses_duplicates_and_bad_kinds():
    with pytest.raises(ValueError, match="already registered"):
        register_metric(get_metric("l0"))
    with pytest.raises(ValueError, match="kind"):
        Metric(name="x", terms=lambda o: (), aggregate=lambda s, o: s["x"],
               higher_is_better=True, description="x", kind="other")


def test_vector_terms_are_the_wide_ones():
    terms = _terms(_raw(4, sum(LENGTHS)), LENGTHS)
    assert {k for k, v in terms.items() if v.dim() == 2} == set(VECTOR_TERMS)


seeds = st.integers(0, 2**16)
lengths_st = st.lists(st.integers(1, 8), min_size=1, max_size=6).map(tuple)


@FAST
@given(seed=seeds, lengths=lengths_st, mean=st.floats(-3, 3))
def test_identity_reconstruction_is_perfect(seed: int, lengths: tuple, mean: float):
    terms = _terms(_raw(seed, sum(lengths), mean=mean, recon="identity"), lengths)
    if sum(lengths) > 1:
        assert _value("explained_variance", terms, {}) == pytest.approx(1.0, abs=1e-12)
    assert _value("mse", terms, {}) == 0.0
    for name in ("cossim", "l2_ratio", "relative_reconstruction_bias"):
        assert _value(name, terms, {}) == pytest.approx(1.0, abs=1e-12)


@FAST
@given(seed=seeds, lengths=lengths_st, mean=st.floats(-3, 3))
def test_zero_reconstruction_explains_nothing(seed: int, lengths: tuple, mean: float):
    raw = _raw(seed, sum(lengths), mean=mean, recon="zero")
    terms = _terms(raw, lengths)
    if sum(lengths) > 1:
        assert _value("explained_variance", terms, {}) <= 1e-12
    assert _value("mse", terms, {}) == pytest.approx((raw["x"] ** 2).mean().item(), rel=1e-12)
    assert _value("cossim", terms, {}) == 0.0
    assert _value("l2_ratio", terms, {}) == 0.0


@FAST
@given(seed=seeds, lengths=lengths_st, c=st.floats(0.1, 3))
def test_scaled_reconstruction_gives_the_scale(seed: int, lengths: tuple, c: float):
    raw = _raw(seed, sum(lengths), recon="identity")
    raw["r"] = c * raw["x"]
    terms = _terms(raw, lengths)
    assert _value("relative_reconstruction_bias", terms, {}) == pytest.approx(c, rel=1e-12)
    assert _value("l2_ratio", terms, {}) == pytest.approx(c, rel=1e-12)
    assert _value("cossim", terms, {}) == pytest.approx(1.0, rel=1e-12)


@FAST
@given(seed=seeds, lengths=lengths_st.filter(lambda ls: sum(ls) > 1), mean=st.floats(-5, 5))
def test_predicting_the_mean_explains_zero_variance(seed: int, lengths: tuple, mean: float):
    raw = _raw(seed, sum(lengths), mean=mean)
    raw["r"] = raw["x"].mean(0).expand_as(raw["x"]).clone()
    assert _value("explained_variance", _terms(raw, lengths), {}) == pytest.approx(0, abs=1e-9)


@FAST
@given(seed=seeds, lengths=lengths_st, frac=st.floats(0, 1), ablation=st.sampled_from(
    ["zero", "mean"]))
def test_ce_loss_recovered_interpolates_between_clean_and_ablated(
        seed: int, lengths: tuple, frac: float, ablation: str):
    raw = _raw(seed, sum(lengths))
    abl = raw[f"ce_{ablation}"]
    opts = {"ablation": ablation}
    raw["ce_spliced"] = raw["ce_clean"].clone()
    assert _value("ce_loss_recovered", _terms(raw, lengths), opts) == pytest.approx(1, abs=1e-12)
    raw["ce_spliced"] = abl.clone()
    assert _value("ce_loss_recovered", _terms(raw, lengths), opts) == pytest.approx(0, abs=1e-12)
    raw["ce_spliced"] = raw["ce_clean"] + frac * (abl - raw["ce_clean"])
    assert _value("ce_loss_recovered", _terms(raw, lengths), opts) == pytest.approx(
        1 - frac, abs=1e-9)


@FAST
@given(seed=seeds, data=st.data())
def test_values_do_not_depend_on_how_positions_are_grouped(seed: int, data):
    """Same tokens split into sequences two ways give the same values (not the same intervals:
    the bootstrap resamples whole sequences, so its interval depends on the grouping)."""
    lengths = data.draw(lengths_st, label="lengths")
    n = sum(lengths)
    cuts = data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=4, unique=True),
                     label="cuts")
    bounds = [0, *sorted(c for c in cuts if c < n), n]
    other = tuple(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    raw = _raw(seed, n)
    a, b = _terms(raw, lengths), _terms(raw, other)
    for options in OPTION_SETS:
        for name in CORE:
            va, vb = _value(name, a, options), _value(name, b, options)
            assert va == pytest.approx(vb, rel=1e-9, abs=1e-12, nan_ok=True), name


def _info(n_hooks: int, d_sae: int = 64) -> DictionaryInfo:
    hooks = ",".join(f"blocks.{i}.hook_mlp_out" for i in range(n_hooks))
    return DictionaryInfo(hooks, hooks, 8, 8, d_sae, {})


@FAST
@given(n_hooks=st.integers(1, 6), index=st.integers(-10, 10))
def test_per_layer_error_takes_exactly_the_indices_of_its_write_hooks(n_hooks, index):
    """`layer` is refused at collection exactly where `_layer_choice` could not pick a hook:
    outside [-n, n) for n write hooks."""
    table = {"layer": get_metric("per_layer_error").options["layer"]}
    problem = index_problem(table, {"layer": index}, {"ct": _info(n_hooks)}, "s.yaml:3: c")
    errors = torch.ones(n_hooks)
    try:
        errors[index]
        fits = -n_hooks <= index
    except IndexError:
        fits = False
    assert (problem is None) == fits
    if problem is not None:
        assert problem.startswith(f"s.yaml:3: c.layer: index {index} is outside the {n_hooks} "
                                  "write hook")
        assert f"allowed: 0..{n_hooks - 1}, or -{n_hooks}..-1 counting from the end" in problem
    assert index_problem(table, {"layer": "max"}, {"ct": _info(n_hooks)}, "w") is None


def test_feature_ids_are_checked_against_the_one_dictionary_they_address():
    table = {"features": Option("cards", tuple, (), indexes="feature")}
    assert index_problem(table, {"features": (0, 63)}, {"a": _info(1)}, "w") is None
    assert index_problem(table, {"features": (3, 64, 99)}, {"a": _info(1)}, "w") == (
        "w.features: feature ids [64, 99] are outside 'a', whose 64 features are 0..63")
    assert "this check splices 2 dictionaries" in index_problem(
        table, {"features": (3,)}, {"a": _info(1), "b": _info(1)}, "w")
    assert "'ct' is a replacement model" in index_problem(
        table, {"features": (3,)}, {"ct": _info(4)}, "w")
    unknown = DictionaryInfo("blocks.0.hook_resid_pre", None, None, None, None, {})
    assert index_problem(table, {"features": (10**6,)}, {"f": unknown}, "w") is None
    with pytest.raises(ValueError, match="indexes must be one of"):
        Option("x", int, indexes="layers")
