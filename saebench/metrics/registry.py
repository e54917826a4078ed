"""The metric registry: each metric's terms, aggregation and direction.

As in lm-evaluation-harness, a metric is a name, an aggregation and `higher_is_better`.
Every metric here is a function of *terms*: per-sequence sums (float64) that the engine
produces. `aggregate` receives each term already summed over sequences, possibly with
leading bootstrap dimensions (a scalar term [...], a vector term [..., k]) and returns [...];
that is what makes a paired bootstrap over sequences one matrix product (`saebench.stats`).
Every value is a ratio of pooled sums (e.g. mean CE = Σ CE / Σ n_pred), never a mean of
per-sequence ratios.

    >>> m = get_metric("ce_loss_recovered")
    >>> m.terms({"ablation": "mean"})
    ('n_pred', 'ce_clean', 'ce_spliced', 'ce_mean')
    >>> m.aggregate({k: v.sum(0) for k, v in terms.items()}, {"ablation": "mean"})

Term names (the contract with the engine; all float64 per-sequence sums):

- downstream: over prediction positions (input token not special, and a next token exists;
  the CE mask is `mask[:, :-1]`): `n_pred` (count), `ce_clean`, `ce_spliced`, `ce_zero`,
  `ce_mean` (sums of per-token CE); over every position whose input token is not special
  (the last one too, as sae_lens does): `n_kl` (count), `kl_spliced`, `kl_zero`, `kl_mean`
  (sums of per-token KL(clean ‖ variant)), `agree_spliced` (positions whose top-1 next
  token is the clean model's); at each of the L write hooks of the spliced pass, over the
  spliced positions (`n_layer`, count): `layer_sq_err` [L] (Σ‖written − clean‖²),
  `layer_sq_target` [L], `layer_sum_target` [L, d].
- reconstruction, over activation positions (input token not special): `n_act` (count),
  `l0`, `sq_err`, `sq_target`, `sum_target` (width d), `sq_recon`, `dot`, `cossim`,
  `l2_ratio`, `feature_counts` (width d_sae: positions where each feature is active).
- guards, which no value may be computed without: `n_pred_spliced`, `n_kl_spliced` (the
  counted positions whose prediction the splice can change: at or after a spliced
  position) and, for tasks, `n_prompts_spliced` (`SPLICED_COUNTS`); `nonfinite:<dictionary>`
  and `nonfinite_at:<dictionary>` (`HEALTH_TERMS`): per sequence, how many evaluated
  positions have a non-finite reconstruction or feature activation, and the first one
  (−1 when none). `saebench.stats.summarize` turns them into `empty` and `nan` verdicts.

A metric also declares its own options (`options`: `ablation`, `dense_threshold`, ...; the
options every check takes are `saebench.suite.OPTIONS`) and what it needs from a run
(`needs(options, site)` -> `Needs`): `saebench.plan` turns those declarations into engine
requests, so a metric family lives in one module. What the engine does not compute itself,
a metric computes in a `Probe` of its own, called on each batch with the clean and spliced
activations it asked for.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from saebench.options import Option, choice_option, fraction

Terms = Mapping[str, Tensor]
Options = Mapping[str, Any]

ABLATIONS = ("zero", "mean")
KINDS = ("downstream", "reconstruction", "task")
COUNT_TERMS = {"downstream": "n_pred", "reconstruction": "n_act", "task": "n_prompts"}
SPLICED_COUNTS = {"n_pred": "n_pred_spliced", "n_kl": "n_kl_spliced",
                  "n_prompts": "n_prompts_spliced"}
"""Count term -> the guard term counting those positions that the splice can change."""
HEALTH_TERMS = ("nonfinite:", "nonfinite_at:")
"""Prefixes of the per-dictionary health terms (name follows the colon)."""
UNBOUNDED = (-math.inf, math.inf)
FRACTION = (0.0, 1.0)
NON_NEGATIVE = (0.0, math.inf)
DOWNSTREAM_TERMS = ("n_pred", "ce_clean", "ce_spliced", "ce_zero", "ce_mean",
                    "n_kl", "kl_spliced", "kl_zero", "kl_mean", "kl_eps_iso", "kl_eps_cov",
                    "agree_spliced")
LAYER_TERMS = ("n_layer", "layer_sq_err", "layer_sq_target", "layer_sum_target")
RECONSTRUCTION_TERMS = ("n_act", "l0", "sq_err", "sq_target", "sum_target", "sq_recon", "dot",
                        "cossim", "l2_ratio", "feature_counts")
VECTOR_TERMS = ("sum_target", "feature_counts")
NOISE_TERMS = {"isotropic": "kl_eps_iso", "covariance": "kl_eps_cov"}
"""Each random-noise baseline of the engine's noise passes and the term of its KL sums."""


