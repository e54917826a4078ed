"""The zoo's dictionaries: what is trained where, and the training itself.

SAEs are trained with sae_lens' own `LanguageModelSAETrainingRunner` on the zoo model
(`override_model`) and the zoo corpus (`override_dataset`), and saved in sae_lens'
on-disk format. sae_lens has no transcoder trainer, so the transcoder is trained by the
short loop in `train_transcoder` and saved as a sae_lens `Transcoder`; both kinds load
with `SAE.load_from_disk`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import (
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    StandardTrainingSAEConfig,
    TopKTrainingSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from sae_lens.constants import RUNNER_CFG_FILENAME
from sae_lens.saes.sae import SAEMetadata
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

TRAINING_FILE = "saebench_training.json"
BATCH_TOKENS = 4096


@dataclass(frozen=True)
class DictionarySpec:
    """One zoo dictionary: where it reads and writes, its shape and how long it trains.

    `architecture` is `topk` or `standard` (ReLU + L1) for SAEs, `transcoder` for a
    transcoder (read hook != write hook). `token_fraction` scales the build's token budget,
    which is how the deliberately poor dictionary is made.
    """

    name: str
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None
    l1_coefficient: float | None = None
    hook_out: str | None = None
    token_fraction: float = 1.0
    note: str = ""

    @property
    def write_hook(self) -> str:
        return self.hook_out or self.hook


def zoo_dictionaries(n_layers: int, d_model: int, d_mlp: int) -> list[DictionarySpec]:
    """The zoo's catalogue of dictionaries for a model of the given shape."""
    mid, last = n_layers // 2, n_layers - 1
    resid = [
        DictionarySpec(f"resid-L{layer}-topk16", f"blocks.{layer}.hook_resid_pre", "topk",
                       d_model, 8 * d_model, k=16, note="residual SAE, one per layer")
        for layer in range(n_layers)
    ]
    sweep = [
        DictionarySpec(f"resid-L{mid}-topk{k}", f"blocks.{mid}.hook_resid_pre", "topk",
                       d_model, 8 * d_model, k=k, note="sparsity sweep at the middle layer")
        for k in (4, 8, 32)
    ]
    return resid + sweep + [
        DictionarySpec(f"mlp_out-L{mid}-relu", f"blocks.{mid}.hook_mlp_out", "standard",
                       d_model, 8 * d_model, l1_coefficient=3.0, note="ReLU + L1 SAE"),
        DictionarySpec(f"mlp_post-L{last}-topk32", f"blocks.{last}.mlp.hook_post", "topk",
                       d_mlp, 2 * d_mlp, k=32, note="SAE on the MLP hidden activations"),
        DictionarySpec("attn_z-L1-topk16", "blocks.1.attn.hook_z", "topk",
                       d_model, 4 * d_model, k=16, note="SAE on concatenated head outputs"),
        DictionarySpec(f"transcoder-L{last}", f"blocks.{last}.ln2.hook_normalized", "transcoder",
                       d_model, 8 * d_model, l1_coefficient=0.3,
                       hook_out=f"blocks.{last}.hook_mlp_out", note="MLP transcoder"),
        DictionarySpec(f"resid-L{mid}-poor", f"blocks.{mid}.hook_resid_pre", "topk",
                       d_model, 8 * d_model, k=16, token_fraction=0.005,
                       note="deliberately poor: trained on 0.5% of the tokens"),
    ]


def _sae_config(spec: DictionarySpec, seed: int):
    common = dict(d_in=spec.d_in, d_sae=spec.d_sae, device="cpu", dtype="float32")
    if spec.hook.endswith("attn.hook_z"):
        common["reshape_activations"] = "hook_z"
    if spec.architecture == "topk":
        return TopKTrainingSAEConfig(k=spec.k, **common)
    if spec.architecture == "standard":
        return StandardTrainingSAEConfig(l1_coefficient=spec.l1_coefficient, **common)
    raise ValueError(f"{spec.name}: no sae_lens trainer for architecture {spec.architecture!r}")


