"""saebench's core metrics equal sae_lens' `run_evals` on the same tokens and dictionary.

Where the definitions differ the test states the exact difference and checks that:
`mse` is a mean per element here and a per-token sum over dimensions in sae_lens.
"""

from __future__ import annotations

import pytest
from datasets import Dataset
from sae_lens import ActivationsStore
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler

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
    for metric, expected in pairs.items():
        assert ours[metric] == pytest.approx(expected, rel=1e-4, abs=1e-6), metric
