"""A catalogue of bad inputs to the leaderboard, the SAEBench core import and `saebench
export`, each with the outcome the user sees: never a number that is not what it claims,
never a traceback.

- SAEBench core files as found in the wild (`IMPORT_CASES`, `FLAG_CASES`): -1 (SAEBench's
  NaN) in every block, a value outside its field's possible range (a negative KL, L0 < 0 or
  above d_sae, a negative mse, a dense fraction or cosine above 1, a negative CE), NaN, text
  or a boolean, and any field of a computation the eval_config switched off (every
  `compute_*` flag of SAEBench's CoreEvalConfig): the imported row is value NaN, verdict
  `nan`, and its message says why; a score computed from a missing part is missing too;
  every other field of the file is imported unchanged.
- On the leaderboard: a missing value is "—" with a footnote mark, its reason listed under
  the table; it is not ranked, not on the Pareto front, and its CSV cell is empty with the
  reason in `missing`; the sentinel or placeholder itself appears nowhere.
- Files that do not state their hook (`HOOK_CASES`): the hook from sae_lens_id, else the
  layer alone, else a label naming the file; never an empty heading, two layers never in one
  table.
- Inputs named `.` or `dir/`: the page names them; "1 entry from 1 input".
- Export (`test_rows_without_a_measurement_export_null_with_the_reason`, ...): an `error`,
  `unstable`, `empty` or `skipped` row exports null with the reason beside it, never -1 or 0;
  names that slug alike (`x/y`, `x_y`) and one name in two suites get two files; `-o` an
  existing file, or a foreign file where a target would go: exit 2, one line, nothing
  written or overwritten.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from test_saebench_core import core_json, write_json

from saebench import leaderboard, results, saebench_core
from saebench.leaderboard import CSV_FILE, MARKDOWN_FILE, build
from saebench.saebench_core import missing_reason_of, read_core_results
from saebench.saebench_core_export import ExportKey, export_name
from saebench.saebench_core_fields import COMPUTE_FLAGS

SAE_ID, RELEASE = "layer_12/width_16k/average_l0_82", "gemma-scope-2b-pt-res"
KL, CE = "kl_div_score[zero]", "ce_loss_recovered[zero]"
KEY_FIELDS = {
    CE: ("model_performance_preservation", "ce_loss_score"),
    KL: ("model_behavior_preservation", "kl_div_score"),
    "kl_div": ("model_behavior_preservation", "kl_div_with_sae"),
    "explained_variance_saebench": ("reconstruction_quality", "explained_variance"),
    "mse_per_position": ("reconstruction_quality", "mse"),
    "cossim": ("reconstruction_quality", "cossim"),
    "l2_ratio": ("shrinkage", "l2_ratio"),
    "relative_reconstruction_bias": ("shrinkage", "relative_reconstruction_bias"),
    "l0": ("sparsity", "l0"),
    "dense_fraction[dense_threshold=0.01]": ("misc_metrics", "freq_over_1_percent"),
    "dense_fraction[dense_threshold=0.1]": ("misc_metrics", "freq_over_10_percent"),
}
"""Every key an import yields, with the SAEBench field it is read from (the test's own copy
of the mapping)."""
SENTINEL = "SAEBench wrote -1, its mark of a NaN"


def every_field(value: float) -> dict:
    """Every field of every metric block of `core_json` set to `value`."""
    return {category: dict.fromkeys(fields, value)
            for category, fields in core_json(SAE_ID, RELEASE, 0.8)["eval_result_metrics"].items()}


IMPORT_CASES = {
    "sentinel in every block": (every_field(-1), dict.fromkeys(KEY_FIELDS, SENTINEL)),
    "negative KL": (
        {"model_behavior_preservation": {"kl_div_with_sae": -0.05}},
        {"kl_div": "outside the possible range of kl_div_with_sae, [0, ∞): a KL divergence",
         KL: "computed from kl_div_with_sae, which is missing (outside the possible range"}),
    "KL score above 1": (
        {"model_behavior_preservation": {"kl_div_score": 1.3}},
        {KL: "outside the possible range of kl_div_score, (−∞, 1]"}),
    "sentinel in a part": (
        {"model_behavior_preservation": {"kl_div_with_ablation": -1}},
        {KL: f"computed from kl_div_with_ablation, which is missing ({SENTINEL})"}),
    "negative CE": (
        {"model_performance_preservation": {"ce_loss_without_sae": -0.1}},
        {CE: "computed from ce_loss_without_sae, which is missing (outside the possible range "
             "of ce_loss_without_sae, [0, ∞): a cross-entropy)"}),
    "negative L0": ({"sparsity": {"l0": -3.0}},
                    {"l0": "outside the possible range of l0, [0, 16384]"}),
    "L0 above d_sae": ({"sparsity": {"l0": 16385.0}},
                       {"l0": "outside the possible range of l0, [0, 16384]"}),
    "negative mse": ({"reconstruction_quality": {"mse": -0.001}},
                     {"mse_per_position": "outside the possible range of mse, [0, ∞)"}),
    "cosine above 1": ({"reconstruction_quality": {"cossim": 1.01}},
                       {"cossim": "outside the possible range of cossim, [-1, 1]"}),
    "dense fraction above 1": (
        {"misc_metrics": {"freq_over_1_percent": 1.5, "freq_over_10_percent": -0.2}},
        {"dense_fraction[dense_threshold=0.01]": "outside the possible range of "
                                                 "freq_over_1_percent, [0, 1]",
         "dense_fraction[dense_threshold=0.1]": "outside the possible range of "
                                                "freq_over_10_percent, [0, 1]"}),
    "NaN and infinity": ({"shrinkage": {"l2_ratio": math.nan,
                                        "relative_reconstruction_bias": math.inf}},
                         {"l2_ratio": "not a finite number",
                          "relative_reconstruction_bias": "not a finite number"}),
    "text and a boolean": ({"sparsity": {"l0": True}, "shrinkage": {"l2_ratio": "0.96"}},
                           {"l0": "not a number", "l2_ratio": "not a number"}),
}
"""name -> (eval_result_metrics changes, {key: the start of the reason it is missing})."""

FLAG_KEYS = {
    "compute_kl": [KL, "kl_div"],
    "compute_ce_loss": [CE],
    "compute_l2_norms": ["l2_ratio", "relative_reconstruction_bias"],
    "compute_sparsity_metrics": ["l0"],
    "compute_variance_metrics": ["explained_variance_saebench", "mse_per_position", "cossim"],
    "compute_featurewise_density_statistics": ["dense_fraction[dense_threshold=0.01]",
                                               "dense_fraction[dense_threshold=0.1]"],
}
"""What each compute_* flag of SAEBench 0.6.0's CoreEvalConfig switches (evals/core/main.py)."""


