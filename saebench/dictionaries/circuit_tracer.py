"""`circuit_tracer:` dictionaries: a directory circuit-tracer reads, a per-layer transcoder
set or a cross-layer transcoder (CLT), spliced as a *replacement model*: every layer's MLP
output replaced at once, each layer's features reading the spliced model.

circuit-tracer (`circuit-tracer` on PyPI) pins transformers <= 4.57 and an older
transformer-lens than sae-lens needs, so it cannot be installed beside saebench. This module
reads its documented on-disk format with safetensors and runs its equations:

- `config.yaml`: `model_kind` (`transcoder_set` or `cross_layer_transcoder`),
  `feature_input_hook` and `feature_output_hook`, hook names under `blocks.{layer}.`
  (e.g. `ln2.hook_normalized` and `hook_mlp_out`).
- a transcoder set: `layer_{i}.safetensors` per layer, with `W_enc` [d_tc, d_model], `W_dec`
  [d_tc, d_model], `b_enc`, `b_dec`, optionally `W_skip` [d_model, d_model] (adds
  `x @ W_skip.T`) and `activation_function.threshold` (JumpReLU; ReLU without it).
- a CLT: per source layer i, `W_enc_{i}.safetensors` (`W_enc_{i}` [d_tc, d_model],
  `b_enc_{i}`, `b_dec_{i}`, optionally `threshold_{i}`) and `W_dec_{i}.safetensors`
  (`W_dec_{i}` [d_tc, n_layers - i, d_model]); layer j's output is
  `b_dec_j + Σ_{i ≤ j} f_i @ W_dec_i[:, j - i]`.

Each layer becomes one part (`splice.Dictionary` with `part_of` the entry's name); a CLT's
layer-i part writes every MLP output from layer i on. `args: {shuffle_decoders: <seed>}`
gives the control with each layer's decoder vectors permuted among its features (same
weights, no feature→output mapping): a replacement model that must fail its checks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saebench import located

if TYPE_CHECKING:
    from saebench.suite import DictionarySpec

from saebench.dictionaries import DictionaryInfo, Format, register_format, sha256_of

CONFIG_FILE = "config.yaml"
KINDS = ("transcoder_set", "cross_layer_transcoder")
ARGS = ("shuffle_decoders",)
_LAYER_FILES = {"transcoder_set": re.compile(r"^layer_(\d+)\.safetensors$"),
                "cross_layer_transcoder": re.compile(r"^W_enc_(\d+)\.safetensors$")}


def _activation(pre: Tensor, threshold: Tensor | None) -> Tensor:
    """ReLU, or JumpReLU `pre * (pre > threshold)` where a threshold is stored."""
    return pre.relu() if threshold is None else pre * (pre > threshold)


class TranscoderLayer(torch.nn.Module):
    """One layer of a circuit-tracer replacement model: features read one hook and write
    one (a transcoder of a set) or several (a CLT layer: every later MLP output).

    `encode(x)` gives dense features; `decode(features, x)` the reconstruction, a tuple
    with one entry per write hook when there are several (the saebench protocol).
    """

    def __init__(self, tensors: dict[str, Tensor], read_hook: str,
                 write_hooks: tuple[str, ...]) -> None:
        super().__init__()
        self.W_enc = torch.nn.Parameter(tensors["W_enc"], requires_grad=False)
        self.b_enc = torch.nn.Parameter(tensors["b_enc"], requires_grad=False)
        self.W_dec = torch.nn.Parameter(tensors["W_dec"], requires_grad=False)  # [f, n_out, d]
        self.b_dec = torch.nn.Parameter(tensors["b_dec"], requires_grad=False)
        for name in ("threshold", "W_skip"):
            value = tensors.get(name)
            setattr(self, name, None if value is None
                    else torch.nn.Parameter(value, requires_grad=False))
        self.read_hooks, self.write_hooks = (read_hook,), write_hooks
        self.d_sae, self.d_in = self.W_enc.shape
        self.d_out = self.W_dec.shape[-1]

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [..., d_tc]."""
        return _activation(x.to(self.W_enc.dtype) @ self.W_enc.T + self.b_enc, self.threshold)

    def decode(self, feats: Tensor, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        """This layer's contribution to each write hook (its own output bias on the first)."""
        out = (feats.to(self.W_dec.dtype) @ self.W_dec.flatten(1)).unflatten(
            -1, self.W_dec.shape[1:])
        parts = list(out.unbind(-2))
        parts[0] = parts[0] + self.b_dec
        if self.W_skip is not None:
            parts[0] = parts[0] + x.to(self.W_skip.dtype) @ self.W_skip.T
        return parts[0] if len(parts) == 1 else tuple(parts)


def _read_config(directory: Path) -> dict[str, str]:
    import yaml

    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a circuit-tracer directory: expected {CONFIG_FILE}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        cfg = {key: str(raw[key]) for key in
               ("model_kind", "feature_input_hook", "feature_output_hook")}
    except (yaml.YAMLError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a circuit-tracer config (needs model_kind, "
                         f"feature_input_hook and feature_output_hook): {err}") from None
    if cfg["model_kind"] not in KINDS:
        raise ValueError(f"{path}: model_kind {cfg['model_kind']!r} is not one of "
                         f"{', '.join(KINDS)}")
    return cfg


def _layer_count(directory: Path, kind: str) -> int:
    found = sorted(int(m[1]) for p in directory.iterdir()
                   if (m := _LAYER_FILES[kind].match(p.name)))
    if not found or found != list(range(len(found))):
        raise ValueError(f"{directory}: a {kind} needs files for layers 0..n-1 "
                         f"({_LAYER_FILES[kind].pattern}); found layers {found or 'none'}")
    return len(found)


def _files(directory: Path, kind: str, n_layers: int) -> list[Path]:
    if kind == "transcoder_set":
        return [directory / f"layer_{i}.safetensors" for i in range(n_layers)]
    return [directory / f"{w}_{i}.safetensors" for i in range(n_layers) for w in ("W_enc", "W_dec")]


def _layer_tensors(directory: Path, kind: str, layer: int, n_layers: int,
                   shapes_only: bool) -> dict[str, Any]:
    """Layer `layer`'s tensors (or their shapes) under the names `TranscoderLayer` takes,
    checked against each other."""
    from safetensors import safe_open

    if kind == "transcoder_set":
        names = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": "W_dec", "b_dec": "b_dec",
                 "threshold": "activation_function.threshold", "W_skip": "W_skip"}
        files = {k: directory / f"layer_{layer}.safetensors" for k in names}
    else:
        names = {"W_enc": f"W_enc_{layer}", "b_enc": f"b_enc_{layer}", "b_dec": f"b_dec_{layer}",
                 "threshold": f"threshold_{layer}", "W_dec": f"W_dec_{layer}"}
        files = {k: directory / f"{'W_dec' if k == 'W_dec' else 'W_enc'}_{layer}.safetensors"
                 for k in names}
    out: dict[str, Any] = {}
    for path in dict.fromkeys(files.values()):  # each file opened once
        with safe_open(str(path), framework="pt") as f:
            stored = set(f.keys())
            for key in (k for k, file in files.items() if file == path):
                if names[key] in stored:
                    out[key] = (tuple(f.get_slice(names[key]).get_shape()) if shapes_only
                                else f.get_tensor(names[key]))
                elif key not in ("threshold", "W_skip"):
                    raise ValueError(f"{path}: no tensor {names[key]!r}")
    shape = (lambda v: tuple(v)) if shapes_only else (lambda v: tuple(v.shape))
    d_tc, d_model = shape(out["W_enc"])
    n_out = 1 if kind == "transcoder_set" else n_layers - layer
    expected = {"b_enc": (d_tc,), "b_dec": (d_model,), "threshold": (d_tc,),
                "W_skip": (d_model, d_model),
                "W_dec": (d_tc, d_model) if kind == "transcoder_set" else (d_tc, n_out, d_model)}
    for key, want in expected.items():
        if key in out and shape(out[key]) != want:
            raise ValueError(f"{files[key]}: {names[key]} has shape {list(shape(out[key]))}, "
                             f"expected {list(want)} (from W_enc {[d_tc, d_model]})")
    if not shapes_only and kind == "transcoder_set":
        out["W_dec"] = out["W_dec"].unsqueeze(1)
    return out


def _inspect(spec: DictionarySpec, suite_path: Path | None
             ) -> tuple[Path, dict[str, str], int, list[dict[str, Any]]]:
    """The entry's directory, config, layer count and per-layer tensor shapes."""
    directory = located.local_path(spec.ref, suite_path)
    try:
        if not directory.is_dir():
            raise ValueError(f"{directory} is not a directory")
        cfg = _read_config(directory)
        n_layers = _layer_count(directory, cfg["model_kind"])
        shapes = [_layer_tensors(directory, cfg["model_kind"], i, n_layers, True)
                  for i in range(n_layers)]
        if spec.hook or spec.hook_out:
            raise ValueError("hook:/hook_out: do not apply: a circuit-tracer model's hooks come "
                             "from its config.yaml (feature_input_hook, feature_output_hook)")
        unknown = sorted(set(spec.args) - set(ARGS))
        if unknown:
            raise ValueError(f"args {unknown} do not apply; circuit_tracer takes {', '.join(ARGS)}")
        seed = spec.args.get("shuffle_decoders")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"args.shuffle_decoders must be an integer seed, got {seed!r}")
    except (ValueError, OSError) as err:
        raise located.error_at(suite_path, spec.line, f"dictionaries.{spec.name}",
                               str(err)) from None
    return directory, cfg, n_layers, shapes


