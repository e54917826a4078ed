"""Build the toy zoo from a seed: corpus, tokenizer, model, task prompts, tokens, dictionaries.

    python -m saebench.zoo build --out saebench/zoo/artifacts  # in a checkout: the committed
                                                  # zoo (about 20 minutes on 2 CPU cores)
    python -m saebench.zoo build --tiny --out tiny-zoo   # seconds; exercises every step
    python -m saebench.zoo build --out saebench/zoo/artifacts --dictionaries ct-clt
                                                  # one dictionary, into the zoo

Each step writes its artifacts under the output directory; the last one writes
`manifest.json` with every file's sha256, the settings, the measured quality, and a
fingerprint of the training tokens (which no artifact holds). `--dictionaries` trains only
the named dictionaries into an existing zoo, on its model and the regenerated tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from importlib.metadata import version
from pathlib import Path, PurePosixPath

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from saebench.zoo import corpus, paths
from saebench.zoo.dictionaries import DictionarySpec, train, zoo_dictionaries
from saebench.zoo.model import (
    ModelSpec,
    TrainSpec,
    build_config,
    load_model,
    save_model,
    train_model,
)
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


@dataclass
class Data:
    """What the build derives from the seed before the model: tokenizer, token sets, prompts."""

    tokenizer: PreTrainedTokenizerBase
    train_seqs: torch.Tensor
    heldout_seqs: torch.Tensor
    task_rows: dict[str, list[dict]]

    @cached_property
    def dataset(self) -> Dataset:
        """The training rows as the `tokens` column sae_lens' runner reads."""
        return Dataset.from_dict({"tokens": self.train_seqs.tolist()})


class BuildError(RuntimeError):
    """A partial build cannot go ahead: the zoo does not match what this code would build."""


def prepare_data(out_dir: Path, settings: BuildSettings, started: float) -> Data:
    """Generate the corpus and task prompts from the seed, train the tokenizer, tokenize, and
    write the tokenizer, held-out tokens and task prompts under `out_dir`."""
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
    return Data(tokenizer, train_seqs, heldout_seqs, task_rows)


def catalogue(settings: BuildSettings) -> list[DictionarySpec]:
    """The dictionaries a zoo built with `settings` holds."""
    return zoo_dictionaries(settings.model.n_layers, settings.model.d_model,
                            settings.model.d_mlp)


@torch.enable_grad()
def build(out_dir: Path, settings: BuildSettings) -> dict:
    """Build every zoo artifact into `out_dir` and return the manifest written there."""
    started = time.perf_counter()
    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(out_dir, settings, started)

    model, losses = train_model(data.train_seqs, data.tokenizer, settings.model, settings.train,
                                settings.seed)
    config = build_config(settings.model, len(data.tokenizer), settings.seed, "LNPre")
    save_model(model, config, out_dir / paths.MODEL)
    _log(f"model trained: final train loss {losses[-1]:.3f}", started)
    quality = {"model": model_quality(model, data.heldout_seqs, data.train_seqs,
                                      data.task_rows)}
    _log(f"model quality: {quality['model']}", started)

    specs = catalogue(settings)
    quality["dictionaries"] = {
        spec.name: _build_dictionary(spec, model, data, settings, out_dir, started)
        for spec in specs
    }
    manifest = _manifest(out_dir, settings, quality, specs, data.train_seqs,
                         time.perf_counter() - started)
    _write_manifest(out_dir, manifest)
    _log(f"manifest written: {len(manifest['artifacts'])} files", started)
    return manifest


@torch.enable_grad()
def build_dictionaries(out_dir: Path, settings: BuildSettings, names: Sequence[str]) -> dict:
    """(Re)build only the dictionaries `names` into the existing zoo at `out_dir`.

    The corpus and tokens are regenerated by the full build's own code and checked against
    the zoo's files (and the training tokens against the fingerprint its manifest records);
    the zoo's model is loaded, not retrained; the other dictionaries are left as they are.
    The manifest's entries for `names` (spec, quality, file hashes) are replaced.
    """
    started = time.perf_counter()
    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    manifest = json.loads((out_dir / paths.MANIFEST).read_text())
    if manifest["settings"] != _json(asdict(settings)):
        raise BuildError(f"{out_dir} was built with other settings than these; give the "
                         "same options (--tiny, --seed) as its build")
    specs = {spec.name: spec for spec in catalogue(settings)}
    unknown = [name for name in names if name not in specs]
    if unknown:
        raise BuildError(f"no dictionary {', '.join(unknown)} in the catalogue; it has: "
                         f"{', '.join(specs)}")
    _check_kept_specs(manifest, specs, names)
    with tempfile.TemporaryDirectory() as scratch:
        data = prepare_data(Path(scratch), settings, started)
        _check_files(Path(scratch), manifest, "", "the zoo was built by other code or "
                     "settings than these; rebuild the whole zoo")
    _check_files(out_dir / paths.MODEL, manifest, paths.MODEL, "the model changed after the "
                 "zoo was built")
    fingerprint = _fingerprint(data.train_seqs)
    if manifest.setdefault("training_tokens", fingerprint) != fingerprint:
        raise BuildError("the regenerated training tokens differ from the zoo's fingerprint")
    _log("regenerated data matches the zoo's", started)
    model = load_model(out_dir / paths.MODEL, load_tokenizer(out_dir / paths.TOKENIZER))

    rebuilt = {name: _build_dictionary(specs[name], model, data, settings, out_dir, started)
               for name in names}
    present = [n for n in specs if n in manifest["dictionaries"] or n in rebuilt]
    manifest["dictionaries"] = {n: _json(asdict(specs[n])) for n in present}
    old_quality = manifest["quality"]["dictionaries"]
    manifest["quality"]["dictionaries"] = {n: rebuilt.get(n, old_quality.get(n))
                                           for n in present}
    kept = {rel: digest for rel, digest in manifest["artifacts"].items()
            if PurePosixPath(rel).parts[:2] not in
            {PurePosixPath(paths.dictionary_dir(n)).parts for n in names}}
    new_files = [p for n in names for p in (out_dir / paths.dictionary_dir(n)).rglob("*")
                 if p.is_file()]
    manifest["artifacts"] = _sorted_artifacts({**kept, **_hashes(out_dir, new_files)})
    _write_manifest(out_dir, manifest)
    _log(f"manifest updated: {', '.join(names)}", started)
    return manifest


