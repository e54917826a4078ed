"""Tests of saebench.saebench_core: importing SAEBench core JSON as result rows, exporting a
run as SAEBench core JSON, the round trip, and the `saebench export` command line."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from saebench import results, saebench_core, saebench_core_export
from saebench.metrics import get_metric
from saebench.saebench_core import (
    HIGHER_IS_BETTER,
    add_export_arguments,
    read_core_results,
    run_export,
)
from saebench.saebench_core_export import ExportKey, export_core, export_name
from saebench.saebench_core_fields import COMPUTE_FLAGS, FILE_SUFFIX

EXAMPLE = Path(__file__).resolve().parent.parent / "reports" / "example"
CATEGORIES = {
    "model_behavior_preservation": {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"},
    "model_performance_preservation": {"ce_loss_score", "ce_loss_with_ablation",
                                       "ce_loss_with_sae", "ce_loss_without_sae"},
    "reconstruction_quality": {"explained_variance", "mse", "cossim"},
    "shrinkage": {"l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"},
    "sparsity": {"l0", "l1"},
    "token_stats": {"total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"},
    "misc_metrics": {"freq_over_1_percent", "freq_over_10_percent",
                     "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
                     "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
                     "frac_alive"},
}
"""SAEBench's core metric categories and their fields (CoreEvalOutput)."""
SHARED_KEYS = ("ce_loss_recovered[zero]", "kl_div_score[zero]", "kl_div", "l0", "cossim",
               "l2_ratio", "relative_reconstruction_bias", "explained_variance", "mse")


def core_json(sae_id: str | None, release: str | None, ev: float, **metrics) -> dict:
    """A SAEBench core eval output, shaped as SAEBench 0.6.0's CoreEvalOutput (every
    compute_* flag of CoreEvalConfig true), with `metrics` overriding fields of
    eval_result_metrics (`category={...}`)."""
    categories = {
        "model_behavior_preservation": {"kl_div_score": 0.95, "kl_div_with_ablation": 8.0,
                                        "kl_div_with_sae": 0.4},
        "model_performance_preservation": {"ce_loss_score": 0.9, "ce_loss_with_ablation": 10.0,
                                           "ce_loss_with_sae": 3.7, "ce_loss_without_sae": 3.0},
        "reconstruction_quality": {"explained_variance": ev, "explained_variance_legacy": ev,
                                   "mse": 2.5, "cossim": 0.93},
        "shrinkage": {"l2_norm_in": 50.0, "l2_norm_out": 48.0, "l2_ratio": 0.96,
                      "relative_reconstruction_bias": 0.98},
        "sparsity": {"l0": 82.5, "l1": 310.0},
        "token_stats": {"total_tokens_eval_reconstruction": 409600,
                        "total_tokens_eval_sparsity_variance": 4096000},
        "misc_metrics": {"freq_over_1_percent": 0.02, "freq_over_10_percent": 0.001,
                         "normalized_freq_over_1_percent": 0.3,
                         "normalized_freq_over_10_percent": 0.05,
                         "average_max_encoder_cosine_sim": 0.4,
                         "average_max_decoder_cosine_sim": 0.5, "frac_alive": 0.99},
    }
    for category, fields in metrics.items():
        categories[category] = {**categories[category], **fields}
    return {
        "eval_type_id": "core",
        "eval_config": {"model_name": "gemma-2-2b", "llm_dtype": "bfloat16",
                        "n_eval_reconstruction_batches": 200,
                        "n_eval_sparsity_variance_batches": 2000, "batch_size_prompts": 16,
                        "context_size": 128, "dataset": "Skylion007/openwebtext",
                        **dict.fromkeys(COMPUTE_FLAGS.values(), True),
                        "compute_featurewise_weight_based_metrics": True,
                        "exclude_special_tokens_from_reconstruction": True, "verbose": False},
        "eval_id": "0c057d5e-9c3f-4b2a-8e4b-1d2f3a4b5c6d",
        "datetime_epoch_millis": 1732012345678,
        "eval_result_metrics": categories,
        "eval_result_details": [],
        "eval_result_unstructured": None,
        "sae_bench_commit_hash": "abc1234",
        "sae_lens_id": sae_id,
        "sae_lens_release_id": release,
        "sae_lens_version": "5.3.0",
        "sae_cfg_dict": {"d_in": 2304, "d_sae": 16384, "hook_name": "blocks.12.hook_resid_post",
                         "architecture": "jumprelu", "model_name": "gemma-2-2b"},
    }


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def saebench_dir(tmp_path: Path) -> Path:
    """A SAEBench eval_results directory with two SAEs' core results (one without ids)."""
    root = tmp_path / "eval_results" / "core"
    write_json(root / "gemma-scope_layer_12_eval_results.json",
               core_json("layer_12/width_16k/average_l0_82", "gemma-scope-2b-pt-res", 0.81))
    write_json(root / "custom_sae_eval_results.json", core_json(None, None, 0.7))
    return tmp_path / "eval_results"