@dataclass
class BatchView:
    """What a `Probe` sees of one batch of an engine run.

    `tokens` [b, t]; `first_row` the index of its first sequence in the run's tokens;
    `act_mask` the evaluated positions (input token not special); `splice_mask` those the
    request splices; `reached` the evaluated positions at or after a spliced one (the only
    ones the splice can change); `clean` / `spliced`: activations at the probe's
    `clean_hooks` in the clean pass and at its `spliced_hooks` in the request's spliced pass
    (the first sweep only); `rerun(edits, hooks)`: the activations at `hooks` of one more
    spliced pass with the feature `edits` (`saebench.splice.FeatureEdit`) applied.
    """

    tokens: Tensor
    first_row: int
    act_mask: Tensor
    splice_mask: Tensor
    reached: Tensor
    clean: Mapping[str, Tensor]
    spliced: Mapping[str, Tensor]
    rerun: Callable[[tuple, tuple[str, ...]], dict[str, Tensor]]


class Probe(ABC):
    """A metric's own computation inside an engine run: told each batch (`batch`), it
    returns per-sequence terms [b, ...] (float64 sums) for the request's term log.

    `key` identifies what it computes (equal keys in one request run once); a probe that
    needs what a whole pass over the data found (the most frequent features, a maximum)
    asks for `sweeps` > 1 passes, and `end_sweep(i)` is called after pass i. Subclass it
    in the metric's module; `saebench.plan` adds it to the request of the checks needing it.
    """

    key: Hashable = None
    sweeps: int = 1
    clean_hooks: tuple[str, ...] = ()
    spliced_hooks: tuple[str, ...] = ()

    @abstractmethod
    def batch(self, view: BatchView, sweep: int) -> Mapping[str, Tensor]:
        """The per-sequence terms of this batch in pass `sweep` ({} when it adds none)."""

    def end_sweep(self, sweep: int) -> None:  # noqa: B027 -- optional: one-pass probes need none
        """Called after pass `sweep` over the data (choose features, fix a maximum)."""


@dataclass(frozen=True)
class Needs:
    """What a check's metric needs from the run computing it; `saebench.plan` merges the
    needs of the checks sharing a request (`merge`) and builds the request from them.

    `spliced`: the spliced pass with logits (CE, KL, agreement; task logit differences);
    `ablations`: ablation passes or baselines by kind; `reconstruction`: the activation
    terms of one dictionary; `layers`: the error at each write hook; `noise_draws` /
    `noise_baselines`: random-noise passes (`NOISE_TERMS`); `dla`: the task's direct logit
    attributions; `feature_k`: the task's top-k feature ablation; `probes`: the metric's
    own computations.
    """

    spliced: bool = False
    ablations: frozenset[str] = frozenset()
    reconstruction: bool = False
    layers: bool = False
    noise_draws: int = 0
    noise_baselines: frozenset[str] = frozenset()
    dla: bool = False
    feature_k: int | None = None
    probes: tuple[Probe, ...] = ()

    def merge(self, other: Needs) -> Needs:
        """Both needs at once: flags or-ed, sets joined, counts the larger, probes by key."""
        probes = {p.key: p for p in (*self.probes, *other.probes)}
        return Needs(
            spliced=self.spliced or other.spliced, ablations=self.ablations | other.ablations,
            reconstruction=self.reconstruction or other.reconstruction,
            layers=self.layers or other.layers,
            noise_draws=max(self.noise_draws, other.noise_draws),
            noise_baselines=self.noise_baselines | other.noise_baselines,
            dla=self.dla or other.dla,
            feature_k=max(self.feature_k or 0, other.feature_k or 0) or None,
            probes=tuple(probes.values()))


