"""Task metrics: logit difference recovered, sign agreement, remainder DLA, feature ablation.

Their terms are per-prompt values from `saebench.tasks.run_task` (kind "task", counted by
`n_prompts`); every value is a ratio of pooled means over prompts, so the bootstrap
resamples prompts, paired across the clean, spliced and ablated runs.

    >>> m = get_metric("logit_diff_recovered")
    >>> m.terms({"normalize": "zero"})
    ('n_prompts', 'ld_clean', 'ld_spliced', 'ld_zero')
    >>> summarize(m, result.terms["r2"], {"normalize": "zero"})

Terms: `n_prompts` (1 per prompt), `ld_clean`, `ld_spliced`, `ld_zero`, `ld_mean` (logit
differences at the answer position), `sign_agree` (1 where the spliced LD keeps the clean
sign), `dla_original`, `dla_reconstruction`, `dla_remainder`, `abs_dla_reconstruction`,
`abs_dla_remainder` (direct logit attributions at the dictionary's write hook) and
`ld_topk_zeroed` [n_prompts, K] (column j: LD with the top j+1 features zeroed jointly).
"""

from __future__ import annotations

from torch import Tensor

from saebench.metrics.registry import (
    FRACTION,
    UNBOUNDED,
    Metric,
    Needs,
    Options,
    Site,
    TableContext,
    Terms,
    register_metric,
)
from saebench.options import Option, choice_option, positive_int

NORMALIZE = choice_option("logit_diff_recovered against an ablation baseline: none, zero, "
                          "mean", "none", "zero", "mean")
SHARE = choice_option("remainder_dla share: signed or abs", "signed", "abs")
TOP_K = Option("how many top features feature_ablation zeroes", positive_int, 3,
               shapes_run=True, at_most="d_sae")


def normalize_kind(options: Options) -> str:
    """The `normalize` option of logit_diff_recovered ("none" by default), validated."""
    return NORMALIZE.value(options, "normalize")


def share_kind(options: Options) -> str:
    """The `share` option of remainder_dla ("signed" by default), validated."""
    return SHARE.value(options, "share")


def top_k(options: Options) -> int:
    """The `k` option of feature_ablation (3 by default), validated to be positive."""
    return TOP_K.value(options, "k")


def _prompt_rows(prefix: str):
    """A `tables` function: the task's per-prompt rows with the numbers named `prefix*`."""
    def tables(ctx: TableContext) -> dict[str, list[dict]]:
        return {"per_prompt.csv": [
            {k: v for k, v in row.items() if not isinstance(v, float) or k.startswith(prefix)}
            for row in ctx.per_prompt]}
    return tables


def _mean(s: Terms, name: str) -> Tensor:
    return s[name] / s["n_prompts"]


def _ld_terms(o: Options) -> tuple[str, ...]:
    kind = normalize_kind(o)
    base = ("n_prompts", "ld_clean", "ld_spliced")
    return base if kind == "none" else (*base, f"ld_{kind}")


def _ld_baseline(s: Terms, o: Options) -> Tensor:
    kind = normalize_kind(o)
    return s["ld_clean"] * 0 if kind == "none" else s[f"ld_{kind}"]


def _ld_denominator(s: Terms, o: Options) -> Tensor:
    return (s["ld_clean"] - _ld_baseline(s, o)) / s["n_prompts"]


def _ld_parts(s: Terms, o: Options) -> dict[str, Tensor]:
    parts = {"ld_clean": _mean(s, "ld_clean"), "ld_spliced": _mean(s, "ld_spliced")}
    kind = normalize_kind(o)
    if kind != "none":
        parts[f"ld_{kind}"] = _mean(s, f"ld_{kind}")
    return parts


register_metric(Metric(
    name="logit_diff_recovered",
    terms=_ld_terms,
    aggregate=lambda s, o: (s["ld_spliced"] - _ld_baseline(s, o))
    / (s["ld_clean"] - _ld_baseline(s, o)),
    higher_is_better=True,
    description="mean LD_spliced / mean LD_clean, LD = logit[answer] − logit[distractor] at the "
                "answer position; option `normalize` (none, zero, mean) gives (LD_spliced − "
                "LD_abl) / (LD_clean − LD_abl) against an ablation of the write hook(s). Ratio "
                "of pooled means over prompts.",
    kind="task",
    denominator=_ld_denominator,
    denominator_name="mean LD_clean (− mean LD_abl when normalized), in logits",
    parts_of=_ld_parts,
    options={"normalize": NORMALIZE},
    needs=lambda o, site: Needs(spliced=True,
                                ablations=frozenset({normalize_kind(o)} - {"none"})),
    tables=_prompt_rows("ld_"),
))

