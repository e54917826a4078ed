"""The published on-disk formats of the zoo's own-loop dictionaries, written from a `Coder`
and read back into one (float64 for the quality numbers, which so go through the files).

| format | architecture | files (how the format's own code loads them) |
|---|---|---|
| sae_lens | transcoder, skip_transcoder | cfg.json, sae_weights.safetensors (`SAE.load_from_disk`)|
| sparsify | topk | cfg.json, sae.safetensors (`sparsify.SparseCoder.load_from_disk`) |
| dictionary_learning | topk | config.json, ae.pt (an `AutoEncoderTopK` state dict) |
| circuit_tracer | transcoder_set | config.yaml, layer_{i}.safetensors |
| circuit_tracer | clt | config.yaml, W_enc_{i}.safetensors, W_dec_{i}.safetensors |

The zoo's sae_lens SAEs are written by sae_lens' own runner, not here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml
from sae_lens import SAE, SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file, save_file
from torch import Tensor

from saebench.dictionaries.sparsify import read_sparsify
from saebench.zoo.coder import Coder

if TYPE_CHECKING:
    from saebench.zoo.dictionaries import DictionarySpec

MODEL_NAME = "saebench-zoo"
DL_CONFIG, DL_WEIGHTS = "config.json", "ae.pt"
CT_CONFIG = "config.yaml"
LAYER_TEMPLATE = "blocks.{layer}."


def sae_lens_transcoder(spec: DictionarySpec, read: str, write: str, d_out: int,
                        n_ctx: int) -> Transcoder:
    """A freshly initialised sae_lens `Transcoder` (`SkipTranscoder` for a skip transcoder)
    of `spec`'s shape, reading `read` and writing `write`."""
    skip = spec.architecture == "skip_transcoder"
    config_class = SkipTranscoderConfig if skip else TranscoderConfig
    cfg = config_class(
        d_in=spec.d_in, d_sae=spec.d_sae, d_out=d_out, apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=read, hook_name_out=write,
                             model_name=MODEL_NAME, context_size=n_ctx, prepend_bos=True),
    )
    return SkipTranscoder(cfg) if skip else Transcoder(cfg)


def write(spec: DictionarySpec, coder: Coder, directory: Path, n_ctx: int) -> None:
    """Write `coder` in `spec.format` into `directory` (float32)."""
    directory.mkdir(parents=True, exist_ok=True)
    _codec(spec)[0](spec, coder.to(torch.float32), directory, n_ctx)


def read(spec: DictionarySpec, directory: Path, dtype: torch.dtype = torch.float64) -> Coder:
    """The dictionary `spec.format` stored in `directory`, as a `Coder` in `dtype`."""
    return _codec(spec)[1](spec, directory).to(dtype)


def _codec(spec: DictionarySpec) -> tuple[Callable, Callable]:
    key = (spec.format, spec.architecture)
    if key not in CODECS:
        raise ValueError(f"{spec.name}: no writer for a {spec.architecture} in format "
                         f"{spec.format!r}; known: {sorted(CODECS)}")
    return CODECS[key]


def _write_sae_lens(spec: DictionarySpec, coder: Coder, directory: Path, n_ctx: int) -> None:
    transcoder = sae_lens_transcoder(spec, coder.reads[0], coder.writes[0],
                                     coder.b_dec[0].shape[0], n_ctx)
    state = {"W_enc": coder.W_enc[0], "b_enc": coder.b_enc[0], "W_dec": coder.W_dec[(0, 0)],
             "b_dec": coder.b_dec[0]}
    if coder.W_skip[0] is not None:
        state["W_skip"] = coder.W_skip[0]
    transcoder.load_state_dict(state)
    transcoder.save_model(str(directory))


def _read_sae_lens(spec: DictionarySpec, directory: Path) -> Coder:
    sae = SAE.load_from_disk(str(directory))
    meta = sae.cfg.metadata
    if not meta.hook_name_out:
        raise ValueError(f"{directory}: a sae_lens SAE, measured by run_evals, not read here")
    return Coder([meta.hook_name], [meta.hook_name_out], [sae.W_enc], [sae.b_enc],
                 {(0, 0): sae.W_dec}, [sae.b_dec], [None], [getattr(sae, "W_skip", None)])


def _write_sparsify(spec: DictionarySpec, coder: Coder, directory: Path, n_ctx: int) -> None:
    """Through sparsify's own `SparseCoder.save_to_disk` (cfg.json + sae.safetensors)."""
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(spec.d_in, SparseCoderConfig(num_latents=spec.d_sae, k=spec.k))
    sae.load_state_dict({"encoder.weight": coder.W_enc[0].T, "encoder.bias": coder.b_enc[0],
                         "W_dec": coder.W_dec[(0, 0)], "b_dec": coder.b_dec[0]})
    sae.save_to_disk(directory)