@pytest.fixture
def example_run(tmp_path: Path) -> Path:
    """A copy of reports/example (never written in place)."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "example"))


def by_key(frame: pd.DataFrame) -> dict[str, dict]:
    """Rows by metric key (the check id after `::`)."""
    return {r["check_id"].rsplit("::", 1)[1]: r for r in frame.to_dict("records")}


# --------------------------------------------------------------------------- import


def test_import_keys_values_and_identity(saebench_dir: Path) -> None:
    frame = read_core_results(saebench_dir / "core" / "gemma-scope_layer_12_eval_results.json")
    assert list(frame.columns) == results.RESULT_COLUMNS
    rows = by_key(frame)
    assert set(rows) == {
        "ce_loss_recovered[zero]", "kl_div_score[zero]", "kl_div", "l0", "cossim", "l2_ratio",
        "relative_reconstruction_bias", "explained_variance_saebench", "mse_per_position",
        "dense_fraction[dense_threshold=0.01]", "dense_fraction[dense_threshold=0.1]"}
    assert rows["ce_loss_recovered[zero]"]["value"] == 0.9
    assert json.loads(rows["ce_loss_recovered[zero]"]["parts"]) == {
        "ce_clean": 3.0, "ce_spliced": 3.7, "ce_abl": 10.0}
    assert json.loads(rows["kl_div_score[zero]"]["parts"]) == {"kl_spliced": 0.4, "kl_abl": 8.0}
    assert json.loads(rows["ce_loss_recovered[zero]"]["options"]) == {"ablation": "zero"}
    assert rows["kl_div"]["value"] == 0.4 and rows["l0"]["value"] == 82.5
    assert rows["dense_fraction[dense_threshold=0.01]"]["value"] == 0.02
    first = rows["l0"]
    assert first["check_id"] == "layer_12/width_16k/average_l0_82::l0"
    assert first["source"] == \
        "saebench-core:gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_82"
    assert first["model"] == "gemma-2-2b" and first["architecture"] == "jumprelu"
    assert first["hook"] == first["read_hook"] == first["write_hook"] == \
        "blocks.12.hook_resid_post"
    assert (first["d_in"], first["d_sae"]) == (2304, 16384)
    assert first["started_at"] == pytest.approx(1732012345.678)
    assert first["sae_lens_version"] == "5.3.0"
    assert first["run_id"] == "0c057d5e-9c3f-4b2a-8e4b-1d2f3a4b5c6d"


def test_import_has_no_intervals_and_marks_rows_imported(saebench_dir: Path) -> None:
    frame = read_core_results(saebench_dir)
    assert frame["ci_low"].isna().all() and frame["ci_high"].isna().all()
    assert frame["n"].isna().all() and str(frame["n"].dtype) == "Int64"
    assert set(frame["verdict"]) == {"imported"}
    assert frame["higher_is_better"].notna().all()


def test_saebench_ev_and_per_position_mse_are_labelled(saebench_dir: Path) -> None:
    """SAEBench 0.6.0's explained_variance is neither centred nor uncentred (its denominator
    is E‖x‖² − (E‖x‖²/d_in)²): imported under its own key, with its formula."""
    rows = by_key(read_core_results(saebench_dir / "core" / "custom_sae_eval_results.json"))
    assert "explained_variance" not in rows and "mse" not in rows
    assert "explained_variance_uncentred" not in rows
    ev, mse = rows["explained_variance_saebench"], rows["mse_per_position"]
    assert ev["value"] == 0.7 and ev["higher_is_better"] is True
    assert ev["metric"] == "explained_variance_saebench"
    assert "(E‖x‖²/d_in)²" in ev["message"]
    assert mse["value"] == 2.5 and mse["higher_is_better"] is False
    assert "per position" in mse["message"]


def test_import_directory_sorted_and_without_ids(saebench_dir: Path) -> None:
    frame = read_core_results(saebench_dir)
    assert list(dict.fromkeys(frame["dictionary"])) == [
        "custom_sae", "layer_12/width_16k/average_l0_82"]
    custom = frame[frame["dictionary"] == "custom_sae"]
    assert set(custom["source"]) == {"saebench-core:custom_sae_eval_results.json"}
    assert custom["check_id"].str.startswith("custom_sae::").all()


def test_import_skips_null_metrics_and_empty_directory(tmp_path: Path) -> None:
    data = core_json("a", "r", 0.8, sparsity={"l0": None}, shrinkage={"l2_ratio": float("nan")})
    rows = by_key(read_core_results(write_json(tmp_path / "a_eval_results.json", data)))
    assert "l0" not in rows and rows["cossim"]["value"] == 0.93
    # a NaN (which Python's json writes and reads) is no measurement: missing, with the reason
    assert math.isnan(rows["l2_ratio"]["value"]) and rows["l2_ratio"]["verdict"] == "nan"
    assert saebench_core.missing_reason_of(rows["l2_ratio"]) == "not a finite number"
    (tmp_path / "nothing").mkdir()
    empty = read_core_results(tmp_path / "nothing")
    assert empty.empty and list(empty.columns) == results.RESULT_COLUMNS
    with pytest.raises(FileNotFoundError, match="missing"):
        read_core_results(tmp_path / "missing")


@pytest.mark.parametrize(("change", "field"), [
    ({"eval_type_id": "absorption_first_letter"}, "eval_type_id"),
    ({"eval_type_id": None}, "eval_type_id"),
    ({"eval_result_metrics": None}, "eval_result_metrics"),
    ({"eval_result_metrics": [1, 2]}, "eval_result_metrics"),
])
def test_refuses_a_file_that_is_not_core(tmp_path: Path, change: dict, field: str) -> None:
    path = write_json(tmp_path / "bad_eval_results.json", {**core_json("a", "r", 0.8), **change})
    with pytest.raises(ValueError, match=field) as info:
        read_core_results(path)
    assert "bad_eval_results.json" in str(info.value)


def test_refuses_a_missing_metrics_field_and_bad_json(tmp_path: Path) -> None:
    data = core_json("a", "r", 0.8)
    del data["eval_result_metrics"]
    with pytest.raises(ValueError, match="m_eval_results.json.*eval_result_metrics"):
        read_core_results(write_json(tmp_path / "m_eval_results.json", data))
    bad = tmp_path / "j_eval_results.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="j_eval_results.json"):
        read_core_results(tmp_path)


def test_module_does_not_import_torch() -> None:
    code = "import sys, saebench.saebench_core; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"


def test_higher_is_better_matches_the_registry() -> None:
    registered = {k: v for k, v in HIGHER_IS_BETTER.items() if k not in saebench_core._DISTINCT}
    assert registered == {k: get_metric(k).higher_is_better for k in registered}
    assert HIGHER_IS_BETTER["explained_variance_uncentred"] is True
    assert HIGHER_IS_BETTER["explained_variance_saebench"] is True
    assert HIGHER_IS_BETTER["mse_per_position"] is False


# --------------------------------------------------------------------------- export


def test_export_example_envelope_and_categories(example_run: Path, tmp_path: Path) -> None:
    files = export_core(example_run, tmp_path / "out")
    original = results.read_results(example_run)
    singles = [d for d in dict.fromkeys(original["dictionary"]) if "+" not in d]
    firsts = [original[original["dictionary"] == d].iloc[0] for d in singles]
    assert [f.name for f in files] == [
        export_name(ExportKey(r["suite"], r["dictionary"],
                              "" if pd.isna(r["identity"]) else r["identity"]), r["hook"])
        for r in firsts]
    (file,) = (tmp_path / "out").glob("resid-L2-topk16_blocks.2.hook_resid_pre-*")
    data = json.loads(file.read_text(encoding="utf-8"))
    assert data["eval_type_id"] == "core" and data["eval_id"] == original["run_id"].iloc[0]
    assert isinstance(data["datetime_epoch_millis"], int)
    assert data["eval_result_details"] == []
    assert data["sae_lens_id"] is None and data["sae_lens_release_id"] is None
    assert data["sae_lens_version"] == "6.54.12"
    assert data["sae_cfg_dict"]["hook_name"] == "blocks.2.hook_resid_pre"
    for category, fields in CATEGORIES.items():
        assert fields <= set(data["eval_result_metrics"][category])
    config = data["eval_config"]
    assert config["model_name"] == "zoo" and config["token_set"] == "9a3e17b8999250d0"
    assert config["n_sequences"] == 581 and config["saebench_version"] == "0.1.0"
    first = original[original["dictionary"] == "resid-L2-topk16"].iloc[0]
    assert (config["saebench_suite"], config["saebench_dictionary"]) == (
        first["suite"], "resid-L2-topk16")
    assert config["saebench_model_hash"] == first["model_hash"]
    assert data["eval_result_unstructured"]["missing"]["sparsity.l1"] == \
        "saebench does not measure it"
    definitions = config["saebench_definitions"]
    assert "uncentred" in definitions["explained_variance"]
    assert "centred" in definitions["explained_variance_centred"]
    assert "per position" in definitions["mse"] and "per element" in definitions["mse_per_element"]


def test_export_example_values_and_nulls(example_run: Path, tmp_path: Path) -> None:
    export_core(example_run, tmp_path / "out")
    rows = by_key(results.read_results(example_run).query("dictionary == 'resid-L2-poor'"))
    data = json.loads(next((tmp_path / "out").glob("resid-L2-poor_*")).read_text("utf-8"))
    metrics = data["eval_result_metrics"]
    ce_parts = json.loads(rows["ce_loss_recovered[zero]"]["parts"])
    assert metrics["model_performance_preservation"] == {
        "ce_loss_score": rows["ce_loss_recovered[zero]"]["value"],
        "ce_loss_with_ablation": ce_parts["ce_abl"], "ce_loss_with_sae": ce_parts["ce_spliced"],
        "ce_loss_without_sae": ce_parts["ce_clean"]}
    ev_parts = json.loads(rows["explained_variance"]["parts"])
    quality = metrics["reconstruction_quality"]
    assert quality["explained_variance"] == ev_parts["explained_variance_uncentred"]
    assert quality["explained_variance_centred"] == rows["explained_variance"]["value"]
    assert quality["mse"] == ev_parts["sq_err_per_position"]
    assert quality["mse"] == pytest.approx(128 * rows["mse"]["value"])
    # this dictionary was never measured for shrinkage: null, never a made-up value
    assert metrics["shrinkage"] == dict.fromkeys(CATEGORIES["shrinkage"])
    assert metrics["sparsity"] == {"l0": 16.0, "l1": None}
    assert metrics["misc_metrics"]["frac_alive"] is None
    assert metrics["misc_metrics"]["freq_over_10_percent"] == \
        rows["dense_fraction[dense_threshold=0.1]"]["value"]
    missing = data["eval_result_unstructured"]["missing"]
    assert {f"shrinkage.{f}" for f in CATEGORIES["shrinkage"]} <= set(missing)
    assert missing["shrinkage.l2_ratio"] == "not measured in this run"
    nulls = {f"{c}.{f}" for c, fields in metrics.items() for f, v in fields.items() if v is None}
    assert set(missing) == nulls  # every null says why, and only nulls
    intervals = data["eval_result_unstructured"]["intervals"]
    assert intervals["cossim"] == {"verdict": "xfail", "value": rows["cossim"]["value"],
                                   "ci_low": rows["cossim"]["ci_low"],
                                   "ci_high": rows["cossim"]["ci_high"], "n": 581}
    assert intervals["dead_fraction"]["ci_low"] is None


def test_round_trip_of_the_example(example_run: Path, tmp_path: Path) -> None:
    export_core(example_run, tmp_path / "out")
    imported = read_core_results(tmp_path / "out")
    original = results.read_results(example_run)
    compared = 0
    for dictionary in (d for d in dict.fromkeys(original["dictionary"]) if "+" not in d):
        theirs = by_key(original[original["dictionary"] == dictionary])
        mine = by_key(imported[imported["dictionary"] == dictionary])
        first = next(iter(mine.values()))
        for column in ("suite", "model", "hook", "model_hash", "token_set", "weights_sha256"):
            assert first[column] == next(iter(theirs.values()))[column], column
        for key in SHARED_KEYS:
            if key in theirs:
                assert mine[key]["value"] == theirs[key]["value"], (dictionary, key)
                assert mine[key]["higher_is_better"] == theirs[key]["higher_is_better"]
                compared += 1
        if "explained_variance" in theirs:
            parts = json.loads(theirs["explained_variance"]["parts"])
            assert mine["explained_variance_uncentred"]["value"] == \
                parts["explained_variance_uncentred"]
            assert mine["mse_per_position"]["value"] == parts["sq_err_per_position"]
    assert compared > 80


def handmade_run(tmp_path: Path,
                 source: str = "gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_82") -> Path:
    """A run of one dictionary (by default from a release; a `/` in its name) measured for
    three metrics, and a spliced set, which SAEBench's per-SAE format cannot hold."""
    run = results.RunDir(tmp_path / "20261201-153000-ab12")
    common = {"run_id": run.run_id, "suite": "mine", "dictionary": "res/L12",
              "hook": "blocks.12.hook_resid_post", "model": "gemma-2-2b",
              "source": source,
              "architecture": "jumprelu", "d_in": 2304, "d_sae": 16384,
              "read_hook": "blocks.12.hook_resid_post",
              "write_hook": "blocks.12.hook_resid_post", "sae_lens_version": "6.54.12",
              "saebench_version": "0.1.0", "token_set": "feedbeef", "n": 64,
              "verdict": "pass", "started_at": 1795441599.25}
    rows = [
        results.row(**common, check_id="res/L12::l0", metric="l0", value=80.0, ci_low=79.0,
                    ci_high=81.0, higher_is_better=False, parts=json.dumps({"n_act": 8128.0})),
        results.row(**common, check_id="res/L12::cossim", metric="cossim", value=0.9,
                    ci_low=0.89, ci_high=0.91, higher_is_better=True, parts="{}"),
        results.row(**common, check_id="res/L12::kl_div_score[zero]", metric="kl_div_score",
                    options=json.dumps({"ablation": "zero"}), value=0.97, ci_low=0.96,
                    ci_high=0.98, higher_is_better=True,
                    parts=json.dumps({"kl_spliced": 0.3, "kl_abl": 10.0, "n_kl": 8192.0})),
        results.row(**{**common, "dictionary": "res/L12+res/L13"}, check_id="both::l0",
                    metric="l0", value=1.0),
    ]
    results.append_rows(run.results, rows)
    return run.path


