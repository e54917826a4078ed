"""Suite checks computed through `SuiteRun`: a check's row does not depend on the others."""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from pathlib import Path

import pytest

from saebench import loading
from saebench.api import evaluate
from saebench.checks import RunSettings, SuiteRun
from saebench.metrics.registry import METRICS
from saebench.results import RANDOM_COLUMNS
from saebench.splice import random_like
from saebench.stats import bootstrap_interval
from saebench.suite import load_suite

TOY = Path(__file__).resolve().parents[1] / "suites" / "toy.yaml"
SAME = ("value", "ci_low", "ci_high", "n", "verdict", "message", "parts", "options", "seed",
        "fingerprint", *RANDOM_COLUMNS)


def _same(a, b) -> bool:
    both_nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return both_nan or a == b


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> SuiteRun:
    """The toy suite's checks, prepared on 16 sequences of its held-out tokens and the first
    40 prompts of each task (so that every check can also run alone in a few seconds)."""
    directory = tmp_path_factory.mktemp("toy")
    text = TOY.read_text()
    for task in ("ioi", "closing_quote", "agreement"):
        prompts = loading.load_task(task)[:40]
        (directory / f"{task}.jsonl").write_text("".join(
            json.dumps(dataclasses.asdict(p)) + "\n" for p in prompts))
        text = text.replace(f"{{zoo: {task}}}", f"{{path: {task}.jsonl}}")
    (directory / "toy.yaml").write_text(text)
    run = SuiteRun(load_suite(directory / "toy.yaml"), RunSettings(device="cpu", n_tokens=2048))
    run.prepare()
    return run


def test_every_toy_check_gives_the_same_row_alone_and_in_the_suite(toy_run):
    together = toy_run.fresh()
    together.compute(toy_run.suite.checks)
    differ = []
    for check in toy_run.suite.checks:
        alone, shared = toy_run.fresh().result(check), together.result(check)
        differ += [f"{check.id}.{k}: {alone[k]!r} alone, {shared[k]!r} in the suite"
                   for k in SAME if not _same(alone[k], shared[k])]
    assert not differ, "\n".join(differ[:20])
    assert {c.metric for c in toy_run.suite.checks} == set(METRICS)  # every metric at least once


MIXED = """\
model: zoo
data: {source: zoo, n_tokens: 1024}
tasks: {quote: {zoo: closing_quote}}
dictionaries: {good: {zoo: resid-L2-topk16}}
defaults: {options: {n_boot: 50}}
checks:
  - metric: pathological_error
    dictionaries: [good]
    options: {baseline: isotropic, n_draws: 1}
  - metric: pathological_error
    dictionaries: [good]
    options: {baseline: covariance, n_draws: 3, seed: 5}
  - metric: feature_ablation
    dictionaries: [good]
    task: quote
    options: {k: 1}
  - metric: feature_ablation
    dictionaries: [good]
    task: quote
    options: {k: 2, seed: 3, n_boot: 80}
"""


def test_checks_sharing_a_run_keep_their_own_draws_seeds_and_tables(tmp_path):
    """Options that shape a run (n_draws, seeds, the feature table's k and n_boot) differ
    between these checks: sharing a run must not hand one check the other's."""
    (tmp_path / "mixed.yaml").write_text(MIXED)
    prepared = SuiteRun(load_suite(tmp_path / "mixed.yaml"), RunSettings(device="cpu"))
    prepared.prepare()
    together = prepared.fresh()
    together.compute(prepared.suite.checks)
    for check in prepared.suite.checks:
        alone = prepared.fresh()
        assert alone.result(check)["value"] == together.result(check)["value"], check.id
        assert alone.extra_rows(check) == together.extra_rows(check), check.id
    tables = [together.extra_rows(c).get("features.csv") for c in prepared.suite.checks[2:]]
    assert [sum(r["table"] == "ablation" for r in t) for t in tables] == [1, 2]
    assert [sum(r["table"] == "card" for r in t) for t in tables] == [1, 2]
    last = prepared.suite.checks[3]  # its own n_boot and seed reach its table's intervals
    effects = together._terms[together._request_key(last)]
    for j, row in enumerate(r for r in tables[1] if r["table"] == "ablation"):
        assert (row["ci_low"], row["ci_high"]) == bootstrap_interval(
            effects["feature_effect"][:, j], 80, 3)


