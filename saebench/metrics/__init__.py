"""Metrics: per-token tensor functions (`tokens`) and the metric registry (`registry`).

    >>> from saebench.metrics import get_metric, metric_names
    >>> get_metric("kl_div").higher_is_better
    False
"""

from saebench.metrics import (
    clamp,  # noqa: F401  (registers clamp_effect)
    fidelity,  # noqa: F401  (registers feature_fidelity, feature_jaccard, feature_l0_drift)
    hidden,  # noqa: F401  (registers transcoder_hidden_fidelity)
    pathological,  # noqa: F401  (registers pathological_error)
    task,  # noqa: F401  (registers the task metrics)
)
from saebench.metrics.registry import (
    METRICS,
    Metric,
    get_metric,
    metric_names,
    parts,
    register_metric,
)

__all__ = ["METRICS", "Metric", "get_metric", "metric_names", "parts", "register_metric"]