def test_export_handmade_run(tmp_path: Path) -> None:
    run = handmade_run(tmp_path)
    files = export_core(run, tmp_path / "out")
    assert [f.name for f in files] == [
        export_name(ExportKey("mine", "res/L12", ""), "blocks.12.hook_resid_post")]
    assert files[0].name.startswith("res_L12_blocks.12.hook_resid_post-")
    data = json.loads(files[0].read_text(encoding="utf-8"))
    assert data["eval_id"] == "20261201-153000-ab12"
    assert data["datetime_epoch_millis"] == 1795441599250
    assert data["sae_lens_release_id"] == "gemma-scope-2b-pt-res"
    assert data["sae_lens_id"] == "layer_12/width_16k/average_l0_82"
    assert data["sae_cfg_dict"] == {"model_name": "gemma-2-2b", "d_in": 2304, "d_sae": 16384,
                                    "hook_name": "blocks.12.hook_resid_post",
                                    "architecture": "jumprelu"}
    metrics = data["eval_result_metrics"]
    assert metrics["model_behavior_preservation"] == {
        "kl_div_score": 0.97, "kl_div_with_ablation": 10.0, "kl_div_with_sae": 0.3}
    assert metrics["model_performance_preservation"] == dict.fromkeys(
        CATEGORIES["model_performance_preservation"])
    assert metrics["reconstruction_quality"]["explained_variance"] is None
    assert metrics["reconstruction_quality"]["cossim"] == 0.9
    assert metrics["token_stats"] == {"total_tokens_eval_reconstruction": 8192,
                                      "total_tokens_eval_sparsity_variance": 8128}
    assert set(data["eval_result_unstructured"]["intervals"]) == {
        "l0", "cossim", "kl_div_score[zero]"}
    assert data["eval_config"]["saebench_source"] == \
        "gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_82"

    rows = by_key(read_core_results(files[0]))
    assert set(rows) == {"l0", "cossim", "kl_div_score[zero]", "kl_div"}
    assert rows["l0"]["value"] == 80.0 and rows["kl_div_score[zero]"]["value"] == 0.97
    assert rows["l0"]["source"] == \
        "saebench-core:" + data["eval_config"]["saebench_source"]
    assert rows["l0"]["d_sae"] == 16384 and math.isnan(rows["l0"]["ci_low"])


