"""Suite parsing and validation: every bad input is a SuiteError naming file, line and field."""

from __future__ import annotations

import copy
import json
import math
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saebench import loading
from saebench.loading import TaskPrompt
from saebench.suite import (
    OPTIONS,
    Edit,
    Suite,
    SuiteError,
    Threshold,
    load_suite,
    option_table,
    parse_threshold,
    validate_resolved,
)
from saebench.zoo import paths

KNOWN_METRICS = (
    "ce_loss_recovered", "delta_ce", "kl_div", "kl_div_score", "l0", "explained_variance", "mse",
    "cossim", "l2_ratio", "relative_reconstruction_bias", "dead_fraction", "dense_fraction",
)
FAKE_ZOO = (
    "resid-L0-topk16", "resid-L1-topk16", "resid-L2-topk16", "resid-L3-topk16",
    "resid-L2-topk4", "mlp_out-L2-relu", "mlp_post-L3-topk32", "transcoder-L3", "resid-L2-poor",
)
REAL_ZOO = paths.ARTIFACTS
SENTENCE = "When Mary and John went to the store , John gave a drink to Mary"


@pytest.fixture(scope="module")
def fake_zoo(tmp_path_factory) -> Path:
    """A zoo directory with a manifest naming FAKE_ZOO and one task, `ioi`."""
    zoo = tmp_path_factory.mktemp("zoo")
    (zoo / paths.MANIFEST).write_text(json.dumps({"dictionaries": {n: {} for n in FAKE_ZOO}}))
    task = zoo / paths.task_file("ioi")
    task.parent.mkdir(parents=True)
    task.write_text(json.dumps({"prompt": SENTENCE, "answer": "Mary", "distractor": "John"}))
    return zoo


@pytest.fixture(autouse=True)
def _use_fake_zoo(monkeypatch, fake_zoo):
    monkeypatch.setattr(paths, "ARTIFACTS", fake_zoo)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The zoo model when the zoo is built, else a tiny model with a word-level tokenizer."""
    try:
        return loading.load_zoo_model(zoo=REAL_ZOO)
    except loading.ZooError:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        from saebench.zoo.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

        directory = tmp_path_factory.mktemp("tokenizer")
        save_tokenizer(train_tokenizer([SENTENCE]), directory)
        tokenizer = load_tokenizer(directory)
        cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=32, d_head=4, n_heads=4,
                                      d_mlp=32, d_vocab=len(tokenizer), act_fn="gelu",
                                      normalization_type="LNPre", seed=0)
        return HookedTransformer(cfg, tokenizer=tokenizer)


def write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error(tmp_path: Path, text: str) -> SuiteError:
    path = write(tmp_path, text)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    return info.value


def assert_located(err: SuiteError, line: int, field: str, *fragments: str) -> None:
    assert (err.line, err.field) == (line, field), str(err)
    assert str(err).startswith(f"{err.file}:{line}: {field}: "), str(err)
    assert err.file.endswith("suite.yaml")
    for fragment in fragments:
        assert fragment in err.message, str(err)


BASE = """
model: zoo
dictionaries:
  "resid-L{layer}-topk16": {zoo: "resid-L{layer}-topk16", for: {layer: "0..3"}}
  resid-L2-poor: {zoo: resid-L2-poor}
tasks:
  ioi: {zoo: ioi}
checks:
  - metric: ce_loss_recovered
    dictionaries: ["resid-L*-topk16"]
    threshold: ">= 0.85"
