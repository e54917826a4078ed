"""Shards: a deterministic, balanced split of a run's checks, for CI matrices and Slurm arrays.

A shard takes whole *prefix groups*: the checks of one suite on the same data (its tokens,
or one task) whose dictionaries first splice at the same layer. One process computes such
a group's clean prefix once and shares it, so a group is never split. Groups are dealt out
by estimated cost (passes x layers x tokens, `SuiteRun.prefix_group`), largest first, each
to the shard with the least cost so far (ties to the lower shard, then by group name), so
every process that sees the same selection computes the same split.

    >>> assign({"toy:tokens:L0": 9.0, "toy:tokens:L2": 5.0, "toy:ioi:L2": 4.0}, 2)
    {'toy:tokens:L0': 1, 'toy:tokens:L2': 2, 'toy:ioi:L2': 2}

Shards are numbered from 1: `--saebench-shard 2/3` is the second of three.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

SHARD_FILE = "shard.json"
"""What a shard's run directory records about its shard (`saebench merge` reads it)."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (1 <= index <= count)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """`"2/3"` -> Shard(2, 3); ValueError saying what is expected otherwise.

        >>> parse_shard("1/1")
        Shard(index=1, count=1)
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None:
        raise ValueError(f"{text!r}: expected I/N, shard I of N, such as 1/3")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f"{text!r}: shards are numbered 1..N (a Slurm array: --array=1-N)")
    return Shard(index, count)


def assign(costs: Mapping[str, float], count: int) -> dict[str, int]:
    """The shard (1..count) of each group, from the groups' estimated costs: largest first,
    each to the least-loaded shard, so the heaviest shard is at most the lightest plus one
    group. Deterministic in the names and costs alone (not in the mapping's order)."""
    loads = [0.0] * count
    shards: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        lightest = min(range(count), key=lambda i: (loads[i], i))
        loads[lightest] += costs[name]
        shards[name] = lightest + 1
    return shards
