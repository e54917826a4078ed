"""SAEBench's `core` eval JSON in and out: import it as result rows, export a run as it.

`read_core_results(path)` turns SAEBench core files (`CoreEvalOutput`, eval_type_id "core")
into rows of `saebench.results.RESULT_COLUMNS`, so a leaderboard can set them beside
saebench's own rows; `export_core(run_dir, out)` writes one SAEBench-core-shaped file per
dictionary of a run, so SAEBench's tools can read saebench's numbers.

    >>> read_core_results(Path("eval_results/core"))[["check_id", "value", "source"]]
    >>> export_core(Path("reports/20261201-153000-ab12"), Path("out"))  # [out/…_eval_results.json]

Where the definitions agree, a SAEBench field becomes the saebench key of the same quantity:
ce_loss_score is `ce_loss_recovered[zero]`, kl_div_score is `kl_div_score[zero]`,
kl_div_with_sae is `kl_div`, l0, cossim, l2_ratio, relative_reconstruction_bias keep their
names, freq_over_1_percent / freq_over_10_percent are `dense_fraction[dense_threshold=0.01]`
/ `[dense_threshold=0.1]`. Where they differ, the key says so: SAEBench's explained_variance
(uncentred, 1 − E‖x − x̂‖²/E‖x‖²) is `explained_variance_uncentred`, its mse (the
per-position sum, d_in × saebench's per-element `mse`) is `mse_per_position`. Imported rows
have no interval (SAEBench reports none), no n, verdict "imported", and the source
`saebench-core:<release>:<sae_id>` (else the saebench source an exported file names, else
`saebench-core:<file name>`): after the prefix it is the source saebench gives the same
dictionary, so a leaderboard can match the two.

Explained variance on export: the `explained_variance` field holds the *uncentred* value (the
`explained_variance_uncentred` part of saebench's row) and saebench's centred value goes to
an extra field, `explained_variance_centred`; likewise `mse` holds the per-position form and
`mse_per_element` saebench's. Why not the centred value under SAEBench's name, with the
definition stated in eval_config: SAEBench's graphs, leaderboards and this module's own
importer read `explained_variance` without reading any note, so the same name would carry
two definitions and a centred value would be ranked against uncentred ones (it is lower
whenever activations have a large mean). A field name keeps one meaning everywhere; the
centred value stays one clearly named field away, and the round trip keeps both.
eval_config.saebench_definitions still states every definition used in the file.

Exported files hold single dictionaries only (a spliced set such as `a+b` is not one SAE);
metrics the run lacks are null, never estimated; the 95% bootstrap intervals, for which the
schema has no place, go to eval_result_unstructured. No torch here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from saebench import __version__, results
from saebench.results import is_missing

EVAL_TYPE_ID = "core"
FILE_SUFFIX = "_eval_results.json"
FORMATS = ("saebench-core",)
IMPORTED_VERDICT = "imported"
SOURCE_PREFIX = "saebench-core:"

Options = tuple[tuple[str, Any], ...]
_ZERO: Options = (("ablation", "zero"),)
_OPTION_DEFAULTS = {"ablation": "zero", "dense_threshold": 0.01}
"""saebench's defaults of the options that select a row (`saebench.metrics.registry`)."""

HIGHER_IS_BETTER: dict[str, bool] = {
    "ce_loss_recovered": True, "kl_div_score": True, "kl_div": False, "l0": False,
    "cossim": True, "l2_ratio": True, "relative_reconstruction_bias": True,
    "explained_variance": True, "mse": False, "dense_fraction": False,
    "explained_variance_uncentred": True, "mse_per_position": False,
}
"""The direction of each imported metric: the registry's for saebench's metrics (a test
holds them equal; the registry imports torch, this module must not), and for the two
SAEBench-only definitions."""

_DISTINCT = {
    "explained_variance_uncentred": "uncentred: 1 − E‖x − x̂‖² / E‖x‖²",
    "mse_per_position": "per position: E‖x − x̂‖², d_in × saebench's per-element mse",
}
"""The keys of SAEBench fields whose definition differs from saebench's, with that
definition (in the message of each imported row)."""


class _Imported(NamedTuple):
    """A SAEBench field read as a row: its category and name, the saebench key and metric,
    and the options that key stands for."""

    category: str
    field: str
    key: str
    metric: str
    options: Options = ()


