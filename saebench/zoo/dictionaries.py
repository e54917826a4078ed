"""The zoo's dictionaries: what is trained where, and the training itself.

SAEs in sae_lens' format are trained with sae_lens' own `LanguageModelSAETrainingRunner` on
the zoo model (`override_model`) and the zoo corpus (`override_dataset`). Everything else is
trained by one short loop here (`_fit`) on a `Coder`, with one of two losses: the ReLU
transcoders (plain, skip, per-layer set, cross-layer) by `train_transcoder`, the TopK SAEs
saved in other libraries' formats by `train_topk_sae`; `saebench.zoo.formats` writes each in
its published on-disk format and reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
)
from sae_lens.constants import RUNNER_CFG_FILENAME
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import ActivationCache, HookedTransformer

from saebench.zoo import formats
from saebench.zoo.coder import Coder
from saebench.zoo.formats import sae_lens_transcoder

TRAINING_FILE = "saebench_training.json"
BATCH_TOKENS = 4096
TRANSCODERS = ("transcoder", "skip_transcoder", "transcoder_set", "clt")
FORMATS = ("sae_lens", "sparsify", "dictionary_learning", "circuit_tracer")


@dataclass(frozen=True)
class DictionarySpec:
    """One zoo dictionary: where it reads and writes, its shape, how long it trains, and the
    on-disk format it is saved in (`FORMATS`).

    `architecture` is `topk` or `standard` (ReLU + L1) for SAEs; `transcoder`,
    `skip_transcoder` (with a linear skip term), `transcoder_set` (one transcoder per layer)
    or `clt` (cross-layer: each layer's features also write to every later layer) when the
    read hook differs from the write hook. With `layers`, `hook` and `hook_out` are
    templates with a `{layer}` field, one per layer. `token_fraction` scales the build's
    token budget, which is how the deliberately poor dictionary is made.
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
    format: str = "sae_lens"
    layers: tuple[int, ...] = ()

    @property
    def write_hook(self) -> str:
        return self.hook_out or self.hook

    @property
    def reads(self) -> list[str]:
        """The hook each source layer reads (one for a single-layer dictionary)."""
        return self._per_layer(self.hook)

    @property
    def writes(self) -> list[str]:
        """The hook each output writes, in the order of `reads`."""
        return self._per_layer(self.write_hook)

    def _per_layer(self, template: str) -> list[str]:
        return [template.format(layer=layer) for layer in self.layers] or [template]


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
    ] + _other_formats(n_layers, d_model)