def train_sae(
    spec: DictionarySpec,
    model: HookedTransformer,
    dataset: Dataset,
    training_tokens: int,
    out_dir: Path,
    seed: int,
) -> None:
    """Train one SAE with sae_lens' runner and save it (sae_lens format) in `out_dir`."""
    tokens = max(BATCH_TOKENS, int(training_tokens * spec.token_fraction))
    cfg = LanguageModelSAERunnerConfig(
        sae=_sae_config(spec, seed),
        model_name="saebench-zoo",
        model_from_pretrained_kwargs={},
        hook_name=spec.hook,
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=model.cfg.n_ctx,
        prepend_bos=True,
        training_tokens=tokens,
        train_batch_size_tokens=BATCH_TOKENS,
        store_batch_size_prompts=32,
        n_batches_in_buffer=2 * BATCH_TOKENS // model.cfg.n_ctx,
        lr=1e-3 if spec.architecture == "topk" else 5e-4,
        lr_warm_up_steps=min(50, tokens // BATCH_TOKENS // 10),
        lr_decay_steps=tokens // BATCH_TOKENS // 5,
        device="cpu",
        seed=seed,
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=str(out_dir),
        logger=LoggingConfig(log_to_wandb=False),
        n_eval_batches=0,
        verbose=False,
    )
    torch.manual_seed(seed)
    LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model).run()
    _portable_runner_cfg(out_dir)
    _write_training_record(out_dir, spec, tokens, seed,
                           trainer="sae_lens.LanguageModelSAETrainingRunner")


def train_transcoder(
    spec: DictionarySpec,
    model: HookedTransformer,
    sequences: torch.Tensor,
    training_tokens: int,
    out_dir: Path,
    seed: int,
) -> None:
    """Train a ReLU transcoder: fraction of variance unexplained + L1 on the feature
    activations scaled by decoder norms (in units of the target's RMS norm).

    Reads `spec.hook`, predicts `spec.hook_out`; saved as sae_lens' `Transcoder`.
    """
    torch.manual_seed(seed)
    layer = int(spec.hook.split(".")[1])
    d_out = model.cfg.d_model
    cfg = TranscoderConfig(
        d_in=spec.d_in, d_sae=spec.d_sae, d_out=d_out, apply_b_dec_to_input=False,
        metadata=SAEMetadata(
            hook_name=spec.hook, hook_name_out=spec.write_hook, model_name="saebench-zoo",
            context_size=model.cfg.n_ctx, prepend_bos=True,
        ),
    )
    transcoder = Transcoder(cfg)
    with torch.no_grad():
        transcoder.W_dec.mul_(0.1 / transcoder.W_dec.norm(dim=1, keepdim=True))
        transcoder.W_enc.copy_(transcoder.W_dec.T * (d_out / spec.d_in) ** 0.5)
    opt = torch.optim.Adam(transcoder.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    rows_per_batch = max(1, BATCH_TOKENS // sequences.shape[1])
    steps = max(1, int(training_tokens * spec.token_fraction) // BATCH_TOKENS)
    for _ in tqdm(range(steps), desc=f"train {spec.name}", leave=False):
        idx = torch.randint(0, sequences.shape[0], (rows_per_batch,), generator=generator)
        with torch.no_grad():
            _, cache = model.run_with_cache(
                sequences[idx], names_filter=[spec.hook, spec.write_hook],
                stop_at_layer=layer + 1,
            )
        x = cache[spec.hook].reshape(-1, spec.d_in)
        target = cache[spec.write_hook].reshape(-1, d_out)
        feats = transcoder.encode(x)
        scale = target.pow(2).sum(-1).mean()
        fvu = (transcoder.decode(feats) - target).pow(2).sum(-1).mean() / scale
        sparsity = (feats * transcoder.W_dec.norm(dim=1)).sum(-1).mean() / scale.sqrt()
        loss = fvu + spec.l1_coefficient * sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    transcoder.save_model(str(out_dir))
    _write_training_record(out_dir, spec, steps * BATCH_TOKENS, seed,
                           trainer="saebench.zoo.dictionaries.train_transcoder")


def _portable_runner_cfg(out_dir: Path) -> None:
    """Record the output path in sae_lens' runner config as the directory's own name, so the
    committed zoo carries no path of the machine that built it."""
    path = out_dir / RUNNER_CFG_FILENAME
    runner_cfg = json.loads(path.read_text())
    runner_cfg["output_path"] = out_dir.name
    path.write_text(json.dumps(runner_cfg))


def _write_training_record(
    out_dir: Path, spec: DictionarySpec, tokens: int, seed: int, trainer: str
) -> None:
    record = dict(spec.__dict__, training_tokens=tokens, seed=seed, trainer=trainer)
    (out_dir / TRAINING_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