@dataclass(frozen=True)
class Site:
    """What a metric's `needs` may look at: the dictionaries spliced (`dictionaries`, the
    parts of every entry of the check) and those the check reads without splicing (`read`,
    the parts of its `read:` entry; empty unless the metric `reads`) and the `model`
    they are spliced into (for hook shapes and weights such as `W_U`)."""

    dictionaries: tuple[Any, ...]
    read: tuple[Any, ...] = ()
    model: Any = None


@dataclass(frozen=True)
class TableContext:
    """What a metric's `tables` may use to build a check's side-table rows: its request's
    `terms`, the task run's `per_prompt` and `features` rows (task checks), the metric
    `options`, `n_boot` and `seed` for intervals, the request's `write_hooks`, and
    `summarize(metric, options, terms)`: `saebench.stats.summarize` with the check's
    `n_boot` and `seed`; `interval(values, counts=None)`: the 95% percentile bootstrap
    interval of the mean of per-sequence (per-prompt) `values` [n] (or of Σ values / Σ
    counts), resampled as the check's values are; `probes`: the request's probes after the
    run, by key (what they found, such as a metric's chosen features)."""

    terms: Mapping[str, Tensor]
    options: Options
    n_boot: int
    seed: int
    summarize: Callable[..., Any]
    interval: Callable[..., tuple[float, float]]
    probes: Mapping[Hashable, Probe] = field(default_factory=dict)
    write_hooks: tuple[str, ...] = ()
    per_prompt: tuple[dict, ...] = ()
    features: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Metric:
    """One aggregate metric: which terms it needs, how it reduces them, which way is better,
    its options and what it needs from a run.

    `terms(options)` names the terms needed; `aggregate(summed, options)` and, for ratio
    metrics, `denominator(summed, options)` map summed terms [...] / [..., k] to [...].
    `denominator_name` says in words what the denominator is (for "unstable" verdicts);
    `parts_of(summed, options)` gives the raw quantities a reader needs to audit the value.
    `kind` is "downstream" (clean/spliced/ablated passes), "reconstruction" (activations) or
    "task" (a task's prompts).
    `bootstrap=False` marks a statistic that resampling sequences misrepresents (no interval).
    `count` names the term counting the positions averaged over, when it is not the kind's
    default (n_pred for downstream, n_act for reconstruction).
    `bounds` is the range every value lies in (closed; a callable of the options when it
    depends on them), so a threshold that no value can fail, or pass, is refused.
    `needs_splice`: the value means something only if the splice changed a counted position
    (true for downstream and task metrics whose terms come from the spliced run).
    `tolerance` (absolute) and `rel_tolerance` (a share of the baseline's value) are how much
    worse than its baseline a value may be before a gate calls it a regression, by default.

    What the planner reads: `options` (name -> `Option`, the metric's own options),
    `needs(options, site)` -> `Needs` (by default from `kind`: the spliced pass for
    downstream and task metrics, the reconstruction terms for reconstruction ones),
    `single` (needs a dictionary reading one hook and writing one; default: reconstruction
    metrics), `seeded` (its run draws random numbers from the check's seed),
    `random_baseline` (takes `random_baseline: true`: a ratio of spliced-pass terms),
    `reads` (a check names, with `read:`, a dictionary it reads without splicing),
    `breakdowns` (the `by:` breakdowns it takes; default: position and source on token
    data, none on tasks) and `tables(context)` -> {file name: rows} (its side tables:
    per_prompt.csv, features.csv, layers.csv).
    """

    name: str
    terms: Callable[[Options], tuple[str, ...]]
    aggregate: Callable[[Terms, Options], Tensor]
    higher_is_better: bool
    description: str
    kind: str
    denominator: Callable[[Terms, Options], Tensor] | None = None
    denominator_name: str = ""
    parts_of: Callable[[Terms, Options], Mapping[str, Tensor]] | None = None
    bootstrap: bool = True
    count: str | None = None
    bounds: tuple[float, float] | Callable[[Options], tuple[float, float]] = UNBOUNDED
    needs_splice: bool = True
    tolerance: float = 0.01
    rel_tolerance: float = 0.0
    options: Mapping[str, Option] = field(default_factory=dict)
    needs: Callable[[Options, Site], Needs] | None = None
    single: bool | None = None
    seeded: bool = False
    random_baseline: bool = False
    reads: bool = False
    breakdowns: tuple[str, ...] | None = None
    tables: Callable[[TableContext], dict[str, list[dict]]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"metric {self.name!r}: kind must be one of {KINDS}, "
                             f"got {self.kind!r}")

    @property
    def count_term(self) -> str:
        """The term counting the positions this metric averages over."""
        return self.count or COUNT_TERMS[self.kind]

    @property
    def guard_term(self) -> str | None:
        """The term that must be positive for a value to be measured (None: the count)."""
        if not self.needs_splice or self.kind == "reconstruction":
            return None
        return SPLICED_COUNTS.get(self.count_term)

    @property
    def one_hook(self) -> bool:
        """Whether the metric needs a dictionary that reads one hook and writes one."""
        return self.kind == "reconstruction" if self.single is None else self.single

    @property
    def run_options(self) -> tuple[str, ...]:
        """The options that shape the run producing the terms (not only their summary), so
        checks that differ in them never share a run; `seed` for a seeded metric."""
        own = tuple(k for k, o in self.options.items() if o.shapes_run)
        return (*own, "seed") if self.seeded else own

    @property
    def breaks_down(self) -> tuple[str, ...]:
        """The `by:` breakdowns the metric takes (`position`, `source`)."""
        if self.breakdowns is not None:
            return self.breakdowns
        return () if self.kind == "task" else ("position", "source")

    def option(self, options: Options, name: str) -> Any:
        """The validated value of the metric's option `name` in `options` (or its default)."""
        return self.options[name].value(options, name)

    def defaults(self) -> dict[str, Any]:
        """The metric's options with a default, and their defaults."""
        return {k: o.default for k, o in self.options.items() if o.default is not None}

    def needs_of(self, options: Options, site: Site) -> Needs:
        """What a check with `options` on `site` needs from its run."""
        if self.needs is not None:
            return self.needs(options, site)
        if self.kind == "reconstruction":
            return Needs(reconstruction=True)
        return Needs(spliced=True)

    def value_range(self, options: Options) -> tuple[float, float]:
        """The closed range every value of this metric lies in, given the options."""
        return self.bounds(options) if callable(self.bounds) else self.bounds


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric, *, replace: bool = False) -> Metric:
    """Add `metric` to `METRICS`; re-registering a name needs `replace=True`."""
    if metric.name in METRICS and not replace:
        raise ValueError(f"metric {metric.name!r} is already registered")
    METRICS[metric.name] = metric
    return metric