def test_export_of_a_zoo_dictionary_keeps_its_source(tmp_path: Path) -> None:
    (file,) = export_core(handmade_run(tmp_path, "zoo:resid-L12"), tmp_path / "out")
    data = json.loads(file.read_text(encoding="utf-8"))
    assert data["sae_lens_id"] is None and data["sae_lens_release_id"] is None
    assert set(read_core_results(file)["source"]) == {"saebench-core:zoo:resid-L12"}


def test_export_writes_strict_json(tmp_path: Path) -> None:
    run = handmade_run(tmp_path)
    results.append_rows(run / results.RESULTS_FILE, [results.row(
        run_id="20261201-153000-ab12", suite="mine", check_id="res/L12::l2_ratio",
        dictionary="res/L12", metric="l2_ratio", value=float("inf"), verdict="unstable", n=64)])
    (file,) = export_core(run, tmp_path / "out")
    data = json.loads(file.read_text(encoding="utf-8"), parse_constant=pytest.fail)
    assert data["eval_result_metrics"]["shrinkage"]["l2_ratio"] is None


KEYS = st.builds(ExportKey, st.text(max_size=12), st.text(min_size=1, max_size=40),
                 st.text(alphabet="0123456789abcdef", max_size=16))


@given(st.lists(st.tuples(KEYS, st.text(max_size=40)), unique_by=lambda pair: pair[0],
                max_size=40))
