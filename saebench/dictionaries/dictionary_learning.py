"""`dictionary_learning:` dictionaries: a directory saprmarks' dictionary_learning wrote for one
trained dictionary, read here without that package (installing it would upgrade torch).

The directory holds `config.json`, whose `trainer` section names `dict_class`,
`activation_dim`, `dict_size`, `k` and `submodule_name`, and `ae.pt`, the module's state dict,
read with `torch.load(..., weights_only=True)` so that a pickled object is refused. Encoding
and decoding follow dictionary_learning's equations per class (`LAYOUTS`); BatchTopK and
Matryoshka encode with their learned threshold, as dictionary_learning does at inference.
Without `hook:`, `submodule_name` is mapped to a TransformerLens hook (`resid_post_layer_3`,
or a Hugging Face module path via `saebench.hooks`).
"""

from __future__ import annotations

import contextlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saebench import hooks, located

if TYPE_CHECKING:
    from saebench.suite import DictionarySpec

from saebench.dictionaries import (
    DictionaryInfo,
    Format,
    register_format,
    require_files,
    sha256_of,
)

WEIGHTS_FILE = "ae.pt"
IDENTITY_FILES = ("config.json", WEIGHTS_FILE)


@dataclass(frozen=True)
class Layout:
    """How one dict_class stores its weights (`linear`: nn.Linear `encoder`/`decoder`, else
    `W_enc` [d, F] / `W_dec` [F, d]) and encodes: `pre_bias` subtracts the decoder bias first,
    `rule` is "relu", "topk" (per token) or "threshold" (scalar, or per feature)."""

    linear: bool
    b_dec: str
    pre_bias: bool
    rule: str
    per_feature_threshold: bool = False


LAYOUTS = {
    "AutoEncoder": Layout(linear=True, b_dec="bias", pre_bias=True, rule="relu"),
    "AutoEncoderTopK": Layout(linear=True, b_dec="b_dec", pre_bias=True, rule="topk"),
    "BatchTopKSAE": Layout(linear=True, b_dec="b_dec", pre_bias=True, rule="threshold"),
    "MatryoshkaBatchTopKSAE": Layout(linear=False, b_dec="b_dec", pre_bias=True,
                                     rule="threshold"),
    "JumpReluAutoEncoder": Layout(linear=False, b_dec="b_dec", pre_bias=False,
                                  rule="threshold", per_feature_threshold=True),
}


class DictionaryLearningSAE(torch.nn.Module):
    """A dictionary_learning dictionary in one form, `W_enc` [d, F] and `W_dec` [F, d], as
    `splice.as_dictionary` adapts it: `encode` gives dense features, `decode` any features."""

    def __init__(self, tensors: dict[str, Tensor], layout: Layout, k: int | None,
                 hook_name: str, hook_name_out: str) -> None:
        super().__init__()
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            self.register_parameter(name, torch.nn.Parameter(tensors[name], requires_grad=False))
        self.register_buffer("threshold", tensors.get("threshold"))
        self.layout, self.k = layout, k
        self.hook_name, self.hook_name_out = hook_name, hook_name_out
        self.d_in, self.d_sae = self.W_enc.shape
        self.d_out = self.d_in

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [..., d_sae]: relu of the encoder, then the class's sparsity."""
        if self.layout.pre_bias:
            x = x - self.b_dec
        acts = torch.relu(x @ self.W_enc + self.b_enc)
        if self.layout.rule == "topk":
            top = acts.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
        if self.layout.rule == "threshold":
            return acts * (acts > self.threshold)
        return acts

    def decode(self, feats: Tensor) -> Tensor:
        """The reconstruction `feats @ W_dec + b_dec`."""
        return feats.to(self.W_dec.dtype) @ self.W_dec + self.b_dec


def _read_config(directory: Path) -> dict[str, Any]:
    """The `trainer` section of the directory's config.json, its fields checked."""
    require_files(directory, IDENTITY_FILES, "dictionary_learning",
                  "dictionary_learning's trainers")
    cfg_file = directory / "config.json"
    try:
        trainer = json.loads(cfg_file.read_text(encoding="utf-8"))["trainer"]
        cfg = {"dict_class": str(trainer["dict_class"]),
               "d_in": int(trainer["activation_dim"]), "d_sae": int(trainer["dict_size"]),
               "k": None if trainer.get("k") is None else int(trainer["k"]),
               "submodule": trainer.get("submodule_name")}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{cfg_file}: not a dictionary_learning config "
                         f"({located.first_line(err)})") from None
    if cfg["dict_class"] not in LAYOUTS:
        raise ValueError(f"{cfg_file}: dict_class {cfg['dict_class']!r} is not supported; "
                         f"supported: {', '.join(LAYOUTS)}")
    if LAYOUTS[cfg["dict_class"]].rule == "topk" and (cfg["k"] or 0) < 1:
        raise ValueError(f"{cfg_file}: an AutoEncoderTopK needs a positive trainer.k")
    return cfg


