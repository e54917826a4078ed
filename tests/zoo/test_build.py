"""A smoke run of the whole zoo build with tiny settings (seconds), every step exercised, and
the partial build that retrains only some dictionaries into an existing zoo."""

from __future__ import annotations

import json
import shutil

import pytest

from saebench import loading
from saebench.zoo import corpus, paths
from saebench.zoo.build import BuildError, BuildSettings, build, build_dictionaries, pack

IDENTITY_FILE = {"sae_lens": "cfg.json", "sparsify": "cfg.json",
                 "dictionary_learning": "config.json", "circuit_tracer": "config.yaml"}


def _sae_lens_names(manifest: dict) -> list[str]:
    return [n for n, d in manifest["dictionaries"].items() if d["format"] == "sae_lens"]


def test_tiny_build_writes_every_artifact(tiny_zoo):
    out, manifest = tiny_zoo
    assert json.loads((out / paths.MANIFEST).read_text()) == manifest
    for rel, digest in manifest["artifacts"].items():
        assert paths.sha256(out / rel) == digest
    for name, spec in manifest["dictionaries"].items():
        assert name in manifest["quality"]["dictionaries"]
        assert (out / paths.dictionary_dir(name) / IDENTITY_FILE[spec["format"]]).is_file()
    for task in corpus.TASKS:
        assert (out / paths.task_file(task)).is_file()
    assert manifest["training_tokens"]["shape"][1] == BuildSettings.tiny().model.n_ctx


def test_tiny_build_loads_through_the_real_loaders(tiny_zoo):
    out, manifest = tiny_zoo
    model = loading.load_zoo_model(zoo=out)
    assert model.cfg.n_layers == BuildSettings.tiny().model.n_layers
    for name in _sae_lens_names(manifest):
        sae = loading.load_zoo_dictionary(name, zoo=out)
        assert sae.cfg.metadata.hook_name in model.hook_dict
    assert loading.load_heldout_tokens(zoo=out).shape[1] == model.cfg.n_ctx
    assert len(loading.load_task("ioi", zoo=out)) == BuildSettings.tiny().n_task_prompts
    assert "dictionary" in loading.zoo_summary(out)


def test_catalogue_has_every_kind_of_dictionary(tiny_zoo):
    _, manifest = tiny_zoo
    specs = manifest["dictionaries"].values()
    hooks = {s["hook"].split(".", 2)[-1] for s in specs}
    assert {"hook_resid_pre", "hook_resid_post", "hook_mlp_out", "mlp.hook_post",
            "attn.hook_z", "ln2.hook_normalized"} <= hooks
    assert {"transcoder", "skip_transcoder", "transcoder_set", "clt"} <= {
        s["architecture"] for s in specs}
    assert set(IDENTITY_FILE) == {s["format"] for s in specs}
    assert any(s["token_fraction"] < 0.1 for s in specs)


def test_tiny_build_is_deterministic(tiny_zoo, tmp_path):
    out, manifest = tiny_zoo
    again = build(tmp_path, BuildSettings.tiny())
    for rel in ("tokens/heldout.safetensors", "tasks/ioi.jsonl", "tokenizer/tokenizer.json",
                "model/model.safetensors"):
        assert again["artifacts"][rel] == manifest["artifacts"][rel], rel
    assert again["training_tokens"] == manifest["training_tokens"]


@pytest.fixture
def zoo_copy(tiny_zoo, tmp_path):
    out, manifest = tiny_zoo
    copy = tmp_path / "zoo"
    shutil.copytree(out, copy)
    return copy, manifest


def test_partial_build_retrains_the_named_dictionaries_as_the_full_build_did(zoo_copy):
    zoo, before = zoo_copy
    shutil.rmtree(zoo / paths.dictionary_dir("ct-clt"))
    (zoo / paths.dictionary_dir("sparsify-L1-topk16") / "stale.txt").write_text("x")
    after = build_dictionaries(zoo, BuildSettings.tiny(), ["ct-clt", "sparsify-L1-topk16"])
    assert json.loads((zoo / paths.MANIFEST).read_text()) == after == before
    files = {p.relative_to(zoo).as_posix() for p in zoo.rglob("*")
             if p.is_file() and p.name != paths.MANIFEST}
    assert files == set(after["artifacts"])
    for rel, digest in after["artifacts"].items():
        assert paths.sha256(zoo / rel) == digest, rel


def test_partial_build_records_a_missing_fingerprint_and_refuses_a_wrong_one(zoo_copy):
    zoo, before = zoo_copy
    manifest = dict(before)
    del manifest["training_tokens"]
    (zoo / paths.MANIFEST).write_text(json.dumps(manifest))
    after = build_dictionaries(zoo, BuildSettings.tiny(), ["dl-L1-topk16"])
    assert after["training_tokens"] == before["training_tokens"]
    wrong = {**after, "training_tokens": {**after["training_tokens"], "sha256": "0" * 64}}
    (zoo / paths.MANIFEST).write_text(json.dumps(wrong))
    with pytest.raises(BuildError, match="training tokens differ"):
        build_dictionaries(zoo, BuildSettings.tiny(), ["dl-L1-topk16"])


def test_partial_build_refuses_what_it_cannot_match(zoo_copy):
    zoo, before = zoo_copy
    with pytest.raises(BuildError, match="no dictionary nope in the catalogue"):
        build_dictionaries(zoo, BuildSettings.tiny(), ["nope"])
    with pytest.raises(BuildError, match="other settings"):
        build_dictionaries(zoo, BuildSettings(**{**BuildSettings.tiny().__dict__, "seed": 1}),
                           ["ct-clt"])
    changed = json.loads((zoo / paths.MANIFEST).read_text())
    changed["artifacts"][paths.task_file("ioi")] = "0" * 64
    (zoo / paths.MANIFEST).write_text(json.dumps(changed))
    with pytest.raises(BuildError, match="tasks/ioi.jsonl does not match"):
        build_dictionaries(zoo, BuildSettings.tiny(), ["ct-clt"])
    changed = {**before, "dictionaries": {**before["dictionaries"]}}
    changed["dictionaries"]["transcoder-L1"] = {
        **changed["dictionaries"]["transcoder-L1"], "l1_coefficient": 9.0}
    (zoo / paths.MANIFEST).write_text(json.dumps(changed))
    with pytest.raises(BuildError, match="transcoder-L1 is not the catalogue's"):
        build_dictionaries(zoo, BuildSettings.tiny(), ["ct-clt"])


def test_cli_builds_named_dictionaries_into_a_zoo(zoo_copy, capsys):
    from saebench.cli import main

    zoo, before = zoo_copy
    shutil.rmtree(zoo / paths.dictionary_dir("skip-transcoder-L1"))
    args = ["zoo", "build", "--tiny", "--out", str(zoo), "--dictionaries"]
    assert main([*args, "skip-transcoder-L1, ct-transcoders"]) == 0
    assert json.loads((zoo / paths.MANIFEST).read_text()) == before
    assert main([*args, "nope"]) == 2
    assert "no dictionary nope in the catalogue" in capsys.readouterr().err


def test_pack_starts_every_row_with_bos():
    rows = pack([[5, 6, 7], [8, 9]], bos=1, n_ctx=3)
    assert rows.tolist() == [[1, 1, 5], [1, 6, 7], [1, 1, 8]]
