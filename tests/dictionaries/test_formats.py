"""The dictionary format registry: a new format is one registration, and the suite parser,
the probe and the loader all go through it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from saebench import loading
from saebench.checks import RunSettings, SuiteRun
from saebench.dictionaries import (
    FORMATS,
    DictionaryInfo,
    Format,
    get_format,
    register_format,
)
from saebench.suite import SuiteError, load_suite


def _named(spec) -> str:
    return (Path(spec.ref) / "name.txt").read_text().strip()


def _probe(spec, suite_path):
    return DictionaryInfo(spec.hook or "blocks.2.hook_resid_pre",
                          spec.hook_out or spec.hook or "blocks.2.hook_resid_pre",
                          128, 128, 1024, {"source": f"named:{_named(spec)}"}, "topk")


def _load(spec, device, suite_path, allow_factory=False):
    return loading.load_zoo_dictionary(_named(spec), device)


@pytest.fixture
def named_format():
    fmt = register_format(Format(name="named", ref="directory", probe=_probe, load=_load,
                                 summary="a file naming a zoo dictionary"))
    yield fmt
    del FORMATS["named"]


def test_a_new_format_is_one_registration(tmp_path, named_format):
    (tmp_path / "saes" / "mine").mkdir(parents=True)
    (tmp_path / "saes" / "mine" / "name.txt").write_text("resid-L2-topk16\n")
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""\
        model: zoo
        data: {source: zoo, n_tokens: 1024}
        dictionaries: {mine: {named: saes/mine}}
        defaults: {options: {n_boot: 50}}
        checks:
          - {metric: l0, dictionaries: [mine], threshold: "<= 70"}
        """))
    run = SuiteRun(load_suite(tmp_path / "s.yaml"), RunSettings(device="cpu"))
    (check,) = run.suite.checks
    row = run.result(check)
    assert row["verdict"] == "pass" and row["value"] == 16
    assert row["source"] == "named:resid-L2-topk16"
    assert run.suite.dictionaries["mine"].ref == str(tmp_path / "saes" / "mine")


def test_the_parser_takes_keys_and_messages_from_the_registry(tmp_path, named_format):
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""\
        model: zoo
        dictionaries: {mine: {named: ., sae_id: x}}
        checks:
          - {metric: l0, dictionaries: [mine]}
        """))
    with pytest.raises(SuiteError, match=r":2: dictionaries\.mine\.sae_id: does not apply to "
                                         r"named: dictionaries"):
        load_suite(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""\
        model: zoo
        dictionaries: {mine: {hook: blocks.0.hook_resid_pre}}
        checks:
          - {metric: l0, dictionaries: [mine]}
        """))
    with pytest.raises(SuiteError, match=r"give exactly one of zoo:, path:, release: \(with "
                                         r"sae_id:\), sparsify:, dictionary_learning:, "
                                         r"circuit_tracer:, factory: or named:$"):
        load_suite(tmp_path / "s.yaml")


def test_every_entry_may_name_its_hooks(tmp_path):
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""\
        model: zoo
        dictionaries:
          z: {zoo: resid-L2-topk16, hook_out: blocks.2.hook_resid_pre}
          r: {release: gpt2-small-res-jb, sae_id: blocks.0.hook_resid_pre,
              hook: blocks.0.hook_resid_pre}
        checks:
          - {metric: l0, dictionaries: [z]}
        """))
    suite = load_suite(tmp_path / "s.yaml")
    assert suite.dictionaries["z"].hook_out == "blocks.2.hook_resid_pre"
    assert suite.dictionaries["r"].hook == "blocks.0.hook_resid_pre"


def test_registering_a_name_twice_or_asking_for_an_unknown_one_is_refused(named_format):
    with pytest.raises(ValueError, match="'named' is already registered"):
        register_format(named_format)
    assert register_format(named_format, replace=True) is named_format
    with pytest.raises(KeyError, match="unknown dictionary format 'nope'; known: zoo, path, "
                                       "release, sparsify, dictionary_learning, "
                                       "circuit_tracer, factory, named"):
        get_format("nope")
    with pytest.raises(ValueError, match="ref must be one of"):
        Format(name="x", ref="url", probe=_probe, load=_load, summary="")
