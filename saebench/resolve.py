"""Suite specs to live objects: the model, the token set, dictionaries and task prompts.

This is the bridge the pytest plugin calls after `saebench.suite.load_suite`: zoo specs
delegate to `saebench.loading`, local paths are loaded from disk, and hub names go through
TransformerLens, sae_lens and `datasets`. Relative paths resolve against the suite file's
directory.

    >>> model = resolve_model(suite.model, device="cpu", dtype=torch.float32,
    ...                       suite_path=suite.path, dictionaries=suite.dictionaries.values())
    >>> tokens = resolve_tokens(suite.data, model, suite_path=suite.path)
    >>> spec = suite.dictionaries["resid-L2-topk16"]
    >>> (d,) = adapt(spec, resolve_dictionary(spec, device="cpu", suite_path=suite.path))

A download that is needed and fails (offline, missing, gated) raises `HubUnavailable`,
naming the suite entry and what was being fetched; nothing here sets environment
variables, so `HF_HUB_OFFLINE=1` (set by the user) makes such failures immediate.
Bad local input raises `SuiteError` (a ValueError) at the entry's line when the suite
path and line are known, else a ValueError; both name the offending file.
"""

from __future__ import annotations

import itertools
import json
import pickle
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import torch
from sae_lens.loading.pretrained_saes_directory import (
    PretrainedSAELookup,
    get_pretrained_saes_directory,
)
from sae_lens.tokenization_and_batching import concat_and_batch_sequences
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading
from transformers import AutoModelForCausalLM, AutoTokenizer

from saebench import loading, splice
from saebench.dictionaries import DictionaryInfo
from saebench.located import (  # noqa: F401  (re-exported: resolve.HubUnavailable, ...)
    HubUnavailable,
    error_at,
    first_line,
    hub_access,
    local_path,
    suggest,
    where_of,
)
from saebench.suite import DataSpec, DictionarySpec, ModelSpec, TaskSpec, source_name
from saebench.zoo import paths
from saebench.zoo.model import hooked_transformer_on_purpose, load_model
from saebench.zoo.tokenizer import load_tokenizer

# TransformerLens' processing flags for HF checkpoint directories; all off by default, as in
# `HookedTransformer.from_pretrained_no_processing`.
_PROCESSING = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
               "refactor_factored_attn_matrices")
_TEXT_SUFFIXES = (".txt", ".jsonl")
_DATA_FIELDS = {"path": "data.source.path", "hf": "data.source.hf"}
_Fail = Callable[[str], ValueError]  # builds the located error for a data problem


# ---------------------------------------------------------------------------- releases

def release_lookup(release: str, sae_id: str) -> PretrainedSAELookup | None:
    """The sae_lens pretrained-directory entry for `release`, checked to hold `sae_id`.

    None for a release that is a Hugging Face repo id (`owner/name`) outside the directory,
    which sae_lens loads directly. Unknown names raise ValueError with close matches.
    """
    directory = get_pretrained_saes_directory()
    lookup = directory.get(release)
    if lookup is None:
        if "/" in release:
            return None
        raise ValueError(f"unknown sae_lens release {release!r}{suggest(release, directory)} "
                         f"(sae_lens knows {len(directory)} releases; a Hugging Face repo id "
                         "such as 'owner/name' is also accepted)")
    if sae_id not in lookup.saes_map:
        ids = list(lookup.saes_map)
        hint = suggest(sae_id, ids) or f"; first ids: {', '.join(ids[:5])}"
        raise ValueError(f"release {release!r} has no sae_id {sae_id!r}{hint} "
                         f"({len(ids)} ids in all)")
    return lookup


def model_kwargs_for_release(release: str, sae_id: str) -> dict:
    """The `model_from_pretrained_kwargs` sae_lens' pretrained directory lists for a release.

    Read offline from the directory's `config_overrides` (e.g. `{"center_writing_weights":
    True}` for gpt2-small-res-jb): the processing the SAEs were trained with, to load the
    model with. Releases that keep these kwargs only in their hub `cfg.json` give `{}` here
    (after a download they are in `sae.cfg.metadata.model_from_pretrained_kwargs`).

        >>> model_kwargs_for_release("gpt2-small-res-jb", "blocks.0.hook_resid_pre")
        {'center_writing_weights': True}
    """
    lookup = release_lookup(release, sae_id)
    overrides = (lookup.config_overrides if lookup is not None else None) or {}
    return dict(overrides.get("model_from_pretrained_kwargs") or {})


