"""`by: position` and `by: source` breakdowns: one row per bucket, against independent
computations, and the breakdowns a metric or the data cannot have refused at load."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from tolerances import F64_RECOMPUTE, downstream, f32_error, f32_log_probs, logit_bound

from saebench import engine, evaluate, loading
from saebench.checks import RunSettings, SuiteRun
from saebench.engine import position_buckets
from saebench.suite import SuiteError, load_suite

SUITE = """
model: zoo
data: {n_tokens: 1024}
dictionaries: {a: {zoo: resid-L2-topk16}}
defaults: {options: {n_boot: 50}}
checks:
  - {metric: delta_ce, dictionaries: [a], options: {by: position}}
  - {metric: explained_variance, dictionaries: [a], options: {by: position}}
"""


def _run(tmp_path, text: str) -> SuiteRun:
    (tmp_path / "suite.yaml").write_text(textwrap.dedent(text))
    run = SuiteRun(load_suite(tmp_path / "suite.yaml"), RunSettings(device="cpu"))
    run.prepare()
    return run


def test_position_buckets_double_and_cover_the_sequence():
    buckets = position_buckets(128)
    assert buckets[:5] == [(0, 0), (1, 1), (2, 3), (4, 7), (8, 15)] and buckets[-1][1] == 127
    assert [b[0] for b in buckets[1:]] == [b[1] + 1 for b in buckets[:-1]]


def test_delta_ce_by_position_matches_plain_hooks(tmp_path):
    run = _run(tmp_path, SUITE)
    check = run.suite.checks[0]
    assert check.id == "a::delta_ce[by=position]"
    row = run.result(check)
    rows = run.extra_rows(check)["breakdown.csv"]
    model, tokens = run.model, run.tokens
    sae = loading.load_zoo_dictionary("resid-L2-topk16")
    keep = ~torch.isin(tokens, torch.tensor(engine.special_token_ids(model)))

    def splice(act, hook):
        return torch.where(keep[..., None], sae.decode(sae.encode(act)), act)

    with torch.no_grad():
        clean = model(tokens).double().log_softmax(-1)
        spliced = model.run_with_hooks(tokens, fwd_hooks=[(sae.cfg.metadata.hook_name, splice)])
        spliced = spliced.double().log_softmax(-1)
    nll = [-lp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0] for lp in (clean, spliced)]
    counted = keep[:, :-1]
    # the suite's passes against one pass here: a token's log-probs move by `f32_log_probs`
    # of the measured `f32_error`, a difference of two CE means by twice that (~2e-4); a
    # position counted in the wrong bucket moves a bucket's value by ~1e-2
    token = f32_log_probs(model.cfg.d_vocab, logit_bound(model), f32_error(model, tokens))
    for (first, last), out in zip(position_buckets(tokens.shape[1]), rows, strict=True):
        assert out["bucket"] == f"{first}-{last}"
        within = counted.clone()
        within[:, :first] = False
        within[:, last + 1:] = False
        expected = float((nll[1] - nll[0])[within].mean()) if within.any() else float("nan")
        if within.any():
            assert out["value"] == pytest.approx(expected, rel=0, abs=2 * token), out["bucket"]
        else:
            assert out["value"] != out["value"]  # nothing counted there: NaN, not a number
    assert row["value"] == pytest.approx(float((nll[1] - nll[0])[counted].mean()), rel=0,
                                         abs=2 * token)


def test_reconstruction_by_position_pools_to_the_whole(tmp_path):
    run = _run(tmp_path, SUITE)
    check = run.suite.checks[1]
    run.result(check)
    terms = run._terms[run._request_key(check)]
    buckets = [f"@{a}-{b}:" for a, b in position_buckets(run.tokens.shape[1])]
    # the same float64 per-position values summed by bucket, then the buckets: another order
    # of ≤ 128 nonnegative terms per sequence
    for name in ("n_act", "sq_err", "sq_target"):
        pooled = sum(terms[p + name] for p in buckets)
        torch.testing.assert_close(pooled, terms[name], rtol=F64_RECOMPUTE, atol=0)


def test_by_source_is_the_value_on_each_source_alone(tmp_path):
    tokens = loading.load_heldout_tokens()
    torch.save(tokens[100:108].clone(), tmp_path / "other.pt")
    run = _run(tmp_path, """
        model: zoo
        data: {n_tokens: 1024, source: [zoo, {path: other.pt}]}
        dictionaries: {a: {zoo: resid-L2-topk16}}
        checks:
          - {metric: ce_loss_recovered, dictionaries: [a], options: {by: source, n_boot: 20}}
    """)
    (check,) = run.suite.checks
    run.result(check)
    rows = {r["bucket"]: r for r in run.extra_rows(check)["breakdown.csv"]}
    assert list(rows) == ["zoo", "other.pt"] and run.sources.count("zoo") == 8
    model, sae = run.model, loading.load_zoo_dictionary("resid-L2-topk16")
    for name, part in (("zoo", tokens[:8]), ("other.pt", tokens[100:108])):
        alone = evaluate(model, {"a": sae}, part, ["ce_loss_recovered"], n_boot=0,
                         batch_size=32, progress=False)
        # other batches than the suite's: per-token log-probs move by `f32_log_probs` of the
        # measured `f32_error`; the other source's tokens mixed in would move it by ~1e-2
        value = alone["value"].item()
        token = f32_log_probs(model.cfg.d_vocab, logit_bound(model), f32_error(model, part))
        tol = downstream("ce_loss_recovered", value, json.loads(alone["parts"].item()), token,
                         model.cfg.d_vocab)
        assert rows[name]["value"] == pytest.approx(value, rel=0, abs=tol)


@pytest.mark.parametrize("options,data,message", [
    ("{metric: pathological_error, dictionaries: [a], options: {by: position}}", "",
     "pathological_error has no breakdown by position"),
    ("{metric: l0, dictionaries: [a], options: {by: source}}", "",
     "by: source needs data with several sources"),
    ("{metric: l0, dictionaries: [a]}", "data: {source: [zoo]}", "at least two"),
])
def test_a_breakdown_that_cannot_be_is_refused_where_it_is_written(tmp_path, options, data,
                                                                    message):
    (tmp_path / "s.yaml").write_text(f"model: zoo\n{data}\ndictionaries: {{a: {{zoo: "
                                     f"resid-L2-topk16}}}}\nchecks:\n  - {options}\n")
    with pytest.raises(SuiteError, match=message) as err:
        load_suite(tmp_path / "s.yaml")
    assert err.value.line in (2, 5)