_IMPORTS = (
    _Imported("model_performance_preservation", "ce_loss_score", "ce_loss_recovered[zero]",
              "ce_loss_recovered", _ZERO),
    _Imported("model_behavior_preservation", "kl_div_score", "kl_div_score[zero]",
              "kl_div_score", _ZERO),
    _Imported("model_behavior_preservation", "kl_div_with_sae", "kl_div", "kl_div"),
    _Imported("reconstruction_quality", "explained_variance", "explained_variance_uncentred",
              "explained_variance_uncentred"),
    _Imported("reconstruction_quality", "explained_variance_centred", "explained_variance",
              "explained_variance"),
    _Imported("reconstruction_quality", "mse", "mse_per_position", "mse_per_position"),
    _Imported("reconstruction_quality", "mse_per_element", "mse", "mse"),
    _Imported("reconstruction_quality", "cossim", "cossim", "cossim"),
    _Imported("shrinkage", "l2_ratio", "l2_ratio", "l2_ratio"),
    _Imported("shrinkage", "relative_reconstruction_bias", "relative_reconstruction_bias",
              "relative_reconstruction_bias"),
    _Imported("sparsity", "l0", "l0", "l0"),
    _Imported("misc_metrics", "freq_over_1_percent", "dense_fraction[dense_threshold=0.01]",
              "dense_fraction", (("dense_threshold", 0.01),)),
    _Imported("misc_metrics", "freq_over_10_percent", "dense_fraction[dense_threshold=0.1]",
              "dense_fraction", (("dense_threshold", 0.1),)),
)

_IMPORTED_PARTS = {
    "ce_loss_recovered[zero]": {"ce_clean": "ce_loss_without_sae",
                                "ce_spliced": "ce_loss_with_sae",
                                "ce_abl": "ce_loss_with_ablation"},
    "kl_div_score[zero]": {"kl_spliced": "kl_div_with_sae", "kl_abl": "kl_div_with_ablation"},
}
"""The parts of an imported row (saebench's names) and the SAEBench fields, in the row's
category, that hold them."""


class _Source(NamedTuple):
    """Where an exported field comes from: the row of `metric` with `options`, its value
    (`part` None) or one of its parts."""

    metric: str
    options: Options = ()
    part: str | None = None