register_metric(Metric(
    name="sign_agreement",
    terms=lambda o: ("n_prompts", "sign_agree"),
    aggregate=lambda s, o: s["sign_agree"] / s["n_prompts"],
    higher_is_better=True,
    description="Share of prompts whose logit difference keeps its clean sign when spliced.",
    kind="task",
    bounds=FRACTION,
))


def _dla_terms(o: Options) -> tuple[str, ...]:
    base = ("n_prompts", "dla_original", "dla_reconstruction", "dla_remainder")
    return base if share_kind(o) == "signed" else (
        *base, "abs_dla_reconstruction", "abs_dla_remainder")


def _dla_denominator(s: Terms, o: Options) -> Tensor:
    if share_kind(o) == "signed":
        return _mean(s, "dla_original")
    return (s["abs_dla_reconstruction"] + s["abs_dla_remainder"]) / s["n_prompts"]


def _dla_share(s: Terms, o: Options) -> Tensor:
    if share_kind(o) == "signed":
        return s["dla_remainder"] / s["dla_original"]
    return s["abs_dla_remainder"] / (s["abs_dla_reconstruction"] + s["abs_dla_remainder"])


register_metric(Metric(
    name="remainder_dla",
    terms=_dla_terms,
    aggregate=_dla_share,
    higher_is_better=False,
    description="Share of the direct logit attribution (onto answer − distractor, through the "
                "clean final-LN scale, at the answer position) carried by the remainder e = "
                "target − x̂ at the write hook: option `share` signed (mean DLA(e) / mean "
                "DLA(original), default) or abs (mean |DLA(e)| / (mean |DLA(x̂)| + mean "
                "|DLA(e)|)), since the terms can cancel. Direct path only.",
    kind="task",
    denominator=_dla_denominator,
    denominator_name="mean DLA(original) (signed) or mean |DLA(x̂)| + |DLA(e)| (abs), in logits",
    parts_of=lambda s, o: {name: _mean(s, name) for name in
                           ("dla_original", "dla_reconstruction", "dla_remainder")},
    bounds=lambda o: FRACTION if share_kind(o) == "abs" else UNBOUNDED,
    needs_splice=False,
    options={"share": SHARE},
    needs=lambda o, site: Needs(spliced=True, dla=True),
    single=True,
    tables=_prompt_rows("dla_"),
))


def _topk_zeroed(s: Terms, o: Options) -> Tensor:
    k = top_k(o)
    width = s["ld_topk_zeroed"].shape[-1]
    if k > width:
        raise ValueError(f"feature_ablation with k={k}, but the task run zeroed at most "
                         f"{width} top features; run it with feature_k >= {k}")
    return s["ld_topk_zeroed"][..., k - 1]


def _feature_terms(o: Options) -> tuple[str, ...]:
    top_k(o)
    return ("n_prompts", "ld_spliced", "ld_topk_zeroed")


def _feature_needs(o: Options, site: Site) -> Needs:
    return Needs(spliced=True, feature_k=top_k(o))


def _feature_rows(ctx: TableContext) -> dict[str, list[dict]]:
    """The task's top-k feature table, each effect with its bootstrap interval over prompts."""
    effects = ctx.terms["feature_effect"]
    rows = []
    for j, row in enumerate(ctx.features):
        low, high = ctx.interval(effects[:, j])
        rows.append({"table": "ablation", **row, "ci_low": low, "ci_high": high})
    return {"features.csv": rows}


register_metric(Metric(
    name="feature_ablation",
    terms=_feature_terms,
    aggregate=lambda s, o: (s["ld_spliced"] - _topk_zeroed(s, o)) / s["ld_spliced"],
    higher_is_better=True,
    description="Share of the spliced logit difference carried by the top-k features (by mean "
                "activation on the task, option `k`, default 3): (mean LD_spliced − mean LD "
                "with them zeroed jointly) / mean LD_spliced. The per-feature table is in "
                "the task result's `features`.",
    kind="task",
    denominator=lambda s, o: _mean(s, "ld_spliced"),
    denominator_name="mean LD_spliced (logits)",
    parts_of=lambda s, o: {"ld_spliced": _mean(s, "ld_spliced"),
                           "ld_topk_zeroed": _topk_zeroed(s, o) / s["n_prompts"],
                           "k": s["n_prompts"].new_tensor(top_k(o))},
    options={"k": TOP_K},
    needs=_feature_needs,
    single=True,
    tables=_feature_rows,
))
