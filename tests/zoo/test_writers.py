"""The zoo's own-loop dictionaries, written by the tiny build, read back by each format's own
reader and reconstructing as `saebench.zoo.formats` reads them (which the build checked
against the trained dictionary)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from sae_lens.util import get_special_token_ids
from safetensors.torch import load_file
from tolerances import PASS_MARGIN, float64_copy
from zoo_readers import (
    NEW_FORMATS,
    circuit_tracer_reference,
    dl_name,
    f32_bound,
    own_reconstruction,
    spec_of,
)

from saebench import loading
from saebench.zoo import formats, paths
from saebench.zoo.build import BuildSettings

N_LAYERS = BuildSettings.tiny().model.n_layers
NAMES = (*NEW_FORMATS, dl_name(N_LAYERS))


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of a safetensors file's tensors, all of them float32."""
    tensors = load_file(path)
    assert {t.dtype for t in tensors.values()} == {torch.float32}, path
    return {name: tuple(t.shape) for name, t in tensors.items()}


@pytest.fixture(scope="module")
def tiny_model(tiny_zoo):
    return loading.load_zoo_model(zoo=tiny_zoo[0])


@pytest.fixture(scope="module")
def tiny_cache(tiny_zoo, tiny_model):
    tokens = loading.load_heldout_tokens(zoo=tiny_zoo[0])
    _, cache = tiny_model.run_with_cache(tokens)
    return tokens, cache


@pytest.mark.parametrize("name", NAMES)
def test_each_format_reads_back_as_written(tiny_zoo, tiny_cache, name):
    out, manifest = tiny_zoo
    spec = spec_of(manifest, name)
    directory = out / paths.dictionary_dir(name)
    _, cache = tiny_cache
    coder = formats.read(spec, directory)
    xs = [cache[hook].double() for hook in spec.reads]
    expected = coder.reconstruct(xs)
    got = own_reconstruction(spec, directory, cache)
    assert len(got) == len(spec.writes) == len(coder.writes)
    assert coder.reads == spec.reads and coder.writes == spec.writes
    # float32 against float64: `f32_bound`; a misread tensor moves the output by O(1)
    for hook, g, e, tol in zip(spec.writes, got, expected, f32_bound(coder, xs), strict=True):
        torch.testing.assert_close(g.double(), e, atol=tol, rtol=0, msg=hook)


def test_sparsify_directory_is_what_save_to_disk_writes(tiny_zoo):
    out, manifest = tiny_zoo
    spec = spec_of(manifest, "sparsify-L1-topk16")
    directory = out / paths.dictionary_dir(spec.name)
    cfg = json.loads((directory / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"]) == (spec.d_in, spec.d_sae, 16)
    assert not cfg["transcode"] and not cfg["skip_connection"]
    assert _shapes(directory / "sae.safetensors") == {
        "encoder.weight": (spec.d_sae, spec.d_in), "encoder.bias": (spec.d_sae,),
        "W_dec": (spec.d_sae, spec.d_in), "b_dec": (spec.d_in,)}


def test_dictionary_learning_directory_maps_to_its_hook(tiny_zoo):
    from saebench.dictionaries import get_format
    from saebench.suite import DictionarySpec as Entry

    out, manifest = tiny_zoo
    spec = spec_of(manifest, dl_name(N_LAYERS))
    directory = out / paths.dictionary_dir(spec.name)
    info = get_format("dictionary_learning").probe(
        Entry(spec.name, "dictionary_learning", str(directory)), None)
    assert (info.read_hook, info.write_hook) == (spec.hook, spec.hook)
    assert (info.d_in, info.d_sae, info.architecture) == (
        spec.d_in, spec.d_sae, "dictionary_learning-AutoEncoderTopK")
    state = torch.load(directory / formats.DL_WEIGHTS, weights_only=True)
    assert {k: v.dtype for k, v in state.items()} == {
        "encoder.weight": torch.float32, "encoder.bias": torch.float32,
        "decoder.weight": torch.float32, "b_dec": torch.float32, "k": torch.int32,
        "threshold": torch.float32}
    assert int(state["k"]) == spec.k


def test_skip_transcoder_is_a_sae_lens_skip_transcoder_with_a_trained_skip(tiny_zoo):
    from sae_lens import SAE, SkipTranscoder

    out, manifest = tiny_zoo
    spec = spec_of(manifest, "skip-transcoder-L1")
    sae = SAE.load_from_disk(str(out / paths.dictionary_dir(spec.name)))
    assert isinstance(sae, SkipTranscoder)
    assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out) == (
        spec.hook, spec.hook_out)
    assert sae.W_skip.abs().sum() > 0


@pytest.mark.parametrize(("name", "kind"), [("ct-transcoders", "transcoder_set"),
                                            ("ct-clt", "cross_layer_transcoder")])
def test_circuit_tracer_directories_hold_the_documented_files(tiny_zoo, name, kind):
    out, manifest = tiny_zoo
    spec = spec_of(manifest, name)
    directory = out / paths.dictionary_dir(name)
    assert yaml.safe_load((directory / formats.CT_CONFIG).read_text()) == {
        "model_kind": kind, "model_name": "saebench-zoo",
        "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}
    d, f = spec.d_in, spec.d_sae
    expected = {}
    for i in range(N_LAYERS):
        if kind == "transcoder_set":
            expected[f"layer_{i}.safetensors"] = {"W_enc": (f, d), "W_dec": (f, d),
                                                  "b_enc": (f,), "b_dec": (d,)}
        else:
            expected[f"W_enc_{i}.safetensors"] = {f"W_enc_{i}": (f, d), f"b_enc_{i}": (f,),
                                                  f"b_dec_{i}": (d,)}
            expected[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": (f, N_LAYERS - i, d)}
    for file, tensors in expected.items():
        assert _shapes(directory / file) == tensors, file
    assert {p.name for p in directory.glob("*.safetensors")} == set(expected)


def test_recorded_clt_fvu_and_l0_are_the_equations_on_the_heldout_tokens(tiny_zoo, tiny_cache,
                                                                         tiny_model):
    """The record is rounded to 4 decimals (±5e-5). The build ran its own batches, whose
    float32 activations differ from this pass's by rounding: by `PASS_MARGIN` × how far
    this float32 pass's FVU is from a float64 pass's. A wrong equation (a missing layer's
    contribution, an uncentred variance) moves an FVU by more than 1e-2."""
    out, manifest = tiny_zoo
    spec = spec_of(manifest, "ct-clt")
    tokens, cache = tiny_cache
    with torch.no_grad():
        _, exact = float64_copy(tiny_model).run_with_cache(tokens)
    keep = ~torch.isin(tokens, torch.tensor(list(get_special_token_ids(tiny_model.tokenizer))))
    recorded = manifest["quality"]["dictionaries"]["ct-clt"]
    directory = out / paths.dictionary_dir("ct-clt")

    def fvus(acts) -> list[float]:
        recons = circuit_tracer_reference(directory, acts)
        targets = [acts[hook].double()[keep] for hook in spec.writes]
        return [float((r[keep] - t).pow(2).sum() / (t - t.mean(0)).pow(2).sum())
                for r, t in zip(recons, targets, strict=True)]

    for hook, fvu, fvu_exact in zip(spec.writes, fvus(cache), fvus(exact), strict=True):
        tol = 5e-5 + PASS_MARGIN * abs(fvu - fvu_exact)
        assert abs(fvu - recorded["fvu_per_hook"][hook]) <= tol, hook
    assert set(recorded["l0_per_hook"]) == set(spec.reads)
    assert 0 <= recorded["next_token_agreement"] <= 1
