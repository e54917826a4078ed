"""The zoo's language model: a small HookedTransformer trained on the grammar on CPU.

Trained with LayerNorm, then saved with the LayerNorm weights folded and the writing
weights and unembedding centred (TransformerLens' `process_weights_`), so that direct
logit attribution through the cached final-LN scale is exact. The dictionaries are
trained on this processed model, and a user loads exactly what they were trained on.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerBase

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of the zoo model (TransformerLens config fields)."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    n_ctx: int = 128
    act_fn: str = "gelu"


@dataclass(frozen=True)
class TrainSpec:
    """Optimiser settings for the zoo model."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100


def build_config(spec: ModelSpec, d_vocab: int, seed: int, normalization: str) -> dict:
    """A TransformerLens config dict for `spec` (JSON-serialisable)."""
    return dict(
        asdict(spec),
        d_vocab=d_vocab,
        normalization_type=normalization,
        positional_embedding_type="standard",
        default_prepend_bos=True,
        seed=seed,
    )


def train_model(
    sequences: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase,
    spec: ModelSpec,
    train: TrainSpec,
    seed: int,
) -> tuple[HookedTransformer, list[float]]:
    """Train a LayerNorm model on `sequences` [n, n_ctx] and return it processed.

    Returns the model with folded LayerNorm (normalisation `LNPre`) and the loss curve.
    """
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(**build_config(spec, len(tokenizer), seed, "LN"))
    with hooked_transformer_on_purpose():
        model = HookedTransformer(cfg, tokenizer=tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)

    def lr_at(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(train.steps), desc="train zoo model", leave=False):
        idx = torch.randint(0, sequences.shape[0], (train.batch_size,), generator=generator)
        loss = model(sequences[idx], return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model, losses


def save_model(model: HookedTransformer, config: dict, directory: Path) -> None:
    """Write `config.json` and `model.safetensors` for a processed model."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))


@contextlib.contextmanager
def hooked_transformer_on_purpose() -> Iterator[None]:
    """Build a `HookedTransformer` without TransformerLens 3's notice that version 4 removes
    it: sae_lens runs on TransformerLens 3, so saebench builds one on purpose (and a user's
    first run should show no warning it cannot act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HookedTransformer is deprecated",
                                category=DeprecationWarning)
        yield


def load_model(
    directory: Path,
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> HookedTransformer:
    """Load a model saved by `save_model` (config + safetensors) onto `device`."""
    config = json.loads((directory / CONFIG_FILE).read_text())
    cfg = HookedTransformerConfig(**config, device=str(device), dtype=dtype)
    with hooked_transformer_on_purpose():
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    model.eval()
    return model
