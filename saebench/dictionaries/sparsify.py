"""`sparsify:` dictionaries: a directory EleutherAI's sparsify (`eai-sparsify`) wrote for one
hookpoint, read here with safetensors alone (sparsify is not needed to evaluate one).

The directory holds `cfg.json` (sparsify's `SparseCoderConfig` plus `d_in`) and
`sae.safetensors` (`encoder.weight` [latents, d_in], `encoder.bias`, `W_dec` [latents, d_in],
`b_dec`, and `W_skip` [d_in, d_in] with a skip connection, all of one dtype, kept as stored);
it is named after the Hugging Face module it was trained on (`layers.6`, `layers.6.mlp`).
Without `hook:`, that name is mapped to TransformerLens hooks: an SAE reads and writes the
module's output, a transcoder reads its input and writes its output. The probe reads the
config and the weights header only.

sparsify's equations (`SparseCoder.encode`/`decode`/`forward`), which `SparsifyCoder` runs:

    pre   = relu((x - b_dec if an SAE else x) @ encoder.weightᵀ + encoder.bias)
    feats = top-k of pre (`activation: topk`), or the maximum of each of k contiguous groups
            of latents/k (`activation: groupmax`); the others zero
    out   = feats @ W_dec + b_dec (+ x @ W_skipᵀ with a skip connection, x as given)

A config key sparsify does not document, or a tensor it would not load, is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
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
from saebench.dictionaries.sae_lens import check_weights_header

WEIGHTS_FILE = "sae.safetensors"
IDENTITY_FILES = ("cfg.json", WEIGHTS_FILE)
ACTIVATIONS = ("topk", "groupmax")
TRAINING_KEYS = ("normalize_decoder", "multi_topk", "dtype")
"""Config keys that shape sparsify's training only (decoder normalisation, the Multi-TopK
loss, the training dtype): accepted, and they change nothing here."""
KNOWN_KEYS = ("d_in", "activation", "num_latents", "expansion_factor", "k", "transcode",
              "skip_connection", "signed", *TRAINING_KEYS)
"""Every cfg.json key sparsify writes (`signed` by its older releases, only as false)."""


class SparsifyCoder(torch.nn.Module):
    """A sparsify `SparseCoder` with dense features, as `splice.as_dictionary` adapts it.

    The parameters keep sparsify's names, layouts and order (`W_dec`, `b_dec`, `W_skip`,
    then `encoder.weight` [d_sae, d_in] and `encoder.bias`), so that `splice.random_like`
    draws the same random baseline from them as from sparsify's own module. `encode` gives
    the dense features [..., d_sae] (zeros off the top-k or the group maxima); `decode`
    multiplies any features by `W_dec`, so edited features decode too. `W_skip` (or None)
    is exposed for `splice.Dictionary.decode`, which adds `x @ W_skip.T` as sparsify's
    forward does.
    """

    def __init__(self, tensors: dict[str, Tensor], cfg: dict[str, Any], hook_name: str,
                 hook_name_out: str) -> None:
        super().__init__()

        def frozen(name: str) -> torch.nn.Parameter | None:
            value = tensors.get(name)
            return None if value is None else torch.nn.Parameter(value, requires_grad=False)

        self.W_dec, self.b_dec, self.W_skip = frozen("W_dec"), frozen("b_dec"), frozen("W_skip")
        self.encoder = torch.nn.Module()
        self.encoder.weight, self.encoder.bias = frozen("encoder.weight"), frozen("encoder.bias")
        self.activation, self.k, self.transcode = cfg["activation"], cfg["k"], cfg["transcode"]
        self.hook_name, self.hook_name_out = hook_name, hook_name_out
        self.d_in = self.d_out = cfg["d_in"]
        self.d_sae = cfg["d_sae"]

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations [..., d_sae] of `x` [..., d_in], in the stored dtype."""
        x = x.to(self.W_dec.dtype)
        pre = torch.relu((x if self.transcode else x - self.b_dec) @ self.encoder.weight.T
                         + self.encoder.bias)
        if self.activation == "topk":
            top = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
        groups = pre.unflatten(-1, (self.k, -1))
        top = groups.max(dim=-1, keepdim=True)
        return torch.zeros_like(groups).scatter_(-1, top.indices, top.values).flatten(-2)

    def decode(self, feats: Tensor) -> Tensor:
        """The reconstruction `feats @ W_dec + b_dec` (without the skip term, which needs x)."""
        return feats.to(self.W_dec.dtype) @ self.W_dec + self.b_dec


def sparsify_hooks(module: str, transcode: bool) -> tuple[str, str] | None:
    """TransformerLens (read, write) hooks of a sparsify module name (`saebench.hooks`): an
    SAE reads and writes the module's output, a transcoder reads its input; None when the
    name has no mapping."""
    try:
        given, output = hooks.module_hooks(module)
    except ValueError:
        return None
    return (given if transcode else output), output