"""


def test_registry_knows_the_metrics_suites_use():
    from saebench.metrics.registry import metric_names

    assert set(KNOWN_METRICS) <= set(metric_names())


def test_base_suite_loads(tmp_path):
    suite = load_suite(write(tmp_path, BASE))
    assert isinstance(suite, Suite)
    assert suite.name == "suite"
    assert suite.model.kind == "zoo" and suite.data.kind == "zoo"
    assert list(suite.dictionaries) == [f"resid-L{i}-topk16" for i in range(4)] + ["resid-L2-poor"]
    assert suite.dictionaries["resid-L3-topk16"].line == 3
    assert suite.tasks["ioi"].line == 6
    assert [c.id for c in suite.checks] == [
        f"resid-L{i}-topk16::ce_loss_recovered" for i in range(4)]


# ------------------------------------------------------------------- bad input, located

BAD = {
    "yaml syntax": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: [unclosed
        """, 5, "(yaml syntax)", "flow sequence"),
    "unquoted threshold": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            dictionaries: [a]
            threshold: >= 0.85
        """, 6, "(yaml syntax)", 'quote thresholds'),
    "unknown top-level key": ("""
        model: zoo
        dictionary: {a: {zoo: resid-L0-topk16}}
        """, 2, "dictionary", "unknown key (did you mean 'dictionaries'?)", "allowed keys"),
    "unknown check key": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            dictionaries: [a]
            treshold: ">= 1"
        """, 6, "checks[0].treshold", "unknown key", "threshold"),
    "unknown dictionary key": ("""
        model: zoo
        dictionaries:
          a:
            zoo: resid-L0-topk16
            layer: 3
        checks: [{metric: l0, dictionaries: [a]}]
        """, 5, "dictionaries.a.layer", "unknown key", "zoo, path, release"),
    "key of another dictionary kind": ("""
        model: zoo
        dictionaries:
          a: {zoo: resid-L0-topk16, sae_id: x}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 3, "dictionaries.a.sae_id", "does not apply to zoo"),
    "unknown data key": ("""
        model: zoo
        data:
          source: zoo
          tokens: 100
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 4, "data.tokens", "n_tokens"),
    "unknown model key": ("""
        model:
          name: gpt2-small
          kwargs: {}
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 3, "model.kwargs", "from_pretrained_kwargs"),
    "unknown defaults key": ("""
        model: zoo
        defaults:
          expect: fail
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 3, "defaults.expect", "options, threshold"),
    "unknown task key": ("""
        model: zoo
        tasks:
          ioi: {zoo: ioi, n: 3}
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 3, "tasks.ioi.n", "zoo, path"),
    "unknown metric": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            dictionaries: [a]
          - metric: ce_los_recovered
            dictionaries: [a]
        """, 6, "checks[1].metric", "did you mean 'ce_loss_recovered'", "known metrics: ",
        "kl_div_score"),
    "bad threshold": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            dictionaries: [a]
          - metric: l0
            dictionaries: [a]
            id: second
            threshold: "=> 3"
        """, 9, "checks[1].threshold", "bad threshold '=> 3'", ">=, >, <=, <, =="),
    "threshold as a number": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - {metric: l0, dictionaries: [a], threshold: 0.8}
        """, 4, "checks[0].threshold", "quoted string"),
    "bad default threshold": ("""
        model: zoo
        defaults:
          threshold: "ci_mid >= 1"
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 3, "defaults.threshold", "unknown target 'ci_mid'"),
    "unknown option": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: ce_loss_recovered
            dictionaries: [a]
            options:
              ablation: zero
              ablate: mean
        """, 8, "checks[0].options.ablate", "unknown option 'ablate'", "ablation", "batch_size"),
    "option of another metric": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            dictionaries: [a]
            options: {ablation: zero}
        """, 6, "checks[0].options.ablation", "l0 takes no option 'ablation'", "batch_size"),
    "bad option value": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: ce_loss_recovered
            dictionaries: [a]
            options: {ablation: resample}
        """, 6, "checks[0].options.ablation", "zero or mean"),
    "bad positions": ("""
        model: zoo
        defaults:
          options:
            positions: [1, last]
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 4, "defaults.options.positions", '"all", "answer"'),
    "missing dictionary directory": ("""
        model: zoo
        dictionaries:
          mine: {path: saes/nowhere}
        checks: [{metric: l0, dictionaries: [mine]}]
        """, 3, "dictionaries.mine.path", "'saes/nowhere' does not exist"),
    "missing task file": ("""
        model: zoo
        tasks:
          mine: {path: tasks/none.jsonl}
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 3, "tasks.mine.path", "'tasks/none.jsonl' does not exist"),
    "missing data file": ("""
        model: zoo
        data:
          source: {path: tokens.safetensors}
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 3, "data.source.path", "'tokens.safetensors' does not exist"),
    "data file of unknown kind": ("""
        model: zoo
        data:
          source:
            path: tokens.csv
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 4, "data.source.path", ".safetensors, .pt, .txt, .jsonl"),
    "missing model directory": ("""
        model: {path: models/none}
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 1, "model.path", "does not exist"),
    "unknown zoo dictionary": ("""
        model: zoo
        dictionaries:
          a: {zoo: resid-L0-topk16}
          b: {zoo: resid-L9-topk16}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 4, "dictionaries.b.zoo", "no dictionary 'resid-L9-topk16'", "resid-L2-poor"),
    "unknown zoo dictionary after expansion": ("""
        model: zoo
        dictionaries:
          "r{layer}":
            zoo: "resid-L{layer}-topk16"
            for: {layer: "3..4"}
        checks: [{metric: l0, dictionaries: [r3]}]
        """, 4, "dictionaries.r{layer}.zoo", "'resid-L4-topk16'"),
    "unknown zoo task": ("""
        model: zoo
        tasks:
          ioi: {zoo: ioi}
          gender: {zoo: gender}
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 4, "tasks.gender.zoo", "no task 'gender'"),
    "undefined dictionary": ("""
        model: zoo
        dictionaries: {resid-L0: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            dictionaries: [resid-L0, resid-L1]
        """, 5, "checks[0].dictionaries[1]", "undefined dictionary 'resid-L1' (did you mean",
        "defined: resid-L0"),
    "glob matching nothing": ("""
        model: zoo
        dictionaries: {resid-L0: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            splice:
              - "mlp-*"
        """, 6, "checks[0].splice[0]", "pattern 'mlp-*' matches no dictionary"),
    "undefined task": ("""
        model: zoo
        tasks: {ioi: {zoo: ioi}}
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: logit_diff_recovered
            dictionaries: [a]
            task: iio
        """, 7, "checks[0].task", "undefined task 'iio' (did you mean 'ioi'?)"),
    "factory refused": ("""
        model: zoo
        dictionaries:
          custom:
            factory: "mypkg.mod:make_sae"
            hook: blocks.0.hook_resid_pre
        checks: [{metric: l0, dictionaries: [custom]}]
        """, 4, "dictionaries.custom.factory", "allow_factory: true"),
    "bad factory reference": ("""
        model: zoo
        allow_factory: true
        dictionaries:
          custom: {factory: "mypkg.mod.make_sae"}
        checks: [{metric: l0, dictionaries: [custom]}]
        """, 4, "dictionaries.custom.factory", "package.module:callable"),
    "release without sae_id": ("""
        model: gpt2-small
        dictionaries:
          res: {release: gpt2-small-res-jb}
        checks: [{metric: l0, dictionaries: [res]}]
        """, 3, "dictionaries.res.sae_id", "required"),
    "bad expect": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            dictionaries: [a]
            threshold: "< 20"
            expect: xfail
        """, 7, "checks[0].expect", "pass or fail"),
    "expect fail without threshold": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            dictionaries: [a]
            expect: fail
        """, 6, "checks[0].expect", "needs a threshold"),
    "duplicate check ids": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            dictionaries: [a]
          - metric: l0
            dictionaries: [a]
            threshold: "< 10"
        """, 6, "checks[1]", "duplicate check id 'a::l0'", "line 4", "id:"),
    "duplicate explicit ids": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}, b: {zoo: resid-L1-topk16}}
        checks:
          - {metric: l0, dictionaries: [a], id: same}
          - metric: l0
            dictionaries: [b]
            id: same
        """, 7, "checks[1].id", "duplicate check id 'same'"),
    "id with an empty part": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - {metric: l0, dictionaries: [a], id: "a::"}
        """, 4, "checks[0].id", "non-empty parts"),
    "id nested deeper than set::name": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - {metric: l0, dictionaries: [a], id: "a::b::c"}
        """, 4, "checks[0].id", "`set::name`"),
    "id on an expanding check": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}, b: {zoo: resid-L1-topk16}}
        checks:
          - metric: l0
            dictionaries: [a, b]
            id: both
        """, 6, "checks[0].id", "expands to 2 checks"),
    "reversed range": ("""
        model: zoo
        dictionaries:
          "r{layer}":
            zoo: "resid-L{layer}-topk16"
            for:
              layer: "3..0"
        checks: [{metric: l0, dictionaries: [r0]}]
        """, 6, "dictionaries.r{layer}.for.layer", "empty range"),
    "range that is not one": ("""
        model: zoo
        dictionaries:
          "r{layer}": {zoo: "resid-L{layer}-topk16", for: {layer: "0-3"}}
        checks: [{metric: l0, dictionaries: [r0]}]
        """, 3, "dictionaries.r{layer}.for.layer", 'inclusive range such as "0..11"'),
    "placeholder without values": ("""
        model: zoo
        dictionaries:
          "r{layer}": {zoo: "resid-L{layer}-topk16"}
        checks: [{metric: l0, dictionaries: [r0]}]
        """, 3, "dictionaries.r{layer}", "add for: {layer: [...]}"),
    "for variable not in the name": ("""
        model: zoo
        dictionaries:
          "r{layer}":
            zoo: "resid-L{layer}-topk{k}"
            for:
              layer: [0]
              k: [16]
        checks: [{metric: l0, dictionaries: [r0]}]
        """, 7, "dictionaries.r{layer}.for.k", "does not appear in the name"),
    "for values that are not scalars": ("""
        model: zoo
        dictionaries:
          "r{layer}":
            zoo: "resid-L{layer}-topk16"
            for:
              layer:
                - [0, 1]
        checks: [{metric: l0, dictionaries: [r0]}]
        """, 7, "dictionaries.r{layer}.for.layer[0]", "a string or a number"),
    "expansion colliding with an entry": ("""
        model: zoo
        dictionaries:
          r0: {zoo: resid-L0-topk16}
          "r{layer}": {zoo: "resid-L{layer}-topk16", for: {layer: [0, 1]}}
        checks: [{metric: l0, dictionaries: [r0]}]
        """, 4, "dictionaries.r{layer}", "'r0' is defined twice (first at line 3)"),
    "checks is a mapping": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          metric: l0
        """, 4, "checks", "expected a list, got a mapping"),
    "dictionaries is a list": ("""
        model: zoo
        dictionaries:
          - {zoo: resid-L0-topk16}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 3, "dictionaries", "expected a mapping, got a list"),
    "check is a string": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - l0
        """, 4, "checks[0]", "expected a mapping, got 'l0'"),
    "check names a template": ("""
        model: zoo
        dictionaries:
          "resid-L{layer}": {zoo: "resid-L{layer}-topk16", for: {layer: [0, 1]}}
        checks: [{metric: l0, dictionaries: ["resid-L{layer}"]}]
        """, 4, "checks[0].dictionaries[0]", "use a glob such as 'resid-L*'"),
    "dictionary spec is a string": ("""
        model: zoo
        dictionaries:
          a: resid-L0-topk16
        checks: [{metric: l0, dictionaries: [a]}]
        """, 3, "dictionaries.a", "expected a mapping"),
    "model is a list": ("""
        model: [zoo]
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 1, "model", "expected a mapping, got a list"),
    "metric is a number": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: 3
            dictionaries: [a]
        """, 4, "checks[0].metric", "non-empty string, got the number 3"),
    "batch size is a string": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            dictionaries: [a]
            options: {batch_size: "16"}
        """, 6, "checks[0].options.batch_size", "integer"),
    "negative n_tokens": ("""
        model: zoo
        data: {n_tokens: -5}
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 2, "data.n_tokens", ">= 1"),
    "missing metric": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - dictionaries: [a]
        """, 4, "checks[0].metric", "required key missing"),
    "missing checks": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        """, 1, "checks", "required key missing"),
    "neither dictionaries nor splice": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            task: ioi
        """, 4, "checks[0]", "dictionaries: (one check per dictionary) or splice:"),
    "duplicate yaml key": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: l0
            dictionaries: [a]
            metric: kl_div
        """, 6, "checks[0].metric", "duplicate key (first at line 4)"),
    "non-string key": ("""
        model: zoo
        dictionaries:
          1: {zoo: resid-L0-topk16}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 3, "dictionaries", "keys must be non-empty strings"),
    "python tag": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - metric: !!python/name:os.system l0
            dictionaries: [a]
        """, 4, "checks[0].metric", "cannot read this value"),
    "reconstruction metric on a spliced set": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}, b: {zoo: resid-L1-topk16}}
        checks:
          - metric: l0
            splice: [a, b]
        """, 5, "checks[0].splice", "single dictionary's reconstruction"),
    "edit of a dictionary outside the set": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}, b: {zoo: resid-L1-topk16}}
        checks:
          - metric: ce_loss_recovered
            dictionaries: [a]
            options:
              edits: [{dictionary: b, features: [3]}]
        """, 7, "checks[0].options.edits", "edits 'b', which this check does not splice"),
    "edit without a dictionary on a set": ("""
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}, b: {zoo: resid-L1-topk16}}
        defaults:
          options: {edits: [{features: 3}]}
        checks:
          - metric: ce_loss_recovered
            splice: [a, b]
        """, 4, "defaults.options.edits", "must name its dictionary"),
    "zoo model with kwargs": ("""
        model:
          name: zoo
          from_pretrained_kwargs: {fold_ln: false}
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks: [{metric: l0, dictionaries: [a]}]
        """, 3, "model.from_pretrained_kwargs", "takes none"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_names_file_line_and_field(tmp_path, case):
    text, line, field, *fragments = BAD[case]
    assert_located(error(tmp_path, text), line, field, *fragments)


def test_missing_zoo_is_a_suite_error(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "ARTIFACTS", tmp_path / "no-zoo")
    err = error(tmp_path, """
        model: zoo
        dictionaries:
          a: {zoo: resid-L0-topk16}
        checks: [{metric: l0, dictionaries: [a]}]
        """)
    assert_located(err, 3, "dictionaries.a.zoo", "saebench zoo build")


def test_empty_and_missing_files(tmp_path):
    assert_located(error(tmp_path, ""), 1, "(top level)", "empty")
    assert_located(error(tmp_path, "- a\n- b\n"), 1, "(top level)", "expected a mapping")
    with pytest.raises(SuiteError, match=r"none\.yaml:1: \(file\): cannot read"):
        load_suite(tmp_path / "none.yaml")


def test_suite_error_pickles_and_keeps_its_parts():
    import pickle

    err = pickle.loads(pickle.dumps(SuiteError("s.yaml", 3, "checks[0]", "bad")))
    assert (err.file, err.line, err.field, err.message) == ("s.yaml", 3, "checks[0]", "bad")
    assert str(err) == "s.yaml:3: checks[0]: bad"
    assert isinstance(err, ValueError)


# ------------------------------------------------------------------- thresholds

@pytest.mark.parametrize(("text", "target", "op", "bound", "canonical"), [
    (">= 0.85", "value", ">=", 0.85, ">= 0.85"),
    (">=0.85", "value", ">=", 0.85, ">= 0.85"),
    ("  < 1e-3 ", "value", "<", 0.001, "< 0.001"),
    ("value > -2", "value", ">", -2.0, "> -2"),
    ("ci_low >= 0.8", "ci_low", ">=", 0.8, "ci_low >= 0.8"),
    ("ci_high<=0.1", "ci_high", "<=", 0.1, "ci_high <= 0.1"),
    ("== 0", "value", "==", 0.0, "== 0"),
])
def test_threshold_forms(text, target, op, bound, canonical):
    # exact: a decimal literal parses to its nearest float, as Python's does, and the text
    # of a float (its shortest repr) parses back to the same float
    threshold = parse_threshold(text)
    assert threshold == Threshold(target, op, bound)
    assert str(threshold) == canonical
    assert parse_threshold(str(threshold)) == threshold


@pytest.mark.parametrize("text", [
    "", "0.85", "=> 0.8", "= 0.8", "!= 0", ">= ", ">= nan", ">= inf", "ci_mid >= 0.8",
    ">= 0.8 and <= 0.9", ">= 1,5", "≥ 0.8",
])
def test_bad_thresholds_say_what_is_accepted(text):
    with pytest.raises(ValueError, match="threshold"):
        parse_threshold(text)


def test_threshold_needs_a_string():
    with pytest.raises(ValueError, match="quoted string"):
        parse_threshold(0.85)  # type: ignore[arg-type]


def test_threshold_targets_and_bad_values():
    low = parse_threshold("ci_low >= 0.8")
    assert low.passes({"value": 0.95, "ci_low": 0.81, "ci_high": 0.99})
    assert not low.passes({"value": 0.95, "ci_low": 0.79})
    assert not low.passes({"value": 0.95})
    high = parse_threshold("ci_high <= 0.1")
    assert high.passes({"value": 0.2, "ci_high": 0.05})
    assert not high.passes({"value": 0.0, "ci_high": 0.2})
    for value in (math.nan, math.inf, -math.inf, None, "x"):
        assert not parse_threshold("<= 1").passes({"value": value})
        assert not parse_threshold(">= 0").passes({"value": value})
    assert parse_threshold("== 0").passes({"value": 0.0})


@given(st.sampled_from(["value", "ci_low", "ci_high"]), st.sampled_from([">=", ">", "<=", "<",
                                                                        "=="]),
       st.floats(allow_nan=False, allow_infinity=False))
def test_threshold_text_round_trips(target, op, bound):
    threshold = Threshold(target, op, bound)
    assert parse_threshold(str(threshold)) == threshold
    assert not threshold.passes({target: math.nan})


# ------------------------------------------------------------------- expansion

FULL = """
suite: toy
model: {name: gpt2-small, from_pretrained_kwargs: {center_writing_weights: true}}
data:
  source: {hf: NeelNanda/pile-10k}
  n_tokens: 4096
  context: 16