def test_a_bad_task_row_fails_only_that_tasks_checks_naming_the_entry_and_the_row(tmp_path):
    (tmp_path / "mine.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""\
        model: zoo
        tasks:
          mine: {path: mine.jsonl}
        dictionaries: {a: {zoo: resid-L0-topk16}}
        checks:
          - {metric: l0, dictionaries: [a]}
          - {metric: sign_agreement, dictionaries: [a], task: mine}
        """))
    run = SuiteRun(load_suite(tmp_path / "s.yaml"), RunSettings(device="cpu", n_tokens=1024))
    run.prepare()
    l0, task_check = run.suite.checks
    assert run.problem(l0) is None
    problem = run.problem(task_check)
    assert problem.verdict == "error"
    assert problem.message.startswith(f"{tmp_path / 's.yaml'}:3: tasks.mine: ")
    assert "mine.jsonl:1: field 'distractor'" in problem.message


def test_hooks_on_a_path_entry_and_a_factory_beside_the_suite(tmp_path):
    """A sae_lens directory saved without `metadata.hook_name` takes `hook:` from the suite,
    and `factory: "module:fn"` finds a module next to the suite file without PYTHONPATH."""
    sae = loading.load_zoo_dictionary("resid-L2-topk16")
    sae.save_model(str(tmp_path / "nohook"))
    cfg = json.loads((tmp_path / "nohook" / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = None
    (tmp_path / "nohook" / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "local_saes.py").write_text(textwrap.dedent("""\
        from saebench import loading

        def make():
            return loading.load_zoo_dictionary("resid-L2-topk16")
        """))
    (tmp_path / "s.yaml").write_text(textwrap.dedent("""\
        model: zoo
        allow_factory: true
        data: {source: zoo, n_tokens: 1024}
        dictionaries:
          given: {path: nohook, hook: blocks.2.hook_resid_pre}
          missing: {path: nohook}
          local: {factory: "local_saes:make"}
        defaults: {options: {n_boot: 50}}
        checks:
          - {metric: l0, dictionaries: ["*"], threshold: "<= 70"}
        """))
    run = SuiteRun(load_suite(tmp_path / "s.yaml"), RunSettings(device="cpu"))
    rows = {c.dictionaries[0]: run.result(c) for c in run.suite.checks}
    assert rows["given"]["verdict"] == "pass" and rows["given"]["hook"] == "blocks.2.hook_resid_pre"
    assert rows["local"]["verdict"] == "pass"
    assert rows["missing"]["verdict"] == "error" and "hook" in rows["missing"]["message"]


RANDOM_SUITE = """\
model: zoo
data: {source: zoo, n_tokens: 2048}
dictionaries: {good: {zoo: resid-L2-topk16}, tc: {zoo: transcoder-L3}}
defaults: {options: {n_boot: 200, seed: 7}}
checks:
  - metric: ce_loss_recovered
    dictionaries: [good, tc]
    options: {random_baseline: true}
    threshold: "margin_low >= 0.01"
  - metric: kl_div_score
    dictionaries: [good]
    options: {ablation: mean, random_baseline: true, error_term: true}
"""


def test_random_baseline_is_the_metric_of_a_random_dictionary_of_the_same_shape(tmp_path):
    """random_value is what `evaluate` gives for `random_like(dictionary, seed)` on its own,
    and the margin is value − random_value with a paired interval around it."""
    (tmp_path / "s.yaml").write_text(RANDOM_SUITE)
    run = SuiteRun(load_suite(tmp_path / "s.yaml"), RunSettings(device="cpu"))
    run.prepare()
    checks = {c.id: c for c in run.suite.checks}
    run.compute(checks.values())
    for name in ("good", "tc"):
        row = run.result(checks[f"{name}::ce_loss_recovered[random_baseline=true]"])
        (part,) = run._dictionaries[name]
        random = random_like(part, seed=7)
        alone = evaluate(run.model, {"r": random.module}, run.tokens, ["ce_loss_recovered"],
                         n_boot=0, progress=False, batch_size=16)
        assert row["random_value"] == pytest.approx(alone["value"].item(), rel=1e-9)
        assert row["margin"] == pytest.approx(row["value"] - row["random_value"], abs=1e-12)
        assert row["margin_low"] <= row["margin"] <= row["margin_high"]
        assert row["verdict"] == "pass" and "random" in row["message"]
    spliced_back = run.result(checks["good::kl_div_score[mean,error_term=true,"
                                     "random_baseline=true]"])
    assert spliced_back["value"] == spliced_back["random_value"] == 1.0
    assert spliced_back["margin"] == 0.0