_EXPORTS: dict[str, dict[str, tuple[_Source, ...]]] = {
    "model_behavior_preservation": {
        "kl_div_score": (_Source("kl_div_score", _ZERO),),
        "kl_div_with_ablation": (_Source("kl_div_score", _ZERO, "kl_abl"),),
        "kl_div_with_sae": (_Source("kl_div"), _Source("kl_div_score", _ZERO, "kl_spliced")),
    },
    "model_performance_preservation": {
        "ce_loss_score": (_Source("ce_loss_recovered", _ZERO),),
        "ce_loss_with_ablation": (_Source("ce_loss_recovered", _ZERO, "ce_abl"),),
        "ce_loss_with_sae": (_Source("ce_loss_recovered", _ZERO, "ce_spliced"),
                             _Source("delta_ce", (), "ce_spliced")),
        "ce_loss_without_sae": (_Source("ce_loss_recovered", _ZERO, "ce_clean"),
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
        "total_tokens_eval_reconstruction": (_Source("kl_div_score", _ZERO, "n_kl"),
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
    "explained_variance": "uncentred, as SAEBench: 1 - E|x - x̂|² / E|x|²",
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
    "missing": "null: the run did not measure it",
    "intervals": "eval_result_unstructured.intervals: value, 95% bootstrap interval over "
                 "sequences and n of every check of this dictionary, by metric key",
}
"""What each exported field means (eval_config.saebench_definitions)."""


# --------------------------------------------------------------------------- import


def read_core_results(path: Path) -> pd.DataFrame:
    """SAEBench core results as result rows: one file, or every `*_eval_results.json` under
    a directory (sorted); one row per metric the file reports.

    Raises ValueError naming the file and the field for a file that is not a core eval
    (eval_type_id) or has no eval_result_metrics.

        >>> read_core_results(Path("eval_results/core"))[["check_id", "value"]]
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    files = sorted(path.rglob(f"*{FILE_SUFFIX}")) if path.is_dir() else [path]
    rows = [r for file in files for r in _file_rows(file, _load_core(file))]
    frame = pd.DataFrame(rows, columns=results.RESULT_COLUMNS)
    return frame.astype({"n": "Int64", "d_in": "Int64", "d_sae": "Int64", "seed": "Int64",
                         "higher_is_better": "boolean"})


def _load_core(file: Path) -> dict[str, Any]:
    """The JSON object of a core eval file; ValueError naming the file and the field."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{file}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: not a JSON object")
    if data.get("eval_type_id") != EVAL_TYPE_ID:
        raise ValueError(f"{file}: field 'eval_type_id' is {data.get('eval_type_id')!r}, "
                         f"not {EVAL_TYPE_ID!r}")
    if not isinstance(data.get("eval_result_metrics"), dict):
        raise ValueError(f"{file}: field 'eval_result_metrics' is missing or not an object")
    return data


def _name_of(file: Path) -> str:
    """A file's name without `_eval_results.json` (SAEBench's suffix for every file)."""
    return file.name.removesuffix(FILE_SUFFIX).removesuffix(".json")


def _file_rows(file: Path, data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of one core eval file, in the order of `_IMPORTS`."""
    metrics = data["eval_result_metrics"]
    base = _imported_identity(file, data)
    rows = []
    for spec in _IMPORTS:
        category = _object(metrics.get(spec.category))
        value = _number(category.get(spec.field))
        if value is None:
            continue
        parts = {ours: _number(category.get(theirs))
                 for ours, theirs in _IMPORTED_PARTS.get(spec.key, {}).items()}
        note = f" ({_DISTINCT[spec.key]})" if spec.key in _DISTINCT else ""
        rows.append(results.row(
            **base, check_id=f"{base['dictionary']}::{spec.key}", metric=spec.metric,
            options=json.dumps(dict(spec.options), sort_keys=True), value=value,
            verdict=IMPORTED_VERDICT, higher_is_better=HIGHER_IS_BETTER[spec.metric],
            parts=json.dumps({k: v for k, v in parts.items() if v is not None}, sort_keys=True),
            message=f"SAEBench core {spec.category}.{spec.field}{note}, from {file.name}"))
    return rows


def _imported_identity(file: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """The columns every row of a file shares: dictionary, source, model, hooks, sizes."""
    cfg = _object(data.get("sae_cfg_dict"))
    config = _object(data.get("eval_config"))
    sae_id, release = data.get("sae_lens_id"), data.get("sae_lens_release_id")
    own = config.get("saebench_source")  # set by `export_core`, so an export keeps its source
    source = f"{release}:{sae_id}" if sae_id and release else own or sae_id or file.name
    read_hook = cfg.get("hook_name")
    write_hook = cfg.get("hook_name_out") or read_hook
    millis = _number(data.get("datetime_epoch_millis"))
    return {
        "run_id": data.get("eval_id"), "dictionary": sae_id or _name_of(file),
        "source": SOURCE_PREFIX + source,
        "model": config.get("model_name") or cfg.get("model_name"),
        "hook": write_hook, "read_hook": read_hook, "write_hook": write_hook,
        "architecture": cfg.get("architecture"),
        "d_in": _number(cfg.get("d_in")), "d_sae": _number(cfg.get("d_sae")),
        "sae_lens_version": data.get("sae_lens_version"),
        "started_at": None if millis is None else millis / 1000,
    }


def _object(value: Any) -> Mapping[str, Any]:
    """`value` when it is a JSON object, else an empty one (a category SAEBench left out)."""
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    """A finite JSON number as a float; None for null, NaN, text or a boolean."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------- export


def export_core(run_dir: Path, out: Path) -> list[Path]:
    """Write one SAEBench core JSON per single dictionary of a run directory to `out`
    (`<dictionary>_<hook>_eval_results.json`, `/` replaced by `_`); returns the files.

    Raises FileNotFoundError when the run has no results.csv.

        >>> export_core(Path("reports/20261201-153000-ab12"), Path("out"))
    """
    rows = results.read_results(Path(run_dir))
    out = Path(out)
    written = []
    for dictionary in _single_dictionaries(rows["dictionary"]):
        own = rows[rows["dictionary"] == dictionary]
        hook = _text(own["hook"].iloc[0])
        target = out / _safe(f"{dictionary}_{hook}{FILE_SUFFIX}")
        out.mkdir(parents=True, exist_ok=True)
        payload = _core_json(own, Path(run_dir).name)
        results.atomic_write(target, json.dumps(payload, indent=2, ensure_ascii=False,
                                                allow_nan=False) + "\n")
        written.append(target)
    return written


def _single_dictionaries(names: Iterable[Any]) -> list[str]:
    """The distinct dictionary names of single dictionaries (not `a+b` sets), in order."""
    return [n for n in dict.fromkeys(map(_text, names)) if n and "+" not in n]


def _safe(name: str) -> str:
    """A file name without path separators."""
    return name.replace("/", "_")


def _text(value: Any) -> str:
    """A text cell as a string ("" when missing)."""
    return "" if is_missing(value) else str(value)


def _core_json(rows: pd.DataFrame, fallback_run_id: str) -> dict[str, Any]:
    """The SAEBench core object of one dictionary's rows."""
    first = rows.iloc[0]
    release = _release(_text(first["source"]))
    core = [_parsed(r) for r in rows.to_dict("records") if not _text(r["task"])]
    return {
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": _eval_config(first, core),
        "eval_id": _text(first["run_id"]) or fallback_run_id,
        "datetime_epoch_millis": _millis(rows["started_at"]),
        "eval_result_metrics": {
            category: {name: _field(core, sources, category) for name, sources in fields.items()}
            for category, fields in _EXPORTS.items()},
        "eval_result_details": [],
        "eval_result_unstructured": {"intervals": _intervals(rows)},
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


def _field(rows: list[dict[str, Any]], sources: tuple[_Source, ...], category: str) -> Any:
    """A field's value from the first source the rows hold a finite number for; else None."""
    for source in sources:
        for row in rows:
            if row["metric"] != source.metric or not _selects(source.options, row["options"]):
                continue
            value = _finite(row["value"] if source.part is None else row["parts"].get(source.part))
            if value is not None:
                return int(value) if category == "token_stats" else value
    return None


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
    """Value, 95% interval and n of every check of the dictionary, by metric key."""
    return {
        _text(r["check_id"]).rsplit("::", 1)[-1]: {
            "value": _finite(r["value"]), "ci_low": _finite(r["ci_low"]),
            "ci_high": _finite(r["ci_high"]), "n": None if is_missing(r["n"]) else int(r["n"])}
        for r in rows.to_dict("records")
    }


def _eval_config(first: Mapping[str, Any], core: list[dict[str, Any]]) -> dict[str, Any]:
    """The run settings SAEBench's eval_config has room for, saebench's extras (n is the
    number of sequences of the core rows), and the definitions of the exported fields."""
    counts = [int(r["n"]) for r in core if not is_missing(r["n"])]
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


# --------------------------------------------------------------------------- command line


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `saebench export RUN_DIR --format saebench-core -o DIR`."""
    parser.add_argument("run_dir", help="a run directory (holding results.csv)")
    parser.add_argument("--format", default=FORMATS[0],
                        help=f"output format: {', '.join(FORMATS)} (default {FORMATS[0]})")
    parser.add_argument("-o", "--out", default=None,
                        help="output directory (default: RUN_DIR/saebench-core)")


def run_export(args: argparse.Namespace) -> int:
    """`saebench export`: write the files, print their paths; 0 on success, 2 with a
    one-line message on stderr for a missing run, a run without results or an unknown
    format."""
    try:
        written = _export(Path(args.run_dir), args.format, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"saebench export: {err}", file=sys.stderr)
        return 2
    print("\n".join(map(str, written)))
    return 0


def _export(run_dir: Path, fmt: str, out: str | None) -> list[Path]:
    """The files `saebench export` writes; ValueError saying why it cannot (unknown format,
    no run directory, no results.csv, nothing to export)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if not run_dir.is_dir():
        raise ValueError(f"no such run directory: {run_dir}")
    if not (run_dir / results.RESULTS_FILE).is_file():
        raise ValueError(f"no {results.RESULTS_FILE} in {run_dir}")
    written = export_core(run_dir, Path(out) if out else run_dir / fmt)
    if not written:
        raise ValueError(f"{run_dir} has no results of a single dictionary")
    return written