def _build_dictionary(spec: DictionarySpec, model, data: Data, settings: BuildSettings,
                      out_dir: Path, started: float) -> dict:
    """Train `spec` into its directory (replacing what was there) and measure it."""
    dict_dir = out_dir / paths.dictionary_dir(spec.name)
    shutil.rmtree(dict_dir, ignore_errors=True)
    seed = settings.seed + 1 + sum(map(ord, spec.name))
    began = time.perf_counter()
    train(spec, model, data.dataset, data.train_seqs, settings.dictionary_tokens, dict_dir,
          seed)
    seconds = time.perf_counter() - began
    quality = dictionary_quality(spec, dict_dir, model, data.heldout_seqs)
    _log(f"{spec.name}: trained in {seconds:.1f}s; {quality}", started)
    return quality


def _check_kept_specs(manifest: dict, specs: dict[str, DictionarySpec],
                      names: Sequence[str]) -> None:
    """Every dictionary left as it is must still be the catalogue's: same recorded fields,
    and any field the manifest predates at its default."""
    defaults = {f.name: f.default for f in fields(DictionarySpec)}
    for name, recorded in manifest["dictionaries"].items():
        if name in names:
            continue
        spec = _json(asdict(specs[name])) if name in specs else None
        if spec is None or any(spec[k] != v for k, v in recorded.items()) or any(
                spec[k] != _json(defaults[k]) for k in spec.keys() - recorded.keys()):
            raise BuildError(f"the zoo's {name} is not the catalogue's any more; rebuild it "
                             f"too (--dictionaries ...,{name}) or the whole zoo")


def _check_files(directory: Path, manifest: dict, prefix: str, hint: str) -> None:
    """Each file under `directory` (zoo path `prefix/...`) has the sha256 the manifest says."""
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = PurePosixPath(prefix, path.relative_to(directory).as_posix()).as_posix()
        if manifest["artifacts"].get(rel) != paths.sha256(path):
            raise BuildError(f"{rel} does not match the zoo's manifest: {hint}")


def _fingerprint(train_seqs: torch.Tensor) -> dict:
    """Shape and sha256 of the training tokens (int32), which no artifact holds."""
    data = train_seqs.to(torch.int32).contiguous().numpy().tobytes()
    return {"shape": list(train_seqs.shape), "sha256": hashlib.sha256(data).hexdigest()}


def _json(value):
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _hashes(root: Path, files: Iterable[Path]) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): paths.sha256(p) for p in files}


def _sorted_artifacts(artifacts: dict[str, str]) -> dict[str, str]:
    """Artifacts in path order (by path components, as the full build lists them)."""
    return dict(sorted(artifacts.items(), key=lambda item: PurePosixPath(item[0]).parts))


def _write_manifest(out_dir: Path, manifest: dict) -> None:
    (out_dir / paths.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _manifest(out_dir: Path, settings: BuildSettings, quality: dict,
              specs: list[DictionarySpec], train_seqs: torch.Tensor, seconds: float) -> dict:
    files = [p for p in out_dir.rglob("*") if p.is_file() and p.name != paths.MANIFEST]
    return {
        "settings": asdict(settings),
        "dictionaries": {s.name: _json(asdict(s)) for s in specs},
        "quality": quality,
        "artifacts": _sorted_artifacts(_hashes(out_dir, files)),
        "training_tokens": _fingerprint(train_seqs),
        "versions": {pkg: version(pkg) for pkg in ("torch", "sae-lens", "transformer-lens")},
        "build_seconds": round(seconds, 1),
    }
