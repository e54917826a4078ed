"""`dictionary_learning:` dictionaries: directories saprmarks' dictionary_learning wrote
(config.json + ae.pt), probed from their files and reconstructing by its equations."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from saebench import resolve
from saebench.checks import RunSettings, SuiteRun
from saebench.dictionaries.dictionary_learning import submodule_hook
from saebench.splice import Dictionary
from saebench.suite import DictionarySpec, SuiteError, load_suite

HOOK = "blocks.2.hook_resid_pre"
K, DICT_SIZE, D_MODEL = 8, 512, 128
CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
           "JumpReluAutoEncoder")


def _state(dict_class: str) -> dict[str, torch.Tensor]:
    """A random state dict with the keys and shapes dictionary_learning's class saves."""
    g = torch.Generator().manual_seed(CLASSES.index(dict_class))
    enc = torch.randn(DICT_SIZE, D_MODEL, generator=g) * 0.1   # [F, d], nn.Linear layout
    dec = torch.randn(D_MODEL, DICT_SIZE, generator=g) * 0.1   # [d, F]
    b_enc = torch.randn(DICT_SIZE, generator=g) * 0.05
    b_dec = torch.randn(D_MODEL, generator=g) * 0.1
    if dict_class == "AutoEncoder":
        return {"bias": b_dec, "encoder.weight": enc, "encoder.bias": b_enc,
                "decoder.weight": dec}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {"encoder.weight": enc, "encoder.bias": b_enc, "decoder.weight": dec,
                "b_dec": b_dec, "k": torch.tensor(K), "threshold": torch.tensor(0.3)}
    state = {"W_enc": enc.T.contiguous(), "b_enc": b_enc, "W_dec": dec.T.contiguous(),
             "b_dec": b_dec}
    if dict_class == "JumpReluAutoEncoder":
        return {**state, "threshold": torch.rand(DICT_SIZE, generator=g) * 0.4}
    return {**state, "k": torch.tensor(K), "threshold": torch.tensor(0.3),
            "group_sizes": torch.tensor([128, 384])}


def _saved(tmp_path: Path, dict_class: str, submodule: str | None = "resid_post_layer_3",
           state: object = None) -> Path:
    """A trainer directory as dictionary_learning writes it: ae.pt and config.json."""
    directory = tmp_path / dict_class
    directory.mkdir()
    torch.save(_state(dict_class) if state is None else state, directory / "ae.pt")
    trainer = {"dict_class": dict_class, "activation_dim": D_MODEL, "dict_size": DICT_SIZE,
               "layer": 3, "lm_name": "zoo", "submodule_name": submodule}
    if dict_class != "AutoEncoder":
        trainer["k"] = K
    (directory / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))
    return directory


def _spec(directory: Path, hook: str | None = None, line: int = 0) -> DictionarySpec:
    return DictionarySpec("s", "dictionary_learning", str(directory), hook=hook, line=line)


def _loaded(spec: DictionarySpec) -> Dictionary:
    (d,) = resolve.adapt(spec, resolve.resolve_dictionary(spec, device="cpu"))
    return d


