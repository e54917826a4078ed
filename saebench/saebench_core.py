"""SAEBench's `core` eval JSON in and out: import it as result rows, export a run as it.

`read_core_results(path)` turns SAEBench core files (`CoreEvalOutput`, eval_type_id "core")
into rows of `saebench.results.RESULT_COLUMNS`, so a leaderboard can set them beside
saebench's own rows; `saebench export` (`run_export`, `saebench.saebench_core_export`)
writes one SAEBench-core-shaped file per dictionary of a run, so SAEBench's tools can read
saebench's numbers.

    >>> read_core_results(Path("eval_results/core"))[["check_id", "value", "source"]]

Where the definitions agree, a SAEBench field becomes the saebench key of the same quantity:
ce_loss_score is `ce_loss_recovered[zero]`, kl_div_score is `kl_div_score[zero]`,
kl_div_with_sae is `kl_div`, l0, cossim, l2_ratio, relative_reconstruction_bias keep their
names, freq_over_1_percent / freq_over_10_percent are `dense_fraction[dense_threshold=0.01]`
/ `[dense_threshold=0.1]`. Where they differ, the key says so: SAEBench 0.6.0's explained_variance,
1 − E‖x − x̂‖² / (E‖x‖² − (E‖x‖²/d_in)²) (its denominator is neither the variance nor the
squared norm), is `explained_variance_saebench` (the uncentred value
`explained_variance_uncentred` when the file is one saebench exported); its mse (the
per-position sum, d_in × saebench's per-element `mse`) is `mse_per_position`.

Import never invents a number: SAEBench writes -1 for a NaN metric, and a file may hold a
value outside a field's possible range or one of a computation its eval_config switched off
(`compute_kl: false`, ...); each is read as *missing* (`saebench.saebench_core_fields` has
the rules and the table of ranges): a row of value NaN, verdict "nan" and the reason in its
message (`missing_reason_of`), so the leaderboard shows "—" with the reason. Other imported
rows have no interval (SAEBench reports none), no n, verdict "imported". The source is
`saebench-core:<release>:<sae_id>` (else the saebench source an exported file names, else
`saebench-core:<file name>`): after the prefix it is the source saebench gives the same
dictionary. The hook comes from sae_cfg_dict, else from sae_lens_id (the whole hook, or the
layer alone), never "". A file saebench exported also gives back its dictionary name,
suite, identity, model hash and token set, so it is the same leaderboard entry as its run.
No torch here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from saebench import results
from saebench import saebench_core_fields as fields
from saebench.results import is_missing
from saebench.saebench_core_export import ZERO, Options, export_core
from saebench.saebench_core_fields import EVAL_TYPE_ID, FILE_SUFFIX

FORMATS = ("saebench-core",)
IMPORTED_VERDICT = "imported"
MISSING_VERDICT = "nan"
"""The verdict of an imported value read as missing (its message says why)."""
SOURCE_PREFIX = "saebench-core:"


HIGHER_IS_BETTER: dict[str, bool] = {
    "ce_loss_recovered": True, "kl_div_score": True, "kl_div": False, "l0": False,
    "cossim": True, "l2_ratio": True, "relative_reconstruction_bias": True,
    "explained_variance": True, "mse": False, "dense_fraction": False,
    "explained_variance_uncentred": True, "explained_variance_saebench": True,
    "mse_per_position": False,
}
"""The direction of each imported metric: the registry's for saebench's metrics (a test
holds them equal; the registry imports torch, this module must not), and for the two
SAEBench-only definitions."""

_DISTINCT = {
    "explained_variance_uncentred": "uncentred: 1 − E‖x − x̂‖² / E‖x‖²",
    "explained_variance_saebench": "SAEBench 0.6.0's formula: 1 − E‖x − x̂‖² / (E‖x‖² − "
                                   "(E‖x‖²/d_in)²), not centred on E x; within "
                                   "(E‖x‖²/d_in)²/E‖x‖² of the uncentred value",
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
              "ce_loss_recovered", ZERO),
    _Imported("model_behavior_preservation", "kl_div_score", "kl_div_score[zero]",
              "kl_div_score", ZERO),
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


# --------------------------------------------------------------------------- import


def read_core_results(path: Path) -> pd.DataFrame:
    """SAEBench core results as result rows: one file, or every `*_eval_results.json` under
    a directory (sorted); one row per metric the file reports. A value that is no
    measurement (`saebench.saebench_core_fields`) is a row of value NaN, verdict "nan" and
    the reason in its message.

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
    """The rows of one core eval file, in the order of `_IMPORTS`: a value, or NaN with the
    reason it is missing (its own, or that of a part it is computed from)."""
    metrics = data["eval_result_metrics"]
    config = _object(data.get("eval_config"))
    base = _imported_identity(file, data)
    d_sae = None if is_missing(base["d_sae"]) else base["d_sae"]
    rows = []
    for spec in _IMPORTS:
        category = _object(metrics.get(spec.category))
        raw = category.get(spec.field)
        if raw is None:
            continue
        why = fields.missing_reason(spec.category, spec.field, raw, config, d_sae)
        parts = {}
        for ours, theirs in _IMPORTED_PARTS.get(spec.key, {}).items():
            if category.get(theirs) is None:
                continue
            part_why = fields.missing_reason(spec.category, theirs, category[theirs], config)
            if part_why is None:
                parts[ours] = float(category[theirs])
            elif why is None:
                why = fields.part_reason(theirs, part_why)
        spec = _as_written(spec, config)
        if why is None:
            note = f" ({_DISTINCT[spec.key]})" if spec.key in _DISTINCT else ""
            value, verdict = float(raw), IMPORTED_VERDICT
            message = f"SAEBench core {spec.category}.{spec.field}{note}, from {file.name}"
        else:
            value, verdict = math.nan, MISSING_VERDICT
            message = fields.missing_message(why, spec.category, spec.field, raw, file.name)
        rows.append(results.row(
            **base, check_id=f"{base['dictionary']}::{spec.key}", metric=spec.metric,
            options=json.dumps(dict(spec.options), sort_keys=True), value=value,
            verdict=verdict, higher_is_better=HIGHER_IS_BETTER[spec.metric],
            parts=json.dumps(parts, sort_keys=True), message=message))
    return rows


