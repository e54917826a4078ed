"""saebench's core metrics equal sae_lens' `run_evals` on the same tokens and dictionary.

Where the definitions differ the test states the exact difference and checks that:
`mse` is a mean per element here and a per-token sum over dimensions in sae_lens.
"""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from sae_lens import ActivationsStore
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from tolerances import (
    f32_error,
    f32_kl,
    f32_log_probs,
    f32_sum,
    f32_sum_typical,
    logit_bound,
    mean_typical,
    ratio,
)

from saebench import evaluate, loading

N_SEQS = 32


def sae_lens_metrics(model, sae, tokens) -> dict[str, float]:
    store = ActivationsStore.from_sae(
        model, sae, Dataset.from_dict({"tokens": tokens.tolist()}), streaming=False,
        context_size=tokens.shape[1], store_batch_size_prompts=len(tokens), n_batches_in_buffer=2,
    )
    config = EvalConfig(
        batch_size_prompts=len(tokens), n_eval_reconstruction_batches=1,
        n_eval_sparsity_variance_batches=1, compute_kl=True, compute_ce_loss=True,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_l2_norms=True,
    )
    nested, _ = run_evals(sae, store, model, ActivationScaler(), config)
    return {k: v for group in nested.values() if isinstance(group, dict) for k, v in group.items()}


@pytest.mark.parametrize(
    "name", ["resid-L2-topk16", "mlp_out-L2-relu", "mlp_post-L3-topk32", "attn_z-L1-topk16",
             "resid-L2-poor"],
)
def test_core_metrics_match_sae_lens_run_evals(zoo_model, name):
    sae = loading.load_zoo_dictionary(name)
    tokens = loading.load_heldout_tokens()[:N_SEQS]
    ref = sae_lens_metrics(zoo_model, sae, tokens)
    df = evaluate(zoo_model, {name: sae}, tokens, batch_size=8, progress=False, n_boot=50)
    ours = dict(zip(df["metric"], df["value"], strict=True))
    parts = dict(zip(df["metric"], map(json.loads, df["parts"]), strict=True))
    width = sae.cfg.d_in
    pairs = {
        "ce_loss_recovered": ref["ce_loss_score"],
        "kl_div_score": ref["kl_div_score"],
        "l0": ref["l0"],
        "explained_variance": ref["explained_variance"],
        "cossim": ref["cossim"],
        "l2_ratio": ref["l2_ratio"],
        "relative_reconstruction_bias": ref["relative_reconstruction_bias"],
        "mse": ref["mse"] / width,
    }
    tolerance = sae_lens_tolerances(zoo_model, tokens, sae.cfg.d_in, ours, parts)
    for metric, expected in pairs.items():
        assert ours[metric] == pytest.approx(expected, rel=0, abs=tolerance[metric]), metric


def sae_lens_tolerances(model, tokens, width: int, ours: dict[str, float],
                        parts: dict[str, dict]) -> dict[str, float]:
    """How far sae_lens' values may be from ours. It runs the same passes and SAE up to
    their order: per token, log-probs within `f32_log_probs` of the measured `f32_error`,
    whose means over the n ≈ 4,000 positions are typically (`mean_typical`) 10 times closer
    than any one token. It averages its per-position float32 values over the n positions
    in float32, in its own order: `f32_sum_typical(n)` relative (6e-5; the worst case
    n·EPS32 would be 5e-4), on per-position values that are float32 sums over the width
    (`f32_sum`, relative). Ratios of such means move by `ratio`; explained variance's
    variance cancels its sums by E‖x‖² / variance. A definition apart (BOS counted, KL
    reversed, a per-token mse) moves a value by more than 1%."""
    n = tokens.numel()
    mean = f32_sum_typical(n)
    position = 2 * f32_sum(width + 2)  # a dot product and a norm, or two norms
    token = f32_log_probs(model.cfg.d_vocab, logit_bound(model), f32_error(model, tokens))
    ce, kl, ev = parts["ce_loss_recovered"], parts["kl_div_score"], parts["explained_variance"]
    kl_moved = sum(f32_kl(token, kl[k], model.cfg.d_vocab) for k in ("kl_abl", "kl_spliced"))
    cancelling = 1 / (1 - ev["explained_variance_uncentred"]) * (
        ev["sq_err_per_position"] / ev["variance_per_position"])
    tolerance = {
        "ce_loss_recovered": ratio(ours["ce_loss_recovered"], ce["denominator"],
                                   mean * (ce["ce_abl"] + ce["ce_clean"] + ce["ce_spliced"])
                                   + mean_typical(2 * token, n)),
        "kl_div_score": ratio(ours["kl_div_score"], kl["denominator"],
                              mean * (kl["kl_abl"] + kl["kl_spliced"])
                              + mean_typical(kl_moved, n)),
        # 1 − EV = E/V: E and E‖x‖² are float32 sums of n·width squares, V = E‖x‖² − ‖E x‖²
        "explained_variance": abs(1 - ours["explained_variance"])
        * f32_sum_typical(n * width) * (1 + 2 * cancelling),
        "relative_reconstruction_bias": 2 * (mean + position)
        * abs(ours["relative_reconstruction_bias"]),
    }
    rest = ("l0", "cossim", "l2_ratio", "mse")
    return tolerance | {m: (mean + position) * abs(ours[m]) for m in rest}
