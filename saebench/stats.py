"""Bootstrap intervals, aggregation rules and verdicts for metric values.

A metric's value is its aggregate of the terms summed over sequences. Its interval is a
percentile bootstrap over sequences, *paired*: clean, spliced and ablated runs saw the same
sequences, so one set of resample weights applies to every term, and the resampled sums are
one matrix product, `weights @ terms`.

    >>> s = summarize(get_metric("ce_loss_recovered"), terms, {"ablation": "zero"})
    >>> s.value, (s.ci_low, s.ci_high), s.verdict, s.reason, s.parts

Verdicts never let an invalid number pass as valid: "empty" (no sequences, no counted
positions, or a splice that changed no counted position), "nan" (a non-finite
reconstruction or feature activation of a dictionary involved, a non-finite term or
value), "unstable" (a ratio whose denominator is tiny or whose interval includes 0, some
resamples non-finite, a value outside its own interval, or a single sequence), "ok".
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from saebench.metrics.registry import HEALTH_TERMS, Metric, parts

VERDICTS = ("ok", "unstable", "nan", "empty")
WEIGHT_BLOCK = 64
"""Resample weights are drawn in blocks of this many rows, so chunking never changes them."""
CHUNK_BYTES = 1 << 28


@dataclass(frozen=True)
class Summary:
    """A metric's value, its bootstrap interval, n (sequences or prompts) and verdict.

    `reason` explains any verdict but "ok" (empty when ok); `parts` holds the raw
    quantities behind the value (see `saebench.metrics.registry.parts`).
    """

    value: float
    ci_low: float
    ci_high: float
    n: int
    verdict: str
    reason: str = ""
    parts: dict[str, float] = field(default_factory=dict)


def ratio_of_means(num: Tensor, den: Tensor) -> Tensor:
    """Σ num / Σ den over sequences: the ratio of pooled means, the aggregation rule here.

    Not the mean of per-sequence ratios, which gives huge weight to sequences with a
    near-zero denominator (ai-safety-foundation/sparse_autoencoder PR #157). Leading
    dimensions other than the sequence dimension (the first) are kept.

        >>> ratio_of_means(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 3.0]))  # not 2/3
        tensor(0.5000)
    """
    return num.sum(0) / den.sum(0)


def _weight_blocks(n: int, n_boot: int, seed: int, rows: int) -> Iterator[Tensor]:
    """Resample counts in chunks of `rows` resamples ([≤rows, n], float64).

    Indices are drawn in blocks of `WEIGHT_BLOCK` resamples from one generator, so any
    `rows` that is a multiple of the block gives the same weights.
    """
    gen = torch.Generator().manual_seed(seed)
    one = torch.ones((), dtype=torch.float64)
    for start in range(0, n_boot, rows):
        chunk = torch.zeros(min(rows, n_boot - start), n, dtype=torch.float64)
        for b in range(0, len(chunk), WEIGHT_BLOCK):
            block = chunk[b:b + WEIGHT_BLOCK]
            idx = torch.randint(n, block.shape, generator=gen)
            block.scatter_add_(1, idx, one.expand(block.shape))
        yield chunk


def bootstrap_weights(n: int, n_boot: int, seed: int) -> Tensor:
    """Resample counts [n_boot, n] (float64): row b says how often each sequence is drawn.

    Each row sums to n. Deterministic given the seed. The same weights apply to every term
    (paired resampling), so resampled sums are `weights @ terms`.
    """
    if n <= 0 or n_boot <= 0:
        return torch.zeros(max(n_boot, 0), max(n, 0), dtype=torch.float64)
    rows = -(-n_boot // WEIGHT_BLOCK) * WEIGHT_BLOCK
    return next(_weight_blocks(n, n_boot, seed, rows))


def bootstrap_interval(values: Tensor, n_boot: int, seed: int,
                       counts: Tensor | None = None) -> tuple[float, float]:
    """The 95% percentile interval of the mean of per-sequence `values` [n] over `n_boot`
    resamples of the sequences, or of the pooled ratio Σ values / Σ `counts` when given
    (NaN for fewer than two sequences)."""
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    weights = bootstrap_weights(n, n_boot, seed)
    means = weights @ values.double() / (n if counts is None else weights @ counts.double())
    low, high = torch.quantile(means, means.new_tensor([0.025, 0.975])).tolist()
    return (low, high)


def _result(value: float, verdict: str, reason: str, n: int,
            ci: tuple[float, float] = (math.nan, math.nan),
            parts_: dict[str, float] | None = None) -> Summary:
    return Summary(value=value, ci_low=ci[0], ci_high=ci[1], n=n, verdict=verdict,
                   reason=reason, parts=parts_ or {})


def _gather(metric: Metric, terms: Mapping[str, Tensor], options: Mapping[str, Any],
            device: torch.device | str | None) -> dict[str, Tensor]:
    names = tuple(dict.fromkeys((metric.count_term, *metric.terms(options))))
    missing = [name for name in names if name not in terms]
    if missing:
        raise KeyError(f"metric {metric.name!r} needs term(s) {', '.join(missing)}; "
                       f"got {', '.join(terms) or 'none'}")
    cols = {name: torch.as_tensor(terms[name]).to(device=device, dtype=torch.float64)
            for name in names}
    sizes = {name: (col.shape[0] if col.dim() else -1) for name, col in cols.items()}
    if len(set(sizes.values())) != 1 or -1 in sizes.values():
        raise ValueError(f"metric {metric.name!r}: terms must be per-sequence tensors [n_seq] "
                         f"or [n_seq, k] of one length; got {sizes}")
    return cols


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def health_problem(terms: Mapping[str, Tensor], unit: str = "sequence") -> str | None:
    """Why the dictionaries behind `terms` cannot be trusted, or None.

    The engine counts, per `unit` (sequence or prompt) and dictionary, the evaluated
    positions whose reconstruction or feature activations are not finite
    (`nonfinite:<name>`) and the first of them (`nonfinite_at:<name>`); any such position
    invalidates every metric of the request, even one (like L0) whose own terms are finite.

        >>> health_problem({"nonfinite:sae": torch.tensor([0.0, 2.0]),
        ...                 "nonfinite_at:sae": torch.tensor([-1.0, 5.0])})[-38:]
        '); the first at sequence 1, position 5'
    """
    count_prefix, at_prefix = HEALTH_TERMS
    problems = []
    for name, counts in terms.items():
        if not name.startswith(count_prefix):
            continue
        counts = torch.as_tensor(counts)
        total = int(counts.sum())
        if total == 0:
            continue
        dictionary = name[len(count_prefix):]
        row = int(torch.nonzero(counts)[0])
        where = f"{unit} {row}"
        first = terms.get(at_prefix + dictionary)
        if first is not None:
            where += f", position {int(torch.as_tensor(first)[row])}"
        problems.append(f"dictionary {dictionary!r} gives a non-finite reconstruction or "
                        f"feature activation (NaN or inf) at {total} evaluated position(s); "
                        f"the first at {where}")
    return "; ".join(problems) or None


def _bootstrap(metric: Metric, cols: dict[str, Tensor], options: Mapping[str, Any], n: int,
               n_boot: int, seed: int, chunk_bytes: int) -> tuple[Tensor, Tensor | None]:
    """Aggregate (and denominator) of each resample: [n_boot] each, chunked over resamples."""
    scalars = [name for name, col in cols.items() if col.dim() == 1]
    vectors = [name for name, col in cols.items() if col.dim() > 1]
    stacked = torch.stack([cols[name] for name in scalars], dim=1)
    width = len(scalars) + sum(cols[name][0].numel() for name in vectors)
    per_row = 8 * (n + 4 * width)
    rows = max(WEIGHT_BLOCK, chunk_bytes // per_row // WEIGHT_BLOCK * WEIGHT_BLOCK)
    values, dens = [], []
    for weights in _weight_blocks(n, n_boot, seed, rows):
        weights = weights.to(stacked.device)
        summed = dict(zip(scalars, (weights @ stacked).unbind(1), strict=True))
        for name in vectors:
            col = cols[name]
            summed[name] = (weights @ col.flatten(1)).view(-1, *col.shape[1:])
        values.append(metric.aggregate(summed, options).reshape(-1))
        if metric.denominator is not None:
            dens.append(metric.denominator(summed, options).reshape(-1))
    return torch.cat(values), (torch.cat(dens) if dens else None)


def resampled(metric: Metric, terms: Mapping[str, Tensor], options: Mapping[str, Any],
              n_boot: int, seed: int) -> Tensor:
    """The metric's value on each of `n_boot` resamples of the sequences [n_boot].

    The resample weights depend only on (number of sequences, n_boot, seed), so two runs
    over the same sequences resampled with the same seed are paired: their differences,
    resample by resample, give a paired interval (`saebench.gate`).
    """
    cols = _gather(metric, terms, options, None)
    n = next(iter(cols.values())).shape[0]
    return _bootstrap(metric, cols, options, n, n_boot, seed, CHUNK_BYTES)[0]


def _interval(samples: Tensor, alpha: float) -> tuple[float, float, int]:
    """Percentile interval of the finite samples, and how many samples were not finite."""
    finite = torch.isfinite(samples)
    bad = int((~finite).sum())
    if bad == len(samples):
        return math.nan, math.nan, bad
    q = torch.quantile(samples[finite], samples.new_tensor([alpha / 2, 1 - alpha / 2]))
    return float(q[0]), float(q[1]), bad


def summarize(
    metric: Metric,
    terms: Mapping[str, Tensor],
    options: Mapping[str, Any] | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    min_denominator: float = 1e-3,
    chunk_bytes: int = CHUNK_BYTES,
    device: torch.device | str | None = None,
) -> Summary:
    """Value, percentile-bootstrap interval over sequences, n and verdict of one metric.

    `terms` maps term name -> per-sequence tensor [n_seq] or [n_seq, k]. The interval uses
    `n_boot` paired resamples (`n_boot=0` or `metric.bootstrap=False`: NaN bounds); wide
    terms are processed in chunks of resamples holding about `chunk_bytes`. `device` runs
    the resampling elsewhere (e.g. "cuda" for feature_counts of a wide dictionary).
    A missing term raises KeyError; an invalid option ValueError.
    """
    options = {} if options is None else options
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    cols = _gather(metric, terms, options, device)
    n = next(iter(cols.values())).shape[0]
    if n == 0:
        return _result(math.nan, "empty", "no sequences were evaluated", 0)
    unit = "prompt" if metric.kind == "task" else "sequence"
    unhealthy = health_problem(terms, unit)
    if unhealthy:
        return _result(math.nan, "nan", unhealthy, n)
    guard = metric.guard_term
    if guard is not None and guard in terms and float(torch.as_tensor(terms[guard]).sum()) == 0:
        return _result(math.nan, "empty", f"the splice changed no counted position ({guard} "
                       f"is 0 in {n} {unit}(s)): the selected positions hold only special "
                       "tokens, or lie after every position whose prediction is counted", n)
    bad_terms = [f"{name!r} ({int((~torch.isfinite(col)).sum())} of {n} sequences)"
                 for name, col in cols.items() if not torch.isfinite(col).all()]
    if bad_terms:
        return _result(math.nan, "nan", f"non-finite (NaN or inf) values in term "
                       f"{', '.join(bad_terms)}", n)
    summed = {name: col.sum(0) for name, col in cols.items()}
    count = float(summed[metric.count_term])
    if count == 0:
        return _result(math.nan, "empty", f"{metric.count_term} is 0: no positions were "
                       f"counted in {n} sequence(s)", n)
    value = float(metric.aggregate(summed, options))
    audit = parts(metric, summed, options)
    den = audit.get("denominator")
    if not math.isfinite(value):
        why = f"; denominator {metric.denominator_name} = {_fmt(den)}" if den is not None else ""
        return _result(math.nan, "nan", f"value is {value} from finite terms{why}", n,
                       parts_=audit)

    reasons = []
    ci = den_ci = (math.nan, math.nan)
    if n == 1:
        reasons.append("a single sequence: no interval over sequences can be estimated")
    elif n_boot > 0 and metric.bootstrap:
        samples, den_samples = _bootstrap(metric, cols, options, n, n_boot, seed, chunk_bytes)
        *ci, bad = _interval(samples, alpha)
        if bad:
            reasons.append(f"{bad} of {n_boot} resamples gave a non-finite value")
        tol = 1e-9 * max(1.0, abs(value))
        if not ci[0] - tol <= value <= ci[1] + tol:
            reasons.append(f"the value lies outside its own bootstrap interval "
                           f"[{_fmt(ci[0])}, {_fmt(ci[1])}]: resampling is biased for it here")
        if den_samples is not None:
            den_ci = _interval(den_samples, alpha)[:2]
    if den is not None:
        why = [f"|value| is below min_denominator {min_denominator:g}"
               ] if abs(den) < min_denominator else []
        why += ["its interval includes 0"] if den_ci[0] <= 0 <= den_ci[1] else []
        if why:
            interval = (f", {100 * (1 - alpha):g}% CI [{_fmt(den_ci[0])}, {_fmt(den_ci[1])}]"
                        if math.isfinite(den_ci[0]) else "")
            reasons.append(f"denominator {metric.denominator_name} = {_fmt(den)}{interval}: "
                           f"{' and '.join(why)}, so the ratio is not stable")
    verdict = "unstable" if reasons else "ok"
    return _result(value, verdict, "; ".join(reasons), n, tuple(ci), audit)
