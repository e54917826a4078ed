"""Half precision: a bfloat16 or float16 model gives the float32 numbers to a stated
tolerance, and no accumulator runs in the model's dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from tolerances import F64_RECOMPUTE, f32_kl, f32_log_probs, logit_bound, ratio
from toys import Identity, tiny_model, tokens_for

from saebench import evaluate, loading
from saebench.engine import EngineOptions, unembed
from saebench.metrics import get_metric
from saebench.splice import as_dictionary
from saebench.stats import summarize
from saebench.tasks import TaskRequest, run_task

pytestmark = pytest.mark.usefixtures("no_grad_one_thread")

ZOO_DICTIONARY = "resid-L2-topk16"
METRICS = ("ce_loss_recovered", "kl_div", "explained_variance")
TOLERANCE = {"ce_loss_recovered": 5e-4, "kl_div": 0.1, "explained_variance": 1e-3,
             "logit_diff_recovered": 0.02}
"""Largest half − float32 difference allowed (absolute; relative for kl_div). Measured with
`ZOO_DICTIONARY` on 16 held-out sequences and 32 IOI prompts (bfloat16 | float16):
ce_loss_recovered 2.0e-5 | 1.3e-6, kl_div −2.6% | +0.7% (of 0.0094), explained_variance
−1.2e-4 | −5.6e-6, logit_diff_recovered 3.4e-3 | 2.3e-3; the other zoo resid-L* dictionaries
measured up to 5.3e-5, 3.9%, 1.2e-4 and 4.1e-3 in bfloat16. Each tolerance is 2.5-10 times
the largest difference measured. Measured, not derived: bfloat16 rounds every activation and
logit by up to 2⁻⁸ relative, but over thousands of tokens, and between passes that round
alike, the metrics' errors mostly cancel, so a bound built from 2⁻⁸ would be too loose to
tell a half-precision model from a broken one."""


def zoo_values(model, dtype: torch.dtype) -> dict[str, float]:
    """The metrics and the IOI logit diff recovered of `ZOO_DICTIONARY` with model and
    dictionary both in `dtype` (the model is copied: `evaluate` moves the one it is given)."""
    model = copy.deepcopy(model).to(dtype)
    sae = loading.load_zoo_dictionary(ZOO_DICTIONARY).to(dtype)
    df = evaluate(model, {"d": sae}, loading.load_heldout_tokens()[:16], METRICS,
                  dtype=dtype, batch_size=16, progress=False, n_boot=10)
    values = dict(zip(df["metric"], df["value"], strict=True))
    result = run_task(model, loading.load_task("ioi")[:32],
                      [TaskRequest("d", (as_dictionary(sae),))],
                      EngineOptions(batch_size=32, progress=False))
    values["logit_diff_recovered"] = summarize(get_metric("logit_diff_recovered"),
                                               result.terms["d"], {}, n_boot=10).value
    return values


@pytest.fixture(scope="module")
def float32_values(zoo_model) -> dict[str, float]:
    return zoo_values(zoo_model, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gives_the_float32_numbers(zoo_model, float32_values, dtype):
    """Model and dictionary in half precision give the float32 values within `TOLERANCE`:
    ce_loss_recovered ±5e-4, kl_div ±10% (relative), explained_variance ±1e-3 and the IOI
    logit_diff_recovered ±0.02, chosen from the measured differences there (2.5-10 times
    the largest)."""
    half = zoo_values(zoo_model, dtype)
    for name, want in float32_values.items():
        if name == "kl_div":
            assert half[name] == pytest.approx(want, rel=TOLERANCE[name]), name
        else:
            assert half[name] == pytest.approx(want, abs=TOLERANCE[name]), name


class Nudged(Identity):
    """A deterministic, slightly wrong reconstruction (a tilt of the centred activation)."""

    def decode(self, f):
        return f + 0.3 * torch.tanh(f - f.mean(-1, keepdim=True)).flip(-1)


def test_no_accumulator_runs_in_half_precision():
    """A bfloat16 model whose residual stream sits ~40 from 0 in every coordinate, so the
    centred variance of explained variance is a small difference of large sums. From the
    model's own bfloat16 activations and logits (unembedded as the engine does, so they are
    the same bfloat16 numbers: another matrix layout may round a bfloat16 logit apart),
    widened to float64 here, saebench's explained variance agrees to float64 rounding and
    its loss recovered and KL to float32 log-probs' (`f32_log_probs` of identical logits);
    computing the same parts in bfloat16 (per-position squared norms, the CE means before
    their difference, the log-probs of the KL) misses by 0.24, 0.09 and 0.7%, far outside
    those tolerances, so any such accumulator fails this test."""
    model = tiny_model(seed=3)
    for block in model.blocks:
        block.mlp.b_out.data += 40.0
    model = model.to(torch.bfloat16)
    tokens = tokens_for(model, 8, 3)
    hook = "blocks.1.hook_mlp_out"
    d = as_dictionary(Nudged(), hook=hook, d_in=16, d_sae=16)
    df = evaluate(model, {"d": d}, tokens, ["explained_variance", "ce_loss_recovered", "kl_div"],
                  exclude_special_tokens=False, batch_size=8, progress=False, n_boot=10)
    got = dict(zip(df["metric"], df["value"], strict=True))

    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    x = cache[hook].flatten(0, 1)
    recon = Nudged().decode(x)
    assert x.dtype == recon.dtype == torch.bfloat16

    def explained_variance(sq_err, sq_norm, total):
        return float(1 - sq_err.sum() / (sq_norm.sum() - total.pow(2).sum() / len(x)))

    x64, recon64 = x.double(), recon.double()
    ev = explained_variance((x64 - recon64).pow(2).sum(-1), x64.pow(2).sum(-1), x64.sum(0))
    ev_half = explained_variance((x - recon).pow(2).sum(-1).double(), x.pow(2).sum(-1).double(),
                                 x.sum(0).double())
    # float64 sums of 96 × 16 terms in another order; the variance cancels its sums by
    # E‖x‖² / variance (~10³ here), which scales its rounding and so 1 − EV's
    cancelling = float(x64.pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())
    assert got["explained_variance"] == pytest.approx(
        ev, rel=0, abs=F64_RECOMPUTE * (1 + cancelling) * abs(1 - ev))
    assert abs(ev_half - ev) > 0.1

    def final_logits(fwd) -> torch.Tensor:
        resid = model.run_with_hooks(tokens, fwd_hooks=fwd, stop_at_layer=model.cfg.n_layers)
        return unembed(model, model.ln_final(resid))

    logits = [final_logits(fwd) for fwd in (
        [], [(hook, lambda a, hook: Nudged().decode(a))],
        [(hook, lambda a, hook: torch.zeros_like(a))])]
    assert model.W_U.dtype == torch.bfloat16
    assert all(torch.equal(lg, lg.to(torch.bfloat16).float()) for lg in logits)

    def nll(logp):
        return -logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]

    def recovered(clean, spliced, ablated):
        return float((ablated - spliced) / (ablated - clean))

    token = f32_log_probs(model.cfg.d_vocab, logit_bound(model), 0.0)
    logps = [lg.double().log_softmax(-1) for lg in logits]
    means = [nll(lp).mean() for lp in logps]
    halves = [m.to(torch.bfloat16).double() for m in means]
    want = recovered(*means)
    tol = ratio(want, float(means[2] - means[0]), 2 * token)
    assert got["ce_loss_recovered"] == pytest.approx(want, rel=0, abs=tol)
    assert abs(recovered(*halves) - want) > 0.05

    kl = float((logps[0].exp() * (logps[0] - logps[1])).sum(-1).mean())
    clean, spliced = (lg.to(torch.bfloat16).log_softmax(-1) for lg in logits[:2])
    kl_half = float((clean.exp() * (clean - spliced)).sum(-1).double().mean())
    tol = f32_kl(token, kl, model.cfg.d_vocab)
    assert got["kl_div"] == pytest.approx(kl, rel=0, abs=tol)
    assert abs(kl_half - kl) > 4 * tol