allow_factory: true
dictionaries:
  "resid-L{layer}-topk16": {zoo: "resid-L{layer}-topk16", for: {layer: [0, 1, 2, 3]}}
  resid-L2-poor: {zoo: resid-L2-poor}
  mine: {path: saes/my_sae}
  "res-jb-L{layer}": {release: gpt2-small-res-jb, sae_id: "blocks.{layer}.hook_resid_pre",
                      for: {layer: "0..11"}}
  custom: {factory: "mypkg.mod:make_sae", args: {width: 512}, hook: blocks.0.hook_resid_pre}
  "grid-{arch}-k{k}": {path: "saes/{arch}_{k}", for: {arch: [topk, relu], k: [8, 16]}}
tasks:
  ioi: {zoo: ioi}
  mine: {path: tasks/mine.jsonl}
defaults:
  options: {ablation: mean, batch_size: 8}
  threshold: ">= 0.5"
checks:
  - metric: ce_loss_recovered
    dictionaries: ["resid-L*-topk16"]
    options: {ablation: zero}
    threshold: ">= 0.85"
  - metric: ce_loss_recovered
    dictionaries: [resid-L2-poor]
    threshold: ">= 0.85"
    expect: fail
  - metric: ce_loss_recovered
    splice: [resid-L0-topk16, resid-L3-topk16]
    id: resid-L0+L3
    threshold: ">= 0.8"
  - metric: kl_div
    splice: [resid-L3-topk16, "resid-L[12]-topk16"]
    threshold: null
  - metric: logit_diff_recovered
    dictionaries: [resid-L2-topk16]
    task: ioi
    options: {positions: -1, error_term: true, edits: [{features: [3, 17]}], batch_size: 4}
    threshold: "ci_low >= 0.8"
  - metric: l0
    dictionaries: [mine, "res-jb-L1?", custom, resid-L2-topk16]