def imported(tmp_path: Path, data: dict, name: str = "sae") -> dict[str, dict]:
    """The rows of one core file, by metric key."""
    frame = read_core_results(write_json(tmp_path / f"{name}_eval_results.json", data))
    return {r["check_id"].rsplit("::", 1)[1]: r for r in frame.to_dict("records")}


def assert_read(rows: dict[str, dict], data: dict, missing: dict[str, str]) -> None:
    """Every key present; the `missing` ones NaN with their reason, every other one the file's
    value unchanged."""
    assert set(rows) == set(KEY_FIELDS)
    metrics = data["eval_result_metrics"]
    for key, (category, field) in KEY_FIELDS.items():
        row = rows[key]
        if key in missing:
            assert math.isnan(row["value"]) and row["verdict"] == "nan", key
            assert missing_reason_of(row).startswith(missing[key]), (key, row["message"])
            assert f"{category}.{field} = " in row["message"]
        else:
            assert row["value"] == metrics[category][field] and row["verdict"] == "imported"


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_a_value_that_is_no_measurement_is_read_as_missing(tmp_path: Path, case: str) -> None:
    changes, missing = IMPORT_CASES[case]
    data = core_json(SAE_ID, RELEASE, 0.8, **changes)
    assert_read(imported(tmp_path, data), data, missing)