def _stored_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state-dict keys dictionary_learning saves for `cfg`'s class, with their shapes."""
    layout, d, f = LAYOUTS[cfg["dict_class"]], cfg["d_in"], cfg["d_sae"]
    if layout.linear:
        shapes = {"encoder.weight": (f, d), "encoder.bias": (f,), "decoder.weight": (d, f)}
    else:
        shapes = {"W_enc": (d, f), "b_enc": (f,), "W_dec": (f, d)}
    shapes[layout.b_dec] = (d,)
    if layout.rule == "threshold":
        shapes["threshold"] = (f,) if layout.per_feature_threshold else ()
    return shapes


def _read_state(path: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """`path`'s tensors, memory-mapped (nothing is read until used) and their shapes checked."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{path}: not a state dict torch.load(weights_only=True) can read "
                         f"({located.first_line(err)}); a pickled object is refused") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    for name, shape in shapes.items():
        if name not in state:
            raise ValueError(f"{path}: no {name} (keys: {', '.join(sorted(state)[:8])})")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{path}: {name} has shape {list(state[name].shape)}, but "
                             f"config.json says {list(shape)}")
    if "threshold" in shapes and bool((state["threshold"] < 0).any()):
        raise ValueError(f"{path}: threshold is negative, so it was never set (dictionary_"
                         "learning sets it during training)")
    return state


def _canonical(state: dict[str, Tensor], layout: Layout) -> dict[str, Tensor]:
    """The tensors as `W_enc` [d, F], `b_enc`, `W_dec` [F, d], `b_dec` (and `threshold`)."""
    if layout.linear:
        tensors = {"W_enc": state["encoder.weight"].T, "b_enc": state["encoder.bias"],
                   "W_dec": state["decoder.weight"].T}
    else:
        tensors = {name: state[name] for name in ("W_enc", "b_enc", "W_dec")}
    tensors["b_dec"] = state[layout.b_dec]
    if layout.rule == "threshold":
        tensors["threshold"] = state["threshold"]
    return tensors


def submodule_hook(submodule: str) -> str | None:
    """The TransformerLens hook of a dictionary_learning submodule name (the output the
    dictionary reads and writes): `resid_post_layer_3`, or a module path; None otherwise."""
    with contextlib.suppress(ValueError):
        return hooks.activation_hook(submodule)
    with contextlib.suppress(ValueError):
        return hooks.module_hooks(submodule)[1]
    return None


def _hooks(spec: DictionarySpec, cfg: dict[str, Any]) -> tuple[str, str]:
    """The entry's (read, write) hooks: `hook`/`hook_out`, else `submodule_name`'s mapping."""
    submodule = cfg["submodule"]
    read = spec.hook or (submodule_hook(str(submodule)) if submodule else None)
    if read is None:
        raise ValueError(f"cannot tell the hook of dictionary_learning submodule "
                         f"{submodule!r} (mapped: resid_post_layer_N, mlp_out_layer_N, "
                         f"attn_out_layer_N, {hooks.FORMS}); give hook:")
    return read, spec.hook_out or read


def _inspect(spec: DictionarySpec, suite_path: Path | None
             ) -> tuple[Path, dict[str, Any], dict[str, Tensor], tuple[str, str]]:
    """The entry's directory, config, mapped state dict and hooks; a problem is located."""
    directory = located.local_path(spec.ref, suite_path)
    try:
        cfg = _read_config(directory)
        state = _read_state(directory / WEIGHTS_FILE, _stored_shapes(cfg))
        return directory, cfg, state, _hooks(spec, cfg)
    except ValueError as err:
        raise located.error_at(suite_path, spec.line, f"dictionaries.{spec.name}",
                               str(err)) from None


def _probe(spec: DictionarySpec, suite_path: Path | None) -> DictionaryInfo:
    directory, cfg, _, (read, write) = _inspect(spec, suite_path)
    identity = {"source": f"dictionary_learning:{directory}",
                "sha256": sha256_of(directory / n for n in IDENTITY_FILES)}
    return DictionaryInfo(read, write, cfg["d_in"], cfg["d_in"], cfg["d_sae"], identity,
                          f"dictionary_learning-{cfg['dict_class']}")


def _load(spec: DictionarySpec, device: str | torch.device, suite_path: Path | None,
          allow_factory: bool = False) -> DictionaryLearningSAE:
    _, cfg, state, (read, write) = _inspect(spec, suite_path)
    layout = LAYOUTS[cfg["dict_class"]]
    tensors = {name: t.to(device=device, memory_format=torch.contiguous_format, copy=True)
               for name, t in _canonical(state, layout).items()}
    return DictionaryLearningSAE(tensors, layout, cfg["k"], read, write)


register_format(Format(name="dictionary_learning", ref="directory", probe=_probe, load=_load,
                       summary="a dictionary_learning directory (config.json + ae.pt)"))
