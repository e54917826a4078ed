"""Shards: balanced, deterministic, whole prefix groups, every check in exactly one shard."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saebench.checks import RunSettings, SuiteRun
from saebench.discovery import suite_arg
from saebench.shards import Shard, assign, parse_shard
from saebench.suite import load_suite

pytest_plugins = ["pytester"]


def test_shards_parse_one_based():
    assert parse_shard("2/3") == Shard(2, 3)
    assert str(parse_shard(" 1 / 1 ")) == "1/1"


@pytest.mark.parametrize(("text", "message"), [
    ("0/3", "numbered 1..N"), ("4/3", "numbered 1..N"), ("1/0", "numbered 1..N"),
    ("3", "expected I/N"), ("a/b", "expected I/N"), ("1/2/3", "expected I/N"),
])
def test_bad_shards_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_shard(text)


costs = st.dictionaries(st.text("abcdefgh:L0123", min_size=1, max_size=6),
                        st.integers(0, 10**6), min_size=0, max_size=30)


@settings(max_examples=60, deadline=None)
@given(costs=costs, count=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_every_group_is_in_one_shard_balanced_and_order_free(costs, count, seed):
    shards = assign(costs, count)
    assert set(shards) == set(costs) and set(shards.values()) <= set(range(1, count + 1))
    names = list(costs)
    random.Random(seed).shuffle(names)
    assert assign({n: costs[n] for n in names}, count) == shards
    loads = [sum(c for n, c in costs.items() if shards[n] == i) for i in range(1, count + 1)]
    assert max(loads) - min(loads) <= max(costs.values(), default=0)


@pytest.fixture(scope="module")
def toy_run():
    run = SuiteRun(load_suite(suite_arg("toy-full")), RunSettings(device="cpu"))
    run.prepare()
    return run


def test_prefix_groups_share_suite_data_and_first_spliced_layer(toy_run):
    groups = {c.id: toy_run.prefix_group(c) for c in toy_run.suite.checks}
    assert groups["resid-L2-topk16::l0"] == "toy-full:tokens:L2"
    assert groups["transcoder-L3::ce_loss_recovered[zero]"] == "toy-full:tokens:L3"
    ioi = [c for c in toy_run.suite.checks if c.task == "ioi" and c.dictionaries == (
        "resid-L1-topk16",)]
    assert ioi and {groups[c.id] for c in ioi} == {"toy-full:ioi:L1"}
    spliced_sets = [c for c in toy_run.suite.checks if len(c.dictionaries) > 1]
    for check in spliced_sets:  # a set starts at its earliest layer
        layers = [int(d.split("-L")[1][0]) for d in check.dictionaries if "-L" in d]
        assert groups[check.id].endswith(f":L{min(layers)}")


def test_costs_follow_passes_layers_and_tokens(toy_run):
    costs = toy_run.prefix_costs(toy_run.suite.checks)
    n_layers, n_tokens = toy_run.model.cfg.n_layers, toy_run.tokens.numel()
    checks = [c for c in toy_run.suite.checks if toy_run.prefix_group(c) == "toy-full:tokens:L3"]
    requests = {key for c in checks for key in toy_run._keys(c)}
    assert costs["toy-full:tokens:L3"] == n_tokens * (n_layers + len(requests) * (n_layers - 3))
    assert costs["toy-full:tokens:L0"] > costs["toy-full:tokens:L3"]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_every_shard_of_the_toy_suite_gets_work_and_loads_stay_balanced(toy_run, count):
    costs = toy_run.prefix_costs(toy_run.suite.checks)
    shards = assign(costs, count)
    owners = {shards[toy_run.prefix_group(c)] for c in toy_run.suite.checks}
    assert owners == set(range(1, count + 1))
    loads = [sum(v for g, v in costs.items() if shards[g] == i) for i in range(1, count + 1)]
    assert max(loads) <= sum(costs.values()) / count + max(costs.values())


def test_the_plugin_deselects_other_shards_checks_keeping_groups_whole(pytester, toy_run):
    def collected(*args: str) -> list[str]:
        out = pytester.runpytest_inprocess("--collect-only", "-q", "-m", "eval", "--suite",
                                           "toy-full", "-p", "no:cacheprovider", *args)
        return [line.split("::", 1)[1] for line in out.outlines if "::" in line]

    everything = collected()
    parts = [collected("--saebench-shard", f"{i}/3") for i in (1, 2, 3)]
    assert len(everything) == len(toy_run.suite.checks) and all(parts)
    assert sorted(sum(parts, [])) == sorted(everything)
    group = {c.id: toy_run.prefix_group(c) for c in toy_run.suite.checks}
    owners = [{group[i] for i in part} for part in parts]
    assert sum(map(len, owners)) == len(set.union(*owners))  # no group in two shards
    out = pytester.runpytest_inprocess("--suite", "toy", "--saebench-shard", "4/3")
    assert out.ret == pytest.ExitCode.USAGE_ERROR
    assert "--saebench-shard '4/3': shards are numbered 1..N" in out.stderr.str()
