"""A smoke run of the whole zoo build with tiny settings (seconds), every step exercised."""

from __future__ import annotations

import json

import pytest

from saebench import loading
from saebench.zoo import corpus, paths
from saebench.zoo.build import BuildSettings, build, pack


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    manifest = build(out, BuildSettings.tiny())
    return out, manifest


def test_tiny_build_writes_every_artifact(tiny_zoo):
    out, manifest = tiny_zoo
    assert json.loads((out / paths.MANIFEST).read_text()) == manifest
    for rel, digest in manifest["artifacts"].items():
        assert paths.sha256(out / rel) == digest
    names = list(manifest["dictionaries"])
    for name in names:
        assert name in manifest["quality"]["dictionaries"]
        assert (out / paths.dictionary_dir(name) / "cfg.json").is_file()
    for task in corpus.TASKS:
        assert (out / paths.task_file(task)).is_file()


def test_tiny_build_loads_through_the_real_loaders(tiny_zoo):
    out, manifest = tiny_zoo
    model = loading.load_zoo_model(zoo=out)
    assert model.cfg.n_layers == BuildSettings.tiny().model.n_layers
    for name in manifest["dictionaries"]:
        sae = loading.load_zoo_dictionary(name, zoo=out)
        assert sae.cfg.metadata.hook_name in model.hook_dict
    assert loading.load_heldout_tokens(zoo=out).shape[1] == model.cfg.n_ctx
    assert len(loading.load_task("ioi", zoo=out)) == BuildSettings.tiny().n_task_prompts
    assert "dictionary" in loading.zoo_summary(out)


def test_catalogue_has_every_kind_of_dictionary(tiny_zoo):
    _, manifest = tiny_zoo
    specs = manifest["dictionaries"].values()
    hooks = {s["hook"].split(".", 2)[-1] for s in specs}
    assert {"hook_resid_pre", "hook_mlp_out", "mlp.hook_post", "attn.hook_z",
            "ln2.hook_normalized"} <= hooks
    assert any(s["architecture"] == "transcoder" for s in specs)
    assert any(s["token_fraction"] < 0.1 for s in specs)


def test_tiny_build_is_deterministic(tiny_zoo, tmp_path):
    out, manifest = tiny_zoo
    again = build(tmp_path, BuildSettings.tiny())
    for rel in ("tokens/heldout.safetensors", "tasks/ioi.jsonl", "tokenizer/tokenizer.json",
                "model/model.safetensors"):
        assert again["artifacts"][rel] == manifest["artifacts"][rel], rel


def test_pack_starts_every_row_with_bos():
    rows = pack([[5, 6, 7], [8, 9]], bos=1, n_ctx=3)
    assert rows.tolist() == [[1, 1, 5], [1, 6, 7], [1, 1, 8]]