def _release_model_kwargs(dictionaries: Iterable[DictionarySpec]) -> dict:
    """The merged model kwargs of every release dictionary; disagreements are errors."""
    merged: dict[str, Any] = {}
    source: dict[str, str] = {}
    for spec in dictionaries:
        if spec.kind != "release" or spec.release is None or spec.sae_id is None:
            continue
        for key, value in model_kwargs_for_release(spec.release, spec.sae_id).items():
            if key in merged and merged[key] != value:
                raise ValueError(f"dictionaries {source[key]!r} and {spec.name!r} expect the "
                                 f"model loaded with {key}={merged[key]!r} and {key}={value!r}; "
                                 "evaluate them in separate suites")
            merged[key] = value
            source.setdefault(key, spec.name)
    return merged


# ---------------------------------------------------------------------------- model

def resolve_model(
    spec: ModelSpec,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    suite_path: Path | None = None,
    dictionaries: Iterable[DictionarySpec] = (),
) -> HookedTransformer:
    """The suite's model, in eval mode on `device`.

    - `zoo`: the packaged zoo model (`loading.load_zoo_model`).
    - `transformer_lens`: `HookedTransformer.from_pretrained_no_processing(name, device,
      dtype, **kwargs)`, the way sae_lens and SAEBench load models for their SAEs, where
      kwargs are the `model_from_pretrained_kwargs` of the suite's release `dictionaries`
      (e.g. center_writing_weights for gpt2-small-res-jb) updated by the suite's own
      `from_pretrained_kwargs`. Downloads; HubUnavailable when that fails.
    - `path`, a local directory, one of: a zoo (with `manifest.json`, as `saebench zoo build`
      writes); a TransformerLens config directory (`config.json` with HookedTransformerConfig
      fields + `model.safetensors`, tokenizer files in `tokenizer/` or beside them), loaded
      as saved; or a Hugging Face checkpoint (`save_pretrained` of a causal LM and its
      tokenizer), converted by TransformerLens from the directory's own config without
      any download. Kwargs in `_PROCESSING` (all off by default) choose TransformerLens'
      weight processing; the others go to its config.
    """
    where = where_of(suite_path, spec.line, "model")
    if spec.kind == "zoo":
        return loading.load_zoo_model(device, dtype)
    if spec.kind == "path":
        return _load_model_dir(local_path(spec.path or "", suite_path), spec.kwargs, device, dtype,
                               where)
    if spec.kind != "transformer_lens" or not spec.name:
        raise ValueError(f"{where}: unknown model kind {spec.kind!r} (or no name)")
    aliases = tl_loading.make_model_alias_map()
    if spec.name.lower() not in aliases:
        raise ValueError(f"{where}: {spec.name!r} is not a TransformerLens model name"
                         f"{suggest(spec.name, aliases)}; for a local "
                         "checkpoint use model: {path: dir}")
    try:
        kwargs = {**_release_model_kwargs(dictionaries), **spec.kwargs}
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    with hub_access(where, f"TransformerLens model {spec.name!r}"), \
            hooked_transformer_on_purpose():
        model = HookedTransformer.from_pretrained_no_processing(
            spec.name, device=str(device), dtype=dtype, **kwargs)
    return model.eval()


def _load_model_dir(directory: Path, kwargs: dict, device: str | torch.device,
                    dtype: torch.dtype, where: str) -> HookedTransformer:
    """A local model directory: a zoo, a TransformerLens config dir or an HF checkpoint."""
    if not directory.is_dir():
        raise ValueError(f"{where}: model directory {directory} does not exist")
    if (directory / paths.MANIFEST).is_file():
        if kwargs:
            raise ValueError(f"{where}: {directory} is a zoo, whose model takes no "
                             "from_pretrained_kwargs")
        return loading.load_zoo_model(device, dtype, zoo=directory)
    config_file = directory / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{where}: {config_file}: cannot read the model config "
                         f"({first_line(err)}); expected a zoo, a TransformerLens config "
                         "directory or a Hugging Face checkpoint") from None
    hf_checkpoint = "architectures" in config or "model_type" in config
    if kwargs and not hf_checkpoint:
        raise ValueError(f"{where}: {directory} holds a TransformerLens config, loaded as "
                         f"saved; it takes no from_pretrained_kwargs (got {sorted(kwargs)})")
    try:
        if hf_checkpoint:
            return _load_hf_checkpoint(directory, kwargs, device, dtype)
        tokenizer_dir = directory / "tokenizer"
        if not tokenizer_dir.is_dir():
            tokenizer_dir = directory
        return load_model(directory, load_tokenizer(tokenizer_dir), device, dtype).eval()
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        raise ValueError(f"{where}: {directory}: cannot load the model "
                         f"({first_line(err)})") from err