def _int_field(raw: dict[str, Any], key: str, default: int, minimum: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _bool_field(raw: dict[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _checked_cfg(raw: Any) -> dict[str, Any]:
    """The fields of a parsed cfg.json that change the computation, with sparsify's defaults
    (`SparseCoderConfig`); a ValueError names the first bad one."""
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; sparsify's keys: {', '.join(KNOWN_KEYS)}")
    if "d_in" not in raw:
        raise ValueError("no d_in (sparsify's save_to_disk writes it)")
    if raw.get("signed", False) is not False:
        raise ValueError(f"signed: {raw['signed']!r} is not supported (only false)")
    d_in = _int_field(raw, "d_in", 0, 1)
    latents = _int_field(raw, "num_latents", 0, 0) or \
        d_in * _int_field(raw, "expansion_factor", 32, 1)
    cfg = {"d_in": d_in, "d_sae": latents, "k": _int_field(raw, "k", 32, 1),
           "activation": raw.get("activation", "topk"),
           "transcode": _bool_field(raw, "transcode", False),
           "skip": _bool_field(raw, "skip_connection", False)}
    for key in ("normalize_decoder", "multi_topk"):
        _bool_field(raw, key, False)
    if cfg["activation"] not in ACTIVATIONS:
        raise ValueError(f"unknown activation {cfg['activation']!r}; sparsify knows "
                         f"{', '.join(ACTIVATIONS)}")
    if cfg["k"] > latents:
        raise ValueError(f"k={cfg['k']} is more than its {latents} latents")
    if cfg["activation"] == "groupmax" and latents % cfg["k"]:
        raise ValueError(f"groupmax splits the {latents} latents into k={cfg['k']} equal "
                         "groups, which does not divide them")
    return cfg


def _read_cfg(directory: Path) -> dict[str, Any]:
    """The checked fields of a sparsify directory's cfg.json; a problem is a ValueError."""
    require_files(directory, IDENTITY_FILES, "sparsify", "SparseCoder.save_to_disk")
    cfg_file = directory / "cfg.json"
    try:
        return _checked_cfg(json.loads(cfg_file.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{cfg_file}: not a sparsify config ({located.first_line(err)})"
                         ) from None


def _weight_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors sparsify's `SparseCoder` has for `cfg`, with their shapes."""
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
              "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    return {**shapes, "W_skip": (d_in, d_in)} if cfg["skip"] else shapes


def _check_weights(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """`path` holds exactly the tensors of `shapes` (as sparsify's strict load requires),
    with those shapes, all of one floating dtype."""
    check_weights_header(path, shapes)
    with safe_open(str(path), framework="pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in set(f.keys())}
    missing, extra = sorted(set(shapes) - set(dtypes)), sorted(set(dtypes) - set(shapes))
    if missing or extra:
        found = "; ".join([*([f"missing {missing}"] if missing else []),
                           *([f"unexpected {extra}"] if extra else [])])
        raise ValueError(f"{path}: {found} (sparsify loads exactly {', '.join(shapes)} for "
                         "this cfg.json)")
    if len(set(dtypes.values())) != 1 or not next(iter(dtypes.values())).startswith(("F", "BF")):
        raise ValueError(f"{path}: tensors must share one floating dtype, got {dtypes}")


def _architecture(cfg: dict[str, Any]) -> str:
    """`sparsify-topk`, `sparsify-transcoder`, `sparsify-skip-transcoder`, ..."""
    kind = "transcoder" if cfg["transcode"] else cfg["activation"]
    return f"sparsify-{'skip-' if cfg['skip'] else ''}{kind}"


def _hooks(spec: DictionarySpec, directory: Path, transcode: bool) -> tuple[str, str]:
    """The entry's (read, write) hooks: `hook`/`hook_out`, else the directory name's mapping
    (an SAE writes where it reads); a ValueError when neither says."""
    mapped = sparsify_hooks(directory.name, transcode) or (None, None)
    read = spec.hook or mapped[0]
    write = spec.hook_out or (mapped[1] if transcode else read)
    if read is None or write is None:
        needed = "hook: and hook_out:" if transcode else "hook:"
        raise ValueError(f"{directory}: cannot tell the hooks of sparsify module "
                         f"{directory.name!r} (mapped: {hooks.FORMS}); "
                         f"give {needed}")
    return read, write


def _inspect(spec: DictionarySpec, suite_path: Path | None
             ) -> tuple[Path, dict[str, Any], tuple[str, str]]:
    """The entry's directory, checked config and hooks; a problem is a located error."""
    directory = located.local_path(spec.ref, suite_path)
    try:
        cfg = _read_cfg(directory)
        _check_weights(directory / WEIGHTS_FILE, _weight_shapes(cfg))
        return directory, cfg, _hooks(spec, directory, cfg["transcode"])
    except ValueError as err:
        raise located.error_at(suite_path, spec.line, f"dictionaries.{spec.name}",
                               str(err)) from None


def _probe(spec: DictionarySpec, suite_path: Path | None) -> DictionaryInfo:
    directory, cfg, (read, write) = _inspect(spec, suite_path)
    identity = {"source": f"sparsify:{directory}",
                "sha256": sha256_of(directory / n for n in IDENTITY_FILES)}
    return DictionaryInfo(read, write, cfg["d_in"], cfg["d_in"], cfg["d_sae"], identity,
                          _architecture(cfg))


def read_sparsify(directory: Path, hook: str, device: str | torch.device = "cpu"
                  ) -> SparsifyCoder:
    """The sparsify SAE in `directory`, reading and writing `hook`, loaded on `device` (the
    zoo's reader of its own sparsify dictionary); a problem is a ValueError."""
    cfg = _read_cfg(directory)
    _check_weights(directory / WEIGHTS_FILE, _weight_shapes(cfg))
    return SparsifyCoder(load_file(str(directory / WEIGHTS_FILE), device=str(device)), cfg,
                         hook, hook)


def _load(spec: DictionarySpec, device: str | torch.device, suite_path: Path | None,
          allow_factory: bool = False) -> SparsifyCoder:
    directory, cfg, (read, write) = _inspect(spec, suite_path)
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    except (OSError, SafetensorError, RuntimeError) as err:
        raise located.error_at(suite_path, spec.line, f"dictionaries.{spec.name}",
                               f"{directory / WEIGHTS_FILE}: cannot load it "
                               f"({located.first_line(err)})") from err
    return SparsifyCoder(tensors, cfg, read, write)


register_format(Format(name="sparsify", ref="directory", probe=_probe, load=_load,
                       summary="a sparsify directory (cfg.json + sae.safetensors)"))