def metric_names() -> list[str]:
    """Registered metric names, in registration order."""
    return list(METRICS)


def get_metric(name: str) -> Metric:
    """The registered metric called `name`; a KeyError listing the known names otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; known metrics: "
                       f"{', '.join(METRICS)}") from None


RANDOM = "random:"
"""Prefix of the terms measured with a random-weight dictionary in place of the real one."""


def randomised(terms: Terms) -> dict[str, Tensor]:
    """The random dictionary's terms under their own names (`random:ce_spliced` ->
    `ce_spliced`): what a metric reads to give the random dictionary's value."""
    return {k.removeprefix(RANDOM): v for k, v in terms.items() if k.startswith(RANDOM)}


def margin_over_random(metric: Metric) -> Metric:
    """The metric's margin over a random dictionary of the same shape: value − random value
    (random − value when lower is better), from both sets of terms, so that a paired
    bootstrap over sequences gives its interval.

        >>> m = margin_over_random(get_metric("ce_loss_recovered"))
        >>> m.terms({})
        ('n_pred', 'ce_clean', 'ce_spliced', 'ce_zero', 'random:n_pred', ...)
    """
    sign = 1.0 if metric.higher_is_better else -1.0

    def terms(o: Options) -> tuple[str, ...]:
        own = metric.terms(o)
        return (*own, *(RANDOM + t for t in own))

    def aggregate(s: Terms, o: Options) -> Tensor:
        return sign * (metric.aggregate(s, o) - metric.aggregate(randomised(s), o))

    return Metric(name=f"{metric.name} margin", terms=terms, aggregate=aggregate,
                  higher_is_better=True, description=f"{metric.name} − its random baseline",
                  kind=metric.kind, denominator=metric.denominator,
                  denominator_name=metric.denominator_name, count=metric.count,
                  needs_splice=metric.needs_splice, options=metric.options)


