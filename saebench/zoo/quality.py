"""Quality numbers the zoo build measures and records in its manifest.

Model: held-out cross-entropy against the corpus' unigram entropy, and task accuracy
(answer logit above distractor logit). Dictionaries: sae_lens' own `run_evals` on the
held-out tokens for the sae_lens SAEs (loss recovered against zero ablation, KL score, L0,
explained variance); the transcoders and the other formats, which `run_evals` cannot take,
get float64 numbers here from the files as their format's reader loads them (FVU and L0 per
hook, the same loss-recovered formula, next-token agreement).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from datasets import Dataset
from sae_lens import SAE, ActivationsStore
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.util import get_special_token_ids
from transformer_lens import HookedTransformer

from saebench.zoo import formats
from saebench.zoo.coder import Coder
from saebench.zoo.dictionaries import TRANSCODERS

if TYPE_CHECKING:
    from saebench.zoo.dictionaries import DictionarySpec

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


def dictionary_quality(spec: DictionarySpec, directory: Path, model: HookedTransformer,
                       heldout: torch.Tensor) -> dict:
    """Quality numbers of a saved dictionary: sae_lens' `run_evals` for a sae_lens SAE, the
    float64 equations of `coder_quality` on what its format's reader loads for the rest."""
    if spec.format == "sae_lens" and spec.architecture not in TRANSCODERS:
        return _run_evals_quality(directory, model, heldout)
    return coder_quality(formats.read(spec, directory), model, heldout)


def _run_evals_quality(directory: Path, model: HookedTransformer, heldout: torch.Tensor) -> dict:
    """Loss recovered (zero ablation) and sparsity/fidelity by sae_lens' `run_evals`."""
    sae = SAE.load_from_disk(str(directory))
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


CODER_SOURCE = (
    "saebench.zoo.quality.coder_quality: float64 equations of the files as read back; FVU "
    "(centred) per write hook and mean L0 per read hook over the non-special positions of "
    "clean runs; CE loss score (sae_lens' formula: zero ablation of every write hook, ratio "
    "of means) and next-token agreement with every write hook replaced at once, each input "
    "read from the spliced run"
)


@torch.no_grad()
def coder_quality(coder: Coder, model: HookedTransformer, heldout: torch.Tensor) -> dict:
    """FVU and L0 on clean activations, and what splicing every output in at once does to
    the model's next-token loss and top-1 predictions, over the held-out tokens.

    A dictionary over several layers also gets the numbers per hook (`fvu`, `l0` are then
    the means over its hooks).
    """
    special = torch.tensor(list(get_special_token_ids(model.tokenizer)))
    totals: dict[str, torch.Tensor | float] = defaultdict(float)
    for i in range(0, len(heldout), EVAL_BATCH):
        _accumulate(totals, coder, model, heldout[i:i + EVAL_BATCH], special)
    fvu = [float(totals[f"err{j}"] / _variance(totals, j)) for j in range(len(coder.writes))]
    l0 = [float(totals[f"l0_{i}"] / totals["positions"]) for i in range(len(coder.reads))]
    result = {
        "fvu": round(sum(fvu) / len(fvu), 4),
        "l0": round(sum(l0) / len(l0), 2),
        "ce_loss_score": round((totals["ablated"] - totals["spliced"])
                               / (totals["ablated"] - totals["clean"]), 4),
        "next_token_agreement": round(totals["agree"] / totals["positions"], 4),
    }
    if len(coder.reads) > 1:
        result["fvu_per_hook"] = {h: round(v, 4) for h, v in zip(coder.writes, fvu, strict=True)}
        result["l0_per_hook"] = {h: round(v, 2) for h, v in zip(coder.reads, l0, strict=True)}
    return {**result, "source": CODER_SOURCE}


def _variance(totals: dict, j: int) -> torch.Tensor:
    """Summed squared deviation from the mean of output j's targets."""
    return totals[f"sq{j}"] - totals[f"sum{j}"].pow(2).sum() / totals["positions"]


def _accumulate(totals: dict, coder: Coder, model: HookedTransformer, tokens: torch.Tensor,
                special: torch.Tensor) -> None:
    """Add one batch's sums (float64) to `totals`."""
    keep = ~torch.isin(tokens, special)
    logits, cache = model.run_with_cache(tokens, names_filter=coder.reads + coder.writes)
    xs = [cache[hook].double() for hook in coder.reads]
    feats = [coder.encode(i, x) for i, x in enumerate(xs)]
    for j, hook in enumerate(coder.writes):
        target = cache[hook].double()[keep]
        totals[f"err{j}"] += (coder.decode(j, feats, xs)[keep] - target).pow(2).sum()
        totals[f"sum{j}"] += target.sum(0)
        totals[f"sq{j}"] += target.pow(2).sum()
    for i, f in enumerate(feats):
        totals[f"l0_{i}"] += float((f[keep] != 0).sum())
    totals["positions"] += int(keep.sum())
    spliced = model.run_with_hooks(tokens, fwd_hooks=_splice_hooks(coder))
    ablated = model.run_with_hooks(tokens, fwd_hooks=[
        (hook, lambda act, hook: torch.zeros_like(act)) for hook in coder.writes])
    loss_keep = keep[:, :-1]
    for name, out in (("clean", logits), ("spliced", spliced), ("ablated", ablated)):
        totals[name] += float(_token_losses(out, tokens)[loss_keep].sum())
    totals["agree"] += float((spliced.argmax(-1) == logits.argmax(-1))[keep].sum())


def _splice_hooks(coder: Coder) -> list[tuple[str, Callable]]:
    """Hooks that encode each read hook's activation in the running (spliced) pass and
    replace each write hook's activation by its reconstruction from those features; a hook
    both read and written is read first."""
    xs: list[torch.Tensor] = [torch.empty(0)] * len(coder.reads)
    feats = list(xs)

    def read(act: torch.Tensor, hook) -> None:
        i = coder.reads.index(hook.name)
        xs[i] = act.double()
        feats[i] = coder.encode(i, xs[i])

    def write(act: torch.Tensor, hook) -> torch.Tensor:
        return coder.decode(coder.writes.index(hook.name), feats, xs).to(act.dtype)

    return [(hook, read) for hook in coder.reads] + [(hook, write) for hook in coder.writes]


def _token_losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy [batch, pos - 1] in float64."""
    logprobs = logits[:, :-1].double().log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, 1:, None])[..., 0]