"""


@pytest.fixture
def full_suite(tmp_path) -> Suite:
    for sub in ("my_sae", "topk_8", "topk_16", "relu_8", "relu_16"):
        (tmp_path / "saes" / sub).mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.jsonl").write_text(
        json.dumps({"prompt": SENTENCE, "answer": "Mary", "distractor": "John"}) + "\n")
    return load_suite(write(tmp_path, FULL))


def test_documented_example_loads(tmp_path):
    import saebench.suite
    from saebench.metrics.registry import metric_names

    text = saebench.suite.__doc__.split("```yaml\n")[1].split("```")[0]
    if "logit_diff_recovered" not in metric_names():  # task metrics register later
        text = text.replace("logit_diff_recovered", "kl_div")
    (tmp_path / "saes" / "my_sae").mkdir(parents=True)
    suite = load_suite(write(tmp_path, text))
    assert suite.checks[0].id == "resid-L0-topk16::ce_loss_recovered[zero]"
    assert [c.expect for c in suite.checks].count("fail") == 1
    assert len(suite.dictionaries) == 4 + 1 + 1 + 12 + 1


def test_full_example_expands_to_readable_unique_ids(full_suite):
    assert [c.id for c in full_suite.checks] == [
        "resid-L0-topk16::ce_loss_recovered[zero]",
        "resid-L1-topk16::ce_loss_recovered[zero]",
        "resid-L2-topk16::ce_loss_recovered[zero]",
        "resid-L3-topk16::ce_loss_recovered[zero]",
        "resid-L2-poor::ce_loss_recovered",
        "resid-L0+L3",
        "resid-L3-topk16+resid-L1-topk16+resid-L2-topk16::kl_div",
        "resid-L2-topk16::logit_diff_recovered[ioi,positions=-1,error_term=true,"
        "edits=[resid-L2-topk16:3+17=0]]",
        "mine::l0", "res-jb-L10::l0", "res-jb-L11::l0", "custom::l0", "resid-L2-topk16::l0",
    ]
    assert all(c.suite == "toy" for c in full_suite.checks)


def test_full_example_specs(full_suite, tmp_path):
    suite = full_suite
    assert suite.name == "toy" and suite.allow_factory
    assert (suite.model.kind, suite.model.name) == ("transformer_lens", "gpt2-small")
    assert suite.model.kwargs == {"center_writing_weights": True}
    assert (suite.data.kind, suite.data.hf, suite.data.split, suite.data.column) == (
        "hf", "NeelNanda/pile-10k", "train", "text")
    assert (suite.data.n_tokens, suite.data.context, suite.data.seed) == (4096, 16, 0)
    jb = suite.dictionaries["res-jb-L7"]
    assert (jb.kind, jb.release, jb.sae_id, jb.line) == (
        "release", "gpt2-small-res-jb", "blocks.7.hook_resid_pre", 12)
    assert [n for n in suite.dictionaries if n.startswith("res-jb")] == [
        f"res-jb-L{i}" for i in range(12)]
    custom = suite.dictionaries["custom"]
    assert (custom.kind, custom.ref, custom.args, custom.hook) == (
        "factory", "mypkg.mod:make_sae", {"width": 512}, "blocks.0.hook_resid_pre")
    assert Path(suite.dictionaries["mine"].ref) == (tmp_path / "saes" / "my_sae").resolve()
    assert Path(suite.dictionaries["grid-relu-k16"].ref) == (tmp_path / "saes/relu_16").resolve()
    assert [n for n in suite.dictionaries if n.startswith("grid")] == [
        "grid-topk-k8", "grid-topk-k16", "grid-relu-k8", "grid-relu-k16"]
    assert suite.tasks["ioi"].kind == "zoo"
    assert Path(suite.tasks["mine"].ref) == (tmp_path / "tasks" / "mine.jsonl").resolve()


def test_defaults_are_overridden_per_check(full_suite):
    checks = {c.id: c for c in full_suite.checks}
    layer0 = checks["resid-L0-topk16::ce_loss_recovered[zero]"]
    assert dict(layer0.options) == {"ablation": "zero", "batch_size": 8}
    assert str(layer0.threshold) == ">= 0.85"
    poor = checks["resid-L2-poor::ce_loss_recovered"]
    assert dict(poor.options) == {"ablation": "mean", "batch_size": 8}
    assert poor.expect == "fail" and poor.line == 27
    assert checks["mine::l0"].threshold == parse_threshold(">= 0.5")
    assert checks["resid-L3-topk16+resid-L1-topk16+resid-L2-topk16::kl_div"].threshold is None
    task_check = next(c for c in full_suite.checks if c.task == "ioi")
    assert dict(task_check.options) == {  # defaults.options apply where the metric takes them
        "batch_size": 4, "positions": -1, "error_term": True,
        "edits": (Edit("resid-L2-topk16", (3, 17), 0.0),)}
    assert str(task_check.threshold) == "ci_low >= 0.8"
    assert [k for k, _ in task_check.options] == sorted(k for k, _ in task_check.options)


def test_splice_sets_are_one_check(full_suite):
    checks = {c.id: c for c in full_suite.checks}
    assert checks["resid-L0+L3"].dictionaries == ("resid-L0-topk16", "resid-L3-topk16")
    kl = checks["resid-L3-topk16+resid-L1-topk16+resid-L2-topk16::kl_div"]
    assert kl.dictionaries == ("resid-L3-topk16", "resid-L1-topk16", "resid-L2-topk16")
    assert all(len(c.dictionaries) == 1 for c in full_suite.checks
               if c.id not in ("resid-L0+L3", kl.id))


def test_group_keys_share_passes(full_suite):
    checks = {c.id: c for c in full_suite.checks}
    l2 = checks["resid-L2-topk16::ce_loss_recovered[zero]"]
    assert l2.group_key == checks["resid-L2-topk16::l0"].group_key
    assert l2.group_key != checks["resid-L3-topk16::ce_loss_recovered[zero]"].group_key
    task_check = next(c for c in full_suite.checks if c.task == "ioi")
    assert task_check.group_key != l2.group_key
    assert {hash(c) for c in full_suite.checks}  # checks (and their options) are hashable


def test_group_key_ignores_options_equal_to_their_default(tmp_path):
    suite = load_suite(write(tmp_path, """
        model: zoo
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - {metric: ce_loss_recovered, dictionaries: [a]}
          - {metric: kl_div, dictionaries: [a], options: {error_term: false, positions: all}}
          - {metric: delta_ce, dictionaries: [a], options: {positions: [-2, -1]}}
        """))
    first, second, third = suite.checks
    assert second.id == "a::kl_div[positions=all,error_term=false]"
    assert first.group_key == second.group_key != third.group_key
    assert dict(third.options)["positions"] == (-2, -1)


def test_options_table_defaults_are_valid():
    for option in OPTIONS.values():
        if option.default is not None:
            value = [] if isinstance(option.default, tuple) else option.default
            assert option.parse(value) == option.default


# ------------------------------------------------------------------- resolved objects

class FakeSAE:
    """An encode/decode dictionary with a sae_lens-like cfg."""

    def __init__(self, hook: str, d_in: int, d_sae: int = 8):
        self.cfg = SimpleNamespace(hook_name=hook, d_in=d_in, d_sae=d_sae)

    def encode(self, x):
        return x

    def decode(self, f):
        return f


RESOLVED = """
model: zoo
dictionaries:
  resid: {zoo: resid-L0-topk16}
  mlp: {zoo: mlp_post-L3-topk32}
  other: {zoo: resid-L1-topk16}
