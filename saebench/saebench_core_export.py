"""`saebench export RUN --format saebench-core`: a run's rows as SAEBench core JSON files, one
per single dictionary (a spliced set such as `a+b` is not one SAE) of each suite and identity.

    >>> export_core(Path("reports/20261201-153000-ab12"), Path("out"))  # [out/…_eval_results.json]

Numbers: a field is taken only from a measured row (`saebench.verdicts.VALUED`: pass, fail,
xfail, xpass, measured), from the first of its sources that has a finite number; a metric
the run lacks, or whose row is `error`, `empty`, `unstable`, `skipped`, is null, never -1, 0
or an estimate, and eval_result_unstructured.missing says why, per field (`category.field`:
the row's verdict and message, or "not measured in this run"). The 95% bootstrap intervals,
for which the schema has no place, go to eval_result_unstructured.intervals, with each
check's verdict.

Explained variance: the `explained_variance` field holds the exact *uncentred* value (the
`explained_variance_uncentred` part of saebench's row; SAEBench 0.6.0's own formula there,
1 − E‖x − x̂‖² / (E‖x‖² − (E‖x‖²/d_in)²), is within (E‖x‖²/d_in)²/E‖x‖² of it) and
saebench's centred value goes to an extra field, `explained_variance_centred`; likewise
`mse` holds the per-position form and `mse_per_element` saebench's. Why not the centred
value under SAEBench's name, with the definition stated in eval_config: SAEBench's graphs,
leaderboards and saebench's own importer read `explained_variance` without reading any
note, so the same name would carry two definitions and a centred value would be ranked
against uncentred ones (it is lower whenever activations have a large mean). A field name
keeps one meaning everywhere; the centred value stays one clearly named field away, and the
round trip keeps both.
eval_config.saebench_definitions states every definition used in the file.

Files: named by `export_name` (readable, plus a hash of the exact suite, dictionary and
identity, so no two dictionaries share a file), and written only where nothing else is:
`export_core` refuses, before writing anything, a target that exists and is not saebench's
export of the same dictionary (a re-export replaces its own file). eval_config carries the
export key and the identity columns, which `saebench.saebench_core` reads back. No torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from saebench import __version__, results
from saebench.results import is_missing
from saebench.saebench_core_fields import EVAL_TYPE_ID, FILE_SUFFIX
from saebench.verdicts import VALUED

Options = tuple[tuple[str, Any], ...]
ZERO: Options = (("ablation", "zero"),)
_OPTION_DEFAULTS = {"ablation": "zero", "dense_threshold": 0.01}
"""saebench's defaults of the options that select a row (`saebench.metrics.registry`)."""


class _Source(NamedTuple):
    """Where an exported field comes from: the row of `metric` with `options`, its value
    (`part` None) or one of its parts."""

    metric: str
    options: Options = ()
    part: str | None = None


_EXPORTS: dict[str, dict[str, tuple[_Source, ...]]] = {
    "model_behavior_preservation": {
        "kl_div_score": (_Source("kl_div_score", ZERO),),
        "kl_div_with_ablation": (_Source("kl_div_score", ZERO, "kl_abl"),),
        "kl_div_with_sae": (_Source("kl_div"), _Source("kl_div_score", ZERO, "kl_spliced")),
    },
    "model_performance_preservation": {
        "ce_loss_score": (_Source("ce_loss_recovered", ZERO),),
        "ce_loss_with_ablation": (_Source("ce_loss_recovered", ZERO, "ce_abl"),),
        "ce_loss_with_sae": (_Source("ce_loss_recovered", ZERO, "ce_spliced"),
                             _Source("delta_ce", (), "ce_spliced")),
        "ce_loss_without_sae": (_Source("ce_loss_recovered", ZERO, "ce_clean"),
                                _Source("delta_ce", (), "ce_clean")),
    },
    "reconstruction_quality": {
        "explained_variance": (_Source("explained_variance", (), "explained_variance_uncentred"),),
        "explained_variance_centred": (_Source("explained_variance"),),
        "mse": (_Source("mse", (), "sq_err_per_position"),
                _Source("explained_variance", (), "sq_err_per_position")),
        "mse_per_element": (_Source("mse"),),
        "cossim": (_Source("cossim"),),
    },
    "shrinkage": {
        "l2_norm_in": (),
        "l2_norm_out": (),
        "l2_ratio": (_Source("l2_ratio"),),
        "relative_reconstruction_bias": (_Source("relative_reconstruction_bias"),),
    },
    "sparsity": {
        "l0": (_Source("l0"),),
        "l1": (),
    },
    "token_stats": {
        "total_tokens_eval_reconstruction": (_Source("kl_div_score", ZERO, "n_kl"),
                                             _Source("kl_div", (), "n_kl")),
        "total_tokens_eval_sparsity_variance": (_Source("l0", (), "n_act"),
                                                _Source("explained_variance", (), "n_act"),
                                                _Source("cossim", (), "n_act")),
    },
    "misc_metrics": {
        "freq_over_1_percent": (_Source("dense_fraction", (("dense_threshold", 0.01),)),),
        "freq_over_10_percent": (_Source("dense_fraction", (("dense_threshold", 0.1),)),),
        "normalized_freq_over_1_percent": (),
        "normalized_freq_over_10_percent": (),
        "average_max_encoder_cosine_sim": (),
        "average_max_decoder_cosine_sim": (),
        "frac_alive": (),
    },
}
"""Every field of SAEBench's core metric categories (plus the two saebench extras), each
with the rows it may be taken from, first found first; no source: always null."""

