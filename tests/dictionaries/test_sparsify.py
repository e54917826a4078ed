"""`sparsify:` dictionaries: directories EleutherAI's sparsify wrote, probed from their files,
read without sparsify, and computed as sparsify computes them: against a float64
re-implementation of its equations here, and against sparsify itself where it is installed."""

from __future__ import annotations

import json
import math
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from saebench import resolve
from saebench.checks import RunSettings, SuiteRun
from saebench.dictionaries.sparsify import SparsifyCoder, sparsify_hooks
from saebench.splice import Dictionary, random_like, splice_hooks
from saebench.suite import DictionarySpec, SuiteError, load_suite

HOOK = "blocks.2.hook_resid_pre"
K, LATENTS, D_MODEL = 8, 512, 128
VARIANTS = {  # name -> cfg.json keys beyond num_latents and k
    "topk": {},
    "groupmax": {"activation": "groupmax"},
    "transcoder": {"transcode": True},
    "skip-transcoder": {"transcode": True, "skip_connection": True},
    "skip-sae": {"skip_connection": True},
}


def _tensors(cfg: dict, seed: int = 0, dtype: torch.dtype = torch.float64
             ) -> dict[str, torch.Tensor]:
    """Random weights of a sparsify coder of `cfg`, as sparsify stores them."""
    g = torch.Generator().manual_seed(seed)
    d, n = cfg["d_in"], cfg["num_latents"]
    tensors = {"encoder.weight": torch.randn(n, d, generator=g, dtype=dtype) * 0.2,
               "encoder.bias": torch.randn(n, generator=g, dtype=dtype) * 0.1,
               "W_dec": torch.randn(n, d, generator=g, dtype=dtype) * 0.05,
               "b_dec": torch.randn(d, generator=g, dtype=dtype) * 0.1}
    if cfg.get("skip_connection"):
        tensors["W_skip"] = torch.randn(d, d, generator=g, dtype=dtype) * 0.02
    return tensors


def _write(directory: Path, variant: str = "topk", seed: int = 0,
           stored: torch.dtype = torch.float64, **changes) -> tuple[Path, dict, dict]:
    """A sparsify directory (cfg.json + sae.safetensors, as `save_to_disk` writes them)."""
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
           "num_latents": LATENTS, "k": K, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": D_MODEL, **VARIANTS[variant], **changes}
    tensors = _tensors(cfg, seed, stored)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "sae.safetensors"))
    return directory, cfg, tensors


