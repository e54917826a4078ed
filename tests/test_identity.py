"""Identity and comparability: what a row measured (`saebench.identity`), and every surface
that reads rows keeping apart what differs (results, report, gate, merge, the plugin's
baseline comparison). The leaderboard's and the export's cases are in
`tests/test_bad_inputs_imports.py` and `tests/test_leaderboard.py`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import hypothesis.strategies as st
import pandas as pd
import pytest
import torch
from hypothesis import given, settings

from saebench import gate, merge, report, results
from saebench.identity import entry_identity, model_hash, module_hash, set_identity, tensors_hash

pytest_plugins = ["pytester"]


# ---------------------------------------------------------------------------- the hashes


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=20),
       st.integers(0, 19))
def test_tensors_hash_changes_with_any_bit_of_any_weight(values, where):
    tensor = torch.tensor(values, dtype=torch.float32)
    changed = tensor.clone()
    index = where % len(values)
    changed.view(torch.int32)[index] ^= 1  # the last bit of one weight
    assert tensors_hash([("w", tensor)]) == tensors_hash([("w", tensor.clone())])
    assert tensors_hash([("w", tensor)]) != tensors_hash([("w", changed)])
    assert tensors_hash([("w", tensor)]) != tensors_hash([("v", tensor)])  # names count
    assert tensors_hash([("w", tensor)]) != tensors_hash([("w", tensor.double())])  # dtype


def test_a_fine_tuned_copy_of_a_model_is_another_model():
    from toys import tiny_model

    model, same, tuned = tiny_model(seed=0), tiny_model(seed=0), tiny_model(seed=0)
    with torch.no_grad():
        tuned.blocks[1].mlp.W_out[0, 0] += 1e-3  # one weight of one layer
    assert model_hash(model) == model_hash(same)  # the configuration is the same too
    assert model_hash(model) != model_hash(tuned)


def test_dictionary_identity_covers_format_weights_args_and_hooks():
    base = {"format": "zoo", "weights": "38a1d929a8fccdfc"}
    variants = [base, {**base, "args": {"shuffle_decoders": 0}},
                {**base, "hook": "blocks.1.hook_resid_pre"},
                {**base, "hook_out": "blocks.2.hook_mlp_out"}, {**base, "format": "path"},
                {**base, "weights": "0000000000000000"},
                {"format": "factory", "factory": "m:f", "args": {"seed": 1}},
                {"format": "factory", "factory": "m:f", "args": {"seed": 2}}]
    identities = [set_identity([entry_identity(v)]) for v in variants]
    assert len(set(identities)) == len(variants)
    assert set_identity([entry_identity({**base, "args": None})]) == identities[0]
    pair = [entry_identity(variants[0]), entry_identity(variants[2])]
    assert set_identity(pair) != set_identity(pair[::-1])  # splice order counts
    assert set_identity([]) == "" and set_identity([entry_identity(base), {}]) == ""


def test_module_hash_of_a_loaded_dictionary_and_of_a_plain_callable():
    linear = torch.nn.Linear(3, 2)
    assert len(module_hash(linear)) == 16 and module_hash(linear) == module_hash(linear)
    assert module_hash(lambda x: x) == "" and module_hash(torch.nn.ReLU()) == ""


# ---------------------------------------------------------------------------- suites

SUITE = """\
suite: {suite}
model: zoo
data: {{source: zoo, n_tokens: 1024}}
dictionaries:
  a: {{zoo: resid-L2-topk16}}
  b: {{zoo: resid-L2-topk16, hook: blocks.2.hook_resid_pre}}
  c: {{zoo: {other}}}
  clt: {{zoo: ct-clt}}
  shuffled: {{zoo: ct-clt, args: {{shuffle_decoders: 0}}}}
defaults: {{options: {{n_boot: 50}}}}
checks:
  - metric: l0
    dictionaries: [a, b, c]
    threshold: "<= 70"
  - metric: ce_loss_recovered
    dictionaries: [a]
    options: {{ablation: zero}}
  - metric: next_token_agreement
    dictionaries: [clt, shuffled]