def _read_sparsify(spec: DictionarySpec, directory: Path) -> Coder:
    """Through saebench's own reader of sparsify directories (sparsify's equations)."""
    sae = read_sparsify(directory, spec.hook)
    if sae.activation != "topk" or sae.transcode:
        raise ValueError(f"{directory}: only sparsify's top-k SAEs are zoo dictionaries")
    return Coder([spec.hook], [spec.hook], [sae.encoder.weight.T], [sae.encoder.bias],
                 {(0, 0): sae.W_dec}, [sae.b_dec], [sae.b_dec], [sae.W_skip], sae.k)


def activation_name(hook: str) -> tuple[str, int]:
    """dictionary_learning's name of the activation at `hook` and its layer
    (`blocks.2.hook_resid_post` -> `resid_post_layer_2`, 2)."""
    match = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_post|mlp_out|attn_out)", hook)
    if match is None:
        raise ValueError(f"dictionary_learning names no activation at {hook!r}")
    return f"{match[2]}_layer_{match[1]}", int(match[1])


def _write_dictionary_learning(spec: DictionarySpec, coder: Coder, directory: Path,
                               n_ctx: int) -> None:
    """An `AutoEncoderTopK` state dict (its `k` and unset `threshold` buffers included) and
    the `trainer`/`buffer` sections dictionary_learning writes to config.json."""
    submodule, layer = activation_name(spec.hook)
    state = {"encoder.weight": coder.W_enc[0].T.contiguous(), "encoder.bias": coder.b_enc[0],
             "decoder.weight": coder.W_dec[(0, 0)].T.contiguous(), "b_dec": coder.b_dec[0],
             "k": torch.tensor(spec.k, dtype=torch.int32),
             "threshold": torch.tensor(-1.0, dtype=torch.float32)}
    torch.save(state, directory / DL_WEIGHTS)
    config = {
        "trainer": {"dict_class": "AutoEncoderTopK",
                    "trainer_class": "saebench.zoo.dictionaries.train_topk_sae",
                    "activation_dim": spec.d_in, "dict_size": spec.d_sae, "k": spec.k,
                    "layer": layer, "lm_name": MODEL_NAME, "submodule_name": submodule},
        "buffer": {"d_submodule": spec.d_in, "io": "out", "ctx_len": n_ctx},
    }
    (directory / DL_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _read_dictionary_learning(spec: DictionarySpec, directory: Path) -> Coder:
    trainer = json.loads((directory / DL_CONFIG).read_text())["trainer"]
    if trainer["dict_class"] != "AutoEncoderTopK":
        raise ValueError(f"{directory}: only AutoEncoderTopK is a zoo dictionary")
    state = torch.load(directory / DL_WEIGHTS, map_location="cpu", weights_only=True)
    return Coder([spec.hook], [spec.hook], [state["encoder.weight"].T], [state["encoder.bias"]],
                 {(0, 0): state["decoder.weight"].T}, [state["b_dec"]], [state["b_dec"]],
                 [None], int(trainer["k"]))


def _ct_suffix(hooks: list[str]) -> str:
    """The hook name under `blocks.{layer}.` that every layer's hook in `hooks` shares."""
    suffixes = {h.removeprefix(LAYER_TEMPLATE.format(layer=i)) for i, h in enumerate(hooks)}
    if len(suffixes) != 1 or any(not h.startswith(LAYER_TEMPLATE.format(layer=i))
                                 for i, h in enumerate(hooks)):
        raise ValueError(f"circuit-tracer hooks must be blocks.{{layer}}.<one name>: {hooks}")
    return suffixes.pop()


def _write_ct_config(coder: Coder, kind: str, directory: Path, **keys: object) -> None:
    config = {"model_kind": kind, "model_name": MODEL_NAME,
              "feature_input_hook": _ct_suffix(coder.reads),
              "feature_output_hook": _ct_suffix(coder.writes),
              **{k: v for k, v in keys.items() if v is not None}}
    (directory / CT_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))


def _read_ct_config(directory: Path, kind: str) -> dict:
    config = yaml.safe_load((directory / CT_CONFIG).read_text())
    if config["model_kind"] != kind:
        raise ValueError(f"{directory}: model_kind {config['model_kind']!r}, expected {kind!r}")
    if config.get("activation", "relu") != "relu":
        raise ValueError(f"{directory}: a Coder runs ReLU features, not {config['activation']}")
    return config


def _ct_hooks(config: dict, n_layers: int) -> tuple[list[str], list[str]]:
    return ([f"blocks.{i}.{config['feature_input_hook']}" for i in range(n_layers)],
            [f"blocks.{i}.{config['feature_output_hook']}" for i in range(n_layers)])