def _other_formats(n_layers: int, d_model: int) -> list[DictionarySpec]:
    """One dictionary per other published format (and sae_lens' skip transcoder)."""
    mid, layers = n_layers // 2, tuple(range(n_layers))
    return [
        DictionarySpec("sparsify-L1-topk16", "blocks.1.hook_resid_post", "topk", d_model,
                       4 * d_model, k=16, format="sparsify",
                       note="TopK SAE in EleutherAI sparsify's format (module layers.1)"),
        DictionarySpec(f"dl-L{mid}-topk16", f"blocks.{mid}.hook_resid_post", "topk", d_model,
                       4 * d_model, k=16, format="dictionary_learning",
                       note=f"dictionary_learning AutoEncoderTopK (resid_post_layer_{mid})"),
        DictionarySpec("skip-transcoder-L1", "blocks.1.ln2.hook_normalized",
                       "skip_transcoder", d_model, 4 * d_model, l1_coefficient=0.05,
                       hook_out="blocks.1.hook_mlp_out",
                       note="sae_lens SkipTranscoder: ReLU + L1 and a linear skip term"),
        DictionarySpec("ct-transcoders", "blocks.{layer}.ln2.hook_normalized",
                       "transcoder_set", d_model, 4 * d_model, l1_coefficient=0.25,
                       hook_out="blocks.{layer}.hook_mlp_out", format="circuit_tracer",
                       layers=layers, note="circuit-tracer transcoder set, every layer"),
        DictionarySpec("ct-clt", "blocks.{layer}.ln2.hook_normalized", "clt", d_model,
                       4 * d_model, l1_coefficient=0.2, hook_out="blocks.{layer}.hook_mlp_out",
                       format="circuit_tracer", layers=layers,
                       note="circuit-tracer cross-layer transcoder, every layer"),
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


def train(
    spec: DictionarySpec,
    model: HookedTransformer,
    dataset: Dataset,
    sequences: torch.Tensor,
    training_tokens: int,
    out_dir: Path,
    seed: int,
) -> None:
    """Train `spec` with the trainer its architecture and format call for, into `out_dir`
    (`dataset` holds the rows of `sequences`, for sae_lens' runner)."""
    if spec.architecture in TRANSCODERS:
        train_transcoder(spec, model, sequences, training_tokens, out_dir, seed)
    elif spec.format == "sae_lens":
        train_sae(spec, model, dataset, training_tokens, out_dir, seed)
    else:
        train_topk_sae(spec, model, sequences, training_tokens, out_dir, seed)


def train_transcoder(
    spec: DictionarySpec,
    model: HookedTransformer,
    sequences: torch.Tensor,
    training_tokens: int,
    out_dir: Path,
    seed: int,
) -> None:
    """Train a ReLU transcoder, skip transcoder, per-layer transcoder set or cross-layer
    transcoder: the sum over outputs of the fraction of variance unexplained + L1 on each
    layer's feature activations scaled by their decoder norms (summed over the outputs a
    feature writes, in units of its own layer's target RMS norm).

    Inputs and targets come from clean runs of the model; saved in `spec.format`.
    """
    torch.manual_seed(seed)
    coder = _init_transcoder(spec, model.cfg.d_model, model.cfg.n_ctx)
    steps = _steps(spec, training_tokens)
    cache = _fit(coder, lambda cache: _transcoder_loss(coder, spec.l1_coefficient, cache),
                 model, sequences, steps, seed, spec.name)
    _save(spec, coder, out_dir, model.cfg.n_ctx, cache)
    _write_training_record(out_dir, spec, steps * BATCH_TOKENS, seed,
                           trainer="saebench.zoo.dictionaries.train_transcoder")


def train_topk_sae(
    spec: DictionarySpec,
    model: HookedTransformer,
    sequences: torch.Tensor,
    training_tokens: int,
    out_dir: Path,
    seed: int,
) -> None:
    """Train a TopK SAE by the equations sparsify and dictionary_learning share
    (relu((x - b_dec) @ W_enc + b_enc), its top k kept; decoded f @ W_dec + b_dec) on the
    centred fraction of variance unexplained, decoder rows renormalised to unit norm after
    every step as both libraries do; saved in `spec.format`."""
    torch.manual_seed(seed)
    rows = max(1, BATCH_TOKENS // sequences.shape[1])
    with torch.no_grad():
        _, first = model.run_with_cache(sequences[:rows], names_filter=[spec.hook],
                                        stop_at_layer=_layer(spec.hook) + 1)
    coder = _init_topk(spec, first[spec.hook].reshape(-1, spec.d_in).mean(0))
    decoder = coder.W_dec[(0, 0)]

    def unit_norm_decoder() -> None:
        with torch.no_grad():
            decoder.div_(decoder.norm(dim=1, keepdim=True))

    steps = _steps(spec, training_tokens)
    cache = _fit(coder, lambda cache: _sae_loss(coder, cache), model, sequences, steps, seed,
                 spec.name, after_step=unit_norm_decoder)
    _save(spec, coder, out_dir, model.cfg.n_ctx, cache)
    _write_training_record(out_dir, spec, steps * BATCH_TOKENS, seed,
                           trainer="saebench.zoo.dictionaries.train_topk_sae")


def _steps(spec: DictionarySpec, training_tokens: int) -> int:
    return max(1, int(training_tokens * spec.token_fraction) // BATCH_TOKENS)


def _layer(hook: str) -> int:
    return int(hook.split(".")[1])


def _fit(
    coder: Coder,
    loss_fn: Callable[[ActivationCache], Tensor],
    model: HookedTransformer,
    sequences: torch.Tensor,
    steps: int,
    seed: int,
    name: str,
    after_step: Callable[[], None] | None = None,
) -> ActivationCache:
    """Adam (lr 1e-3) on `loss_fn` of clean activations: each step caches the coder's hooks
    for BATCH_TOKENS tokens of random training rows, the forward pass stopped after the last
    layer it needs. Returns the last step's cache (to check the written files against)."""
    names = sorted(set(coder.reads + coder.writes))
    opt = torch.optim.Adam(coder.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    rows_per_batch = max(1, BATCH_TOKENS // sequences.shape[1])
    for _ in tqdm(range(steps), desc=f"train {name}", leave=False):
        idx = torch.randint(0, sequences.shape[0], (rows_per_batch,), generator=generator)
        with torch.no_grad():
            _, cache = model.run_with_cache(
                sequences[idx], names_filter=names,
                stop_at_layer=max(map(_layer, names)) + 1,
            )
        loss = loss_fn(cache)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
    return cache


def _init_transcoder(spec: DictionarySpec, d_out: int, n_ctx: int) -> Coder:
    """Each source layer starts as a fresh sae_lens Transcoder whose decoder rows are scaled
    to norm 0.1 and whose encoder is the decoder's transpose (times sqrt(d_out / d_in)); a
    cross-layer transcoder's decoders into later layers start at zero."""
    layers = []
    for read, write in zip(spec.reads, spec.writes, strict=True):
        transcoder = sae_lens_transcoder(spec, read, write, d_out, n_ctx)
        with torch.no_grad():
            transcoder.W_dec.mul_(0.1 / transcoder.W_dec.norm(dim=1, keepdim=True))
            transcoder.W_enc.copy_(transcoder.W_dec.T * (d_out / spec.d_in) ** 0.5)
        layers.append(transcoder)
    n = len(layers)
    decoders = {(i, i): t.W_dec for i, t in enumerate(layers)}
    if spec.architecture == "clt":
        decoders.update({(i, j): torch.nn.Parameter(torch.zeros(spec.d_sae, d_out))
                         for i in range(n) for j in range(i + 1, n)})
    return Coder(spec.reads, spec.writes, [t.W_enc for t in layers], [t.b_enc for t in layers],
                 decoders, [t.b_dec for t in layers], [None] * n,
                 [getattr(t, "W_skip", None) for t in layers])


def _init_topk(spec: DictionarySpec, mean: Tensor) -> Coder:
    """Unit-norm random decoder rows, the encoder their transpose, `b_dec` at the mean
    activation (sparsify and dictionary_learning start it at the first batch's median)."""
    decoder = torch.randn(spec.d_sae, spec.d_in)
    decoder /= decoder.norm(dim=1, keepdim=True)
    b_dec = torch.nn.Parameter(mean.clone())
    return Coder([spec.hook], [spec.hook], [torch.nn.Parameter(decoder.T.clone())],
                 [torch.nn.Parameter(torch.zeros(spec.d_sae))],
                 {(0, 0): torch.nn.Parameter(decoder)}, [b_dec], [b_dec], [None], spec.k)


def _transcoder_loss(coder: Coder, l1_coefficient: float, cache: ActivationCache) -> Tensor:
    xs = [cache[hook].reshape(-1, cache[hook].shape[-1]) for hook in coder.reads]
    targets = [cache[hook].reshape(-1, cache[hook].shape[-1]) for hook in coder.writes]
    feats = [coder.encode(i, x) for i, x in enumerate(xs)]
    scales = [target.pow(2).sum(-1).mean() for target in targets]
    fvu = sum((coder.decode(j, feats, xs) - target).pow(2).sum(-1).mean() / scale
              for j, (target, scale) in enumerate(zip(targets, scales, strict=True)))
    sparsity = sum((f * coder.decoder_norms(i)).sum(-1).mean() / scales[i].sqrt()
                   for i, f in enumerate(feats))
    return fvu + l1_coefficient * sparsity


def _sae_loss(coder: Coder, cache: ActivationCache) -> Tensor:
    x = cache[coder.reads[0]].reshape(-1, coder.W_enc[0].shape[0])
    (recon,) = coder.reconstruct([x])
    return (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def _save(spec: DictionarySpec, coder: Coder, out_dir: Path, n_ctx: int,
          cache: ActivationCache) -> None:
    """Write `coder` in its format and check that what the format's reader gets back
    reconstructs the cached activations as the trained coder does."""
    formats.write(spec, coder, out_dir, n_ctx)
    written = formats.read(spec, out_dir)
    xs = [cache[hook].reshape(-1, cache[hook].shape[-1]).double() for hook in coder.reads]
    with torch.no_grad():
        expected = coder.to(torch.float64).reconstruct(xs)
    for hook, got, want in zip(coder.writes, written.reconstruct(xs), expected, strict=True):
        if not torch.allclose(got, want, rtol=1e-9, atol=1e-9):
            raise RuntimeError(f"{spec.name}: the {spec.format} files in {out_dir} do not "
                               f"reconstruct {hook} as the trained dictionary does")


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