def _load_hf_checkpoint(directory: Path, kwargs: dict, device: str | torch.device,
                        dtype: torch.dtype) -> HookedTransformer:
    """A Hugging Face causal-LM checkpoint directory, converted by TransformerLens offline.

    `HookedTransformer.from_pretrained` needs an official model name and fetches that
    model's config; TransformerLens' loaders also take a local directory, so this follows
    `from_pretrained_no_processing` with the directory's own config instead.
    """
    processing = {key: bool(kwargs.get(key, False)) for key in _PROCESSING}
    rest = {k: v for k, v in kwargs.items() if k not in _PROCESSING}
    hf_model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype,
                                                    local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    cfg = tl_loading.get_pretrained_model_config(
        str(directory), fold_ln=processing["fold_ln"], device=str(device), dtype=dtype, **rest)
    state = tl_loading.get_pretrained_state_dict(str(directory), cfg, hf_model, dtype=dtype)
    with hooked_transformer_on_purpose():
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state, **processing)
    model.move_model_modules_to_device()
    return model.eval()


# ---------------------------------------------------------------------------- tokens

def resolve_token_sources(spec: DataSpec, model: HookedTransformer, *,
                          suite_path: Path | None = None) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The token set (`resolve_tokens`) and the name of each row's source
    (`saebench.suite.source_name`): with several sources, each is resolved with the data's
    `n_tokens` and `context` and the rows are concatenated in order."""
    if spec.kind != "sources":
        tokens = resolve_tokens(spec, model, suite_path=suite_path)
        return tokens, (source_name(spec),) * len(tokens)
    parts = [resolve_tokens(replace(p, n_tokens=spec.n_tokens, context=spec.context), model,
                            suite_path=suite_path) for p in spec.sources]
    widths = sorted({p.shape[1] for p in parts})
    if len(widths) > 1:
        raise error_at(suite_path, spec.line, "data.source", f"the sources give rows of "
                       f"{', '.join(map(str, widths))} tokens; set data.context")
    names = tuple(source_name(p) for p, rows in zip(spec.sources, parts, strict=True)
                  for _ in range(len(rows)))
    return torch.cat(parts), names


def resolve_tokens(spec: DataSpec, model: HookedTransformer, *,
                   suite_path: Path | None = None) -> torch.Tensor:
    """The token set, a LongTensor [n_seq, context].

    - `zoo`: the zoo's held-out rows; a smaller `context` keeps each row's first columns.
    - `path`: token ids in `.safetensors` (key "tokens") or `.pt` (a tensor, or a dict with
      "tokens"; `torch.load(weights_only=True)`): rows [n, L] are used as they are (a smaller
      `context` keeps the first columns), a flat stream [N] is cut into rows of `context`;
      no BOS is added. Text in `.txt` (documents separated by blank lines) or `.jsonl`
      (field `column`, default "text") is tokenized with `model.tokenizer` and packed like
      sae_lens packs text: documents joined with BOS separators into rows of `context`,
      each row starting with BOS.
    - `hf`: `datasets.load_dataset(hf, split=split, streaming=True)`, documents taken in
      order from `column` until `n_tokens` are packed (the same layout); needs `n_tokens`.

    `context` defaults to the row length of a token file, else the model's n_ctx. With
    `n_tokens`, the first `n_tokens // context` rows are kept, in order (the seed does not
    select rows, so a smaller token set is a prefix of a larger one); asking for more rows
    than the source has is an error.
    """
    field = _DATA_FIELDS.get(spec.kind, "data")

    def fail(message: str) -> ValueError:
        return error_at(suite_path, spec.line, field, message)

    n_ctx = int(model.cfg.n_ctx)
    if spec.context is not None and spec.context > n_ctx:
        raise fail(f"context {spec.context} is longer than the model's n_ctx ({n_ctx})")
    if spec.kind == "zoo":
        tokens = _rows(loading.load_heldout_tokens(), spec, "the zoo's held-out tokens", fail)
        return _check_vocab(tokens, model, "the zoo's held-out tokens", fail)
    if spec.kind == "hf":
        return _hf_tokens(spec, model, where_of(suite_path, spec.line, field), fail)
    if spec.kind != "path" or not spec.path:
        raise fail(f"unknown data kind {spec.kind!r} (or no path)")
    path = local_path(spec.path, suite_path)
    if not path.is_file():
        raise fail(f"{path}: token file not found")
    if path.suffix in _TEXT_SUFFIXES:
        documents = (_text_documents(path) if path.suffix == ".txt"
                     else _jsonl_documents(path, spec.column or "text", fail))
        return _pack(documents, model, spec, str(path), fail)
    tokens = _check_vocab(_read_token_file(path, fail), model, str(path), fail)
    if tokens.dim() == 1:
        context = spec.context or n_ctx
        tokens = tokens[: tokens.numel() // context * context].view(-1, context)
    elif spec.context is None and tokens.shape[1] > n_ctx:
        raise fail(f"{path}: rows of {tokens.shape[1]} tokens are longer than the model's "
                   f"n_ctx ({n_ctx}); set data.context to use their first columns")
    return _rows(tokens, spec, str(path), fail)


def _check_vocab(tokens: torch.Tensor, model: HookedTransformer, source: str, fail: _Fail
                 ) -> torch.Tensor:
    """`tokens`, checked to be ids in the model's vocabulary."""
    if tokens.numel():
        low, high, d_vocab = int(tokens.min()), int(tokens.max()), int(model.cfg.d_vocab)
        if low < 0 or high >= d_vocab:
            raise fail(f"{source}: token ids range over [{low}, {high}], outside the model's "
                       f"vocabulary [0, {d_vocab})")
    return tokens