tasks:
  ioi: {zoo: ioi}
checks:
  - {metric: l0, dictionaries: ["*"]}
"""


@pytest.fixture
def resolved_suite(tmp_path) -> Suite:
    return load_suite(write(tmp_path, RESOLVED))


def test_validate_resolved_accepts_matching_objects(resolved_suite, model):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    cfg = model.cfg
    sae = StandardSAE(StandardSAEConfig(d_in=cfg.d_model, d_sae=8, metadata=SAEMetadata(
        hook_name="blocks.0.hook_resid_pre")))
    validate_resolved(resolved_suite, model, {
        "resid": sae,
        "mlp": FakeSAE(f"blocks.{cfg.n_layers - 1}.mlp.hook_post", cfg.d_mlp),
        "other": FakeSAE("blocks.1.attn.hook_z", cfg.n_heads * cfg.d_head),
    }, {"ioi": [TaskPrompt(SENTENCE, "Mary", "John")]})


def test_validate_resolved_hook_absent(resolved_suite, model):
    with pytest.raises(SuiteError) as info:
        validate_resolved(resolved_suite, model, {
            "resid": FakeSAE("blocks.0.hook_resid_pre", model.cfg.d_model),
            "other": FakeSAE("blocks.99.hook_resid_pre", model.cfg.d_model)}, {})
    err = info.value
    assert (err.line, err.field) == (5, "dictionaries.other"), str(err)
    assert str(err).startswith(f"{resolved_suite.path}:5: dictionaries.other: ")
    assert "'blocks.99.hook_resid_pre', which the model does not have" in err.message


def test_validate_resolved_width_mismatch(resolved_suite, model):
    wide = model.cfg.d_model + 1
    with pytest.raises(SuiteError) as info:
        validate_resolved(resolved_suite, model,
                          {"mlp": FakeSAE("blocks.0.hook_resid_pre", wide)}, {})
    assert (info.value.line, info.value.field) == (4, "dictionaries.mlp")
    assert f"d_in={wide}" in info.value.message
    assert f"width {model.cfg.d_model} (d_model)" in info.value.message


def test_validate_resolved_width_mismatch_at_mlp_post(resolved_suite, model):
    with pytest.raises(SuiteError, match=r"suite\.yaml:3: dictionaries\.resid: .*\(d_mlp\)"):
        validate_resolved(resolved_suite, model,
                          {"resid": FakeSAE("blocks.0.mlp.hook_post", model.cfg.d_model)}, {})


def test_validate_resolved_unusable_object(resolved_suite, model):
    with pytest.raises(SuiteError, match=r":3: dictionaries\.resid: cannot use what was loaded"):
        validate_resolved(resolved_suite, model, {"resid": object()}, {})


@pytest.mark.parametrize(("answer", "fragment"), [
    ("Mary said", "is 2 tokens"),
    ("Zyzzyva", "is not in the tokenizer's vocabulary"),
])
def test_validate_resolved_answers_must_be_single_tokens(resolved_suite, model, answer,
                                                         fragment):
    prompts = [TaskPrompt(SENTENCE, "Mary", "John"), TaskPrompt(SENTENCE, "John", answer)]
    with pytest.raises(SuiteError) as info:
        validate_resolved(resolved_suite, model, {}, {"ioi": prompts})
    err = info.value
    assert (err.line, err.field) == (7, "tasks.ioi"), str(err)
    assert f"prompt 1 ({SENTENCE!r}): distractor {answer!r} {fragment}" in err.message


def test_validate_resolved_context_longer_than_the_model(tmp_path, model):
    suite = load_suite(write(tmp_path, f"""
        model: zoo
        data:
          context: {model.cfg.n_ctx + 1}
        dictionaries: {{a: {{zoo: resid-L0-topk16}}}}
        checks: [{{metric: l0, dictionaries: [a]}}]
        """))
    with pytest.raises(SuiteError, match=r":2: data\.context: .* longer than the model's n_ctx"):
        validate_resolved(suite, model, {}, {})


# ------------------------------------------------------------------- property tests

NAMES = st.text(st.sampled_from("abcxyz-_.0123*?{}"), min_size=1, max_size=8)
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(), NAMES,
                 st.lists(st.integers(-2, 3), max_size=3),
                 st.dictionaries(NAMES, st.integers(), max_size=2))
DOWNSTREAM = ("ce_loss_recovered", "delta_ce", "kl_div", "kl_div_score")
OPTION_VALUES = {
    "ablation": st.sampled_from(["zero", "mean"]),
    "batch_size": st.integers(1, 64),
    "positions": st.one_of(st.just("all"), st.integers(-3, 3),
                           st.lists(st.integers(-3, 3), min_size=1, max_size=3)),
    "error_term": st.booleans(),
    "dense_threshold": st.floats(0, 1),
    "n_boot": st.integers(1, 2000),
    "seed": st.integers(0, 5),
    "k": st.integers(1, 5),
    "n_draws": st.integers(1, 5),
}
EDITS = st.lists(st.fixed_dictionaries({"features": st.lists(st.integers(0, 9), min_size=1)},
                                       optional={"value": st.floats(-2, 2)}),
                 min_size=1, max_size=2)
DICTIONARY_SPECS = st.one_of(
    st.builds(lambda n: {"zoo": n}, st.sampled_from(FAKE_ZOO)),
    st.builds(lambda: {"path": "saes/a"}),
    st.builds(lambda r, i: {"release": r, "sae_id": i}, NAMES.filter(lambda t: "{" not in t),
              NAMES.filter(lambda t: "{" not in t and "}" not in t)),
    st.builds(lambda a: {"factory": "pkg.mod:make", "args": a, "hook": "blocks.0.hook_z"},
              st.dictionaries(NAMES, st.integers(), max_size=2)),
)
LAYERS = st.one_of(st.sampled_from(["0..3", "1..2", "2..2"]),
                   st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))


RANGES = {"kl_div": (0, math.inf), "kl_div_score": (-math.inf, 1), "l0": (0, math.inf),
          "explained_variance": (-math.inf, 1), "mse": (0, math.inf), "cossim": (-1, 1),
          "l2_ratio": (0, math.inf), "dead_fraction": (0, 1), "dense_fraction": (0, 1)}
"""Each bounded metric's range, by its definition (the rest are unbounded)."""


