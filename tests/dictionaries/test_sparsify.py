"""`sparsify:` dictionaries: directories EleutherAI's sparsify wrote, probed from their files,
loaded by sparsify and spliced with the same outputs as sparsify's own forward."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from saebench import resolve
from saebench.checks import RunSettings, SuiteRun
from saebench.dictionaries.sparsify import sparsify_hooks
from saebench.splice import Dictionary, splice_hooks
from saebench.suite import DictionarySpec, SuiteError, load_suite

sparsify = pytest.importorskip("sparsify")

HOOK = "blocks.2.hook_resid_pre"
K, LATENTS, D_MODEL = 8, 512, 128


def _coder(transcode: bool = False, seed: int = 0) -> sparsify.SparseCoder:
    """A random sparsify coder for the zoo model: a TopK SAE, or a skip transcoder."""
    torch.manual_seed(seed)
    cfg = sparsify.SparseCoderConfig(num_latents=LATENTS, k=K, transcode=transcode,
                                     skip_connection=transcode)
    coder = sparsify.SparseCoder(D_MODEL, cfg)
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.05)
        coder.b_dec.normal_(0, 0.1)
        if transcode:
            coder.W_dec.normal_(0, 0.05)
            coder.W_skip.normal_(0, 0.02)
    return coder


def _saved(tmp_path: Path, name: str, transcode: bool = False) -> tuple[Path, object]:
    coder = _coder(transcode)
    coder.save_to_disk(tmp_path / name)
    return tmp_path / name, coder


def _spec(directory: Path, hook: str | None = None, hook_out: str | None = None,
          line: int = 0) -> DictionarySpec:
    return DictionarySpec("s", "sparsify", str(directory), hook=hook, hook_out=hook_out,
                          line=line)


def _loaded(spec: DictionarySpec) -> Dictionary:
    (d,) = resolve.adapt(spec, resolve.resolve_dictionary(spec, device="cpu"))
    return d


def test_probe_reads_widths_hooks_and_architecture_from_the_files(tmp_path):
    sae_dir, _ = _saved(tmp_path, "sae")
    info = resolve.probe_dictionary(_spec(sae_dir, HOOK))
    assert (info.read_hook, info.write_hook) == (HOOK, HOOK)
    assert (info.d_in, info.d_out, info.d_sae, info.architecture) == (
        D_MODEL, D_MODEL, LATENTS, "sparsify-topk")
    assert info.identity["source"] == f"sparsify:{sae_dir}"
    assert len(info.identity["sha256"]) == 16
    tc_dir, _ = _saved(tmp_path, "layers.2.mlp", transcode=True)
    info = resolve.probe_dictionary(_spec(tc_dir))
    assert (info.read_hook, info.write_hook, info.architecture) == (
        "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out", "sparsify-skip-transcoder")


@pytest.mark.parametrize("transcode", [False, True])
def test_loaded_dictionary_reconstructs_as_sparsify_does(tmp_path, transcode):
    directory, coder = _saved(tmp_path, "layers.2.mlp" if transcode else "sae", transcode)
    d = _loaded(_spec(directory, None if transcode else HOOK))
    x = torch.randn(2, 5, D_MODEL)
    with torch.no_grad():
        recon, feats = d.reconstruct(x)
        reference = coder(x.flatten(0, 1))
    torch.testing.assert_close(recon.flatten(0, 1), reference.sae_out, atol=1e-5, rtol=0)
    assert feats.shape == (2, 5, LATENTS) and d.d_sae == LATENTS
    assert ((feats != 0).sum(-1) == K).all()
    top = feats.flatten(0, 1).gather(-1, reference.latent_indices)
    torch.testing.assert_close(top, reference.latent_acts)
    assert d.is_transcoder == transcode


def test_a_suite_measures_a_sparsify_sae(tmp_path):
    _saved(tmp_path, "sae")
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
    directory, _ = _saved(tmp_path, "embed_tokens")
    with pytest.raises(SuiteError, match=r"s\.yaml:3: dictionaries\.s: .*embed_tokens.*"
                                         r"cannot tell the hooks .* give hook:$"):
        resolve.probe_dictionary(_spec(directory, line=3), suite_path=tmp_path / "s.yaml")
    assert resolve.probe_dictionary(_spec(directory, HOOK)).read_hook == HOOK


def test_loading_without_sparsify_says_how_to_install_it(tmp_path, monkeypatch):
    directory, _ = _saved(tmp_path, "sae")
    monkeypatch.setitem(sys.modules, "sparsify", None)
    with pytest.raises(SuiteError, match=r"s\.yaml:3: dictionaries\.s: .*pip install "
                                         r'"saebench\[sparsify\]"'):
        resolve.resolve_dictionary(_spec(directory, HOOK, line=3), device="cpu",
                                   suite_path=tmp_path / "s.yaml")


def test_a_skip_transcoder_splices_like_sparsify_and_its_error_term_gives_clean(
        tmp_path, zoo_model, no_grad_one_thread):
    directory, coder = _saved(tmp_path, "layers.2.mlp", transcode=True)
    d = _loaded(_spec(directory))
    tokens = torch.randint(0, zoo_model.cfg.d_vocab, (2, 12))
    captured: dict = {}

    def capture(act, hook):
        captured["x"] = act

    def replace(act, hook):
        return coder(captured["x"].flatten(0, 1)).sae_out.view_as(act)

    reference = zoo_model.run_with_hooks(tokens, fwd_hooks=[
        ("blocks.2.ln2.hook_normalized", capture), ("blocks.2.hook_mlp_out", replace)])
    spliced = zoo_model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d]))
    torch.testing.assert_close(spliced, reference, atol=1e-5, rtol=0)
    record: dict = {}
    with_error = zoo_model.run_with_hooks(
        tokens, fwd_hooks=splice_hooks([d], error_term=True, record=record))
    assert torch.equal(with_error, zoo_model(tokens))
    assert not torch.allclose(record[d.name]["recon"], record[d.name]["target"], atol=1e-3)
