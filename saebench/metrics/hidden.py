"""`transcoder_hidden_fidelity`: how much of its MLP's computation a transcoder's features carry.

A transcoder at layer L reads the MLP's input and writes its output; its reconstruction can
be good while its features say little about what the MLP computes in between. This metric
is the share of variance of the MLP's pre-activations h = `blocks.L.mlp.hook_pre` that the
best affine map from the feature activations z(x) explains, on sequences it was not fitted on:

- sweep 0 counts how often each feature is active on the fitting half (sequences of even
  index in the run's tokens); those active on at least `min_active` (5) fitting positions,
  at most `max_features` of the most frequent, are the regressors (a feature seen twice
  gets an arbitrary coefficient that one scoring sequence can make dominate the error);
- sweep 1 accumulates G = [z, 1]ᵀ[z, 1] and C = [z, 1]ᵀh over the fitting half's evaluated
  positions (float64, on the activations' device) and solves for the map (`affine_fit`);
- sweep 2 gives per-sequence terms of the scoring half (odd index; zero rows for the others):
  `hidden_n` (evaluated positions), `hidden_sq_err` (Σ‖h − ĥ‖²), `hidden_sq` (Σ‖h‖²),
  `hidden_sum` [d_mlp] (Σh); and, for the parts, `hidden_fit_n` (fitting positions of the
  fitting sequences), `hidden_live` (the number of live features used, on every row) and
  `hidden_rows` (1 on every row), so that live = Σ hidden_live / Σ hidden_rows in any resample.

EV = 1 − Σ‖h − ĥ‖² / Σ‖h − h̄‖², h̄ the scoring half's mean. The map is fitted once: the
bootstrap interval resamples the scoring sequences only, not the fit. With no live feature
the value is NaN (verdict "nan", and a warning): an intercept alone would pass off "EV ≈ 0".
A skip transcoder's skip path is not a feature and is not among the regressors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from saebench.metrics.registry import (
    BatchView,
    Metric,
    Needs,
    Options,
    Probe,
    Site,
    Terms,
    register_metric,
)
from saebench.metrics.tokens import sequence_sums
from saebench.options import Option, positive_int
from saebench.splice import Dictionary, hook_layer

NAME = "transcoder_hidden_fidelity"
MAX_FEATURES = Option("at most this many live features, the most often active on the fitting "
                      "half, are the regressors", positive_int, 4096, shapes_run=True)
MIN_ACTIVE = Option("a feature is a regressor only if active on at least this many fitting "
                    "positions (a rarer one gets an arbitrary coefficient)", positive_int, 5,
                    shapes_run=True)
EIG_RTOL = 1e-12
"""`affine_fit` drops directions whose variance is below this share of the largest (singular
values of the centred features below 1e-6 of the largest): rounding noise in float64 sums."""
POSITIONS_PER_REGRESSOR = 10
"""Fewer fitting positions per regressor than this draw a warning: the fit overfits."""
TERMS = ("hidden_n", "hidden_fit_n", "hidden_sq_err", "hidden_sq", "hidden_sum",
         "hidden_live", "hidden_rows")


def max_features(options: Options) -> int:
    """The `max_features` option (default 4096), validated to be >= 1."""
    return MAX_FEATURES.value(options, "max_features")


def affine_fit(gram: Tensor, cross: Tensor) -> tuple[Tensor, Tensor]:
    """(coef [p, d], bias [d]) of the least-squares map h ≈ z @ coef + bias from the normal
    equations G = [z, 1]ᵀ[z, 1] [p + 1, p + 1] and C = [z, 1]ᵀh [p + 1, d] (float64).

    The intercept is eliminated (z and h centred through G's last row) and the centred
    system solved by its eigendecomposition, dropping eigenvalues below `EIG_RTOL` of the
    largest: the minimum-norm solution, as `torch.linalg.lstsq` (gelsd) gives on the CPU, also on
    CUDA (whose lstsq has only the full-rank driver) and when features are collinear or
    fewer positions than features make the system singular. A ridge was not used: its bias
    grows with the condition number (~1e-5 in EV for 256 features of the zoo's transcoder
    fitted on 16 sequences, against 1e-11 here).
    Non-finite sums (a NaN feature) give a NaN map, so that no value is made of them.
    """
    p = len(gram) - 1
    if not (torch.isfinite(gram).all() and torch.isfinite(cross).all()):
        nan = torch.full_like(cross, math.nan)
        return nan[:p], nan[p]
    n = gram[p, p].clamp_min(1)
    mean_z, mean_h = gram[:p, p] / n, cross[p] / n
    cov = gram[:p, :p] - n * torch.outer(mean_z, mean_z)
    xcov = cross[:p] - n * torch.outer(mean_z, mean_h)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    keep = eigvals > EIG_RTOL * (eigvals[-1] if p else 0)
    basis = eigvecs[:, keep]
    coef = basis @ ((basis.T @ xcov) / eigvals[keep, None])
    return coef, mean_h - mean_z @ coef


class HiddenProbe(Probe):
    """The three sweeps of `transcoder_hidden_fidelity` for one transcoder (module docstring)."""

    sweeps = 3
    spliced_hooks = ()

    def __init__(self, dictionary: Dictionary, pre_hook: str, limit: int,
                 min_active: int = 1) -> None:
        self.dictionary = dictionary
        self.pre_hook = pre_hook
        self.limit, self.min_active = limit, min_active
        self.key = (NAME, dictionary.name, limit, min_active)
        self.clean_hooks = (dictionary.read_hook, pre_hook)
        self.counts = self.gram = self.cross = None
        self.live = self.coef = self.bias = None

    def _half(self, view: BatchView, parity: int) -> tuple[Tensor, Tensor, Tensor]:
        """The rows of the half `parity` (0 fitting, 1 scoring): which rows [b], their
        features [b', t, d_sae] and their evaluated positions [b', t]."""
        index = torch.arange(len(view.tokens), device=view.act_mask.device) + view.first_row
        rows = index % 2 == parity
        feats = self.dictionary.encode(view.clean[self.dictionary.read_hook][rows])
        return rows, feats, view.act_mask[rows]

    def batch(self, view: BatchView, sweep: int) -> Mapping[str, Tensor]:
        if sweep == 0:
            _, feats, mask = self._half(view, 0)
            active = ((feats != 0) & mask[..., None]).sum((0, 1)).double()
            self.counts = active if self.counts is None else self.counts + active
            return {}
        h = view.clean[self.pre_hook]
        if sweep == 1:
            rows, feats, mask = self._half(view, 0)
            z = feats[mask][:, self.live].double()
            z = torch.cat([z, z.new_ones(len(z), 1)], dim=1)
            target = h[rows][mask].double()
            gram, cross = z.T @ z, z.T @ target
            self.gram = gram if self.gram is None else self.gram + gram
            self.cross = cross if self.cross is None else self.cross + cross
            return {}
        rows, feats, mask = self._half(view, 1)
        target = h[rows].double()
        recon = feats[..., self.live].double() @ self.coef + self.bias
        out = {name: h.new_zeros(len(h), dtype=torch.float64) for name in TERMS}
        out["hidden_sum"] = h.new_zeros(len(h), h.shape[-1], dtype=torch.float64)
        out["hidden_n"][rows] = mask.sum(-1).double()
        out["hidden_sq_err"][rows] = sequence_sums((target - recon).pow(2).sum(-1), mask)
        out["hidden_sq"][rows] = sequence_sums(target.pow(2).sum(-1), mask)
        out["hidden_sum"][rows] = sequence_sums(target, mask)
        out["hidden_fit_n"][~rows] = view.act_mask[~rows].sum(-1).double()
        out["hidden_live"][:] = len(self.live)
        out["hidden_rows"][:] = 1
        return out

    def end_sweep(self, sweep: int) -> None:
        if sweep == 0:
            counts, self.counts = self.counts, None
            order = torch.argsort(counts, descending=True, stable=True)
            top = order[:self.limit]
            self.live = top[counts[top] >= self.min_active].sort().values
            if not len(self.live):
                warnings.warn(f"{NAME}: no feature of {self.dictionary.name!r} is active on the "
                              "fitting half of the sequences, so there is no value",
                              stacklevel=2)
        elif sweep == 1:
            n, p = int(self.gram[-1, -1]), len(self.live)
            if 0 < n < POSITIONS_PER_REGRESSOR * (p + 1):
                warnings.warn(f"{NAME}: the fit of {self.dictionary.name!r} has {n} positions "
                              f"for {p} live features, fewer than {POSITIONS_PER_REGRESSOR} per "
                              "regressor: it overfits and the value is biased low; evaluate "
                              "more tokens or lower max_features", stacklevel=2)
            self.coef, self.bias = affine_fit(self.gram, self.cross)
            self.gram = self.cross = None


def _needs(options: Options, site: Site) -> Needs:
    """The probe of `site`'s one dictionary, which must be a transcoder of a model's MLP."""
    d = site.dictionaries[0]
    if not (d.single and d.is_transcoder and d.has_features):
        raise ValueError(f"{NAME} needs a transcoder with feature activations, reading one hook "
                         f"and writing another; {d.name!r} reads {', '.join(d.read_hooks)} and "
                         f"writes {', '.join(d.write_hooks)}")
    pre_hook = f"blocks.{hook_layer(d.write_hook)}.mlp.hook_pre"
    if site.model is None or pre_hook not in site.model.hook_dict:
        raise ValueError(f"{NAME}: the model has no hook {pre_hook!r} (the MLP pre-activations "
                         f"of the layer that {d.name!r} writes, {d.write_hook})")
    return Needs(probes=(HiddenProbe(d, pre_hook, max_features(options),
                                     MIN_ACTIVE.value(options, "min_active")),))


def _terms(options: Options) -> tuple[str, ...]:
    max_features(options)
    return TERMS


def _variance(s: Terms) -> Tensor:
    """Σ‖h − h̄‖² over the scoring positions = Σ‖h‖² − ‖Σh‖²/n."""
    return s["hidden_sq"] - s["hidden_sum"].pow(2).sum(-1) / s["hidden_n"]


def _live(s: Terms) -> Tensor:
    return s["hidden_live"] / s["hidden_rows"]


def _explained(s: Terms, denominator: Tensor) -> Tensor:
    """1 − Σ‖h − ĥ‖² / `denominator`; NaN where no feature is live."""
    value = 1 - s["hidden_sq_err"] / denominator
    return torch.where(_live(s) > 0, value, math.nan)


register_metric(Metric(
    name=NAME,
    terms=_terms,
    aggregate=lambda s, o: _explained(s, _variance(s)),
    higher_is_better=True,
    description="Share of the variance of a transcoder's MLP pre-activations (blocks.L.mlp."
                "hook_pre) explained by the best affine map from its feature activations, "
                "fitted by least squares on the even-indexed sequences and scored on the odd "
                "ones: how much of the MLP's hidden computation the features carry, not just "
                "its output. Regressors: the features active on at least `min_active` (5) "
                "fitting positions, at most `max_features` (4096) of the most frequent; NaN "
                "when there is none.",
    kind="reconstruction",
    denominator=lambda s, o: _variance(s) / s["hidden_n"],
    denominator_name="centred variance of the MLP pre-activations per scoring position",
    parts_of=lambda s, o: {"live_features": _live(s), "fit_positions": s["hidden_fit_n"],
                           "explained_variance_uncentred": _explained(s, s["hidden_sq"])},
    count="hidden_n",
    bounds=(-math.inf, 1.0),
    options={"max_features": MAX_FEATURES, "min_active": MIN_ACTIVE},
    needs=_needs,
    breakdowns=("source",),
))