def parts(metric: Metric, summed_terms: Terms, options: Options) -> dict[str, float]:
    """The raw quantities behind a value (e.g. CE clean/spliced/ablated per token), as floats.

    `summed_terms` are summed over sequences without leading dimensions. A ratio without
    its parts cannot be audited; reports store these next to the value.
    """
    out: dict[str, float] = {}
    if metric.count_term in summed_terms:
        out[metric.count_term] = float(summed_terms[metric.count_term])
    if metric.parts_of is not None:
        out.update({k: float(v) for k, v in metric.parts_of(summed_terms, options).items()})
    if metric.denominator is not None:
        out["denominator"] = float(metric.denominator(summed_terms, options))
    return out


ABLATION = choice_option("the baseline the site is ablated to: zero or mean", *ABLATIONS)
DENSE_THRESHOLD = Option("activation rate above which a feature counts as dense", fraction,
                         0.01)


def ablation_kind(options: Options) -> str:
    """The `ablation` option ("zero" by default), validated."""
    return ABLATION.value(options, "ablation")


def dense_threshold(options: Options) -> float:
    """The `dense_threshold` option (0.01 by default), validated to lie in [0, 1]."""
    return DENSE_THRESHOLD.value(options, "dense_threshold")


def _ablation_needs(options: Options, site: Site) -> Needs:
    return Needs(spliced=True, ablations=frozenset({ablation_kind(options)}))


def _per(s: Terms, name: str, count: str) -> Tensor:
    return s[name] / s[count]


def _fixed(*names: str) -> Callable[[Options], tuple[str, ...]]:
    return lambda options: names


def _ce_abl(s: Terms, o: Options) -> Tensor:
    return s[f"ce_{ablation_kind(o)}"]


def _kl_abl(s: Terms, o: Options) -> Tensor:
    return s[f"kl_{ablation_kind(o)}"]


def _variance(s: Terms) -> Tensor:
    """Σ‖target − mean‖² over positions = Σ‖target‖² − ‖Σ target‖²/n."""
    return s["sq_target"] - s["sum_target"].pow(2).sum(-1) / s["n_act"]


def _dense_terms(o: Options) -> tuple[str, ...]:
    dense_threshold(o)
    return ("n_act", "feature_counts")


