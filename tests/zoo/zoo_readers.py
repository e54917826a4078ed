"""Each zoo format read by its own reader (not `saebench.zoo.formats`), for the round-trip
tests: sparsify's `SparseCoder.load_from_disk`, the project's dictionary_learning reader,
sae_lens' `SAE.load_from_disk`, and for circuit-tracer a float64 re-implementation of its
documented equations on the safetensors files."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor

from saebench.zoo.dictionaries import DictionarySpec

NEW_FORMATS = ("sparsify-L1-topk16", "skip-transcoder-L1", "ct-transcoders", "ct-clt")
"""The dictionaries in formats other than sae_lens' SAEs (with the dl one, whose name
depends on the model's depth: `dl_name`)."""


def dl_name(n_layers: int) -> str:
    return f"dl-L{n_layers // 2}-topk16"


def spec_of(manifest: dict, name: str) -> DictionarySpec:
    """The manifest's record of `name` as a `DictionarySpec`."""
    record = manifest["dictionaries"][name]
    return DictionarySpec(**{**record, "layers": tuple(record["layers"])})


@torch.no_grad()
def own_reconstruction(spec: DictionarySpec, directory: Path,
                       cache: dict[str, Tensor]) -> list[Tensor]:
    """Each of `spec.writes` reconstructed from the clean activations in `cache`, by the
    format's own reader."""
    x = cache[spec.reads[0]]
    if spec.format == "sparsify":
        from sparsify import SparseCoder

        sae = SparseCoder.load_from_disk(directory)
        return [sae(x.reshape(-1, x.shape[-1])).sae_out.reshape(x.shape)]
    if spec.format == "dictionary_learning":
        from saebench.dictionaries import get_format
        from saebench.suite import DictionarySpec as Entry

        sae = get_format("dictionary_learning").load(
            Entry(spec.name, "dictionary_learning", str(directory)), "cpu", None)
        return [sae.decode(sae.encode(x))]
    if spec.format == "sae_lens":
        from sae_lens import SAE

        return [SAE.load_from_disk(str(directory))(x)]
    return circuit_tracer_reference(directory, cache)


def circuit_tracer_reference(directory: Path, cache: dict[str, Tensor]) -> list[Tensor]:
    """circuit-tracer's equations in float64, straight from the files: a transcoder set's
    layer i gives relu(x_i @ W_enc.T + b_enc) @ W_dec + b_dec; a CLT's layer j output is
    b_dec_j + sum_{i <= j} relu(x_i @ W_enc_i.T + b_enc_i) @ W_dec_i[:, j - i]."""
    config = yaml.safe_load((directory / "config.yaml").read_text())
    kind = config["model_kind"]
    pattern = "layer_*.safetensors" if kind == "transcoder_set" else "W_enc_*.safetensors"
    n_layers = len(list(directory.glob(pattern)))
    xs = [cache[f"blocks.{i}.{config['feature_input_hook']}"].double() for i in range(n_layers)]
    if kind == "transcoder_set":
        outs = []
        for i, x in enumerate(xs):
            t = {k: v.double() for k, v in load_file(directory / f"layer_{i}.safetensors").items()}
            outs.append(torch.relu(x @ t["W_enc"].T + t["b_enc"]) @ t["W_dec"] + t["b_dec"])
        return outs
    enc = [{k: v.double() for k, v in load_file(directory / f"W_enc_{i}.safetensors").items()}
           for i in range(n_layers)]
    dec = [load_file(directory / f"W_dec_{i}.safetensors")[f"W_dec_{i}"].double()
           for i in range(n_layers)]
    feats = [torch.relu(x @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"])
             for i, x in enumerate(xs)]
    return [enc[j][f"b_dec_{j}"] + sum(feats[i] @ dec[i][:, j - i] for i in range(j + 1))
            for j in range(n_layers)]