def _as_written(spec: _Imported, config: Mapping[str, Any]) -> _Imported:
    """The key a field is imported under given who wrote the file: SAEBench's own
    `explained_variance` is its 0.6.0 formula (`explained_variance_saebench`); a file
    saebench exported (its eval_config states `saebench_definitions`) holds the exact
    uncentred value there."""
    if spec.key != "explained_variance_uncentred" or "saebench_definitions" in config:
        return spec
    return spec._replace(key="explained_variance_saebench", metric="explained_variance_saebench")


def _imported_identity(file: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """The columns every row of a file shares: dictionary, source, model, hooks, sizes, and
    the identity columns a file saebench exported states (so it matches its run's rows)."""
    cfg = _object(data.get("sae_cfg_dict"))
    config = _object(data.get("eval_config"))
    sae_id, release = data.get("sae_lens_id"), data.get("sae_lens_release_id")
    own = config.get("saebench_source")  # set by `export_core`, so an export keeps its source
    source = f"{release}:{sae_id}" if sae_id and release else own or sae_id or file.name
    read_hook, write_hook = fields.recovered_hooks(cfg, sae_id, file.name)
    millis = _number(data.get("datetime_epoch_millis"))
    stated = {column: _text_field(config, f"saebench_{column}")
              for column in ("suite", "identity", "model_hash", "weights_sha256")}
    return {
        "run_id": data.get("eval_id"), "source": SOURCE_PREFIX + source,
        "dictionary": _text_field(config, "saebench_dictionary") or sae_id or _name_of(file),
        "model": config.get("model_name") or cfg.get("model_name"),
        "hook": write_hook, "read_hook": read_hook, "write_hook": write_hook,
        "architecture": cfg.get("architecture"),
        "d_in": _number(cfg.get("d_in")), "d_sae": _number(cfg.get("d_sae")),
        "sae_lens_version": data.get("sae_lens_version"),
        "started_at": None if millis is None else millis / 1000,
        "token_set": _text_field(config, "token_set"), **stated,
    }


def _text_field(config: Mapping[str, Any], name: str) -> str | None:
    """A text field of an eval_config, None when absent, empty or not text."""
    value = config.get(name)
    return value if isinstance(value, str) and value else None


def _object(value: Any) -> Mapping[str, Any]:
    """`value` when it is a JSON object, else an empty one (a category SAEBench left out)."""
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    """A finite JSON number as a float; None for null, NaN, text or a boolean."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def missing_reason_of(row: Mapping[str, Any]) -> str:
    """Why an imported row's value is missing (from its message); "" for other rows."""
    if row.get("verdict") != MISSING_VERDICT or not isinstance(row.get("message"), str):
        return ""
    return fields.reason_of(row["message"])


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
    one-line message on stderr for a missing run, a run without results, an unknown format,
    an output that is a file or a file there it would overwrite."""
    try:
        written = _export(Path(args.run_dir), args.format, args.out)
    except (OSError, ValueError) as err:
        print(f"saebench export: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print("\n".join(map(str, written)))
    return 0


def _export(run_dir: Path, fmt: str, out: str | None) -> list[Path]:
    """The files `saebench export` writes; ValueError saying why it cannot (unknown format,
    no run directory, no results.csv, nothing to export, `out` a file)."""
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
