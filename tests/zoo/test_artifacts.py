"""The committed zoo: intact, loadable through the real loaders, and as good as recorded."""

from __future__ import annotations

import pytest
import torch

from saebench import loading
from saebench.zoo import corpus, paths
from saebench.zoo.quality import task_accuracy


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


@pytest.mark.parametrize("name", loading.zoo_dictionary_names())
def test_dictionary_loads_and_error_term_gives_clean_logits(zoo_model, name):
    sae = loading.load_zoo_dictionary(name)
    read = sae.cfg.metadata.hook_name
    write = sae.cfg.metadata.hook_name_out or read
    assert read in zoo_model.hook_dict and write in zoo_model.hook_dict
    tokens = loading.load_heldout_tokens()[:4]
    _, cache = zoo_model.run_with_cache(tokens, names_filter=[read, write])
    recon = sae.decode(sae.encode(cache[read])).reshape(cache[write].shape)
    assert not torch.allclose(recon, cache[write], atol=1e-3)

    def with_error(act, hook):
        return recon + (act - recon)

    clean = zoo_model(tokens)
    spliced = zoo_model.run_with_hooks(tokens, fwd_hooks=[(write, with_error)])
    torch.testing.assert_close(spliced, clean, atol=1e-5, rtol=0)