def _admissible(metric: str, threshold: str | None) -> bool:
    """Whether a generated threshold is one the schema accepts for `metric`: not decided by
    the metric's range (`value == 2` for a bounded metric), and not on an interval that
    `dead_fraction` does not have."""
    if threshold is None:
        return True
    if threshold.startswith("ci_") and metric == "dead_fraction":
        return False
    low, high = RANGES.get(metric, (-math.inf, math.inf))
    return not (threshold == "value == 2" and high < 2)


@st.composite
def valid_suites(draw) -> dict:
    """Random valid combinations of the schema's elements."""
    dictionaries: dict = draw(st.dictionaries(st.sampled_from(["a", "b", "mlp", "c.d"]),
                                              DICTIONARY_SPECS, min_size=1, max_size=3))
    if draw(st.booleans()):
        dictionaries["resid-L{layer}"] = {"zoo": "resid-L{layer}-topk16",
                                          "for": {"layer": draw(LAYERS)}}
    names = [n.replace("{layer}", "*") for n in dictionaries]
    patterns = st.lists(st.sampled_from([*names, "*"]), min_size=1, max_size=2)
    tasks = draw(st.sampled_from([[], ["ioi"], ["ioi", "mine"]]))
    checks = []
    for metric in draw(st.lists(st.sampled_from(KNOWN_METRICS), min_size=1, max_size=4,
                                unique=True)):
        splice = metric in DOWNSTREAM and draw(st.booleans())
        check: dict = {"metric": metric, "splice" if splice else "dictionaries": draw(patterns)}
        check["threshold"] = draw(st.sampled_from(
            [t for t in (">= 0.5", "ci_low > 0", "ci_high <= 1e-3", None, "value == 2")
             if _admissible(metric, t)]))
        if draw(st.booleans()):
            check["options"] = draw(st.fixed_dictionaries({}, optional={
                k: v for k, v in OPTION_VALUES.items() if k in option_table(metric)
                and (metric in DOWNSTREAM or k not in ("positions", "error_term"))}))
            if not splice and draw(st.booleans()):
                check["options"]["edits"] = draw(EDITS)
        if check["threshold"] is not None and draw(st.booleans()):
            check["expect"] = draw(st.sampled_from(["pass", "fail"]))
        checks.append(check)
    if tasks and draw(st.booleans()):
        checks.append({"metric": draw(st.sampled_from(["logit_diff_recovered", "sign_agreement",
                                                        "remainder_dla"])),
                       "dictionaries": draw(patterns), "task": draw(st.sampled_from(tasks))})
    suite: dict = {"model": draw(st.sampled_from(["zoo", "gpt2-small", {"path": "models/m"},
                                                  {"name": "zoo"}])),
                   "dictionaries": dictionaries, "checks": checks}
    if any("factory" in spec for spec in dictionaries.values()):
        suite["allow_factory"] = True
    if tasks:
        suite["tasks"] = {"ioi": {"zoo": "ioi"}, "mine": {"path": "tasks/mine.jsonl"}}
    optional = {
        "suite": NAMES.filter(str.strip),
        "data": st.fixed_dictionaries({}, optional={
            "source": st.sampled_from(["zoo", {"hf": "x/y"}, {"path": "tokens.pt"}]),
            "n_tokens": st.integers(1, 10**5), "context": st.integers(2, 256),
            "seed": st.integers(0, 2**63 - 1)}),
        "defaults": st.fixed_dictionaries({}, optional={
            "options": st.fixed_dictionaries({}, optional=OPTION_VALUES),
            "threshold": st.sampled_from([">= 0.1", None])}),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            suite[key] = draw(strategy)
    return suite


@st.composite
def mutated(draw, base: st.SearchStrategy) -> object:
    """A suite with one random node replaced, deleted or given an unknown key."""
    root = {"root": copy.deepcopy(draw(base))}
    container: dict | list = root
    key: object = "root"
    while isinstance(container[key], dict | list) and container[key] and draw(st.booleans()):
        container = container[key]
        key = draw(st.sampled_from(list(container) if isinstance(container, dict)
                                   else range(len(container))))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "delete" and container is not root:
        del container[key]
    elif action == "add" and isinstance(container[key], dict):
        container[key][draw(NAMES)] = draw(JUNK)
    else:
        container[key] = draw(JUNK)
    return root["root"]


@pytest.fixture
def property_dir(tmp_path) -> Path:
    for sub in ("saes/a", "models/m", "tasks"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "tasks" / "mine.jsonl").write_text(
        json.dumps({"prompt": SENTENCE, "answer": "Mary", "distractor": "John"}) + "\n")
    (tmp_path / "tokens.pt").write_bytes(b"")
    return tmp_path


def load_or_suite_error(path: Path) -> Suite | SuiteError:
    try:
        return load_suite(path)
    except SuiteError as err:
        assert str(err).startswith(f"{path}:{err.line}: {err.field}: ")
        assert err.line >= 1 and err.field and err.message
        return err


PROPERTY = settings(max_examples=120, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@PROPERTY
@given(tree=valid_suites())
def test_valid_generated_suites_load(property_dir, tree):
    path = property_dir / "generated.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    suite = load_suite(path)
    ids = [c.id for c in suite.checks]
    assert len(ids) == len(set(ids))
    assert {c.metric for c in suite.checks} == {c["metric"] for c in tree["checks"]}
    for check in suite.checks:
        assert set(check.dictionaries) <= set(suite.dictionaries)
        assert check.id.startswith("+".join(check.dictionaries) + "::" + check.metric)


@PROPERTY
@given(tree=mutated(valid_suites()))
def test_mutated_suites_load_or_raise_suite_errors(property_dir, tree):
    path = property_dir / "generated.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    load_or_suite_error(path)


@PROPERTY
@given(line=st.integers(0, 12), text=st.text(max_size=30))
def test_edited_yaml_text_loads_or_raises_suite_errors(property_dir, line, text):
    lines = textwrap.dedent(BASE).lstrip("\n").splitlines()
    lines.insert(min(line, len(lines)), text)
    path = property_dir / "edited.yaml"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    load_or_suite_error(path)
