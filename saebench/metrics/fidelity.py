"""Downstream feature fidelity: do a later dictionary's features still fire as they did?

Splice dictionary set A, and encode the activation at a later hook with dictionary B (the
check's `read:`), once in the clean pass and once in the spliced pass (research seed 000).
Over the evaluated positions at or after a spliced one:

- `feature_fidelity`: per B-feature Pearson correlation of its activation, clean vs
  spliced, averaged with weights = how often the feature fires clean, over B's live
  features (active at least once clean, not constant). A live feature that the splice
  silences (constant when spliced) counts as correlation 0; one that never fires clean has
  no correlation and no weight, never a NaN passed off as a number.
- `feature_jaccard`: mean over positions of |active clean ∩ active spliced| / |∪| of B's
  active sets (1 where both are empty).
- `feature_l0_drift`: |L0_spliced / L0_clean − 1|, B's mean active count spliced against
  clean (the signed values are in the parts). A TopK B keeps its L0 by construction, so
  this says something only for ReLU / JumpReLU dictionaries.

All three share one probe (streaming float64 sums per sequence on the device); the
per-feature correlations go to features.csv (table `fidelity`).

    - {metric: feature_fidelity, splice: [resid-L1-topk16], read: resid-L2-topk16,
       threshold: "ci_low >= 0.8"}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from saebench.hooks import hook_order
from saebench.metrics.registry import (
    FRACTION,
    NON_NEGATIVE,
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

SUMS = ("ff_sx", "ff_sy", "ff_sxx", "ff_syy", "ff_sxy", "ff_count")
"""Per-feature sums [n_seq, d_sae]: clean (x) and spliced (y) activations, their squares and
product, and the clean active count."""
SCALARS = ("ff_n", "ff_jaccard", "ff_l0_clean", "ff_l0_spliced")


class FidelityProbe(Probe):
    """Encodes B's read hook in the clean and the spliced pass and sums, per sequence over
    the positions the splice can reach, what the three metrics need."""

    def __init__(self, read: object) -> None:
        self.read = read
        self.key = ("feature_fidelity", read.name, read.read_hook)
        self.clean_hooks = self.spliced_hooks = (read.read_hook,)

    def batch(self, view: BatchView, sweep: int) -> Mapping[str, Tensor]:
        hook = self.read.read_hook
        keep = view.reached
        x = self.read.encode(view.clean[hook]).double()
        y = self.read.encode(view.spliced[hook]).double()
        w = keep.to(x.dtype)[..., None]
        on_x, on_y = x != 0, y != 0
        union = (on_x | on_y).sum(-1)
        jaccard = torch.where(union > 0, (on_x & on_y).sum(-1) / union.clamp_min(1), 1.0)
        per_position = {"ff_sx": x, "ff_sy": y, "ff_sxx": x * x, "ff_syy": y * y,
                        "ff_sxy": x * y, "ff_count": on_x.to(x.dtype)}
        out = {name: (value * w).sum(1) for name, value in per_position.items()}
        kept = keep.to(x.dtype)
        return out | {"ff_n": kept.sum(-1), "ff_jaccard": (jaccard * kept).sum(-1),
                      "ff_l0_clean": (on_x.sum(-1) * kept).sum(-1),
                      "ff_l0_spliced": (on_y.sum(-1) * kept).sum(-1)}


def correlations(s: Terms) -> tuple[Tensor, Tensor]:
    """Per-feature Pearson correlation [..., d_sae] (0 where the spliced activation is
    constant) and weights (the clean active count; 0 for features that are not live)."""
    n = s["ff_n"][..., None]
    vx = s["ff_sxx"] - s["ff_sx"] ** 2 / n
    vy = s["ff_syy"] - s["ff_sy"] ** 2 / n
    cov = s["ff_sxy"] - s["ff_sx"] * s["ff_sy"] / n
    live = (s["ff_count"] > 0) & (vx > 0)
    r = torch.where(live & (vy > 0), cov / (vx * vy).clamp_min(1e-300).sqrt(), 0.0)
    return r.clamp(-1.0, 1.0), torch.where(live, s["ff_count"], 0.0)


def _weighted(s: Terms, o: Options) -> Tensor:
    r, w = correlations(s)
    return (w * r).sum(-1) / w.sum(-1)


def _needs(o: Options, site: Site) -> Needs:
    if len(site.read) != 1 or not site.read[0].single:
        raise ValueError("feature fidelity reads one dictionary with one read hook (read:)")
    read = site.read[0]
    if not read.has_features:
        raise ValueError(f"feature fidelity needs the features of {read.name!r}, a callable "
                         "that returns only a reconstruction")
    first = min(hook_order(h) for d in site.dictionaries for h in d.write_hooks)
    if hook_order(read.read_hook) < first:
        raise ValueError(f"{read.name!r} reads {read.read_hook}, before the spliced set first "
                         "writes: the splice cannot change what it sees")
    return Needs(spliced=True, probes=(FidelityProbe(read),))


def _feature_rows(ctx: TableContext) -> dict[str, list[dict]]:
    """Per live B-feature: clean density and mean activation, correlation (table fidelity)."""
    s = {k: v.sum(0) for k, v in ctx.terms.items() if k.startswith("ff_")}
    r, w = correlations(s)
    n = float(s["ff_n"])
    return {"features.csv": [
        {"table": "fidelity", "feature": f, "active_share": float(s["ff_count"][f]) / n,
         "mean_activation": float(s["ff_sx"][f]) / n, "correlation": float(r[f])}
        for f in torch.nonzero(w > 0).flatten().tolist()]}


def _l0(s: Terms) -> tuple[Tensor, Tensor]:
    return s["ff_l0_clean"] / s["ff_n"], s["ff_l0_spliced"] / s["ff_n"]


def _terms(*names: str):
    return lambda o: ("ff_n", *names)


COMMON = {"kind": "downstream", "count": "ff_n", "reads": True, "needs": _needs,
          "breakdowns": ("source",)}

FEATURE_FIDELITY = register_metric(Metric(
    name="feature_fidelity",
    terms=_terms(*SUMS, "ff_jaccard"),
    aggregate=_weighted,
    higher_is_better=True,
    description="How faithfully a later dictionary B (read:) still sees its features with the "
                "set spliced: per B-feature Pearson correlation of its activation clean vs "
                "spliced over the positions the splice reaches, averaged with weights = the "
                "feature's clean activation count over B's live features (a live feature the "
                "splice silences counts 0). 1 = every feature fires as it did. Per-feature "
                "values in features.csv.",
    denominator=lambda s, o: correlations(s)[1].sum(-1) / s["ff_n"],
    denominator_name="B's mean live active count per position (the weights)",
    parts_of=lambda s, o: {"n_live": (correlations(s)[1] > 0).sum(-1),
                           "jaccard": s["ff_jaccard"] / s["ff_n"]},
    bounds=(-1.0, 1.0),
    tables=_feature_rows,
    **COMMON,
))

register_metric(Metric(
    name="feature_jaccard",
    terms=_terms("ff_jaccard"),
    aggregate=lambda s, o: s["ff_jaccard"] / s["ff_n"],
    higher_is_better=True,
    description="Mean over positions of the Jaccard overlap |A_clean ∩ A_spliced| / |A_clean "
                "∪ A_spliced| of a later dictionary B's active feature sets (read:), clean vs "
                "spliced (1 where both are empty).",
    bounds=FRACTION,
    **COMMON,
))

register_metric(Metric(
    name="feature_l0_drift",
    terms=_terms("ff_l0_clean", "ff_l0_spliced"),
    aggregate=lambda s, o: (_l0(s)[1] / _l0(s)[0] - 1).abs(),
    higher_is_better=False,
    description="|L0_spliced / L0_clean − 1| of a later dictionary B (read:): how much its "
                "mean number of active features moves when the set is spliced. A TopK B keeps "
                "its L0 by construction; use it on ReLU / JumpReLU dictionaries.",
    denominator=lambda s, o: _l0(s)[0],
    denominator_name="B's mean L0 on the clean model",
    parts_of=lambda s, o: {"l0_clean": _l0(s)[0], "l0_spliced": _l0(s)[1]},
    bounds=NON_NEGATIVE,
    **COMMON,
))
