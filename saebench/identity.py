"""What a result row measured: the model's identity (configuration and weights) and a
dictionary's identity (everything that makes its numbers), as short hashes.

Two rows are the same dictionary only when their `identity` is equal, and comparable only
when they also share `model_hash`, `token_set` and suite (`saebench.results`). Names are
not identity: the same weights under two names are one dictionary, and one name over
weights with other `args:` (a shuffled-decoder control), another `hook:` or another
factory argument is another dictionary.

    >>> entry_identity({"format": "zoo", "weights": "38a1d929a8fccdfc", "args": {}})
    {'format': 'zoo', 'weights': '38a1d929a8fccdfc', 'args': {}}
    >>> len(set_identity([entry_identity({"format": "zoo", "weights": "38a1d929a8fccdfc"})]))
    16
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from saebench.results import short_hash

_MODEL_HASHES: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def tensors_hash(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A short sha256 over named tensors' names, dtypes, shapes and bytes: equal exactly when
    the weights are bit for bit equal, on any device."""
    digest = hashlib.sha256()
    for name, tensor in named:
        flat = tensor.detach().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_hash(model: torch.nn.Module) -> str:
    """A short hash of a TransformerLens model's configuration and every parameter (a
    fine-tuned copy of one configuration is another model); computed once per model."""
    known = _MODEL_HASHES.get(model)
    if known is None:
        cfg = getattr(model, "cfg", None)
        config = json.dumps(cfg.to_dict() if cfg is not None else {}, sort_keys=True,
                            default=str)
        weights = tensors_hash(sorted(model.named_parameters()))
        known = _MODEL_HASHES[model] = short_hash(f"{config}|{weights}")
    return known


def module_hash(module: Any) -> str:
    """The weights' hash of a loaded dictionary object (its parameters and buffers); "" for
    an object without tensors (a plain callable), whose weights cannot be told."""
    if not isinstance(module, torch.nn.Module):
        return ""
    named = sorted([*module.named_parameters(), *module.named_buffers()], key=lambda p: p[0])
    return tensors_hash(named) if named else ""


def entry_identity(fields: Mapping[str, Any]) -> dict[str, Any]:
    """One dictionary entry's identity fields with the empty ones dropped: `format`,
    `weights` (a hash of its files or tensors; its source where neither is known), `args`,
    `hook` / `hook_out` overrides, `factory` and its arguments."""
    return {k: v for k, v in fields.items() if v not in (None, "")}


def set_identity(entries: Sequence[Mapping[str, Any]]) -> str:
    """The identity of a spliced set (or one entry): a short hash of its entries' fields, in
    splice order; "" when no entry is known."""
    if not entries or not all(entries):
        return ""
    return short_hash(json.dumps(list(entries), sort_keys=True, default=str))