register_metric(Metric(
    name="ce_loss_recovered",
    terms=lambda o: ("n_pred", "ce_clean", "ce_spliced", f"ce_{ablation_kind(o)}"),
    aggregate=lambda s, o: (_ce_abl(s, o) - s["ce_spliced"]) / (_ce_abl(s, o) - s["ce_clean"]),
    higher_is_better=True,
    description="(CE_abl − CE_spliced) / (CE_abl − CE_clean), CE = mean next-token cross-entropy "
                "over prediction positions; 1 = as good as the clean model, 0 = as bad as "
                "ablating the site (option `ablation`: zero or mean). Ratio of pooled means.",
    kind="downstream",
    denominator=lambda s, o: (_ce_abl(s, o) - s["ce_clean"]) / s["n_pred"],
    denominator_name="CE_abl − CE_clean (nats/token)",
    parts_of=lambda s, o: {"ce_clean": _per(s, "ce_clean", "n_pred"),
                           "ce_spliced": _per(s, "ce_spliced", "n_pred"),
                           "ce_abl": _ce_abl(s, o) / s["n_pred"]},
    options={"ablation": ABLATION},
    needs=_ablation_needs,
    random_baseline=True,
))

register_metric(Metric(
    name="delta_ce",
    terms=_fixed("n_pred", "ce_clean", "ce_spliced"),
    aggregate=lambda s, o: (s["ce_spliced"] - s["ce_clean"]) / s["n_pred"],
    higher_is_better=False,
    description="CE_spliced − CE_clean in nats per token: the loss increase from splicing, "
                "with no ablation baseline to flatter it.",
    kind="downstream",
    parts_of=lambda s, o: {"ce_clean": _per(s, "ce_clean", "n_pred"),
                           "ce_spliced": _per(s, "ce_spliced", "n_pred")},
    tolerance=0.005,
))

register_metric(Metric(
    name="kl_div",
    terms=_fixed("n_kl", "kl_spliced"),
    aggregate=lambda s, o: s["kl_spliced"] / s["n_kl"],
    higher_is_better=False,
    description="Mean per-token KL(p_clean ‖ p_spliced) in nats, both sides via log_softmax.",
    kind="downstream",
    count="n_kl",
    bounds=NON_NEGATIVE,
    tolerance=0.005,
))

register_metric(Metric(
    name="kl_div_score",
    terms=lambda o: ("n_kl", "kl_spliced", f"kl_{ablation_kind(o)}"),
    aggregate=lambda s, o: (_kl_abl(s, o) - s["kl_spliced"]) / _kl_abl(s, o),
    higher_is_better=True,
    description="(KL_abl − KL_spliced) / KL_abl with KL = mean KL(p_clean ‖ p_variant); 1 = "
                "clean distribution recovered, 0 = as far off as ablating the site. Ratio of "
                "pooled means.",
    kind="downstream",
    denominator=lambda s, o: _kl_abl(s, o) / s["n_kl"],
    denominator_name="KL_abl (nats/token)",
    parts_of=lambda s, o: {"kl_spliced": _per(s, "kl_spliced", "n_kl"),
                           "kl_abl": _kl_abl(s, o) / s["n_kl"]},
    count="n_kl",
    bounds=(-math.inf, 1.0),
    options={"ablation": ABLATION},
    needs=_ablation_needs,
    random_baseline=True,
))

register_metric(Metric(
    name="next_token_agreement",
    terms=_fixed("n_kl", "agree_spliced"),
    aggregate=lambda s, o: s["agree_spliced"] / s["n_kl"],
    higher_is_better=True,
    description="Share of positions (input token not special) whose most likely next token "
                "with the dictionary spliced in is the clean model's: the next-token agreement "
                "of a replacement model (Ameisen et al. 2025). 1 = every top-1 prediction kept.",
    kind="downstream",
    count="n_kl",
    bounds=FRACTION,
))

register_metric(Metric(
    name="l0",
    terms=_fixed("n_act", "l0"),
    aggregate=lambda s, o: s["l0"] / s["n_act"],
    higher_is_better=False,
    description="Mean number of active (nonzero) features per position. A sparsity budget: "
                "lower is sparser, but a useful threshold usually bounds it on both sides.",
    kind="reconstruction",
    bounds=NON_NEGATIVE,
    tolerance=0.0,
    rel_tolerance=0.05,
))

