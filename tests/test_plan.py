"""The planner: every registered metric yields its requests from its declaration alone, and
a metric registered here, in a test file, runs end to end through a suite and evaluate()."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping

import pytest
import torch
from tolerances import F64_RECOMPUTE, f32_activations
from torch import Tensor
from toys import Identity, tiny_model

from saebench import evaluate, loading, plan
from saebench.checks import RunSettings, SuiteRun
from saebench.metrics.registry import (
    METRICS,
    BatchView,
    Metric,
    Needs,
    Probe,
    Site,
    TableContext,
    register_metric,
)
from saebench.options import Option, positive_int
from saebench.splice import as_dictionary
from saebench.suite import load_suite, option_table

MODEL = tiny_model(n_layers=2)
D = MODEL.cfg.d_model
SAE = as_dictionary(Identity(), name="sae", hook="blocks.0.hook_resid_pre", d_sae=D)
LATER = as_dictionary(Identity(), name="later", hook="blocks.1.hook_resid_pre", d_sae=D)
TRANSCODER = as_dictionary(Identity(), name="tc", hook="blocks.1.ln2.hook_normalized",
                           hook_out="blocks.1.hook_mlp_out", d_sae=D)


def _request(metric: Metric, options: Mapping):
    """The request of one check on `metric`: on the residual SAE, else on the transcoder
    (for a metric that needs one), reading the later dictionary when the metric reads."""
    problems = []
    for d in (SAE, TRANSCODER):
        site = Site((d,), (LATER,) if metric.reads else (), MODEL)
        build = plan.task_request if metric.kind == "task" else plan.token_request
        try:
            return build("r", (d,), [(metric, options)], site)
        except ValueError as err:
            problems.append(str(err))
    raise AssertionError(f"{metric.name}: no request ({'; '.join(problems)})")


@pytest.mark.parametrize("name", list(METRICS))
def test_every_metric_yields_its_request_from_its_declaration(name):
    metric = METRICS[name]
    request = _request(metric, metric.defaults())
    need = metric.needs_of(metric.defaults(), Site(request.dictionaries,
                                                   (LATER,) if metric.reads else (), MODEL))
    if metric.kind == "task":
        assert request.dla == need.dla and request.feature_k == need.feature_k
        return
    assert request.reconstruction == need.reconstruction
    assert request.downstream == (need.spliced or need.layers or bool(need.noise_draws))
    assert set(request.ablations) == need.ablations
    assert [p.key for p in request.probes] == [p.key for p in need.probes]
    assert request.downstream or request.reconstruction or request.probes, \
        f"{name} asks for nothing"


@pytest.mark.parametrize("name", list(METRICS))
def test_every_option_default_is_valid_and_named_once(name):
    metric = METRICS[name]
    for key, option in metric.options.items():
        assert option.value({}, key) == option.default
    assert set(metric.run_options) <= {*metric.options, "seed"}
    assert list(option_table(name))[:len(metric.options)] == list(metric.options)


def test_checks_sharing_a_request_merge_their_needs():
    ce, kl = METRICS["ce_loss_recovered"], METRICS["kl_div_score"]
    request = plan.token_request("r", (SAE,), [(ce, {"ablation": "mean"}),
                                               (kl, {"ablation": "zero"}),
                                               (METRICS["l0"], {})], Site((SAE,)))
    assert request.ablations == ("mean", "zero") and request.reconstruction


# ------------------------------------------------------- a metric defined in this file only

class NormProbe(Probe):
    """Per sequence: Σ ‖x‖^p of the clean activation at the dictionary's read hook, and the
    count of evaluated positions."""

    def __init__(self, hook: str, power: int) -> None:
        self.key, self.hook, self.power = ("test_norm", hook, power), hook, power
        self.clean_hooks = (hook,)

    def batch(self, view: BatchView, sweep: int) -> Mapping[str, Tensor]:
        keep = view.act_mask.double()
        norms = view.clean[self.hook].double().norm(dim=-1) ** self.power
        return {"tn_sum": (norms * keep).sum(1), "tn_n": keep.sum(1)}


POWER = Option("the power of the norm", positive_int, 1, shapes_run=True)


def _norm_rows(ctx: TableContext) -> dict[str, list[dict]]:
    return {"layers.csv": [{"layer": 0, "hook": ctx.write_hooks[0],
                            "value": float(ctx.terms["tn_sum"].sum() / ctx.terms["tn_n"].sum())}]}


@pytest.fixture
def test_norm():
    metric = register_metric(Metric(
        name="test_norm", terms=lambda o: ("tn_n", "tn_sum"),
        aggregate=lambda s, o: s["tn_sum"] / s["tn_n"], higher_is_better=True,
        description="mean ‖x‖^power of the clean read-hook activation (a test metric)",
        kind="reconstruction", count="tn_n", options={"power": POWER},
        needs=lambda o, site: Needs(probes=(NormProbe(site.dictionaries[0].read_hook,
                                                      POWER.value(o, "power")),)),
        tables=_norm_rows))
    yield metric
    del METRICS["test_norm"]


def _expected(tokens: Tensor, hook: str, power: int) -> float:
    from saebench import engine

    model = loading.load_zoo_model()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
    keep = ~torch.isin(tokens, torch.tensor(engine.special_token_ids(model)))
    return float((cache[hook][keep].double().norm(dim=-1) ** power).mean())


def test_a_metric_registered_in_a_test_file_runs_end_to_end(test_norm, tmp_path):
    (tmp_path / "suite.yaml").write_text(textwrap.dedent("""
        model: zoo
        data: {n_tokens: 1024}
        dictionaries: {a: {zoo: resid-L2-topk16}}
        checks:
          - {metric: test_norm, dictionaries: [a], threshold: "> 0"}
          - {metric: test_norm, dictionaries: [a], options: {power: 2}}
    """))
    run = SuiteRun(load_suite(tmp_path / "suite.yaml"), RunSettings(device="cpu"))
    run.prepare()
    first, second = run.suite.checks
    assert second.id == "a::test_norm[power=2]"
    rows = [run.result(c) for c in run.suite.checks]
    hook = "blocks.2.hook_resid_pre"
    assert rows[0]["verdict"] == "pass"
    # The suite's batches against one pass here: each activation's norm moves by at most
    # `f32_activations` (relative), ‖x‖^p by p times that; the means add float64 rounding.
    # A wrong power, hook or count of positions moves the value by more than 1%.
    moved = f32_activations(loading.load_zoo_model(), run.tokens, hook)
    for row, power in zip(rows, (1, 2), strict=True):
        assert row["value"] == pytest.approx(_expected(run.tokens, hook, power),
                                             rel=power * moved + F64_RECOMPUTE, abs=0)
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
    # the same float64 sums divided, in another order
    assert run.extra_rows(first)["layers.csv"][0]["value"] == pytest.approx(
        rows[0]["value"], rel=F64_RECOMPUTE, abs=0)

    df = evaluate(loading.load_zoo_model(), {"a": loading.load_zoo_dictionary("resid-L2-topk16")},
                  run.tokens, ["test_norm"], options={"power": [1, 2]}, n_boot=20,
                  progress=False)
    assert df["value"].tolist() == pytest.approx([r["value"] for r in rows],
                                                 rel=2 * moved + F64_RECOMPUTE, abs=0)