SAEBENCH_DEFINITIONS: dict[str, str] = {
    "explained_variance": "uncentred: 1 - E|x - x̂|² / E|x|² (SAEBench 0.6.0 computes "
                          "1 - E|x - x̂|² / (E|x|² - (E|x|²/d_in)²) here, within "
                          "(E|x|²/d_in)²/E|x|² of it)",
    "explained_variance_centred": "saebench's explained_variance, centred: "
                                  "1 - E|x - x̂|² / (E|x|² - |E x|²)",
    "mse": "per position, as SAEBench: E|x - x̂|² (summed over the d_in dimensions)",
    "mse_per_element": "saebench's mse, per element: E|x - x̂|² / d_in",
    "ce_loss_score": "saebench's ce_loss_recovered[zero]: (CE_zero - CE_sae) / "
                     "(CE_zero - CE_clean), CE a mean over prediction positions",
    "kl_div_score": "saebench's kl_div_score[zero]: (KL_zero - KL_sae) / KL_zero, "
                    "KL = mean KL(p_clean || p_variant) per position",
    "relative_reconstruction_bias": "E|x̂|² / E<x, x̂> pooled over all positions "
                                    "(SAEBench averages per-batch ratios)",
    "freq_over_1_percent": "saebench's dense_fraction[dense_threshold=0.01]",
    "freq_over_10_percent": "saebench's dense_fraction[dense_threshold=0.1]",
    "positions": "special tokens excluded; CE over positions with a next token, KL and "
                 "reconstruction over every position",
    "token_stats": "positions evaluated (saebench's n_kl and n_act), not batches x context",
    "missing": "null: the run did not measure it, or its check gave no measurement "
               "(eval_result_unstructured.missing says which, per field)",
    "intervals": "eval_result_unstructured.intervals: value, 95% bootstrap interval over "
                 "sequences and n of every check of this dictionary, by metric key",
}
"""What each exported field means (eval_config.saebench_definitions)."""


# --------------------------------------------------------------------------- files


class ExportKey(NamedTuple):
    """What one exported file holds: one dictionary of one suite, by its identity."""

    suite: str
    dictionary: str
    identity: str


def export_name(key: ExportKey, hook: str) -> str:
    """The file name of an exported dictionary: a readable part (dictionary and hook, each
    character outside `A-Za-z0-9._-` as `_`), then 16 hex digits of a sha256 of the exact
    key, so `x/y` and `x_y`, or one name in two suites, get two files. Two keys share a name
    only if those 64 bits collide, and `export_core` refuses such an export rather than
    write one over the other. The same key always gets the same name (a re-export finds its
    own file).

    >>> export_name(ExportKey("toy", "res/L12", ""), "blocks.12.hook_resid_post")
    'res_L12_blocks.12.hook_resid_post-61520cace9b3bdd5_eval_results.json'
    """
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", f"{key.dictionary}_{hook}").lstrip(".")
    return f"{readable[:150]}-{results.short_hash(json.dumps(list(key)))}{FILE_SUFFIX}"


