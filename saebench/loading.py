"""Specs to objects: the zoo's model, tokenizer, dictionaries, task prompts and tokens.

Everything that knows where weights live is here. The zoo is loaded through the same
code paths a user's own checkpoints take: a TransformerLens model from config +
safetensors, a tokenizer saved with `save_pretrained`, dictionaries with sae_lens'
`SAE.load_from_disk` or, for the zoo's dictionaries in other formats, by their format in
`saebench.dictionaries`.

    >>> model = load_zoo_model()
    >>> sae = load_zoo_dictionary("resid-L2-topk16")
    >>> prompts = load_task("ioi")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from safetensors.torch import load_file
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase

from saebench.zoo import paths
from saebench.zoo.model import load_model
from saebench.zoo.tokenizer import load_tokenizer


class ZooError(FileNotFoundError):
    """A zoo artifact is missing or unknown."""


@dataclass(frozen=True)
class TaskPrompt:
    """One task prompt: the model should prefer `answer` over `distractor` after `prompt`."""

    prompt: str
    answer: str
    distractor: str
    pos: int | None = None


def zoo_dir(zoo: Path | None = None) -> Path:
    """The zoo directory (the packaged one by default), checked to hold a manifest."""
    directory = Path(zoo) if zoo is not None else paths.ARTIFACTS
    if not (directory / paths.MANIFEST).is_file():
        raise ZooError(f"no zoo at {directory} (missing {paths.MANIFEST}); "
                       "build one with `saebench zoo build`")
    return directory


def zoo_manifest(zoo: Path | None = None) -> dict:
    """The zoo's manifest: artifacts with sha256, build settings, measured quality."""
    return json.loads((zoo_dir(zoo) / paths.MANIFEST).read_text())


def load_zoo_tokenizer(zoo: Path | None = None) -> PreTrainedTokenizerBase:
    """The zoo's word-level tokenizer."""
    return load_tokenizer(zoo_dir(zoo) / paths.TOKENIZER)


def load_zoo_model(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    zoo: Path | None = None,
) -> HookedTransformer:
    """The zoo's HookedTransformer, with its tokenizer, in eval mode."""
    directory = zoo_dir(zoo)
    return load_model(directory / paths.MODEL, load_zoo_tokenizer(directory), device, dtype)


def zoo_dictionary_names(zoo: Path | None = None) -> list[str]:
    """Names of the zoo's dictionaries, in catalogue order."""
    return list(zoo_manifest(zoo)["dictionaries"])


def load_zoo_dictionary(name: str, device: str | torch.device = "cpu",
                        zoo: Path | None = None) -> Any:
    """A zoo dictionary by name, as its format loads it: a sae_lens SAE or transcoder, a
    sparsify or dictionary_learning adapter, or a circuit-tracer model's parts (a tuple of
    `saebench.splice.Dictionary`)."""
    names = zoo_dictionary_names(zoo)
    if name not in names:
        raise ZooError(f"the zoo has no dictionary {name!r}; it has: {', '.join(names)}")
    if zoo_manifest(zoo)["dictionaries"][name].get("format", "sae_lens") == "sae_lens":
        return SAE.load_from_disk(str(zoo_dir(zoo) / paths.dictionary_dir(name)),
                                  device=str(device))
    from saebench.dictionaries.zoo import format_entry
    from saebench.suite import DictionarySpec

    fmt, entry = format_entry(DictionarySpec(name, "zoo", name), zoo=zoo)
    return fmt.load(entry, device, None)


def load_heldout_tokens(zoo: Path | None = None) -> torch.Tensor:
    """The held-out token set [n_sequences, n_ctx] (each row starts with BOS)."""
    return load_file(str(zoo_dir(zoo) / paths.HELDOUT_TOKENS))["tokens"].long()


def load_task(task: str | Path, zoo: Path | None = None) -> list[TaskPrompt]:
    """A task's prompts: a zoo task name (`ioi`, `closing_quote`, `agreement`) or a JSONL path."""
    path = Path(task)
    if not path.suffix:
        path = zoo_dir(zoo) / paths.task_file(str(task))
        if not path.is_file():
            raise ZooError(f"the zoo has no task {task!r} (looked for {path})")
    return load_task_file(path)


def load_task_file(path: Path) -> list[TaskPrompt]:
    """Parse a JSONL file of `prompt`, `answer`, `distractor` (and optional `pos`) rows.

    Errors name the file, the line and the field.
    """
    if not path.is_file():
        raise ZooError(f"{path}: task file not found")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: a row must be a JSON object")
        for field in ("prompt", "answer", "distractor"):
            if not isinstance(record.get(field), str) or not record[field]:
                raise ValueError(f"{path}:{number}: field {field!r} must be a non-empty string")
        unknown = set(record) - {"prompt", "answer", "distractor", "pos"}
        if unknown:
            raise ValueError(f"{path}:{number}: unknown field(s) {sorted(unknown)}")
        pos = record.get("pos")
        if pos is not None and (isinstance(pos, bool) or not isinstance(pos, int)):
            raise ValueError(f"{path}:{number}: field 'pos' must be an integer")
        rows.append(TaskPrompt(record["prompt"], record["answer"], record["distractor"], pos))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def zoo_summary(zoo: Path | None = None) -> str:
    """A readable table of the zoo: model, tasks, tokens, and every dictionary's quality."""
    from tabulate import tabulate

    manifest = zoo_manifest(zoo)
    settings, quality = manifest["settings"], manifest["quality"]
    model_q = quality["model"]
    spec = settings["model"]
    lines = [
        f"model: {spec['n_layers']} layers, d_model {spec['d_model']}, d_mlp {spec['d_mlp']}, "
        f"n_ctx {spec['n_ctx']}; held-out CE {model_q['heldout_ce']:.3f} nats "
        f"(unigram entropy {model_q['unigram_entropy']:.3f})",
        "tasks: " + ", ".join(f"{t} acc {a:.1%}" for t, a in model_q["task_accuracy"].items()),
        f"held-out tokens: {load_heldout_tokens(zoo).numel()}",
        "",
    ]
    rows = []
    for name, d in manifest["dictionaries"].items():
        q = quality["dictionaries"].get(name, {})
        rows.append([name, d["hook"], d.get("hook_out") or "", d["architecture"], d["d_sae"],
                     q.get("l0"), q.get("ce_loss_score"), q.get("explained_variance")])
    headers = ["dictionary", "hook", "writes", "arch", "d_sae", "L0", "CE recovered", "EV"]
    return "\n".join(lines) + tabulate(rows, headers=headers, tablefmt="github")
