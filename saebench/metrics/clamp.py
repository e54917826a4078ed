"""`clamp_effect`: does clamping an upstream feature move the downstream feature it predicts?

For a spliced dictionary A and a later dictionary B (the check's `read:`), research seed
000 pairs features across layers by their clean correlation and clamps one to see the
other respond. Three passes over the data (one probe, `sweeps = 3`):

1. clean activity of every A and B feature (counts, A's maxima and means);
2. the clean cross-correlation of A's and B's `top_n` most frequent features (so a
   24k-wide pair of dictionaries costs a `top_n` × `top_n` matrix, not 24k × 24k), and
   the `k` pairs (i, j) of largest |correlation|;
3. per pair, a spliced pass with feature i clamped to `value` (`0`, a number, or `max`:
   its maximum on the data) at every spliced position, against the spliced pass without
   the clamp: the change of j's activation, summed per sequence, over the first
   `sequences` sequences (default 64: the clamped passes are the cost, pairs + 1 per batch).

The value is the share of the k pairs whose clamp moves j in the direction the correlation
predicts (sign(r) × sign(value − mean of i)); each pair's mean change with its bootstrap
interval is in features.csv (table `clamp`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from saebench.metrics.registry import (
    FRACTION,
    BatchView,
    Metric,
    Needs,
    Options,
    Probe,
    Site,
    TableContext,
    Terms,
    register_metric,
)
from saebench.options import Option, number, positive_int, quote
from saebench.splice import FeatureEdit


def _clamp_value(value: Any) -> float | str:
    """`max`, or a finite number: a clamp to an infinite value leaves no finite activation
    downstream to compare."""
    if value == "max":
        return value
    try:
        return number(value)
    except ValueError:
        raise ValueError(f"must be max or a finite number, got {quote(value)}") from None


TOP_N = Option("how many of each dictionary's most frequent features clamp_effect pairs",
               positive_int, 64, shapes_run=True)
PAIRS = Option("how many top-correlated feature pairs clamp_effect clamps", positive_int, 8,
               shapes_run=True)
VALUE = Option("what clamp_effect clamps the upstream feature to: max (its maximum on the "
               "data) or a finite number", _clamp_value, "max", shapes_run=True)
SEQUENCES = Option("on how many of the first sequences clamp_effect runs its clamped passes",
                   positive_int, 64, shapes_run=True)


class ClampProbe(Probe):
    """Finds the top correlated (A feature, B feature) pairs and measures the clamps."""

    sweeps = 3

    def __init__(self, upstream: Any, read: Any, top_n: int, pairs: int,
                 value: float | str, sequences: int) -> None:
        self.upstream, self.read = upstream, read
        self.top_n, self.n_pairs, self.value, self.sequences = top_n, pairs, value, sequences
        self.key = ("clamp_effect", upstream.name, read.name, top_n, pairs, value, sequences)
        self.clean_hooks = (upstream.read_hook, read.read_hook)
        self.stats: dict[str, Tensor] = {}
        self.pairs: list[tuple[int, int, float, float, float]] = []
        """(i, j, correlation, clamp value, expected sign) of each clamped pair."""

    def _features(self, view: BatchView) -> tuple[Tensor, Tensor, Tensor]:
        keep = view.act_mask
        a = self.upstream.encode(view.clean[self.upstream.read_hook])[keep].double()
        b = self.read.encode(view.clean[self.read.read_hook])[keep].double()
        return a, b, keep

    def _add(self, **sums: Tensor) -> None:
        for name, value in sums.items():
            self.stats[name] = self.stats[name] + value if name in self.stats else value

    def batch(self, view: BatchView, sweep: int) -> Mapping[str, Tensor]:
        if sweep == 2:
            return self._clamp(view)
        a, b, _ = self._features(view)
        if sweep == 0:
            self._add(count_a=(a != 0).sum(0), count_b=(b != 0).sum(0), sum_a=a.sum(0),
                      n=a.new_tensor(float(len(a))))
            top = a.max(0).values if len(a) else a.new_full(a.shape[1:], -torch.inf)
            self.stats["max_a"] = torch.maximum(self.stats.get("max_a", top), top)
        else:
            a, b = a[:, self.top_a], b[:, self.top_b]
            self._add(sa=a.sum(0), sb=b.sum(0), saa=(a * a).sum(0), sbb=(b * b).sum(0),
                      sab=a.T @ b)
        return {}

    def end_sweep(self, sweep: int) -> None:
        s = self.stats
        if sweep == 0:
            self.top_a = _most_frequent(s["count_a"], self.top_n)
            self.top_b = _most_frequent(s["count_b"], self.top_n)
        elif sweep == 1:
            self.pairs = self._top_pairs()

    def _top_pairs(self) -> list[tuple[int, int, float, float, float]]:
        s, n = self.stats, self.stats["n"]
        if "sab" not in s or n < 2:
            return []
        va, vb = s["saa"] - s["sa"] ** 2 / n, s["sbb"] - s["sb"] ** 2 / n
        cov = s["sab"] - torch.outer(s["sa"], s["sb"]) / n
        defined = (va[:, None] > 0) & (vb[None, :] > 0)
        r = torch.where(defined, cov / (torch.outer(va, vb).clamp_min(1e-300)).sqrt(), 0.0)
        order = torch.sort(r.abs().flatten(), descending=True, stable=True).indices
        pairs = []
        for flat in order[:self.n_pairs].tolist():
            ia, jb = divmod(flat, r.shape[1])
            if not defined[ia, jb]:
                break
            i, j = int(self.top_a[ia]), int(self.top_b[jb])
            value = float(s["max_a"][i]) if self.value == "max" else float(self.value)
            mean = float(s["sum_a"][i] / n)
            expect = float(torch.sign(r[ia, jb])) * (1.0 if value > mean else
                                                      -1.0 if value < mean else 0.0)
            pairs.append((i, j, float(r[ia, jb]), value, expect))
        return pairs

    def _clamp(self, view: BatchView) -> dict[str, Tensor]:
        hook = self.read.read_hook
        keep = view.reached.double()
        rows = torch.arange(len(keep), device=keep.device) + view.first_row
        keep = keep * (rows < self.sequences)[:, None]
        expect = keep.new_tensor([p[4] for p in self.pairs])
        if not keep.any():
            zeros = keep.new_zeros(len(keep), len(self.pairs))
            return {"clamp_n": keep.sum(1), "clamp_delta": zeros, "clamp_sign": zeros}
        base = self.read.encode(view.rerun((), (hook,))[hook]).double()
        deltas = []
        for i, j, _, value, _ in self.pairs:
            edit = FeatureEdit(self.upstream.name, (i,), value)
            clamped = self.read.encode(view.rerun((edit,), (hook,))[hook]).double()
            deltas.append(((clamped[..., j] - base[..., j]) * keep).sum(1))
        n = keep.sum(1)
        delta = torch.stack(deltas, 1) if deltas else n.new_zeros(len(n), 0)
        return {"clamp_n": n, "clamp_delta": delta, "clamp_sign": n[:, None] * expect}


def _most_frequent(counts: Tensor, n: int) -> Tensor:
    """The ids of the (at most) `n` features active most often, those never active left out."""
    order = torch.sort(counts, descending=True, stable=True).indices[:n]
    return order[counts[order] > 0]


def _toward(s: Terms) -> Tensor:
    """Per pair [..., k]: 1 where the mean change of j has the expected sign, 0 where it
    has not, NaN where the change is not finite (a clamp that overflowed the dictionary's
    dtype), so that the value is not a number rather than a count of such pairs as 0."""
    delta = s["clamp_delta"]
    toward = ((delta * torch.sign(s["clamp_sign"])) > 0).to(s["clamp_n"].dtype)
    return torch.where(delta.isfinite(), toward, torch.nan)


def _needs(o: Options, site: Site) -> Needs:
    if len(site.read) != 1 or not site.read[0].single:
        raise ValueError("clamp_effect reads one dictionary with one read hook (read:)")
    upstream, read = site.dictionaries[0], site.read[0]
    for d in (upstream, read):
        if not d.has_features:
            raise ValueError(f"clamp_effect needs the features of {d.name!r}")
    probe = ClampProbe(upstream, read, TOP_N.value(o, "top_n"), PAIRS.value(o, "pairs"),
                       VALUE.value(o, "value"), SEQUENCES.value(o, "sequences"))
    return Needs(probes=(probe,))


def _pair_rows(ctx: TableContext) -> dict[str, list[dict]]:
    """Each clamped pair: the features, their clean correlation, the clamp value and the
    mean change of the downstream feature per position, with its interval (table clamp)."""
    (probe,) = (p for p in ctx.probes.values() if isinstance(p, ClampProbe))
    n, delta = ctx.terms["clamp_n"], ctx.terms["clamp_delta"]
    rows = []
    for p, (i, j, r, value, _) in enumerate(probe.pairs):
        low, high = ctx.interval(delta[:, p], n)
        rows.append({"table": "clamp", "feature": i, "read_dictionary": probe.read.name,
                     "read_feature": j, "correlation": r, "clamp_value": value,
                     "effect": float(delta[:, p].sum() / n.sum()), "ci_low": low,
                     "ci_high": high})
    return {"features.csv": rows}


CLAMP_EFFECT = register_metric(Metric(
    name="clamp_effect",
    terms=lambda o: ("clamp_n", "clamp_delta", "clamp_sign"),
    aggregate=lambda s, o: _toward(s).mean(-1),
    higher_is_better=True,
    description="Share of the `pairs` (default 8) most correlated (A feature i, B feature j) "
                "pairs, among each dictionary's `top_n` (64) most frequent features on the "
                "clean model, for which clamping i (to `value`: max, its maximum, by default; "
                "or a number) inside the spliced A moves j's mean activation in the direction "
                "the correlation predicts, measured on the first `sequences` (64) sequences. B "
                "is the check's read: dictionary. Each pair's change, with its interval, is in "
                "features.csv.",
    kind="downstream",
    count="clamp_n",
    parts_of=lambda s, o: {"n_pairs": s["clamp_n"].new_tensor(s["clamp_delta"].shape[-1])},
    bounds=FRACTION,
    options={"top_n": TOP_N, "pairs": PAIRS, "value": VALUE, "sequences": SEQUENCES},
    needs=_needs,
    single=True,
    reads=True,
    tables=_pair_rows,
    breakdowns=("source",),
))