def export_core(run_dir: Path, out: Path) -> list[Path]:
    """Write one SAEBench core JSON per single dictionary (per suite and identity) of a run
    directory to `out` (names: `export_name`); returns the files.

    Never overwrites a file it did not write: a target that exists is replaced only when it
    is saebench's export of the same suite, dictionary and identity (a re-export); any other
    file there, or two keys with one name, refuses the whole export, before anything is
    written, with a ValueError naming the file. Raises FileNotFoundError when the run has
    no results.csv, ValueError when `out` is a file.

        >>> export_core(Path("reports/20261201-153000-ab12"), Path("out"))
    """
    rows = results.read_results(Path(run_dir))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    targets: dict[Path, tuple[ExportKey, pd.DataFrame]] = {}
    for key, own in _export_groups(rows):
        target = out / export_name(key, _text(own["hook"].iloc[0]))
        if target in targets:
            raise ValueError(f"{target}: two dictionaries would share this file name "
                             f"({targets[target][0]} and {key}); nothing written")
        _check_replaceable(target, key)
        targets[target] = (key, own)
    if targets:
        out.mkdir(parents=True, exist_ok=True)
    for target, (key, own) in targets.items():
        payload = _core_json(own, key, Path(run_dir).name)
        results.atomic_write(target, json.dumps(payload, indent=2, ensure_ascii=False,
                                                allow_nan=False) + "\n")
    return list(targets)


def _export_groups(rows: pd.DataFrame) -> list[tuple[ExportKey, pd.DataFrame]]:
    """The rows of each single dictionary (not an `a+b` set), by suite, name and identity,
    in the order of their first row."""
    keys = [ExportKey(_text(s), _text(d), _text(i)) for s, d, i
            in zip(rows["suite"], rows["dictionary"], rows["identity"], strict=True)]
    groups: dict[ExportKey, list[int]] = {}
    for index, key in enumerate(keys):
        if key.dictionary and "+" not in key.dictionary:
            groups.setdefault(key, []).append(index)
    return [(key, rows.iloc[indices]) for key, indices in groups.items()]


def _check_replaceable(target: Path, key: ExportKey) -> None:
    """ValueError unless `target` is absent or saebench's export of `key`."""
    if not target.exists() and not target.is_symlink():
        return
    try:
        config = json.loads(target.read_text(encoding="utf-8")).get("eval_config")
    except (OSError, ValueError, AttributeError):
        config = None
    config = config if isinstance(config, dict) else {}
    written = ExportKey(*(config.get(f"saebench_{field}") for field in ExportKey._fields))
    if target.is_symlink() or not target.is_file() or written != key:
        raise ValueError(f"{target}: exists and is not saebench's export of this dictionary; "
                         "not overwritten (nothing written)")


def _text(value: Any) -> str:
    """A text cell as a string ("" when missing)."""
    return "" if is_missing(value) else str(value)


def _core_json(rows: pd.DataFrame, key: ExportKey, fallback_run_id: str) -> dict[str, Any]:
    """The SAEBench core object of one dictionary's rows; every null metric's reason is in
    eval_result_unstructured.missing."""
    first = rows.iloc[0]
    release = _release(_text(first["source"]))
    core = [_parsed(r) for r in rows.to_dict("records") if not _text(r["task"])]
    metrics: dict[str, dict[str, Any]] = {}
    missing: dict[str, str] = {}
    for category, names in _EXPORTS.items():
        metrics[category] = {}
        for name, sources in names.items():
            metrics[category][name], why = _field(core, sources, category)
            if why:
                missing[f"{category}.{name}"] = why
    return {
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": _eval_config(first, core, key),
        "eval_id": _text(first["run_id"]) or fallback_run_id,
        "datetime_epoch_millis": _millis(rows["started_at"]),
        "eval_result_metrics": metrics,
        "eval_result_details": [],
        "eval_result_unstructured": {"missing": missing, "intervals": _intervals(rows)},
        "sae_bench_commit_hash": None,
        "sae_lens_id": release[1] if release else None,
        "sae_lens_release_id": release[0] if release else None,
        "sae_lens_version": _text(first["sae_lens_version"]) or None,
        "sae_cfg_dict": _sae_cfg(first),
    }


def _release(source: str) -> tuple[str, str] | None:
    """(release, sae_id) of a `release:sae_id` source; None for zoo, path and factory
    dictionaries (and no source)."""
    kind, sep, sae_id = source.partition(":")
    if not sep or kind in ("zoo", "path", "factory") or not sae_id:
        return None
    return kind, sae_id


