"""Quality numbers the zoo build measures and records in its manifest.

Model: held-out cross-entropy against the corpus' unigram entropy, and task accuracy
(answer logit above distractor logit). Dictionaries: sae_lens' own `run_evals` on the
held-out tokens (loss recovered against zero ablation, KL score, L0, explained variance);
the transcoder, which `run_evals` cannot splice, gets the same loss-recovered formula here.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import SAE, ActivationsStore
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedTransformer

EVAL_BATCH = 16


@torch.no_grad()
def task_accuracy(model: HookedTransformer, rows: list[dict]) -> float:
    """Share of prompts whose answer logit beats the distractor logit at the last position."""
    by_length: dict[int, list[tuple[torch.Tensor, int, int]]] = defaultdict(list)
    for row in rows:
        tokens = model.to_tokens(row["prompt"])[0]
        answer = model.to_single_token(row["answer"])
        distractor = model.to_single_token(row["distractor"])
        by_length[len(tokens)].append((tokens, answer, distractor))
    correct = 0
    for group in by_length.values():
        tokens = torch.stack([t for t, _, _ in group]).to(model.cfg.device)
        logits = model(tokens)[:, -1]
        idx = torch.arange(len(group))
        answers = torch.tensor([a for _, a, _ in group])
        distractors = torch.tensor([d for _, _, d in group])
        correct += int((logits[idx, answers] > logits[idx, distractors]).sum())
    return correct / len(rows)


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy in nats of the token distribution of `tokens` (the no-context baseline)."""
    counts = torch.bincount(tokens.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def heldout_ce(model: HookedTransformer, tokens: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats) over every position of `tokens`."""
    total = 0.0
    for batch in tokens.split(EVAL_BATCH):
        total += model(batch, return_type="loss").item() * len(batch)
    return total / len(tokens)


def model_quality(
    model: HookedTransformer,
    heldout: torch.Tensor,
    train: torch.Tensor,
    task_rows: dict[str, list[dict]],
) -> dict:
    """Held-out CE, unigram entropy of the training tokens, and accuracy per task."""
    return {
        "heldout_ce": round(heldout_ce(model, heldout), 4),
        "unigram_entropy": round(unigram_entropy(train), 4),
        "task_accuracy": {task: round(task_accuracy(model, rows), 4)
                          for task, rows in task_rows.items()},
    }


def dictionary_quality(directory: Path, model: HookedTransformer, heldout: torch.Tensor) -> dict:
    """Loss recovered (zero ablation) and sparsity/fidelity of a saved dictionary."""
    sae = SAE.load_from_disk(str(directory))
    if sae.cfg.metadata.hook_name_out:
        return _transcoder_quality(sae, model, heldout)
    store = ActivationsStore.from_sae(
        model, sae, Dataset.from_dict({"tokens": heldout.tolist()}),
        streaming=False, store_batch_size_prompts=EVAL_BATCH, n_batches_in_buffer=2,
    )
    n_batches = len(heldout) // EVAL_BATCH
    config = EvalConfig(
        batch_size_prompts=EVAL_BATCH, n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches, compute_kl=True, compute_ce_loss=True,
        compute_sparsity_metrics=True, compute_variance_metrics=True,
    )
    metrics, _ = run_evals(sae, store, model, ActivationScaler(), config)
    return {
        "ce_loss_score": round(metrics["model_performance_preservation"]["ce_loss_score"], 4),
        "kl_div_score": round(metrics["model_behavior_preservation"]["kl_div_score"], 4),
        "l0": round(metrics["sparsity"]["l0"], 2),
        "explained_variance": round(metrics["reconstruction_quality"]["explained_variance"], 4),
        "source": "sae_lens.evals.run_evals",
    }


@torch.no_grad()
def _transcoder_quality(sae: SAE, model: HookedTransformer, heldout: torch.Tensor) -> dict:
    read, write = sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out
    special = torch.tensor(list(get_special_token_ids(model.tokenizer)))
    sums = defaultdict(float)
    n_positions = 0
    for i in range(0, len(heldout), EVAL_BATCH):
        tokens = heldout[i:i + EVAL_BATCH]
        keep = ~torch.isin(tokens[:, :-1], special)
        _, cache = model.run_with_cache(tokens, names_filter=[read, write])
        feats = sae.encode(cache[read])
        recon = sae.decode(feats)

        def splice(act, hook, value=recon):
            return value

        clean = model(tokens, return_type="loss", loss_per_token=True)
        spliced = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True,
                                       fwd_hooks=[(write, splice)])
        ablated = model.run_with_hooks(tokens, return_type="loss", loss_per_token=True,
                                       fwd_hooks=[(write, lambda act, hook: torch.zeros_like(act))])
        sums["clean"] += float(clean[keep].sum())
        sums["spliced"] += float(spliced[keep].sum())
        sums["ablated"] += float(ablated[keep].sum())
        active = (feats != 0).sum(-1)[~torch.isin(tokens, special)]
        sums["l0"] += float(active.sum())
        n_positions += active.numel()
    score = (sums["ablated"] - sums["spliced"]) / (sums["ablated"] - sums["clean"])
    return {"ce_loss_score": round(score, 4), "l0": round(sums["l0"] / n_positions, 2),
            "source": "saebench.zoo.quality (sae_lens' formula: zero ablation, ratio of means)"}
