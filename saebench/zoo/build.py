"""Build the toy zoo from a seed: corpus, tokenizer, model, task prompts, tokens, dictionaries.

    python -m saebench.zoo build            # the committed zoo (about 20 minutes on 2 CPU cores)
    python -m saebench.zoo build --tiny --out tiny-zoo   # seconds; exercises every step

Each step writes its artifacts under the output directory; the last one writes
`manifest.json` with every file's sha256, the settings, and the measured quality.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import version
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import save_file

from saebench.zoo import corpus, paths
from saebench.zoo.dictionaries import DictionarySpec, train_sae, train_transcoder, zoo_dictionaries
from saebench.zoo.model import ModelSpec, TrainSpec, build_config, save_model, train_model
from saebench.zoo.quality import dictionary_quality, model_quality
from saebench.zoo.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


@dataclass(frozen=True)
class BuildSettings:
    """Everything the build depends on; the defaults build the committed zoo."""

    seed: int = 0
    n_train_documents: int = 60_000
    n_heldout_documents: int = 1_000
    n_task_prompts: int = 300
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    dictionary_tokens: int = 1_500_000

    @classmethod
    def tiny(cls) -> BuildSettings:
        """Settings small enough for a smoke test: same pipeline, seconds to run."""
        return cls(
            n_train_documents=300, n_heldout_documents=40, n_task_prompts=20,
            model=ModelSpec(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=32),
            train=TrainSpec(steps=5, batch_size=8, warmup_steps=1),
            dictionary_tokens=8192,
        )


def pack(token_lists: list[list[int]], bos: int, n_ctx: int) -> torch.Tensor:
    """Documents joined with BOS separators into rows of `n_ctx`, each row starting with BOS.

    The same layout sae_lens uses for text datasets (`concat_and_batch_sequences`).
    """
    stream: list[int] = []
    for ids in token_lists:
        stream.append(bos)
        stream.extend(ids)
    width = n_ctx - 1
    n_rows = len(stream) // width
    body = torch.tensor(stream[: n_rows * width], dtype=torch.long).view(n_rows, width)
    return torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), body], dim=1)


def _log(message: str, started: float) -> None:
    print(f"[zoo build {time.perf_counter() - started:7.1f}s] {message}", flush=True)


@torch.enable_grad()
def build(out_dir: Path, settings: BuildSettings) -> dict:
    """Build every zoo artifact into `out_dir` and return the manifest written there."""
    started = time.perf_counter()
    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng_seeds = random.Random(settings.seed)
    train_seed, heldout_seed, *task_seeds = (rng_seeds.randrange(2**31) for _ in range(5))

    train_docs = corpus.corpus(train_seed, settings.n_train_documents)
    heldout_docs = corpus.corpus(heldout_seed, settings.n_heldout_documents)
    task_rows = {
        task: corpus.task_prompts(task, seed, settings.n_task_prompts)
        for task, seed in zip(corpus.TASKS, task_seeds, strict=True)
    }
    prompt_texts = [r["prompt"] + " " + r["answer"] + " " + r["distractor"]
                    for rows in task_rows.values() for r in rows]
    save_tokenizer(train_tokenizer(train_docs + prompt_texts), out_dir / paths.TOKENIZER)
    tokenizer = load_tokenizer(out_dir / paths.TOKENIZER)
    _log(f"corpus: {len(train_docs)} documents, vocabulary {len(tokenizer)}", started)

    n_ctx = settings.model.n_ctx
    train_seqs = pack(tokenizer(train_docs)["input_ids"], tokenizer.bos_token_id, n_ctx)
    heldout_seqs = pack(tokenizer(heldout_docs)["input_ids"], tokenizer.bos_token_id, n_ctx)
    (out_dir / paths.HELDOUT_TOKENS).parent.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": heldout_seqs.to(torch.int32)}, str(out_dir / paths.HELDOUT_TOKENS))
    for task, rows in task_rows.items():
        path = out_dir / paths.task_file(task)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _log(f"tokens: {train_seqs.numel()} train, {heldout_seqs.numel()} held out", started)

    model, losses = train_model(train_seqs, tokenizer, settings.model, settings.train,
                                settings.seed)
    config = build_config(settings.model, len(tokenizer), settings.seed, "LNPre")
    save_model(model, config, out_dir / paths.MODEL)
    _log(f"model trained: final train loss {losses[-1]:.3f}", started)
    quality = {"model": model_quality(model, heldout_seqs, train_seqs, task_rows)}
    _log(f"model quality: {quality['model']}", started)

    dataset = Dataset.from_dict({"tokens": train_seqs.tolist()})
    specs = zoo_dictionaries(settings.model.n_layers, settings.model.d_model,
                             settings.model.d_mlp)
    quality["dictionaries"] = {}
    for spec in specs:
        dict_dir = out_dir / paths.dictionary_dir(spec.name)
        shutil.rmtree(dict_dir, ignore_errors=True)
        _train_dictionary(spec, model, dataset, train_seqs, settings, dict_dir)
        quality["dictionaries"][spec.name] = dictionary_quality(dict_dir, model, heldout_seqs)
        _log(f"{spec.name}: {quality['dictionaries'][spec.name]}", started)

    manifest = _manifest(out_dir, settings, quality, specs, time.perf_counter() - started)
    (out_dir / paths.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _log(f"manifest written: {len(manifest['artifacts'])} files", started)
    return manifest


def _train_dictionary(
    spec: DictionarySpec,
    model,
    dataset: Dataset,
    train_seqs: torch.Tensor,
    settings: BuildSettings,
    dict_dir: Path,
) -> None:
    seed = settings.seed + 1 + sum(map(ord, spec.name))
    if spec.architecture == "transcoder":
        train_transcoder(spec, model, train_seqs, settings.dictionary_tokens, dict_dir, seed)
    else:
        train_sae(spec, model, dataset, settings.dictionary_tokens, dict_dir, seed)


def _manifest(out_dir: Path, settings: BuildSettings, quality: dict,
              specs: list[DictionarySpec], seconds: float) -> dict:
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != paths.MANIFEST)
    return {
        "settings": asdict(settings),
        "dictionaries": {s.name: asdict(replace(s)) for s in specs},
        "quality": quality,
        "artifacts": {p.relative_to(out_dir).as_posix(): paths.sha256(p) for p in files},
        "versions": {pkg: version(pkg) for pkg in ("torch", "sae-lens", "transformer-lens")},
        "build_seconds": round(seconds, 1),
    }