@pytest.mark.parametrize("flag", list(FLAG_KEYS))
def test_a_computation_switched_off_is_missing_whatever_its_fields_hold(tmp_path: Path,
                                                                       flag: str) -> None:
    assert set(FLAG_KEYS) == set(COMPUTE_FLAGS.values())
    data = core_json(SAE_ID, RELEASE, 0.8)
    data["eval_config"][flag] = False
    missing = dict.fromkeys(FLAG_KEYS[flag], f"eval_config.{flag} is false: SAEBench did not "
                                             "compute it")
    assert_read(imported(tmp_path, data), data, missing)


def test_missing_values_are_dashes_with_footnotes(tmp_path: Path) -> None:
    """Four SAEs of one hook: -1 for a NaN KL, a negative KL, KL not computed (placeholder
    zeros), and a good one. Only the good one has a KL score anywhere."""
    folder = tmp_path / "eval_results"
    kl_fields = ("kl_div_score", "kl_div_with_sae", "kl_div_with_ablation")
    files = {
        "sentinel": {"model_behavior_preservation": dict.fromkeys(kl_fields, -1)},
        "negative": {"model_behavior_preservation": {"kl_div_score": 1.05,
                                                     "kl_div_with_sae": -0.4}},
        "off": {"model_behavior_preservation": dict.fromkeys(kl_fields, 0.0)},
        "good": {"model_behavior_preservation": {"kl_div_score": 0.93}},
    }
    for name, changes in files.items():
        data = core_json(f"layer_12/{name}", RELEASE, 0.8, **changes)
        data["eval_config"]["compute_kl"] = name != "off"
        write_json(folder / f"{name}_eval_results.json", data)
    markdown = build([folder], tmp_path / "out", metric=KL).read_text()
    table = pd.read_csv(tmp_path / "out" / CSV_FILE).set_index("dictionary")
    assert table.loc["layer_12/good", KL] == 0.93 and table.loc["layer_12/good", "rank"] == 1
    reasons = {  # in the order of the table: ranked, then the files' order
        "layer_12/negative": "SAEBench core file: outside the possible range of kl_div_score",
        "layer_12/off": "SAEBench core file: eval_config.compute_kl is false",
        "layer_12/sentinel": f"SAEBench core file: {SENTINEL}",
    }
    for name, reason in reasons.items():
        assert math.isnan(table.loc[name, KL]) and pd.isna(table.loc[name, "rank"])
        assert not table.loc[name, f"pareto_{KL}"]
        assert json.loads(table.loc[name, "missing"])[KL].startswith(reason)
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert "kl_div_score[zero] ↑" in lines[0].split("|")[5]
    cells = [(line.split("|")[2].strip(), line.split("|")[5].strip()) for line in lines[1:]]
    assert cells == [("layer_12/good", "0.93 †"), ("layer_12/negative", "— ¹"),
                     ("layer_12/off", "— ²"), ("layer_12/sentinel", "— ³")]
    footnotes = [line for line in markdown.splitlines() if line.startswith("- ")]
    assert [f[:4] for f in footnotes] == ["- ¹ ", "- ² ", "- ³ "]
    for footnote, reason in zip(footnotes, reasons.values(), strict=True):
        assert footnote[4:].startswith(reason)
    assert "-1" not in "".join(lines) and "1.05" not in markdown and "-0.4" not in markdown
    assert " 0 " not in "".join(line.split("|")[5] for line in lines[1:])


HOOK_CASES = {
    "trainer id": ({}, "blocks.3.hook_resid_post__trainer_5", "blocks.3.hook_resid_post"),
    "attention hook in an id": ({}, "blocks.1.attn.hook_z/trainer_0", "blocks.1.attn.hook_z"),
    "Gemma Scope id": ({}, SAE_ID, "layer 12 (hook not stated)"),
    "hook_layer": ({"hook_layer": 7}, "custom", "layer 7 (hook not stated)"),
    "an empty hook_name": ({"hook_name": "", "hook_layer": 7}, None,
                           "layer 7 (hook not stated)"),
    "only hook_name_out": ({"hook_name_out": "blocks.4.hook_mlp_out"}, "x",
                           "blocks.4.hook_mlp_out"),
    "nothing": ({}, None, "hook not stated (sae_eval_results.json)"),
}
"""name -> (sae_cfg_dict without hook_name plus these fields, sae_lens_id, hook read)."""


