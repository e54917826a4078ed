"""SAEBench core's fields as saebench reads them: which values in a file are no measurement,
and which hook a file's SAE was measured at.

SAEBench 0.6.0 (`evals/core/main.py`) writes -1 wherever a metric came out NaN
(`replace_nans_with_negative_one`), and computes a category of metrics only when its
`compute_*` flag in the file's eval_config is true (`COMPUTE_FLAGS`). A field is therefore read
as *missing*, with the reason, never as a number, when it holds

1. exactly -1 (`NAN_SENTINEL`): in every field, also where -1 could be a real value
   (kl_div_score, ce_loss_score, cossim, relative_reconstruction_bias), since the file
   cannot tell the two apart;
2. a value outside the field's possible range (`RANGES`; l0 also above the SAE's d_sae);
3. anything, when the flag of its computation is `false`;
4. NaN, an infinity or something that is not a number;

and a score computed from a part that is missing (kl_div_score from kl_div_with_sae, ...) is
missing too. A null or absent field is simply not reported. The reason goes in the imported
row's message (`missing_message`), from which the leaderboard takes its footnote
(`reason_of`).

Hooks: `sae_cfg_dict.hook_name` (and `hook_name_out`) when set; else a TransformerLens hook
named in `sae_lens_id` (`blocks.3.hook_resid_post__trainer_5`); else the layer, from
`sae_cfg_dict.hook_layer` or a `layer_12` part of the id (Gemma Scope's
`layer_12/width_16k/average_l0_82`), as the label `layer 12 (hook not stated)`; else
`hook not stated (<file>)`, so that files whose layer is unknown never share a table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

EVAL_TYPE_ID = "core"
FILE_SUFFIX = "_eval_results.json"
NAN_SENTINEL = -1.0
"""What SAEBench writes for a NaN metric."""
MISSING_PREFIX = "missing: "
_ORIGIN = "; SAEBench core "
INF = math.inf


class Range(NamedTuple):
    """The closed interval a field's value can lie in, and why."""

    low: float
    high: float
    why: str


RANGES: dict[str, Range] = {
    "kl_div_score": Range(-INF, 1.0, "(KL_abl − KL_sae) / KL_abl with both KL ≥ 0"),
    "kl_div_with_ablation": Range(0.0, INF, "a KL divergence"),
    "kl_div_with_sae": Range(0.0, INF, "a KL divergence"),
    "ce_loss_score": Range(-INF, INF, "(CE_abl − CE_sae) / (CE_abl − CE_clean): either sign"),
    "ce_loss_with_ablation": Range(0.0, INF, "a cross-entropy"),
    "ce_loss_with_sae": Range(0.0, INF, "a cross-entropy"),
    "ce_loss_without_sae": Range(0.0, INF, "a cross-entropy"),
    "explained_variance": Range(-INF, 1.0, "one minus squared error over squared norm"),
    "explained_variance_centred": Range(-INF, 1.0, "one minus squared error over variance"),
    "mse": Range(0.0, INF, "a mean of squares"),
    "mse_per_element": Range(0.0, INF, "a mean of squares"),
    "cossim": Range(-1.0, 1.0, "a cosine"),
    "l2_ratio": Range(0.0, INF, "a ratio of norms"),
    "relative_reconstruction_bias": Range(-INF, INF, "E‖x̂‖² / E⟨x, x̂⟩: either sign"),
    "l0": Range(0.0, INF, "a count of active features, at most d_sae"),
    "freq_over_1_percent": Range(0.0, 1.0, "a fraction of features"),
    "freq_over_10_percent": Range(0.0, 1.0, "a fraction of features"),
}
"""Every field saebench imports (values and parts): the closed interval its value can lie
in, and why. l0's upper bound is the SAE's d_sae when the file states it."""

COMPUTE_FLAGS: dict[str, str] = {
    "model_behavior_preservation": "compute_kl",
    "model_performance_preservation": "compute_ce_loss",
    "shrinkage": "compute_l2_norms",
    "sparsity": "compute_sparsity_metrics",
    "reconstruction_quality": "compute_variance_metrics",
    "misc_metrics": "compute_featurewise_density_statistics",
}
"""The eval_config flag (SAEBench's CoreEvalConfig) without which a category is not
computed. misc_metrics' frequencies come from the feature densities; its encoder and
decoder cosines (`compute_featurewise_weight_based_metrics`) are not imported."""