def hooks_of(cfg: dict[str, str], n_layers: int) -> tuple[list[str], list[str]]:
    """The read hook and the write hook of each layer, as TransformerLens names."""
    return ([f"blocks.{i}.{cfg['feature_input_hook']}" for i in range(n_layers)],
            [f"blocks.{i}.{cfg['feature_output_hook']}" for i in range(n_layers)])


def _probe(spec: DictionarySpec, suite_path: Path | None) -> DictionaryInfo:
    directory, cfg, n_layers, shapes = _inspect(spec, suite_path)
    reads, writes = hooks_of(cfg, n_layers)
    d_tc, d_model = shapes[0]["W_enc"]
    shuffled = spec.args.get("shuffle_decoders")
    identity = {"source": f"circuit_tracer:{directory}",
                "sha256": sha256_of([directory / CONFIG_FILE,
                                     *_files(directory, cfg["model_kind"], n_layers)]),
                **({"shuffle_decoders": str(shuffled)} if shuffled is not None else {})}
    return DictionaryInfo(",".join(reads), ",".join(writes), d_model, d_model,
                          sum(s["W_enc"][0] for s in shapes), identity,
                          f"circuit_tracer-{cfg['model_kind']}")


def shuffle_decoders(tensors: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """`tensors` with the decoder vectors (`W_dec` rows) permuted among the features."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(tensors["W_dec"].shape[0], generator=generator)
    return {**tensors, "W_dec": tensors["W_dec"][order.to(tensors["W_dec"].device)]}


def _load(spec: DictionarySpec, device: str | torch.device, suite_path: Path | None,
          allow_factory: bool = False) -> tuple[Any, ...]:
    from saebench.splice import as_dictionary

    directory, cfg, n_layers, _ = _inspect(spec, suite_path)
    reads, writes = hooks_of(cfg, n_layers)
    seed = spec.args.get("shuffle_decoders")
    parts = []
    for i in range(n_layers):
        tensors = _layer_tensors(directory, cfg["model_kind"], i, n_layers, False)
        if seed is not None:
            tensors = shuffle_decoders(tensors, seed + i)
        tensors = {k: v.to(device=device, dtype=torch.float32) for k, v in tensors.items()}
        outs = (writes[i],) if cfg["model_kind"] == "transcoder_set" else tuple(writes[i:])
        layer = TranscoderLayer(tensors, reads[i], outs)
        parts.append(as_dictionary(layer, name=f"{spec.name}/L{i}", part_of=spec.name))
    return tuple(parts)


register_format(Format(name="circuit_tracer", ref="directory", probe=_probe, load=_load,
                       keys=("args",),
                       summary="a circuit-tracer transcoder set or cross-layer transcoder "
                               "(config.yaml + safetensors), spliced at every layer at once"))