def _read_token_file(path: Path, fail: _Fail) -> torch.Tensor:
    """The token ids in a .safetensors or .pt file, as a 1-D or 2-D LongTensor."""
    try:
        if path.suffix == ".safetensors":
            content: Any = load_file(str(path))
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, SafetensorError, EOFError,
            pickle.UnpicklingError) as err:
        raise fail(f"{path}: cannot read token ids ({first_line(err)}); only tensors are "
                   "loaded from .pt files (weights_only)") from None
    if isinstance(content, dict):
        if "tokens" not in content:
            raise fail(f"{path}: no 'tokens' entry (found: {', '.join(map(str, content))})")
        content = content["tokens"]
    if not isinstance(content, torch.Tensor):
        raise fail(f"{path}: expected a tensor of token ids, got {type(content).__name__}")
    if content.dtype == torch.bool or content.dtype.is_floating_point or content.dtype.is_complex:
        raise fail(f"{path}: token ids must be integers, got dtype {content.dtype}")
    if content.dim() not in (1, 2):
        raise fail(f"{path}: expected token ids [n_seq, context] or a flat stream [n], got "
                   f"shape {list(content.shape)}")
    return content.long()


def _rows(tokens: torch.Tensor, spec: DataSpec, source: str, fail: _Fail) -> torch.Tensor:
    """`tokens` [n, L] cut to `spec.context` columns and its first `n_tokens // context` rows."""
    width = tokens.shape[1]
    context = spec.context or width
    if context > width:
        raise fail(f"context {context} is longer than the rows of {source} ({width})")
    tokens = tokens[:, :context]
    if spec.n_tokens is not None:
        n_rows = spec.n_tokens // context
        if n_rows == 0:
            raise fail(f"n_tokens {spec.n_tokens} is less than one row of {context} tokens")
        if n_rows > tokens.shape[0]:
            raise fail(f"n_tokens {spec.n_tokens} needs {n_rows} rows of {context} tokens, but "
                       f"{source} has {tokens.shape[0]}")
        tokens = tokens[:n_rows]
    if tokens.shape[0] == 0:
        raise fail(f"{source} holds less than one row of {context} tokens")
    return tokens.contiguous()


def _text_documents(path: Path) -> Iterator[str]:
    """The blank-line-separated documents of a text file."""
    for block in re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8")):
        if block.strip():
            yield block.strip()