def _parsed(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with its `options` and `parts` JSON decoded (empty when missing)."""
    return {**row, "options": _json(row["options"]), "parts": _json(row["parts"])}


def _json(text: Any) -> dict[str, Any]:
    """A JSON object cell as a dict ({} when empty or not an object)."""
    try:
        value = json.loads(_text(text) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _field(rows: list[dict[str, Any]], sources: tuple[_Source, ...],
           category: str) -> tuple[Any, str]:
    """A field's value from the first source a measured row holds a finite number for, and
    ""; else None and why: the first source row's verdict and message, or not measured."""
    why = ""
    for source in sources:
        for row in rows:
            if row["metric"] != source.metric or not _selects(source.options, row["options"]):
                continue
            if row["verdict"] not in VALUED:
                why = why or _cut(f"[{row['verdict'] or 'no verdict'}] {row['check_id']}: "
                                  f"{_text(row['message'])}")
                continue
            value = _finite(row["value"] if source.part is None else row["parts"].get(source.part))
            if value is not None:
                return (int(value) if category == "token_stats" else value), ""
            why = why or f"{row['check_id']} has no finite {source.part or 'value'}"
    return None, why or ("not measured in this run" if sources else "saebench does not measure it")


def _cut(text: str, limit: int = 300) -> str:
    """One line of at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _selects(wanted: Options, options: Mapping[str, Any]) -> bool:
    """Whether a row's options (saebench's defaults filled in) include `wanted`."""
    return all(options.get(k, _OPTION_DEFAULTS.get(k)) == v for k, v in wanted)


def _finite(value: Any) -> float | None:
    """A finite number as a float; None for missing, non-finite or non-numeric values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _millis(started: pd.Series) -> int | None:
    """The earliest start time (seconds) of the rows in milliseconds; None when unknown."""
    times = [t for t in map(_finite, started) if t is not None]
    return round(min(times) * 1000) if times else None


def _intervals(rows: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Verdict, value, 95% interval and n of every check of the dictionary, by metric key;
    value and interval null unless the check was measured (`VALUED`)."""
    out = {}
    for r in rows.to_dict("records"):
        measured = r["verdict"] in VALUED
        out[_text(r["check_id"]).rsplit("::", 1)[-1]] = {
            "verdict": _text(r["verdict"]) or None,
            **{k: _finite(r[k]) if measured else None for k in ("value", "ci_low", "ci_high")},
            "n": None if is_missing(r["n"]) else int(r["n"])}
    return out


def _eval_config(first: Mapping[str, Any], core: list[dict[str, Any]],
                 key: ExportKey) -> dict[str, Any]:
    """The run settings SAEBench's eval_config has room for, saebench's extras (n is the
    number of sequences of the measured core rows; the export key and identity columns,
    which the importer reads back), and the definitions of the exported fields."""
    counts = [int(r["n"]) for r in core
              if r["verdict"] in VALUED and not is_missing(r["n"])]
    batch = _json(first["options"]).get("batch_size")
    return {
        "model_name": _text(first["model"]) or None,
        "llm_dtype": _text(first["dtype"]) or None,
        "batch_size_prompts": batch,
        "exclude_special_tokens_from_reconstruction": True,
        "token_set": _text(first["token_set"]) or None,
        "n_sequences": max(counts) if counts else None,
        "seed": None if is_missing(first["seed"]) else int(first["seed"]),
        "saebench_version": _text(first["saebench_version"]) or __version__,
        "saebench_commit": _text(first["saebench_commit"]) or None,
        "saebench_source": _text(first["source"]) or None,
        **{f"saebench_{field}": value for field, value in key._asdict().items()},
        "saebench_model_hash": _text(first["model_hash"]) or None,
        "saebench_weights_sha256": _text(first["weights_sha256"]) or None,
        "saebench_definitions": SAEBENCH_DEFINITIONS,
    }


def _sae_cfg(row: Mapping[str, Any]) -> dict[str, Any]:
    """SAEBench's sae_cfg_dict from a row's identity columns: only what is known."""
    read_hook = _text(row["read_hook"]) or _text(row["hook"])
    write_hook = _text(row["write_hook"]) or read_hook
    cfg: dict[str, Any] = {
        "model_name": _text(row["model"]), "hook_name": read_hook,
        "hook_name_out": write_hook if write_hook != read_hook else "",
        "architecture": _text(row["architecture"]),
        "d_in": None if is_missing(row["d_in"]) else int(row["d_in"]),
        "d_sae": None if is_missing(row["d_sae"]) else int(row["d_sae"]),
    }
    return {k: v for k, v in cfg.items() if v not in ("", None)}