@pytest.mark.parametrize("case", list(HOOK_CASES))
def test_a_file_without_its_hook_is_filed_by_what_it_states(tmp_path: Path, case: str) -> None:
    cfg, sae_id, hook = HOOK_CASES[case]
    data = core_json(sae_id, RELEASE, 0.8)
    del data["sae_cfg_dict"]["hook_name"]
    data["sae_cfg_dict"] |= cfg
    rows = imported(tmp_path, data)
    assert {(r["hook"], r["write_hook"]) for r in rows.values()} == {(hook, hook)}


def test_two_layers_without_hooks_are_never_one_table(tmp_path: Path) -> None:
    folder = tmp_path / "eval_results"
    for layer, score in ((5, 0.7), (12, 0.9)):
        data = core_json(f"layer_{layer}/width_16k/canonical", RELEASE, 0.8,
                         model_performance_preservation={"ce_loss_score": score})
        del data["sae_cfg_dict"]["hook_name"]
        write_json(folder / f"l{layer}_eval_results.json", data)
    data = core_json(None, None, 0.8)
    del data["sae_cfg_dict"]["hook_name"]
    write_json(folder / "custom_eval_results.json", data)
    markdown = build([folder], tmp_path / "out").read_text()
    headings = [line for line in markdown.splitlines() if line.startswith("### ")]
    assert headings == ["### `layer 5 (hook not stated)`", "### `layer 12 (hook not stated)`",
                        "### `hook not stated (custom_eval_results.json)`"]
    table = pd.read_csv(tmp_path / "out" / CSV_FILE)
    assert table["rank"].tolist() == [1, 1, 1]
    assert table["layer"].tolist()[:2] == [5, 12] and pd.isna(table["layer"].iloc[2])
    assert table["family"].tolist()[:2] == ["width_16k/canonical"] * 2


def test_inputs_are_named_on_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run-a"
    results.append_rows(run / results.RESULTS_FILE, [results.row(
        check_id="d::l0", dictionary="d", model="toy", hook="blocks.0.hook_resid_pre",
        metric="l0", value=4.0, verdict="pass")])
    monkeypatch.chdir(run)
    first = build([Path(".")], tmp_path / "one", metric="l0").read_text()
    assert "1 entry from 1 input: `run-a`. Ranked by" in first
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(sources=[Path("run-a/"), Path("run-a/results.csv")],
                              out=tmp_path / "two", metric="l0")
    assert leaderboard.run(args) == 0
    assert "1 entry from 2 inputs: `run-a`, `run-a/results.csv`." in \
        (tmp_path / "two" / MARKDOWN_FILE).read_text()


# --------------------------------------------------------------------------- export


def export(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="saebench export")
    saebench_core.add_export_arguments(parser)
    return saebench_core.run_export(parser.parse_args(list(argv)))


def run_of(path: Path, rows: list[dict]) -> Path:
    """A run directory holding `rows` (suite `s`, model `toy` unless given)."""
    results.append_rows(path / results.RESULTS_FILE,
                        [results.row(**{"suite": "s", "model": "toy", **r}) for r in rows])
    return path


def check(dictionary: str, key: str, value: float, verdict: str = "pass", **fields) -> dict:
    return {"check_id": f"{dictionary}::{key}", "dictionary": dictionary,
            "hook": "blocks.1.hook_resid_pre", "metric": key.split("[")[0], "value": value,
            "verdict": verdict, "n": 64, **fields}