def _reference(cfg: dict, tensors: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dense features, reconstruction) by sparsify's documented equations, in float64
    numpy, one row at a time: relu of the encoder (on x - b_dec for an SAE), the k largest
    (or each of k contiguous groups' largest) kept, decoded, plus x @ W_skip.T."""
    w = {k: v.double().numpy() for k, v in tensors.items()}
    feats, outs = np.zeros((len(x), cfg["num_latents"])), np.zeros_like(x)
    for r, row in enumerate(x):
        given = row if cfg["transcode"] else row - w["b_dec"]
        pre = np.maximum(w["encoder.weight"] @ given + w["encoder.bias"], 0)
        if cfg["activation"] == "topk":
            keep = np.argsort(-pre, kind="stable")[:cfg["k"]]
        else:
            size = cfg["num_latents"] // cfg["k"]
            keep = [g * size + int(np.argmax(pre[g * size:(g + 1) * size]))
                    for g in range(cfg["k"])]
        feats[r, keep] = pre[keep]
        outs[r] = feats[r] @ w["W_dec"] + w["b_dec"]
        if "W_skip" in w:
            outs[r] += w["W_skip"] @ row
    return feats, outs


def _spec(directory: Path, hook: str | None = None, hook_out: str | None = None,
          line: int = 0) -> DictionarySpec:
    return DictionarySpec("s", "sparsify", str(directory), hook=hook, hook_out=hook_out,
                          line=line)


def _loaded(spec: DictionarySpec) -> Dictionary:
    (d,) = resolve.adapt(spec, resolve.resolve_dictionary(spec, device="cpu"))
    return d


def _hook(variant: str) -> str | None:
    return None if "transcoder" in variant else HOOK


def _name(variant: str) -> str:
    return "layers.2.mlp" if "transcoder" in variant else variant


def test_probe_reads_widths_hooks_and_architecture_from_the_files(tmp_path):
    sae_dir, _, _ = _write(tmp_path / "sae")
    info = resolve.probe_dictionary(_spec(sae_dir, HOOK))
    assert (info.read_hook, info.write_hook) == (HOOK, HOOK)
    assert (info.d_in, info.d_out, info.d_sae, info.architecture) == (
        D_MODEL, D_MODEL, LATENTS, "sparsify-topk")
    assert info.identity["source"] == f"sparsify:{sae_dir}"
    assert len(info.identity["sha256"]) == 16
    tc_dir, _, _ = _write(tmp_path / "layers.2.mlp", "skip-transcoder")
    info = resolve.probe_dictionary(_spec(tc_dir))
    assert (info.read_hook, info.write_hook, info.architecture) == (
        "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out", "sparsify-skip-transcoder")


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_and_decode_are_sparsifys_equations_in_float64(tmp_path, variant):
    directory, cfg, tensors = _write(tmp_path / _name(variant), variant)
    d = _loaded(_spec(directory, _hook(variant)))
    x = torch.randn(2, 5, D_MODEL, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    feats, recon = _reference(cfg, tensors, x.flatten(0, 1).numpy())
    got = d.encode(x)
    assert got.dtype == torch.float64 and got.shape == (2, 5, LATENTS) and d.d_sae == LATENTS
    np.testing.assert_allclose(got.flatten(0, 1).numpy(), feats, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d.decode(got, x=x).flatten(0, 1).numpy(), recon,
                               rtol=1e-12, atol=1e-12)
    assert d.is_transcoder == ("transcoder" in variant)


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(1, 6), size=st.integers(1, 5), rows=st.integers(1, 4),
       seed=st.integers(0, 2**16), groupmax=st.booleans())
def test_each_row_keeps_its_k_largest_or_each_groups_largest_pre_activations(
        groups, size, rows, seed, groupmax):
    """Invariants of the activation: the kept features are relu'd pre-activations, at most
    k per row (one per group for groupmax), and none left out exceeds a kept one (of its
    group)."""
    cfg = {"d_in": 3, "d_sae": groups * size, "k": groups, "transcode": True,
           "activation": "groupmax" if groupmax else "topk"}
    g = torch.Generator().manual_seed(seed)
    tensors = {"encoder.weight": torch.randn(groups * size, 3, generator=g, dtype=torch.float64),
               "encoder.bias": torch.randn(groups * size, generator=g, dtype=torch.float64),
               "W_dec": torch.zeros(groups * size, 3, dtype=torch.float64),
               "b_dec": torch.zeros(3, dtype=torch.float64)}
    coder = SparsifyCoder(tensors, cfg, "a", "a")
    x = torch.randn(rows, 3, generator=g, dtype=torch.float64)
    pre = torch.relu(x @ tensors["encoder.weight"].T + tensors["encoder.bias"])
    feats = coder.encode(x)
    kept = feats != 0
    assert torch.equal(feats[kept], pre[kept])
    if groupmax:
        assert ((kept.unflatten(-1, (groups, size))).sum(-1) <= 1).all()
        assert torch.equal(feats.unflatten(-1, (groups, size)).max(-1).values,
                           pre.unflatten(-1, (groups, size)).max(-1).values)
    else:
        assert (kept.sum(-1) <= groups).all()
        low = torch.where(kept, pre, torch.inf).min(-1).values
        assert (torch.where(kept, -torch.inf, pre).max(-1).values <= low).all()


def test_an_sae_keeps_its_stored_dtype_and_reads_any_input_dtype(tmp_path):
    directory, _, _ = _write(tmp_path / "sae", stored=torch.float32)
    d = _loaded(_spec(directory, HOOK))
    feats = d.encode(torch.randn(3, D_MODEL, dtype=torch.float64))
    assert feats.dtype == torch.float32 and d.module.W_dec.dtype == torch.float32


def test_the_random_baseline_permutes_the_stored_weights(tmp_path):
    directory, _, tensors = _write(tmp_path / "sae", "skip-sae")
    d = _loaded(_spec(directory, HOOK))
    fresh = random_like(d, seed=0).module
    for name in ("encoder.weight", "W_dec", "W_skip"):
        new = fresh.get_parameter(name)
        assert not torch.equal(new, tensors[name])
        assert torch.equal(new.flatten().sort().values, tensors[name].flatten().sort().values)


def test_keys_of_training_and_of_older_releases_change_nothing(tmp_path):
    directory, cfg, tensors = _write(tmp_path / "sae", signed=False, dtype="bfloat16",
                                     multi_topk=True, normalize_decoder=False)
    d = _loaded(_spec(directory, HOOK))
    x = torch.randn(4, D_MODEL, dtype=torch.float64)
    np.testing.assert_allclose(d.decode(d.encode(x)).numpy(),
                               _reference(cfg, tensors, x.numpy())[1], rtol=1e-12, atol=1e-12)


def test_loading_needs_no_sparsify(tmp_path, monkeypatch):
    directory, cfg, tensors = _write(tmp_path / "sae")
    monkeypatch.setitem(sys.modules, "sparsify", None)  # `import sparsify` fails
    d = _loaded(_spec(directory, HOOK))
    x = torch.randn(4, D_MODEL, dtype=torch.float64)
    np.testing.assert_allclose(d.decode(d.encode(x)).numpy(),
                               _reference(cfg, tensors, x.numpy())[1], rtol=1e-12, atol=1e-12)


def test_a_suite_measures_a_sparsify_sae(tmp_path):
    _write(tmp_path / "sae", stored=torch.float32)
    (tmp_path / "s.yaml").write_text(textwrap.dedent(f"""\
        model: zoo
        data: {{source: zoo, n_tokens: 1024}}
        dictionaries: {{s: {{sparsify: sae, hook: {HOOK}}}}}
        defaults: {{options: {{n_boot: 50}}}}
        checks:
          - {{metric: l0, dictionaries: [s]}}
          - {{metric: ce_loss_recovered, dictionaries: [s]}}
        """))
    run = SuiteRun(load_suite(tmp_path / "s.yaml"), RunSettings(device="cpu"))
    l0, ce = (run.result(check) for check in run.suite.checks)
    assert l0["value"] == K and l0["source"] == f"sparsify:{tmp_path / 'sae'}"
    assert math.isfinite(ce["value"]) and ce["value"] < 1


@pytest.mark.parametrize(("module", "transcode", "hooks"), [
    ("layers.6", False, ("blocks.6.hook_resid_post", "blocks.6.hook_resid_post")),
    ("layers.6", True, ("blocks.6.hook_resid_pre", "blocks.6.hook_resid_post")),
    ("layers.6.mlp", False, ("blocks.6.hook_mlp_out", "blocks.6.hook_mlp_out")),
    ("layers.6.mlp", True, ("blocks.6.ln2.hook_normalized", "blocks.6.hook_mlp_out")),
    ("h.0.mlp", True, ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")),
    ("layers.6.self_attn", False, ("blocks.6.hook_attn_out", "blocks.6.hook_attn_out")),
    ("embed_tokens", False, None),
])
def test_module_names_map_to_hooks(module, transcode, hooks):
    assert sparsify_hooks(module, transcode) == hooks


def test_an_unmappable_directory_without_hook_is_a_located_error(tmp_path):
    directory, _, _ = _write(tmp_path / "embed_tokens")
    with pytest.raises(SuiteError, match=r"s\.yaml:3: dictionaries\.s: .*embed_tokens.*"
                                         r"cannot tell the hooks .* give hook:$"):
        resolve.probe_dictionary(_spec(directory, line=3), suite_path=tmp_path / "s.yaml")
    assert resolve.probe_dictionary(_spec(directory, HOOK)).read_hook == HOOK


def _drop_bias(directory: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(directory / "sae.safetensors")
    del tensors["encoder.bias"]
    save_file(tensors, str(directory / "sae.safetensors"))


def _mixed_dtypes(directory: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(directory / "sae.safetensors")
    tensors["b_dec"] = tensors["b_dec"].float()
    save_file(tensors, str(directory / "sae.safetensors"))


def _cfg(**changes) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        cfg = json.loads((directory / "cfg.json").read_text())
        (directory / "cfg.json").write_text(json.dumps({**cfg, **changes}))
    return change


# damage -> message after `dictionaries.s: <directory>...`
REFUSED = {
    "unknown key": (_cfg(sparsity="l1"), r"unknown key\(s\) \['sparsity'\]; sparsify's keys"),
    "signed": (_cfg(signed=True), r"signed: True is not supported \(only false\)"),
    "activation": (_cfg(activation="batchtopk"), r"unknown activation 'batchtopk'"),
    "k above latents": (_cfg(k=LATENTS + 1), r"k=513 is more than its 512 latents"),
    "groupmax groups": (_cfg(activation="groupmax", k=7), r"does not divide them"),
    "k a string": (_cfg(k="8"), r"k must be an integer >= 1, got '8'"),
    "no d_in": (lambda d: (d / "cfg.json").write_text('{"k": 8}'), r"no d_in"),
    "skip not stored": (_cfg(skip_connection=True), r"missing \['W_skip'\]"),
    "tensor missing": (_drop_bias, r"missing \['encoder\.bias'\]"),
    "skip not in cfg": (lambda d: (_write(d, "skip-sae"), _cfg(skip_connection=False)(d)),
                        r"unexpected \['W_skip'\] \(sparsify loads exactly encoder\.weight, "
                        r"encoder\.bias, W_dec, b_dec for this cfg\.json\)"),
    "mixed dtypes": (_mixed_dtypes, r"tensors must share one floating dtype"),
    "width": (_cfg(num_latents=256), r"encoder\.weight has shape \[512, 128\], but cfg\.json "
                                     r"says \[256, 128\]"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_directory_sparsify_would_not_load_is_a_located_error(tmp_path, case):
    damage, message = REFUSED[case]
    directory, _, _ = _write(tmp_path / "sae")
    damage(directory)
    with pytest.raises(SuiteError) as err:
        resolve.probe_dictionary(_spec(directory, HOOK, line=3), suite_path=tmp_path / "s.yaml")
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 's.yaml'}:3: dictionaries.s: ") and "\n" not in text
    assert re.search(message, text), text


def test_a_skip_transcoder_splices_as_the_equations_and_its_error_term_gives_clean(
        tmp_path, zoo_model, no_grad_one_thread):
    directory, cfg, tensors = _write(tmp_path / "layers.2.mlp", "skip-transcoder",
                                     stored=torch.float32)
    d = _loaded(_spec(directory))
    tokens = torch.randint(0, zoo_model.cfg.d_vocab, (2, 12),
                           generator=torch.Generator().manual_seed(0))
    captured: dict = {}

    def capture(act, hook):
        captured["x"] = act

    def replace(act, hook):
        x = captured["x"].flatten(0, 1).double().numpy()
        return torch.from_numpy(_reference(cfg, tensors, x)[1]).view_as(act).to(act.dtype)

    reference = zoo_model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.2.ln2.hook_normalized", capture), ("blocks.2.hook_mlp_out", replace)])
    spliced = zoo_model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d]))
    torch.testing.assert_close(spliced, reference, atol=1e-4, rtol=0)
    record: dict = {}
    with_error = zoo_model.run_with_hooks(
        tokens, fwd_hooks=splice_hooks([d], error_term=True, record=record))
    assert torch.equal(with_error, zoo_model(tokens))
    assert not torch.allclose(record[d.name]["recon"], record[d.name]["target"], atol=1e-3)


# ---------------------------------------------------------------------------- sparsify itself

@pytest.mark.parametrize("variant", VARIANTS)
def test_sparsify_loads_the_same_directory_to_the_same_numbers(tmp_path, variant):
    """The reference: sparsify's own `SparseCoder.load_from_disk` and forward, in float64,
    on a directory its `save_to_disk` wrote with random weights."""
    sparsify = pytest.importorskip("sparsify", reason="sparsify (the dev extra) is the "
                                                      "reference this test compares against")
    cfg = {"num_latents": LATENTS, "k": K, **VARIANTS[variant]}
    coder = sparsify.SparseCoder(D_MODEL, sparsify.SparseCoderConfig(**cfg), dtype=torch.float64)
    tensors = _tensors({"d_in": D_MODEL, **cfg})
    coder.load_state_dict(tensors)
    directory = tmp_path / _name(variant)
    coder.save_to_disk(directory)
    d = _loaded(_spec(directory, _hook(variant)))
    x = torch.randn(20, D_MODEL, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        reference = coder(x)
        top = coder.encode(x)
        feats = d.encode(x)
        torch.testing.assert_close(feats.gather(-1, top.top_indices), top.top_acts,
                                   rtol=1e-12, atol=1e-12)
        assert int((feats != 0).sum()) <= int((top.top_acts != 0).sum())
        torch.testing.assert_close(d.decode(feats, x=x), reference.sae_out,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(d.module.decode(feats),
                                   coder.decode(top.top_acts, top.top_indices),
                                   rtol=1e-12, atol=1e-12)