def test_export_names_are_distinct_file_names(pairs: list[tuple[ExportKey, str]]) -> None:
    names = [export_name(key, hook) for key, hook in pairs]
    assert len(set(names)) == len(names)
    for name in names:
        assert name.endswith(FILE_SUFFIX) and not name.startswith(".")
        assert "/" not in name and "\0" not in name and len(name.encode()) <= 255


def test_export_names_stay_readable() -> None:
    hook = "blocks.2.hook_resid_pre"
    names = [export_name(ExportKey(suite, dictionary, ""), hook)
             for suite, dictionary in (("toy", "x/y"), ("toy", "x_y"), ("other", "x_y"))]
    assert len(set(names)) == 3
    assert all(name.startswith(f"x_y_{hook}-") for name in names)
    assert export_name(ExportKey("toy", "a", "c0ffee"), hook) == \
        export_name(ExportKey("toy", "a", "c0ffee"), hook)  # a re-export finds its file


def test_export_refuses_two_dictionaries_of_one_name(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Should two keys ever share a name, nothing is written rather than one overwritten."""
    run = handmade_run(tmp_path)
    results.append_rows(run / results.RESULTS_FILE, [results.row(
        suite="mine", check_id="other::l0", dictionary="other", metric="l0", value=2.0,
        verdict="pass")])
    assert len(export_core(run, tmp_path / "fine")) == 2
    monkeypatch.setattr(saebench_core_export, "export_name", lambda key, hook: "same.json")
    with pytest.raises(ValueError, match="two dictionaries would share this file name"):
        export_core(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- command line


def export(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="saebench export")
    add_export_arguments(parser)
    return run_export(parser.parse_args(list(argv)))


def test_cli_writes_and_prints_files(example_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert export(str(example_run), "--format", "saebench-core", "-o", str(out)) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 18 and set(printed) == {str(p) for p in out.iterdir()}


def test_cli_default_out_and_format(tmp_path: Path, capsys) -> None:
    run = handmade_run(tmp_path)
    assert export(str(run)) == 0
    assert capsys.readouterr().out.strip() == str(run / "saebench-core" / export_name(
        ExportKey("mine", "res/L12", ""), "blocks.12.hook_resid_post"))


@pytest.mark.parametrize(("setup", "extra", "message"), [
    (lambda tmp: tmp / "missing", (), "no such run directory"),
    (lambda tmp: tmp, (), "no results.csv"),
    (lambda tmp: handmade_run(tmp), ("--format", "saebench-absorption"), "unknown format"),
])
def test_cli_exit_codes(tmp_path: Path, capsys, setup, extra, message) -> None:
    assert export(str(setup(tmp_path)), *extra, "-o", str(tmp_path / "out")) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("saebench export: ")
    assert not (tmp_path / "out").exists()


def test_cli_run_without_exportable_results(tmp_path: Path, capsys) -> None:
    results.append_rows(tmp_path / results.RESULTS_FILE, [results.row(
        check_id="a+b::l0", dictionary="a+b", metric="l0", value=1.0, verdict="pass")])
    assert export(str(tmp_path)) == 2
    assert "no results of a single dictionary" in capsys.readouterr().err
