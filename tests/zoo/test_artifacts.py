"""The committed zoo: intact, loadable through the real loaders, and as good as recorded."""

from __future__ import annotations

import pytest
import torch
from tolerances import f32_error
from zoo_readers import NEW_FORMATS, dl_name, f32_bound, own_reconstruction, spec_of

from saebench import loading
from saebench.zoo import corpus, formats, paths
from saebench.zoo.quality import task_accuracy

MANIFEST = loading.zoo_manifest()
SAE_LENS = [name for name, d in MANIFEST["dictionaries"].items()
            if d.get("format", "sae_lens") == "sae_lens"]
OTHERS = (*NEW_FORMATS, dl_name(MANIFEST["settings"]["model"]["n_layers"]))


def test_every_artifact_matches_its_manifest_sha256(zoo_manifest):
    root = loading.zoo_dir()
    files = {p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and p.name != paths.MANIFEST}
    assert files == set(zoo_manifest["artifacts"])
    for rel, digest in zoo_manifest["artifacts"].items():
        assert paths.sha256(root / rel) == digest, rel


def test_zoo_fits_its_size_budget():
    root = loading.zoo_dir()
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 30 * 2**20


def test_model_loads_with_tokenizer(zoo_model, zoo_manifest):
    spec = zoo_manifest["settings"]["model"]
    assert zoo_model.cfg.n_layers == spec["n_layers"]
    assert zoo_model.cfg.d_model == spec["d_model"]
    assert zoo_model.tokenizer is not None
    assert zoo_model.to_str_tokens("Mary said,")[0] == zoo_model.tokenizer.bos_token


def test_heldout_tokens(zoo_model):
    tokens = loading.load_heldout_tokens()
    assert tokens.numel() >= 50_000
    assert tokens.shape[1] == zoo_model.cfg.n_ctx
    assert (tokens[:, 0] == zoo_model.tokenizer.bos_token_id).all()
    assert int(tokens.max()) < zoo_model.cfg.d_vocab


@pytest.mark.parametrize("task", corpus.TASKS)
def test_task_prompts_round_trip_and_answers_are_single_tokens(zoo_model, task):
    rows = loading.load_task(task)
    assert len(rows) >= 200
    tok = zoo_model.tokenizer
    unk = tok.unk_token_id
    for row in rows:
        ids = tok(row.prompt, add_special_tokens=False)["input_ids"]
        assert unk not in ids, row.prompt
        assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids
        for word in (row.answer, row.distractor):
            assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word


@pytest.mark.parametrize("task", corpus.TASKS)
def test_model_solves_each_task(zoo_model, task):
    rows = [r.__dict__ for r in loading.load_task(task)[:80]]
    assert task_accuracy(zoo_model, rows) >= 0.95


def test_recorded_quality_meets_the_zoo_contract(zoo_manifest):
    quality = zoo_manifest["quality"]
    model_q = quality["model"]
    assert all(acc >= 0.95 for acc in model_q["task_accuracy"].values())
    assert model_q["heldout_ce"] < 0.5 * model_q["unigram_entropy"]
    dicts = quality["dictionaries"]
    resid = [n for n in dicts if n.startswith("resid-") and not n.endswith("-poor")]
    assert all(dicts[n]["ce_loss_score"] >= 0.85 for n in resid)
    poor = [n for n in dicts if n.endswith("-poor")]
    assert poor and all(dicts[n]["ce_loss_score"] < 0.60 for n in poor)
    sweep_l0 = [dicts[n]["l0"] for n in resid if n.startswith("resid-L2-")]
    assert len(sweep_l0) >= 4 and max(sweep_l0) >= 4 * min(sweep_l0)


def test_recorded_quality_of_the_other_formats(zoo_manifest):
    dicts = zoo_manifest["quality"]["dictionaries"]
    assert set(OTHERS) <= set(dicts)
    for name in ("sparsify-L1-topk16", OTHERS[-1]):
        assert dicts[name]["l0"] == 16 and dicts[name]["ce_loss_score"] >= 0.85, name
    assert dicts["skip-transcoder-L1"]["fvu"] < 0.3
    for name in ("ct-transcoders", "ct-clt"):
        assert all(v < 0.3 for v in dicts[name]["fvu_per_hook"].values()), name
        assert all(20 <= v <= 60 for v in dicts[name]["l0_per_hook"].values()), name
        assert 0.5 < dicts[name]["next_token_agreement"] <= 1, name


@pytest.mark.parametrize("name", OTHERS)
def test_other_formats_read_back_through_their_own_readers(zoo_model, zoo_manifest, name):
    spec = spec_of(zoo_manifest, name)
    directory = loading.zoo_dir() / paths.dictionary_dir(name)
    _, cache = zoo_model.run_with_cache(loading.load_heldout_tokens()[:2])
    coder = formats.read(spec, directory)
    xs = [cache[hook].double() for hook in spec.reads]
    expected = coder.reconstruct(xs)
    # float32 against float64: `f32_bound`; a misread tensor (transposed, its bias or skip
    # lost) moves the output by O(1), and the reconstruction is far from the activation
    for hook, got, want, tol in zip(spec.writes, own_reconstruction(spec, directory, cache),
                                    expected, f32_bound(coder, xs), strict=True):
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=0, msg=hook)
        assert (got.double() - cache[hook].double()).abs().max() > 10 * tol, hook


@pytest.mark.parametrize("name", SAE_LENS)
def test_dictionary_loads_and_error_term_gives_clean_logits(zoo_model, name):
    sae = loading.load_zoo_dictionary(name)
    read = sae.cfg.metadata.hook_name
    write = sae.cfg.metadata.hook_name_out or read
    assert read in zoo_model.hook_dict and write in zoo_model.hook_dict
    tokens = loading.load_heldout_tokens()[:4]
    _, cache = zoo_model.run_with_cache(tokens, names_filter=[read, write])
    recon = sae.decode(sae.encode(cache[read])).reshape(cache[write].shape)
    # off by far more than rounding (~1e-6 of activations of size ~10): the error term counts
    assert not torch.allclose(recon, cache[write], atol=1e-3)

    def with_error(act, hook):
        return recon + (act - recon)

    clean = zoo_model(tokens)
    spliced = zoo_model.run_with_hooks(tokens, fwd_hooks=[(write, with_error)])
    # recon + (act − recon) is act up to one rounding per element, carried to the logits as
    # any other rounding of the pass (`f32_error`, ~4e-5); a lost error term moves them by
    # the reconstruction's whole effect
    torch.testing.assert_close(spliced, clean, atol=f32_error(zoo_model, tokens), rtol=0)