register_metric(Metric(
    name="explained_variance",
    terms=_fixed("n_act", "sq_err", "sq_target", "sum_target"),
    aggregate=lambda s, o: 1 - s["sq_err"] / _variance(s),
    higher_is_better=True,
    description="1 − E‖target − x̂‖² / (E‖target‖² − ‖E target‖²): the centred form (variance "
                "about the mean), not the uncentred E‖target‖² that SAEBench still uses and that "
                "inflates the score when activations have a large mean (that value is in the "
                "parts as `explained_variance_uncentred`).",
    kind="reconstruction",
    denominator=lambda s, o: _variance(s) / s["n_act"],
    denominator_name="centred variance E‖target‖² − ‖E target‖² (per position)",
    parts_of=lambda s, o: {"sq_err_per_position": _per(s, "sq_err", "n_act"),
                           "variance_per_position": _variance(s) / s["n_act"],
                           "explained_variance_uncentred": 1 - s["sq_err"] / s["sq_target"]},
    bounds=(-math.inf, 1.0),
))

register_metric(Metric(
    name="mse",
    terms=_fixed("n_act", "sq_err", "sum_target"),
    aggregate=lambda s, o: s["sq_err"] / (s["n_act"] * s["sum_target"].shape[-1]),
    higher_is_better=False,
    description="Mean squared error per element, E‖target − x̂‖² / d. sae_lens' `mse` is the "
                "per-position sum over dimensions, E‖target − x̂‖² = d × this (older sae_lens "
                "releases also divided by the batch's token count, making it batch-size "
                "dependent); that value is in the parts as `sq_err_per_position`.",
    kind="reconstruction",
    parts_of=lambda s, o: {"sq_err_per_position": _per(s, "sq_err", "n_act"),
                           "d": s["sq_err"].new_tensor(s["sum_target"].shape[-1])},
    bounds=NON_NEGATIVE,
    tolerance=0.0,
    rel_tolerance=0.05,
))

register_metric(Metric(
    name="cossim",
    terms=_fixed("n_act", "cossim"),
    aggregate=lambda s, o: s["cossim"] / s["n_act"],
    higher_is_better=True,
    description="Mean cosine similarity between target and reconstruction (0 at positions "
                "where either is the zero vector).",
    kind="reconstruction",
    bounds=(-1.0, 1.0),
))

register_metric(Metric(
    name="l2_ratio",
    terms=_fixed("n_act", "l2_ratio"),
    aggregate=lambda s, o: s["l2_ratio"] / s["n_act"],
    higher_is_better=True,
    description="Mean ‖x̂‖ / ‖target‖ (‖target‖ < 1e-4 divides by 1, as in sae_lens). Closer to "
                "1 is better: < 1 is shrinkage, > 1 overshoot; `higher_is_better` only marks "
                "the usual failure, shrinkage, so threshold it on both sides.",
    kind="reconstruction",
    bounds=NON_NEGATIVE,
))

register_metric(Metric(
    name="relative_reconstruction_bias",
    terms=_fixed("n_act", "sq_recon", "dot"),
    aggregate=lambda s, o: s["sq_recon"] / s["dot"],
    higher_is_better=True,
    description="E‖x̂‖² / E⟨target, x̂⟩ pooled over all positions (= c when x̂ = c·target; < 1 is "
                "shrinkage, closer to 1 is better). sae_lens computes it per batch and averages "
                "the batch ratios, which differs slightly.",
    kind="reconstruction",
    denominator=lambda s, o: s["dot"] / s["n_act"],
    denominator_name="E⟨target, x̂⟩ (per position)",
    parts_of=lambda s, o: {"sq_recon_per_position": _per(s, "sq_recon", "n_act"),
                           "dot_per_position": _per(s, "dot", "n_act")},
))