_TL_HOOK = re.compile(r"blocks\.\d+\.[A-Za-z0-9_.]+")
_LAYER_PART = re.compile(r"(?i)(?:layer|blocks?)[_.-]?(\d+)")
LAYER_ONLY = "layer {} (hook not stated)"
UNSTATED = "hook not stated ({})"


# --------------------------------------------------------------------------- values


def _range_text(low: float, high: float) -> str:
    left = "(−∞" if low == -INF else f"[{low:g}"
    right = "∞)" if high == INF else f"{high:g}]"
    return f"{left}, {right}"


def missing_reason(category: str, field: str, raw: Any, config: Mapping[str, Any],
                   d_sae: float | None = None) -> str | None:
    """Why a field's value is no measurement (see the module docstring), or None when it is
    one. `raw` is the JSON value (not None); `d_sae` bounds l0 when known.

    >>> missing_reason("sparsity", "l0", -1, {})
    'SAEBench wrote -1, its mark of a NaN'
    >>> missing_reason("model_behavior_preservation", "kl_div_score", 0.9, {"compute_kl": False})
    'eval_config.compute_kl is false: SAEBench did not compute it'
    """
    flag = COMPUTE_FLAGS.get(category)
    if flag and config.get(flag) is False:
        return f"eval_config.{flag} is false: SAEBench did not compute it"
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return "not a number"
    if not math.isfinite(raw):
        return "not a finite number"
    if raw == NAN_SENTINEL:
        return "SAEBench wrote -1, its mark of a NaN"
    low, high, why = RANGES.get(field, Range(-INF, INF, ""))
    if field == "l0" and d_sae is not None:
        high = d_sae
    if not low <= raw <= high:
        return f"outside the possible range of {field}, {_range_text(low, high)}: {why}"
    return None


def part_reason(part: str, reason: str) -> str:
    """The reason of a score computed from a missing part."""
    return f"computed from {part}, which is missing ({reason})"


def missing_message(reason: str, category: str, field: str, raw: Any, file_name: str) -> str:
    """The message of an imported row read as missing: the reason, then where it came from.

    >>> missing_message("not a number", "sparsity", "l0", "x", "a.json")
    "missing: not a number; SAEBench core sparsity.l0 = 'x', from a.json"
    """
    return f"{MISSING_PREFIX}{reason}{_ORIGIN}{category}.{field} = {raw!r}, from {file_name}"


def reason_of(message: str) -> str:
    """The reason in a `missing_message`; "" for any other message."""
    if not message.startswith(MISSING_PREFIX) or _ORIGIN not in message:
        return ""
    return message.removeprefix(MISSING_PREFIX).split(_ORIGIN, 1)[0]


# --------------------------------------------------------------------------- hooks


def _id_parts(sae_id: str) -> list[str]:
    """The parts of a sae_lens id, split at `/` and `__`."""
    return [p for part in sae_id.split("/") for p in part.split("__") if p]


def _layer(value: Any) -> int | None:
    """A layer number from a JSON value (a non-negative integer), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if math.isfinite(value) and value >= 0 and value == int(value) else None


def recovered_hooks(cfg: Mapping[str, Any], sae_id: Any, name: str) -> tuple[str, str]:
    """(read hook, write hook) of a core file's SAE: from `sae_cfg_dict`, else from its
    `sae_lens_id`, else the layer alone, else a label naming the file (`name`); never "".

    >>> recovered_hooks({}, "blocks.3.hook_resid_post__trainer_5", "f")
    ('blocks.3.hook_resid_post', 'blocks.3.hook_resid_post')
    >>> recovered_hooks({}, "layer_12/width_16k/average_l0_82", "f")[0]
    'layer 12 (hook not stated)'
    """
    read = cfg.get("hook_name") if isinstance(cfg.get("hook_name"), str) else ""
    write = cfg.get("hook_name_out") if isinstance(cfg.get("hook_name_out"), str) else ""
    if read.strip() or write.strip():
        return read.strip() or write.strip(), write.strip() or read.strip()
    parts = _id_parts(sae_id) if isinstance(sae_id, str) else []
    hook = next((p for p in parts if _TL_HOOK.fullmatch(p)), None)
    if hook:
        return hook, hook
    layer = _layer(cfg.get("hook_layer"))
    if layer is None:
        found = (_LAYER_PART.fullmatch(p) for p in parts)
        layer = next((int(m.group(1)) for m in found if m), None)
    label = UNSTATED.format(name) if layer is None else LAYER_ONLY.format(layer)
    return label, label