"""


@pytest.fixture(scope="module")
def two_suites(tmp_path_factory) -> Path:
    """One run of two suites that share check ids (`a::l0`, ...) but not every dictionary:
    its run directory."""
    where = tmp_path_factory.mktemp("two")
    (where / "one.yaml").write_text(SUITE.format(suite="one", other="resid-L3-topk16"))
    (where / "two.yaml").write_text(SUITE.format(suite="two", other="resid-L1-topk16"))
    from toys import run_suite_files

    return run_suite_files(where, ["one.yaml", "two.yaml"], "reports")


def test_rows_name_what_makes_their_numbers(two_suites):
    rows = results.read_results(two_suites)
    one = rows[rows["suite"] == "one"].set_index("check_id")
    assert one.loc["a::l0", "weights_sha256"] == one.loc["b::l0", "weights_sha256"]
    assert one.loc["a::l0", "identity"] != one.loc["b::l0", "identity"]  # another hook: override
    clt, shuffled = one.loc["clt::next_token_agreement"], one.loc["shuffled::next_token_agreement"]
    assert clt["weights_sha256"] == shuffled["weights_sha256"]
    assert clt["identity"] != shuffled["identity"]  # args: shuffle_decoders
    assert clt["value"] != shuffled["value"]
    assert rows["model_hash"].nunique() == 1 and len(rows["model_hash"].iloc[0]) == 16


def test_two_suites_with_one_check_id_keep_both_rows_everywhere(two_suites, tmp_path, capsys):
    rows = results.read_results(two_suites)
    assert len(rows) == 2 * 6 and rows.duplicated(["suite", "check_id"]).sum() == 0
    both = rows[rows["check_id"] == "c::l0"].set_index("suite")
    assert both.loc["one", "identity"] != both.loc["two", "identity"]
    for suite in ("one", "two"):  # each suite's terms in its own file
        assert results.read_terms(results.RunDir(two_suites), "a::l0", suite) is not None
    markdown = report.render_report(two_suites)
    assert markdown.count("### Suite one") >= 1 and markdown.count("### Suite two") >= 1
    table = gate.gate_runs(two_suites, two_suites)
    assert len(table) == 12 and set(table["vs_baseline"]) == {"same"}
    assert gate.run(argparse.Namespace(new=two_suites, baseline=two_suites, strict=False,
                                       allow_incomparable=False)) == 0
    assert "12 checks: 12 same" in capsys.readouterr().out


def test_a_baseline_of_another_model_or_suite_is_refused_unless_allowed(two_suites, tmp_path,
                                                                        capsys):
    rows = results.read_results(two_suites)
    other = tmp_path / "other-model"
    results.append_rows(other / results.RESULTS_FILE,
                        rows.assign(model_hash="ffffffffffffffff").to_dict("records"))
    with pytest.raises(gate.Incomparable, match=r"another model \(ffffffffffffffff\)"):
        gate.gate_runs(two_suites, other)
    table = gate.gate_runs(two_suites, other, allow_incomparable=True)
    assert table["message"].str.startswith("INCOMPARABLE (").all()
    code = gate.run(argparse.Namespace(new=two_suites, baseline=other, strict=False,
                                       allow_incomparable=False))
    assert code == 2 and "--allow-incomparable" in capsys.readouterr().err
    renamed = tmp_path / "renamed"
    results.append_rows(renamed / results.RESULTS_FILE,
                        rows.assign(suite="three").to_dict("records"))
    with pytest.raises(gate.Incomparable, match="holds rows of 'three', not of suite 'one'"):
        gate.gate_runs(two_suites, renamed)
    version = tmp_path / "version"
    results.append_rows(version / results.RESULTS_FILE,
                        rows.assign(saebench_version="0.0.1").to_dict("records"))
    with pytest.raises(gate.Incomparable, match=r"another saebench version \(0.0.1\)"):
        gate.gate_runs(two_suites, version)


def test_the_plugin_refuses_a_baseline_of_another_model_at_collection(two_suites, pytester):
    rows = results.read_results(two_suites)
    base = pytester.path / "base"
    results.append_rows(base / results.RESULTS_FILE,
                        rows[rows["suite"] == "one"].assign(model_hash="0123").to_dict("records"))
    pytester.makefile(".yaml", one=SUITE.format(suite="one", other="resid-L3-topk16"))
    out = pytester.runpytest("-m", "eval", "one.yaml", "-p", "no:cacheprovider",
                             "--saebench-baseline", "base", "-k", "a and l0")
    assert out.ret != 0
    out.stdout.fnmatch_lines(["*--saebench-baseline: base measured another model (0123) than "
                              "this run of 'one'*--saebench-allow-incomparable compares anyway*"])
    before = set((pytester.path / "reports").glob("*"))
    allowed = pytester.runpytest("-m", "eval", "one.yaml", "-p", "no:cacheprovider",
                                 "--saebench-baseline", "base", "-k", "a and l0",
                                 "--saebench-allow-incomparable")
    allowed.assert_outcomes(passed=3)  # the three l0 checks of a, b and c
    (run_dir,) = set((pytester.path / "reports").iterdir()) - before
    assert results.read_results(run_dir)["message"].str.startswith("INCOMPARABLE").all()


def test_a_results_file_saved_back_by_pandas_reads_as_it_was(two_suites, tmp_path):
    rows = results.read_results(two_suites)
    frame = pd.read_csv(two_suites / results.RESULTS_FILE)
    frame.loc[0, "d_in"] = None  # one missing width: pandas then writes the others as 128.0
    saved = tmp_path / "saved"
    saved.mkdir()
    frame.to_csv(saved / results.RESULTS_FILE)  # with pandas' index column
    assert ",128.0," in (saved / results.RESULTS_FILE).read_text()
    refused: list[str] = []
    back = results.read_results(saved, refused=refused)
    assert refused == [] and len(back) == len(rows)
    assert "" not in back.columns  # the index column pandas added is dropped
    assert pd.isna(back.loc[0, "d_in"])
    rows.loc[0, "d_in"] = pd.NA
    pd.testing.assert_frame_equal(back[results.RESULT_COLUMNS], rows[results.RESULT_COLUMNS],
                                  check_dtype=False)
    table = gate.gate_runs(saved, two_suites)
    assert set(table["vs_baseline"]) == {"same"}


def test_a_row_that_its_own_terms_contradict_is_an_error_in_the_gate(two_suites, tmp_path):
    edited = tmp_path / "edited"
    rows = results.read_results(two_suites)
    key = (rows["suite"] == "one") & (rows["check_id"] == "a::ce_loss_recovered[zero]")
    rows.loc[key, "value"] = rows.loc[key, "value"] + 0.01
    results.append_rows(edited / results.RESULTS_FILE, rows.to_dict("records"))
    (edited / results.TERMS_DIR).symlink_to(two_suites / results.TERMS_DIR)
    for new, old, side in ((edited, two_suites, "new"), (two_suites, edited, "baseline")):
        table = gate.gate_runs(new, old).set_index(["suite", "check_id"])
        row = table.loc[("one", "a::ce_loss_recovered[zero]")]
        assert row["vs_baseline"] == "error", row
        assert row["message"].startswith(f"the {side} row: its value") and \
            "is not what its stored terms give" in row["message"]
        assert (table.drop(index=[("one", "a::ce_loss_recovered[zero]")])["vs_baseline"]
                == "same").all()


def test_a_check_the_run_lost_fails_the_gate_unless_its_selection_explains_it(two_suites,
                                                                              tmp_path):
    rows = results.read_results(two_suites)
    partial = tmp_path / "partial"
    results.append_rows(partial / results.RESULTS_FILE,
                        rows[rows["check_id"] != "c::l0"].to_dict("records"))
    table = gate.gate_runs(partial, two_suites)
    lost = table[table["check_id"] == "c::l0"]
    assert set(lost["vs_baseline"]) == {"missing"}
    results.write_selection(partial, {"one": (5, 6), "two": (5, 6)}, "-k 'not c'")
    table = gate.gate_runs(partial, two_suites)
    lost = table[table["check_id"] == "c::l0"]
    assert set(lost["vs_baseline"]) == {"not selected"}
    assert lost["message"].str.contains("selected 5 of the suite's 6 checks: -k 'not c'").all()


@pytest.mark.slow  # two shard runs, each its own process
def test_shards_of_a_two_suite_run_merge_into_it(two_suites, tmp_path):
    from toys import run_suite_files

    where = two_suites.parent.parent
    shards = [run_suite_files(where, ["one.yaml", "two.yaml"], f"shard-{i}",
                              "--saebench-shard", f"{i}/2") for i in (1, 2)]
    merged = merge.merge(shards, tmp_path / "merged")
    back, serial = results.read_results(merged), results.read_results(two_suites)
    assert len(back) == len(serial) == 12
    keys = ["suite", "check_id", "value"]
    assert sorted(back[keys].itertuples(index=False)) == \
        sorted(serial[keys].itertuples(index=False))
    assert results.read_selection(merged)["suites"] == {"one": {"selected": 6, "total": 6},
                                                        "two": {"selected": 6, "total": 6}}
    assert set(gate.gate_runs(merged, two_suites)["vs_baseline"]) == {"same"}


def test_a_run_records_its_selection(two_suites, pytester):
    assert results.read_selection(two_suites)["suites"] == {
        "one": {"selected": 6, "total": 6}, "two": {"selected": 6, "total": 6}}
    pytester.makefile(".yaml", one=SUITE.format(suite="one", other="resid-L3-topk16"))
    pytester.runpytest("-m", "eval", "one.yaml", "-p", "no:cacheprovider", "-k", "l0")
    (run_dir,) = (pytester.path / "reports").iterdir()
    selection = json.loads((run_dir / results.SELECTION_FILE).read_text())
    assert selection == {"suites": {"one": {"selected": 3, "total": 6}}, "how": "-k 'l0'"}

