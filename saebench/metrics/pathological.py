"""`pathological_error` (Gurnee 2024): is the dictionary's error worse than random noise?

KL(p_clean ‖ p_spliced) / KL(p_clean ‖ p_eps), where p_eps comes from the clean activation
plus a random ε of the same norm as the spliced error at each spliced position. The engine
produces the denominator's terms when a request has `pathological_draws > 0`:

- `kl_eps_iso`: per-sequence sum over the KL positions (`n_kl`) of KL(clean ‖ x + ε),
  averaged over the draws, ε ∝ g with g ~ N(0, I) (Gurnee's isotropic baseline);
- `kl_eps_cov`: the same with g ~ N(0, Σ), Σ the covariance of the activation at the write
  hook over the evaluation data (Lee & Heimersheim 2024's distribution-aware baseline).

Options: `baseline` ("isotropic", the default, or "covariance") picks the denominator;
`n_draws` (default 4) is how many draws the engine averages.
"""

from __future__ import annotations

from torch import Tensor

from saebench.metrics.registry import (
    NOISE_TERMS,
    NON_NEGATIVE,
    Metric,
    Needs,
    Options,
    Site,
    Terms,
    register_metric,
)
from saebench.options import Option, choice_option, positive_int

BASELINE = choice_option("pathological_error's random baseline: isotropic or covariance",
                         *NOISE_TERMS, each=True)
N_DRAWS = Option("random draws per baseline", positive_int, 4, shapes_run=True)


def baseline(options: Options) -> str:
    """The `baseline` option ("isotropic" by default), validated."""
    return BASELINE.value(options, "baseline")


def n_draws(options: Options) -> int:
    """The `n_draws` option (random draws per baseline, default 4), validated to be >= 1."""
    return N_DRAWS.value(options, "n_draws")


def _terms(options: Options) -> tuple[str, ...]:
    n_draws(options)
    return ("n_kl", "kl_spliced", NOISE_TERMS[baseline(options)])


def _needs(options: Options, site: Site) -> Needs:
    return Needs(spliced=True, noise_draws=n_draws(options),
                 noise_baselines=frozenset({baseline(options)}))


def _kl_eps(s: Terms, o: Options) -> Tensor:
    return s[NOISE_TERMS[baseline(o)]]


def _parts(s: Terms, o: Options) -> dict[str, Tensor]:
    out = {"kl_spliced": s["kl_spliced"] / s["n_kl"]}
    out |= {term: s[term] / s["n_kl"] for term in NOISE_TERMS.values() if term in s}
    return out


PATHOLOGICAL_ERROR = register_metric(Metric(
    name="pathological_error",
    terms=_terms,
    aggregate=lambda s, o: s["kl_spliced"] / _kl_eps(s, o),
    higher_is_better=False,
    description="KL(p_clean ‖ p_spliced) / KL(p_clean ‖ p_eps), p_eps from the clean activation "
                "plus random noise ε with the spliced error's norm at each spliced position "
                "(Gurnee 2024); ratio of pooled means over the KL positions. > 1 means the "
                "dictionary's error hurts the predictions more than random noise of the same "
                "size, < 1 less. Option `baseline`: isotropic ε (default) or covariance-aware ε "
                "~ N(0, Σ_activation); Lee & Heimersheim 2024 show the verdict depends on the "
                "baseline (errors that look pathological against isotropic noise may not be "
                "against covariance-aware noise), so report both. Option `n_draws` (default 4): "
                "draws averaged per baseline.",
    kind="downstream",
    denominator=lambda s, o: _kl_eps(s, o) / s["n_kl"],
    denominator_name="KL(p_clean ‖ p_eps) (nats/token)",
    parts_of=_parts,
    count="n_kl",
    bounds=NON_NEGATIVE,
    tolerance=0.1,
    options={"n_draws": N_DRAWS, "baseline": BASELINE},
    needs=_needs,
    single=True,
    seeded=True,
    breakdowns=("source",),
))