register_metric(Metric(
    name="dead_fraction",
    terms=_fixed("n_act", "feature_counts"),
    aggregate=lambda s, o: (s["feature_counts"] == 0).to(s["n_act"].dtype).mean(-1),
    higher_is_better=False,
    description="Share of features never active on the evaluated positions (an overestimate "
                "of truly dead features on a small sample). No bootstrap interval: a resample "
                "of sequences holds fewer distinct tokens, so it sees more features as dead and "
                "its interval would lie above the value.",
    kind="reconstruction",
    bootstrap=False,
    parts_of=lambda s, o: {"n_features": s["n_act"].new_tensor(s["feature_counts"].shape[-1]),
                           "n_dead": (s["feature_counts"] == 0).sum(-1)},
    bounds=FRACTION,
))

register_metric(Metric(
    name="dense_fraction",
    terms=_dense_terms,
    aggregate=lambda s, o: (s["feature_counts"] / s["n_act"][..., None] > dense_threshold(o))
    .to(s["n_act"].dtype).mean(-1),
    higher_is_better=False,
    description="Share of features active on more than `dense_threshold` (default 0.01) of the "
                "evaluated positions.",
    kind="reconstruction",
    parts_of=lambda s, o: {"n_features": s["n_act"].new_tensor(s["feature_counts"].shape[-1]),
                           "dense_threshold": s["n_act"].new_tensor(dense_threshold(o))},
    bounds=FRACTION,
    options={"dense_threshold": DENSE_THRESHOLD},
))


def layer_errors(s: Terms) -> Tensor:
    """Normalised MSE at each write hook [..., L]: Σ‖written − clean‖² / Σ‖clean − mean‖²."""
    variance = s["layer_sq_target"] - s["layer_sum_target"].pow(2).sum(-1) / s["n_layer"][..., None]
    return s["layer_sq_err"] / variance


def _layer(value: Any) -> str | int:
    if value == "max" or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"must be 'max' or the index of a write hook, got {value!r}")


def _layer_choice(s: Terms, o: Options) -> Tensor:
    errors = layer_errors(s)
    layer = _LAYER.value(o, "layer")
    if layer == "max":
        return errors.max(-1).values
    if not -errors.shape[-1] <= layer < errors.shape[-1]:
        raise ValueError(f"layer must be 'max' or an index among the {errors.shape[-1]} write "
                         f"hooks, got {layer!r}")
    return errors[..., layer]


def _layer_rows(ctx: TableContext) -> dict[str, list[dict]]:
    """One row per write hook: its value and interval (`layers.csv`)."""
    rows = []
    for layer, hook in enumerate(ctx.write_hooks):
        summary = ctx.summarize(PER_LAYER_ERROR, {**ctx.options, "layer": layer}, ctx.terms)
        rows.append({"layer": layer, "hook": hook, "value": summary.value,
                     "ci_low": summary.ci_low, "ci_high": summary.ci_high})
    return {"layers.csv": rows}


_LAYER = Option("the write hook whose error is the value: max (the worst) or an index",
                _layer, "max", indexes="write_hook")
PER_LAYER_ERROR = register_metric(Metric(
    name="per_layer_error",
    terms=_fixed(*LAYER_TERMS),
    aggregate=_layer_choice,
    higher_is_better=False,
    description="Normalised MSE Σ‖x̂ − x‖² / Σ‖x − x̄‖² at each write hook of a splice, x̂ what "
                "the spliced pass wrote there and x the clean model's activation, with every "
                "dictionary spliced at once (a replacement model: errors compound, each layer "
                "reading the spliced model). The value is the worst write hook (option "
                "`layer`: an index for one); each hook's value is in the parts and, one row "
                "per layer, in layers.csv.",
    kind="downstream",
    count="n_layer",
    parts_of=lambda s, o: {f"layer_{i}": v for i, v in enumerate(layer_errors(s).unbind(-1))},
    bounds=NON_NEGATIVE,
    options={"layer": _LAYER},
    needs=lambda o, site: Needs(spliced=True, layers=True),
    tables=_layer_rows,
))