def test_rows_without_a_measurement_export_null_with_the_reason(tmp_path: Path) -> None:
    run = run_of(tmp_path / "run", [
        check("d", KL, math.nan, "error", options=json.dumps({"ablation": "zero"}),
              parts=json.dumps({"kl_abl": 0.0, "n_kl": 0.0}),
              message="kl_div_score could not be computed (nan): non-finite"),
        check("d", "l2_ratio", 0.0, "empty", message="nothing was measured for l2_ratio"),
        check("d", "cossim", -1.0, "unstable", message="cossim = -1 is unstable: x"),
        check("d", "l0", 0.0, "skipped"),
        check("d", "mse", 0.25, "pass", threshold="<= 1"),
    ])
    (file,) = saebench_core.export_core(run, tmp_path / "out")
    data = json.loads(file.read_text(encoding="utf-8"))
    metrics = data["eval_result_metrics"]
    assert metrics["reconstruction_quality"]["mse_per_element"] == 0.25
    nulls = {
        "model_behavior_preservation.kl_div_score": "[error] d::kl_div_score[zero]: kl_div_score",
        "model_behavior_preservation.kl_div_with_ablation": "[error] d::kl_div_score[zero]",
        "token_stats.total_tokens_eval_reconstruction": "[error] d::kl_div_score[zero]",
        "shrinkage.l2_ratio": "[empty] d::l2_ratio: nothing was measured",
        "reconstruction_quality.cossim": "[unstable] d::cossim: cossim = -1 is unstable",
        "sparsity.l0": "[skipped] d::l0",
    }
    missing = data["eval_result_unstructured"]["missing"]
    for field, reason in nulls.items():
        category, name = field.split(".")
        assert metrics[category][name] is None and missing[field].startswith(reason), field
    every = [v for fields in metrics.values() for v in fields.values()]
    assert every.count(None) == len(every) - 1  # the pass row's value alone
    intervals = data["eval_result_unstructured"]["intervals"]
    assert intervals["cossim"] == {"verdict": "unstable", "value": None, "ci_low": None,
                                   "ci_high": None, "n": 64}


def test_names_that_slug_alike_or_repeat_across_suites_get_their_own_files(
        tmp_path: Path) -> None:
    run = run_of(tmp_path / "run", [
        check("x/y", "l0", 1.0), check("x_y", "l0", 2.0),
        check("d", "l0", 3.0, suite="s1"), check("d", "l0", 4.0, suite="s2"),
    ])
    files = saebench_core.export_core(run, tmp_path / "out")
    assert len(set(files)) == 4 and sorted(files) == sorted((tmp_path / "out").iterdir())
    read = read_core_results(tmp_path / "out")
    assert sorted(zip(read["suite"], read["dictionary"], read["value"], strict=True)) == [
        ("s", "x/y", 1.0), ("s", "x_y", 2.0), ("s1", "d", 3.0), ("s2", "d", 4.0)]
    # a re-export replaces its own files, and nothing else
    assert saebench_core.export_core(run, tmp_path / "out") == files


def test_export_to_an_existing_file_is_refused(tmp_path: Path, capsys) -> None:
    run = run_of(tmp_path / "run", [check("d", "l0", 1.0)])
    target = tmp_path / "out.json"
    target.write_text("keep me")
    assert export(str(run), "-o", str(target)) == 2
    captured = capsys.readouterr()
    assert captured.err == f"saebench export: {target}: exists and is not a directory\n"
    assert captured.out == "" and target.read_text() == "keep me"


@pytest.mark.parametrize("foreign", [
    "not json at all",
    json.dumps(core_json(SAE_ID, RELEASE, 0.8)),  # SAEBench's own file
    json.dumps({"eval_config": {"saebench_suite": "s", "saebench_dictionary": "other",
                                "saebench_identity": ""}}),  # saebench's, another dictionary
])
def test_export_never_overwrites_a_file_it_did_not_write(tmp_path: Path, capsys,
                                                         foreign: str) -> None:
    run = run_of(tmp_path / "run", [check("a", "l0", 1.0), check("d", "l0", 2.0)])
    out = tmp_path / "out"
    out.mkdir()
    target = out / export_name(ExportKey("s", "d", ""), "blocks.1.hook_resid_pre")
    target.write_text(foreign)
    assert export(str(run), "-o", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"saebench export: {target}: exists and is not saebench's export")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert target.read_text() == foreign and list(out.iterdir()) == [target]
