"""Each zoo format read by its own reader (not `saebench.zoo.formats`), for the round-trip
tests: sparsify's `SparseCoder.load_from_disk`, the project's dictionary_learning reader,
sae_lens' `SAE.load_from_disk`, and for circuit-tracer a float64 re-implementation of its
documented equations on the safetensors files."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tolerances import f32_sum
from torch import Tensor

from saebench.zoo.coder import Coder
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


def f32_bound(coder: Coder, xs: list[Tensor]) -> list[float]:
    """Per output of `coder`, the most a float32 reconstruction of the float64 inputs `xs`
    by any reader may differ from `coder.reconstruct(xs)` (float64) in any element.

    An encoder sums d_in products, its bias and the pre-bias subtracted (f32_sum(d_in + 3)
    of its terms' size); a decoder the active features' products, the skip's and a bias
    (f32_sum(active + d_in + 2)); the encoder's error reaches the output through |W_dec|.
    The terms' size is the same maps on absolute values, over the active features only
    (ReLU and top-k only shrink what they pass). Top-k selections agree unless two features
    tie within rounding. Two-order bounds, so one float64 side is covered twice over."""
    feats = [coder.encode(i, x) for i, x in enumerate(xs)]
    terms = []
    for i, x in enumerate(xs):
        pre = x if coder.pre_bias[i] is None else x - coder.pre_bias[i]
        size = pre.abs() @ coder.W_enc[i].abs() + coder.b_enc[i].abs()
        terms.append(torch.where(feats[i] != 0, size, 0.0))
    encoder = f32_sum(max(x.shape[-1] for x in xs) + 3)
    bounds = []
    for j, x in enumerate(xs[:len(coder.writes)]):
        sources = [i for i in range(j + 1) if (i, j) in coder.W_dec]
        size = coder.b_dec[j].abs() + sum(terms[i] @ coder.W_dec[(i, j)].abs() for i in sources)
        active = sum((feats[i] != 0).sum(-1) for i in sources)
        width = x.shape[-1] if coder.W_skip[j] is not None else 0
        if width:
            size = size + x.abs() @ coder.W_skip[j].abs().T
        n_dec = int(active.max()) + width + 2
        bounds.append(float(((encoder + f32_sum(n_dec)) * size).max()))
    return bounds