def _jsonl_documents(path: Path, column: str, fail: _Fail) -> Iterator[str]:
    """The `column` field of each row of a JSONL file, checked row by row."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise fail(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(column), str):
                raise fail(f"{path}:{number}: expected an object with a string field "
                           f"{column!r}")
            yield record[column]


def _pack(documents: Iterable[str], model: HookedTransformer, spec: DataSpec, source: str,
          fail: _Fail) -> torch.Tensor:
    """Tokenize documents lazily and pack them as sae_lens does, stopping at `n_tokens`.

    `concat_and_batch_sequences` puts BOS at the start of every row and between documents.
    """
    tokenizer = model.tokenizer
    if tokenizer is None or tokenizer.bos_token_id is None:
        raise fail(f"{source}: text needs the model's tokenizer with a BOS token to pack rows")
    context = spec.context or int(model.cfg.n_ctx)
    token_ids = (model.to_tokens(document, prepend_bos=False, truncate=False,
                                 move_to_device=False)[0] for document in documents)
    bos = tokenizer.bos_token_id
    rows = concat_and_batch_sequences(token_ids, context, begin_batch_token_id=bos,
                                      sequence_separator_token_id=bos)
    limit = None if spec.n_tokens is None else spec.n_tokens // context
    if limit == 0:
        raise fail(f"n_tokens {spec.n_tokens} is less than one row of {context} tokens")
    packed = list(itertools.islice(rows, limit))
    tokens = torch.stack(packed) if packed else torch.empty(0, context)
    return _rows(tokens.long(), spec, source, fail)


def _hf_tokens(spec: DataSpec, model: HookedTransformer, where: str, fail: _Fail
               ) -> torch.Tensor:
    """Stream a Hugging Face dataset's documents until `n_tokens` are packed."""
    if spec.n_tokens is None:
        raise fail("n_tokens is required for hf: data (the dataset is streamed until that "
                   "many tokens are packed)")
    column, split = spec.column or "text", spec.split or "train"
    what = f"dataset {spec.hf!r} (split {split!r})"
    with hub_access(where, what):
        rows = iter(datasets.load_dataset(spec.hf, split=split, streaming=True))

    def documents() -> Iterator[str]:
        while True:
            with hub_access(where, what):
                row = next(rows, None)
            if row is None:
                return
            if not isinstance(row.get(column), str):
                raise fail(f"dataset {spec.hf!r} has no text column {column!r} (columns: "
                           f"{', '.join(row)})")
            yield row[column]

    return _pack(documents(), model, spec, f"dataset {spec.hf!r}", fail)


# ---------------------------------------------------------------------------- dictionaries

def resolve_dictionary(spec: DictionarySpec, *, device: str | torch.device,
                       suite_path: Path | None = None, allow_factory: bool = False) -> Any:
    """The object a dictionary entry names, unadapted (see `adapt`), loaded by its format
    (`saebench.dictionaries`): `zoo`, `path` (a sae_lens directory, training saves
    converted), `release` (sae_lens' hub, names checked offline first, then HubUnavailable),
    `factory` (refused unless `allow_factory`: it runs code the suite names)."""
    from saebench.dictionaries import get_format

    return get_format(spec.kind).load(spec, device, suite_path, allow_factory)


def probe_dictionary(spec: DictionarySpec, *, suite_path: Path | None = None) -> DictionaryInfo:
    """Read a dictionary entry's configuration without loading its weights, and check it
    (for a sae_lens directory: its config by sae_lens' own class, the safetensors header
    against it). Problems raise a located error at the entry."""
    from saebench.dictionaries import get_format

    return get_format(spec.kind).probe(spec, suite_path)


def adapt(spec: DictionarySpec, obj: Any) -> tuple[splice.Dictionary, ...]:
    """`obj` as the entry's parts: one `splice.Dictionary` named after the entry, with its
    `hook` and `hook_out` overrides, or the parts a replacement model's format made."""
    if isinstance(obj, tuple) and obj and all(isinstance(p, splice.Dictionary) for p in obj):
        return obj
    return (splice.as_dictionary(obj, name=spec.name, hook=spec.hook, hook_out=spec.hook_out),)


# ---------------------------------------------------------------------------- tasks

def resolve_task(spec: TaskSpec, *, suite_path: Path | None = None) -> list[loading.TaskPrompt]:
    """A task's prompts: a zoo task by name, or a JSONL file of prompt/answer/distractor."""
    try:
        if spec.kind == "zoo":
            return loading.load_task(spec.ref)
        if spec.kind == "path":
            return loading.load_task_file(local_path(spec.ref, suite_path))
    except (OSError, ValueError) as err:
        raise error_at(suite_path, spec.line, f"tasks.{spec.name}", str(err)) from None
    raise error_at(suite_path, spec.line, f"tasks.{spec.name}", f"unknown task kind {spec.kind!r}")