def _reference(dict_class: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dictionary_learning's encode/decode equations for `dict_class`, in float64."""
    s = {name: t.double() for name, t in _state(dict_class).items()}
    x = x.double()
    if "W_enc" in s:
        w_enc, b_enc, w_dec = s["W_enc"], s["b_enc"], s["W_dec"]
    else:
        w_enc, b_enc, w_dec = s["encoder.weight"].T, s["encoder.bias"], s["decoder.weight"].T
    b_dec = s["bias"] if dict_class == "AutoEncoder" else s["b_dec"]
    pre = (x if dict_class == "JumpReluAutoEncoder" else x - b_dec) @ w_enc + b_enc
    if dict_class == "JumpReluAutoEncoder":
        f = torch.relu(pre * (pre > s["threshold"]))
    elif dict_class == "AutoEncoderTopK":
        acts = torch.relu(pre)
        kth = acts.topk(K, dim=-1).values[..., -1:]
        f = acts * (acts >= kth)
    elif dict_class == "AutoEncoder":
        f = torch.relu(pre)
    else:
        f = torch.relu(pre) * (torch.relu(pre) > s["threshold"])
    return f @ w_dec + b_dec, f


@pytest.mark.parametrize("dict_class", CLASSES)
def test_probe_reads_widths_hooks_and_architecture_from_the_files(tmp_path, dict_class):
    directory = _saved(tmp_path, dict_class)
    info = resolve.probe_dictionary(_spec(directory))
    assert (info.read_hook, info.write_hook) == ("blocks.3.hook_resid_post",) * 2
    assert (info.d_in, info.d_out, info.d_sae, info.architecture) == (
        D_MODEL, D_MODEL, DICT_SIZE, f"dictionary_learning-{dict_class}")
    assert info.identity["source"] == f"dictionary_learning:{directory}"
    assert len(info.identity["sha256"]) == 16
    assert resolve.probe_dictionary(_spec(directory, HOOK)).write_hook == HOOK


@pytest.mark.parametrize("dict_class", CLASSES)
def test_loaded_dictionary_reconstructs_by_dictionary_learnings_equations(tmp_path,
                                                                          dict_class):
    d = _loaded(_spec(_saved(tmp_path, dict_class), HOOK))
    x = torch.randn(2, 5, D_MODEL)
    with torch.no_grad():
        recon, feats = d.reconstruct(x)
    ref_recon, ref_feats = _reference(dict_class, x)
    torch.testing.assert_close(recon.double(), ref_recon, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats.double(), ref_feats, atol=1e-5, rtol=0)
    assert feats.shape == (2, 5, DICT_SIZE) and d.d_sae == DICT_SIZE
    assert 0 < (feats != 0).sum(-1).float().mean() < DICT_SIZE


def test_a_suite_measures_every_supported_class(tmp_path):
    names = {f"d{i}": _saved(tmp_path, c).name for i, c in enumerate(CLASSES)}
    entries = ", ".join(f"{n}: {{dictionary_learning: {path}, hook: {HOOK}}}"
                        for n, path in names.items())
    (tmp_path / "s.yaml").write_text(textwrap.dedent(f"""\
        model: zoo
        data: {{source: zoo, n_tokens: 1024}}
        dictionaries: {{{entries}}}
        defaults: {{options: {{n_boot: 50}}}}
        checks:
          - {{metric: l0, dictionaries: [{", ".join(names)}]}}
        """))
    run = SuiteRun(load_suite(tmp_path / "s.yaml"), RunSettings(device="cpu"))
    rows = {check.dictionaries[0]: run.result(check) for check in run.suite.checks}
    for name, dict_class in zip(names, CLASSES, strict=True):
        assert math.isfinite(rows[name]["value"]) and rows[name]["value"] > 0
        assert rows[name]["source"] == f"dictionary_learning:{tmp_path / dict_class}"
    assert rows["d1"]["value"] == K


@pytest.mark.parametrize(("submodule", "hook"), [
    ("resid_post_layer_3", "blocks.3.hook_resid_post"),
    ("mlp_out_layer_0", "blocks.0.hook_mlp_out"),
    ("attn_out_layer_5", "blocks.5.hook_attn_out"),
    ("model.layers.3", "blocks.3.hook_resid_post"),
    ("model.layers.3.mlp", "blocks.3.hook_mlp_out"),
    ("embed_tokens", None),
])
def test_submodule_names_map_to_hooks(submodule, hook):
    assert submodule_hook(submodule) == hook


def _located_error(directory: Path, tmp_path: Path, pattern: str) -> None:
    with pytest.raises(SuiteError, match=r"s\.yaml:3: dictionaries\.s: " + pattern):
        resolve.probe_dictionary(_spec(directory, line=3), suite_path=tmp_path / "s.yaml")


def test_an_unmappable_submodule_without_hook_is_a_located_error(tmp_path):
    directory = _saved(tmp_path, "AutoEncoder", submodule="embed_tokens")
    _located_error(directory, tmp_path, r"cannot tell the hook .*'embed_tokens'.* give hook:$")


def test_an_unknown_dict_class_is_a_located_error_listing_the_supported(tmp_path):
    directory = _saved(tmp_path, "AutoEncoder")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["trainer"]["dict_class"] = "GatedAutoEncoder"
    (directory / "config.json").write_text(json.dumps(cfg))
    _located_error(directory, tmp_path, r".*config\.json: dict_class 'GatedAutoEncoder' is "
                                        r"not supported; supported: AutoEncoder, "
                                        r"AutoEncoderTopK, BatchTopKSAE, ")


class _Pickled:
    """Not a tensor: torch.load(weights_only=True) refuses to unpickle it."""


@pytest.mark.parametrize(("state", "pattern"), [
    (_Pickled(), r".*ae\.pt: not a state dict .* a pickled object is refused$"),
    ([1, 2, 3], r".*ae\.pt: holds a list, not a state dict of tensors$"),
    ({"bias": torch.zeros(D_MODEL)}, r".*ae\.pt: no encoder\.weight \(keys: bias\)$"),
])
def test_an_ae_pt_that_is_not_the_state_dict_is_a_located_error(tmp_path, state, pattern):
    _located_error(_saved(tmp_path, "AutoEncoder", state=state), tmp_path, pattern)


def test_a_batch_topk_sae_without_a_set_threshold_is_refused(tmp_path):
    state = {**_state("BatchTopKSAE"), "threshold": torch.tensor(-1.0)}
    _located_error(_saved(tmp_path, "BatchTopKSAE", state=state), tmp_path,
                   r".*threshold is negative, so it was never set")