def write_transcoder_set(coder: Coder, directory: Path, *, activation: str | None = None,
                         k: int | None = None, thresholds: list[Tensor] | None = None) -> None:
    """circuit-tracer's transcoder set: one `layer_{i}.safetensors` per layer, `W_enc` and
    `W_dec` both [d_transcoder, d_model], `W_skip` where the coder has one, and each
    layer's `thresholds[i]` as `activation_function.threshold`; config.yaml says
    `activation` (`topk` with `k`, `relu`, `jump_relu`) when given, as circuit-tracer
    reads it. The zoo's sets (ReLU, no keys) are the coder's equations."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_ct_config(coder, "transcoder_set", directory, activation=activation, k=k)
    for i in range(len(coder.reads)):
        tensors = {"W_enc": coder.W_enc[i].T.contiguous(), "W_dec": coder.W_dec[(i, i)],
                   "b_enc": coder.b_enc[i], "b_dec": coder.b_dec[i]}
        if coder.W_skip[i] is not None:
            tensors["W_skip"] = coder.W_skip[i]
        if thresholds is not None:
            tensors["activation_function.threshold"] = thresholds[i]
        save_file(tensors, str(directory / f"layer_{i}.safetensors"))


def _write_transcoder_set(spec: DictionarySpec, coder: Coder, directory: Path,
                          n_ctx: int) -> None:
    write_transcoder_set(coder, directory)


def _read_transcoder_set(spec: DictionarySpec, directory: Path) -> Coder:
    config = _read_ct_config(directory, "transcoder_set")
    n_layers = len(list(directory.glob("layer_*.safetensors")))
    layers = [load_file(str(directory / f"layer_{i}.safetensors")) for i in range(n_layers)]
    if any("activation_function.threshold" in t for t in layers):
        raise ValueError(f"{directory}: a Coder runs ReLU features, not JumpReLU")
    reads, writes = _ct_hooks(config, n_layers)
    return Coder(reads, writes, [t["W_enc"].T for t in layers], [t["b_enc"] for t in layers],
                 {(i, i): t["W_dec"] for i, t in enumerate(layers)},
                 [t["b_dec"] for t in layers], [None] * n_layers,
                 [t.get("W_skip") for t in layers])


def write_clt(coder: Coder, directory: Path, *, thresholds: list[Tensor] | None = None) -> None:
    """circuit-tracer's cross-layer transcoder: per source layer i, `W_enc_{i}.safetensors`
    (W_enc_i [d_transcoder, d_model], b_enc_i, b_dec_i, and `thresholds[i]` as threshold_i,
    which makes its features JumpReLU) and `W_dec_{i}.safetensors` (W_dec_i [d_transcoder,
    n_layers - i, d_model], output layers i..n-1). circuit-tracer stores no skip term."""
    if any(w is not None for w in coder.W_skip):
        raise ValueError("circuit-tracer's cross-layer transcoder files hold no skip term")
    directory.mkdir(parents=True, exist_ok=True)
    _write_ct_config(coder, "cross_layer_transcoder", directory)
    n_layers = len(coder.reads)
    for i in range(n_layers):
        encoder = {f"W_enc_{i}": coder.W_enc[i].T.contiguous(), f"b_enc_{i}": coder.b_enc[i],
                   f"b_dec_{i}": coder.b_dec[i]}
        if thresholds is not None:
            encoder[f"threshold_{i}"] = thresholds[i]
        save_file(encoder, str(directory / f"W_enc_{i}.safetensors"))
        decoders = torch.stack([coder.W_dec[(i, j)] for j in range(i, n_layers)], dim=1)
        save_file({f"W_dec_{i}": decoders}, str(directory / f"W_dec_{i}.safetensors"))


def _write_clt(spec: DictionarySpec, coder: Coder, directory: Path, n_ctx: int) -> None:
    write_clt(coder, directory)


def _read_clt(spec: DictionarySpec, directory: Path) -> Coder:
    config = _read_ct_config(directory, "cross_layer_transcoder")
    n_layers = len(list(directory.glob("W_enc_*.safetensors")))
    enc = [load_file(str(directory / f"W_enc_{i}.safetensors")) for i in range(n_layers)]
    dec = [load_file(str(directory / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
           for i in range(n_layers)]
    if any(f"threshold_{i}" in t for i, t in enumerate(enc)):
        raise ValueError(f"{directory}: a Coder runs ReLU features, not JumpReLU")
    reads, writes = _ct_hooks(config, n_layers)
    return Coder(reads, writes, [t[f"W_enc_{i}"].T for i, t in enumerate(enc)],
                 [t[f"b_enc_{i}"] for i, t in enumerate(enc)],
                 {(i, j): dec[i][:, j - i] for i in range(n_layers) for j in range(i, n_layers)},
                 [t[f"b_dec_{i}"] for i, t in enumerate(enc)], [None] * n_layers,
                 [None] * n_layers)


CODECS: dict[tuple[str, str], tuple[Callable, Callable]] = {
    ("sae_lens", "transcoder"): (_write_sae_lens, _read_sae_lens),
    ("sae_lens", "skip_transcoder"): (_write_sae_lens, _read_sae_lens),
    ("sparsify", "topk"): (_write_sparsify, _read_sparsify),
    ("dictionary_learning", "topk"): (_write_dictionary_learning, _read_dictionary_learning),
    ("circuit_tracer", "transcoder_set"): (_write_transcoder_set, _read_transcoder_set),
    ("circuit_tracer", "clt"): (_write_clt, _read_clt),
}
