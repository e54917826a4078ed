"""saebench.leaderboard: merging runs, ranking with ties within noise, the Markdown, CSV and
plots it writes, and its command line."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_plots import assert_drawn
from test_report import imported_modules

from saebench import leaderboard
from saebench.leaderboard import (
    CSV_FILE,
    MARKDOWN_FILE,
    build,
    dictionary_key,
    metric_key,
    started_seconds,
    within_noise,
)
from saebench.results import append_rows, read_results, row
from saebench.saebench_core_export import export_core

EXAMPLE = Path(__file__).resolve().parent.parent / "reports" / "example"
HOOK = "blocks.2.hook_resid_pre"
CE = "ce_loss_recovered[zero]"
KL = "kl_div_score[zero]"


def rows_of(dictionary: str, values: dict[str, float | tuple[float, float, float]], *,
            hook: str = HOOK, started: float | str = 1.0, **fields) -> list[dict]:
    """Result rows of one dictionary: per metric key a value, or (value, ci_low, ci_high)."""
    out = []
    for key, given in values.items():
        value, low, high = given if isinstance(given, tuple) else (given, math.nan, math.nan)
        out.append(row(**{
            "suite": "toy", "check_id": f"{dictionary}::{key}", "model": "toy", "run_id": "run-a",
            "dictionary": dictionary, "hook": hook, "metric": key.split("[")[0], "value": value,
            "ci_low": low, "ci_high": high, "n": 100, "verdict": "pass", "started_at": started,
            **fields}))
    return out


def around(value: float, half: float = 0.001) -> tuple[float, float, float]:
    return value, value - half, value + half


def write_run(path: Path, *dictionaries: list[dict]) -> Path:
    append_rows(path / "results.csv", [r for rows in dictionaries for r in rows])
    return path


def board(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / CSV_FILE)


def ranked(out: Path, hook: str = HOOK) -> list[tuple[int, str]]:
    """(rank, dictionary) of one hook's entries, in the order of the CSV."""
    table = board(out)
    table = table[table["hook"] == hook]
    return [(None if pd.isna(r) else int(r), d) for r, d in zip(table["rank"],
                                                                 table["dictionary"],
                                                                 strict=True)]


def table_lines(markdown: str, hook: str = HOOK) -> list[str]:
    """The header and body lines of one hook's Markdown table."""
    body = markdown.split(f"### `{hook}`\n", 1)[1].split("\n### ", 1)[0]
    return [line for line in body.splitlines() if line.startswith("|")]


# --------------------------------------------------------------------------- ranking


def test_ranked_by_the_key_best_first(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run",
                    rows_of("mid", {CE: around(0.90), "l0": 16.0}),
                    rows_of("best", {CE: around(0.99), "l0": 32.0}),
                    rows_of("worst", {CE: around(0.50), "l0": 8.0}),
                    rows_of("none", {"l0": 4.0}))
    build([run], tmp_path / "out")
    assert ranked(tmp_path / "out") == [(1, "best"), (2, "mid"), (3, "worst"), (None, "none")]
    lines = table_lines((tmp_path / "out" / MARKDOWN_FILE).read_text())
    assert f"{CE} ↑" in lines[0] and "l0 ↓" in lines[0]
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["best", "mid", "worst", "none"]
    assert lines[-1].split("|")[1].strip() == "—"  # unranked


def test_a_lower_is_better_key_ranks_the_smallest_first(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run",
                    rows_of("a", {"delta_ce": around(0.30), CE: around(0.99)}),
                    rows_of("b", {"delta_ce": around(0.01), CE: around(0.90)}),
                    rows_of("c", {"delta_ce": around(0.10), CE: around(0.95)}))
    markdown = build([run], tmp_path / "out", metric="delta_ce").read_text()
    assert ranked(tmp_path / "out") == [(1, "b"), (2, "c"), (3, "a")]
    assert "Ranked by `delta_ce` (lower is better)" in markdown
    assert "delta_ce ↓" in table_lines(markdown)[0]


def test_within_noise() -> None:
    # se = 1 on both sides: within noise up to 1.96·√2 ≈ 2.772
    assert within_noise((0.0, -1.96, 1.96), (2.77, 0.81, 4.73))
    assert not within_noise((0.0, -1.96, 1.96), (2.78, 0.82, 4.74))
    assert within_noise((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))  # zero-width intervals, equal
    assert not within_noise((1.0, 1.0, 1.0), (1.0 + 1e-9, 1.0 + 1e-9, 1.0 + 1e-9))
    nan = math.nan
    assert within_noise((0.5, nan, nan), (0.5, nan, nan))  # no interval: exact ties only
    assert not within_noise((0.5, nan, nan), (0.49, 0.0, 1.0))


def test_entries_within_noise_share_the_rank_above(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run",
                    rows_of("a", {CE: (0.900, 0.880, 0.920)}),
                    rows_of("b", {CE: (0.885, 0.865, 0.905)}),  # within noise of a
                    rows_of("c", {CE: (0.860, 0.840, 0.880)}),  # within noise of b, not a
                    rows_of("d", {CE: (0.500, 0.490, 0.510)}),
                    rows_of("e", {CE: 0.400}), rows_of("f", {CE: 0.400}),  # exact tie
                    rows_of("g", {CE: 0.399}))  # no interval: not a tie
    markdown = build([run], tmp_path / "out").read_text()
    assert ranked(tmp_path / "out") == [(1, "a"), (1, "b"), (1, "c"), (4, "d"), (5, "e"),
                                        (5, "f"), (7, "g")]
    assert "shares the rank of the one just above it" in markdown


def test_metric_key_of_a_check_id() -> None:
    assert metric_key("resid-L2-topk16::ce_loss_recovered[zero]", "ce_loss_recovered") == CE
    assert metric_key("every-layer::l0", "l0") == "l0"
    assert metric_key("toy::resid-L2-topk16::l0", "l0") == "l0"
    assert metric_key("x::explained_variance_uncentred", "explained_variance") == \
        "explained_variance_uncentred"
    assert metric_key("x::logit_diff_recovered[ioi,positions=answer]", "") == \
        "logit_diff_recovered[ioi,positions=answer]"


def test_dictionary_key_prefers_identity_then_weights_then_source_then_name() -> None:
    base = {"model": "toy", "dictionary": "d", "identity": "", "weights_sha256": "",
            "source": ""}
    assert dictionary_key({**base, "identity": "c0ffee", "weights_sha256": "ab12"}) == \
        "identity:c0ffee"
    assert dictionary_key({**base, "weights_sha256": "ab12"}) == "sha256:ab12"
    assert dictionary_key({**base, "weights_sha256": "ab12+", "source": "zoo:x"}) == \
        "source:zoo:x"
    assert dictionary_key({**base, "source": "saebench-core:rel:id"}) == dictionary_key(
        {**base, "source": "rel:id", "dictionary": "other"})
    assert dictionary_key({**base, "source": "TopKSAE"}) == "name:toy/d"  # a class: no key
    assert dictionary_key({**base, "identity": math.nan, "weights_sha256": math.nan,
                           "source": math.nan}) == "name:toy/d"


def test_started_seconds_reads_epochs_and_dates() -> None:
    seconds = started_seconds(pd.Series(["1795441599.5", "1970-01-01T00:01:00+00:00", "", None]))
    assert seconds.tolist() == [1795441599.5, 60.0, -math.inf, -math.inf]


# --------------------------------------------------------------------------- merging


def test_the_newest_row_of_a_dictionary_and_key_is_kept(tmp_path: Path) -> None:
    new = write_run(tmp_path / "new", rows_of("renamed", {CE: around(0.95)}, started=20.0,
                                              weights_sha256="ab12", run_id="run-new"))
    old = write_run(tmp_path / "old",
                    rows_of("first-name", {CE: around(0.50), "l0": 16.0}, started=10.0,
                            weights_sha256="ab12", run_id="run-old"),
                    rows_of("other", {CE: around(0.70)}, started=30.0))
    build([new, old], tmp_path / "out")
    table = board(tmp_path / "out").set_index("dictionary")
    assert list(table.index) == ["renamed", "other"]  # one entry per identity, newest name
    assert table.loc["renamed", CE] == 0.95 and table.loc["renamed", "l0"] == 16.0
    assert table.loc["renamed", "source"] == "run run-old; run run-new"
    assert table.loc["renamed", "entry"] == "sha256:ab12"
    assert pd.isna(table.loc["renamed", "identity"])  # these older rows have none


def test_equal_times_keep_the_later_input(tmp_path: Path) -> None:
    first = write_run(tmp_path / "a", rows_of("d", {CE: around(0.5)}, started=5.0))
    second = write_run(tmp_path / "b", rows_of("d", {CE: around(0.6)}, started=5.0))
    build([first, second / "results.csv"], tmp_path / "out")
    assert board(tmp_path / "out")[CE].tolist() == [0.6]


# --------------------------------------------------------------------------- entries


MODEL_A, MODEL_B = "1adb42a56b00646d", "77e0c9d1f2a3b4c5"
TOKENS_A, TOKENS_B = "9a3e17b8999250d0", "0d0f3e2a1b4c5d6e"
POST = "blocks.2.hook_resid_post"


def values(out: Path, key: str = CE) -> dict[tuple[str, str], float]:
    """(dictionary, hook) -> the value of `key`, from the CSV (NaN when missing)."""
    table = board(out)
    return {(d, h): v for d, h, v in zip(table["dictionary"], table["hook"], table[key],
                                         strict=True)}


def test_same_weights_under_another_hook_or_args_are_two_entries(tmp_path: Path) -> None:
    """One file, three declarations (two hooks; other args at one hook): three entries, each
    with its own numbers, with identities and without (older rows)."""
    same = {"weights_sha256": "ab12", "source": "zoo:x", "model_hash": MODEL_A,
            "token_set": TOKENS_A}
    run = write_run(tmp_path / "run",
                    rows_of("x-pre", {CE: around(0.9), KL: around(0.95)}, identity="id-pre",
                            **same),
                    rows_of("x-post", {CE: around(0.8)}, hook=POST, identity="id-post", **same),
                    rows_of("x-args", {CE: around(0.5)}, identity="id-args", **same))
    build([run], tmp_path / "out")
    assert values(tmp_path / "out") == {("x-pre", HOOK): 0.9, ("x-args", HOOK): 0.5,
                                        ("x-post", POST): 0.8}
    kl = values(tmp_path / "out", KL)
    assert kl[("x-pre", HOOK)] == 0.95 and math.isnan(kl[("x-args", HOOK)])
    assert set(board(tmp_path / "out")["identity"]) == {"id-pre", "id-post", "id-args"}
    # the same rows of an older file (no identity): the hook still separates, and two names
    # of one file in one run are two declarations
    old = write_run(tmp_path / "old",
                    rows_of("x-pre", {CE: around(0.9), KL: around(0.95)}, **same),
                    rows_of("x-post", {CE: around(0.8)}, hook=POST, **same),
                    rows_of("x-args", {CE: around(0.5)}, **same))
    build([old], tmp_path / "old-out")
    assert values(tmp_path / "old-out") == values(tmp_path / "out")
    assert set(board(tmp_path / "old-out")["entry"]) == {
        "sha256:ab12#x-pre", "sha256:ab12#x-args", "sha256:ab12"}


def test_a_control_sharing_the_weights_keeps_its_own_values(tmp_path: Path) -> None:
    """ct-clt and ct-clt-shuffled (same weights, `args: {shuffle_decoders: 0}`): the control's
    loss recovered is never shown beside the real transcoder's KL score, nor replaces it."""
    same = {"weights_sha256": "34a7da44bc8ce011", "source": "zoo:ct-clt",
            "model_hash": MODEL_A, "token_set": TOKENS_A}
    real = {CE: around(0.9696), KL: around(0.9687)}
    run = write_run(tmp_path / "run",
                    rows_of("ct-clt", real, identity="real", started=1.0, **same),
                    rows_of("ct-clt-shuffled", {CE: around(0.1152)}, identity="shuffled",
                            started=2.0, **same))
    markdown = build([run], tmp_path / "out").read_text()
    table = board(tmp_path / "out").set_index("dictionary")
    assert table.loc["ct-clt", CE] == 0.9696 and table.loc["ct-clt", KL] == 0.9687
    assert table.loc["ct-clt-shuffled", CE] == 0.1152
    assert math.isnan(table.loc["ct-clt-shuffled", KL])
    assert [line.split("|")[2].strip() for line in table_lines(markdown)[2:]] == [
        "ct-clt", "ct-clt-shuffled"]


def test_one_name_of_two_identities_shows_the_entry(tmp_path: Path) -> None:
    """Two runs of `d` with other args: two entries of one name, told apart on the page."""
    first = write_run(tmp_path / "a", rows_of("d", {CE: around(0.9)}, identity="aaaa1111"))
    second = write_run(tmp_path / "b", rows_of("d", {CE: around(0.5)}, identity="bbbb2222"))
    markdown = build([first, second], tmp_path / "out").read_text()
    assert sorted(board(tmp_path / "out")[CE]) == [0.5, 0.9]
    lines = table_lines(markdown)
    assert "| entry " in lines[0]
    assert "identity:aaaa1111" in lines[2] and "identity:bbbb2222" in lines[3]


@pytest.mark.parametrize(("column", "header", "first", "second"), [
    ("model_hash", "model hash", MODEL_A, MODEL_B),
    ("token_set", "token set", TOKENS_A, TOKENS_B),
])
def test_one_dictionary_measured_twice_differently_is_two_entries(
        tmp_path: Path, column: str, header: str, first: str, second: str) -> None:
    """The same dictionary on a fine-tuned copy of the model, or on other tokens: two
    entries in one table, which shows what differs and says they are not like for like."""
    base = {"identity": "c0ffee00", "model_hash": MODEL_A, "token_set": TOKENS_A}
    a = write_run(tmp_path / "a", rows_of("d", {CE: around(0.9)}, started=1.0,
                                          **{**base, column: first}))
    b = write_run(tmp_path / "b", rows_of("d", {CE: around(0.7)}, started=2.0,
                                          **{**base, column: second}))
    markdown = build([a, b], tmp_path / "out").read_text()
    table = board(tmp_path / "out")
    assert sorted(zip(table[column], table[CE], strict=True)) == sorted(
        [(first, 0.9), (second, 0.7)])
    lines = table_lines(markdown)
    headers = [cell.strip() for cell in lines[0].split("|")]
    assert header in headers and "entry" not in headers
    other = ({"model hash", "token set"} - {header}).pop()
    assert other not in headers  # only what differs
    cells = {line.split("|")[headers.index(header)].strip() for line in lines[2:]}
    assert cells == {first[:8], second[:8]}
    assert f"**Not like for like:** these entries were measured on different " \
           f"{header.split()[0]}" in markdown
    # alike: no such column, no such note
    build([a], tmp_path / "one")
    assert "Not like for like" not in (tmp_path / "one" / MARKDOWN_FILE).read_text()


def test_an_identity_row_never_joins_an_older_row_of_the_same_weights(tmp_path: Path) -> None:
    old = write_run(tmp_path / "old", rows_of("d", {CE: around(0.5), "l0": 8.0},
                                              weights_sha256="ab12", started=1.0))
    new = write_run(tmp_path / "new", rows_of("d", {CE: around(0.9)}, weights_sha256="ab12",
                                              identity="c0ffee00", started=2.0))
    build([old, new], tmp_path / "out")
    table = board(tmp_path / "out").set_index("entry")
    assert table.loc["sha256:ab12", CE] == 0.5 and table.loc["sha256:ab12", "l0"] == 8.0
    assert table.loc["identity:c0ffee00", CE] == 0.9
    assert math.isnan(table.loc["identity:c0ffee00", "l0"])  # not borrowed from the old row


def test_an_export_read_back_is_the_same_entry_as_its_run(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", rows_of(
        "d", {CE: around(0.9), KL: around(0.8), "l0": 16.0}, suite="toy", identity="c0ffee00",
        weights_sha256="ab12", model_hash=MODEL_A, token_set=TOKENS_A))
    export_core(run, tmp_path / "exported")
    build([run, tmp_path / "exported"], tmp_path / "out")
    table = board(tmp_path / "out")
    assert len(table) == 1 and table["entry"].tolist() == ["identity:c0ffee00"]
    assert (table[CE].tolist(), table[KL].tolist(), table["l0"].tolist()) == ([0.9], [0.8], [16])


def test_checks_that_measured_nothing_show_a_dash_and_why(tmp_path: Path) -> None:
    """An unstable ratio (a value the run does not vouch for) and an error are "—" with a
    footnote, not ranked, not on the front; the CSV says why."""
    run = write_run(tmp_path / "run",
                    rows_of("good", {CE: around(0.9), "l0": 16.0, KL: around(0.9)}),
                    rows_of("shaky", {CE: around(0.97), "l0": 8.0}, verdict="unstable"),
                    rows_of("broken", {CE: math.nan, "l0": 4.0}, verdict="error"))
    markdown = build([run], tmp_path / "out").read_text()
    assert ranked(tmp_path / "out") == [(1, "good"), (None, "shaky"), (None, "broken")]
    table = board(tmp_path / "out").set_index("dictionary")
    assert math.isnan(table.loc["shaky", CE]) and not table.loc["shaky", f"pareto_{CE}"]
    assert json.loads(table.loc["shaky", "missing"]) == {
        CE: "[unstable] in its run: its denominator is not usable",
        "l0": "[unstable] in its run: its denominator is not usable"}
    assert pd.isna(table.loc["good", "missing"])
    lines = table_lines(markdown)
    cells = [[cell.strip() for cell in line.split("|")] for line in lines[2:]]
    assert cells[1][3:6:2] == ["— ¹", "— ¹"] and cells[2][3:6:2] == ["— ²", "— ²"]
    assert "0.97" not in markdown
    assert "- ¹ [unstable] in its run: its denominator is not usable" in markdown
    assert "- ² [error] in its run: could not be computed" in markdown


def test_tables_per_model_and_hook(tmp_path: Path) -> None:
    hooks = ["blocks.10.hook_resid_pre", "blocks.2.hook_resid_pre", "hook_embed"]
    run = write_run(tmp_path / "run", *(rows_of(f"d{i}", {CE: 0.9}, hook=h)
                                        for i, h in enumerate(hooks)),
                    rows_of("m", {CE: 0.9}, model="other"))
    markdown = build([run], tmp_path / "out").read_text()
    headings = re.findall(r"^#{2,3} (.*)$", markdown, flags=re.MULTILINE)
    assert headings == ["Model `other`", f"`{HOOK}`", "Model `toy`", f"`{HOOK}`",
                        "`blocks.10.hook_resid_pre`", "`hook_embed`"]


# --------------------------------------------------------------------------- Pareto and plots


@pytest.fixture
def zoo_like(tmp_path: Path) -> Path:
    """Five dictionaries at one hook and a family across three layers, with intervals."""
    points = {"k4": (4.0, 0.80, 0.70), "k8": (8.0, 0.90, 0.85), "k16": (16.0, 0.88, 0.95),
              "k32": (32.0, 0.97, 0.96), "poor": (16.0, 0.10, 0.05)}
    dictionaries = [rows_of(f"resid-L2-{name}", {"l0": (l0, l0, l0), CE: around(ce, 0.002),
                                                 KL: around(kl, 0.002)})
                    for name, (l0, ce, kl) in points.items()]
    dictionaries += [rows_of(f"resid-L{layer}-k16", {"l0": 16.0, CE: around(0.9 + layer / 50),
                                                     KL: around(0.9)},
                             hook=f"blocks.{layer}.hook_resid_pre") for layer in (0, 1, 3)]
    return write_run(tmp_path / "run", *dictionaries)


def test_the_pareto_set_is_marked(tmp_path: Path, zoo_like: Path) -> None:
    markdown = build([zoo_like], tmp_path / "out").read_text()
    table = board(tmp_path / "out")
    table = table[table["hook"] == HOOK].set_index("dictionary")
    on_ce = set(table.index[table[f"pareto_{CE}"]])
    on_kl = set(table.index[table[f"pareto_{KL}"]])
    assert on_ce == {"resid-L2-k4", "resid-L2-k8", "resid-L2-k32"}
    assert on_kl == {"resid-L2-k4", "resid-L2-k8", "resid-L2-k16", "resid-L2-k32"}
    cells = {line.split("|")[2].strip(): line.split("|")[-3].strip()
             for line in table_lines(markdown)[2:]}
    assert cells["resid-L2-k16"] == "KL score"
    assert cells["resid-L2-k4"] == "loss recovered, KL score"
    assert cells["resid-L2-poor"] == ""


def test_markdown_csv_and_plots(tmp_path: Path, zoo_like: Path) -> None:
    out = tmp_path / "board"
    path = build([zoo_like], out)
    assert path == out / MARKDOWN_FILE
    markdown = path.read_text()
    assert str(tmp_path) not in markdown
    # the CSV: one row per entry, rank, the key first, the others as value/interval columns
    table = board(out)
    assert len(table) == 8 and table["dictionary"].is_unique
    assert list(table.columns[:4]) == ["model", "hook", "rank", "dictionary"]
    assert {CE, f"{CE}_ci_low", f"{CE}_ci_high", "l0", KL, f"{KL}_ci_high"} <= set(table.columns)
    best = table[table["hook"] == HOOK].iloc[0]
    assert best["dictionary"] == "resid-L2-k32" and best["rank"] == 1
    assert best[f"{CE}_ci_low"] == pytest.approx(0.968)
    # the Markdown: per hook a table with the interval beside the key and the notes under it
    lines = table_lines(markdown)
    assert [cell.strip() for cell in lines[0].split("|")[3:6]] == [f"{CE} ↑", "95% CI", "l0 ↓"]
    assert "[0.968, 0.972]" in lines[2] and "0.96 [0.958, 0.962]" in lines[2]
    assert markdown.count("Ranked by `ce_loss_recovered[zero]` (higher is better)") == 4
    # the plots: relative links to PNGs beside the Markdown, every one drawn
    links = re.findall(r"!\[(?:\\.|[^\]])*\]\(([^)]+)\)", markdown)
    assert sorted(links) == sorted(p.name for p in out.glob("*.png"))
    assert len([name for name in links if name.startswith("frontier-")]) == 2
    assert len([name for name in links if name.startswith("layers-")]) == 2
    for name in links:
        assert "/" not in name
        assert_drawn(out / name)


def core_file(path: Path, sae_id: str = "layer_12/width_16k/canonical", *,
              millis: int = 50_000, **metrics: float) -> Path:
    """A SAEBench core-eval output file for one SAE of release `rel` (its metrics:
    `category.field` = value, underscores for dots)."""
    categories: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        category, field = name.split("__")
        categories.setdefault(category, {})[field] = value
    path.write_text(json.dumps({
        "eval_type_id": "core", "eval_config": {"model_name": "toy"},
        "eval_id": "core-run", "datetime_epoch_millis": millis,
        "eval_result_metrics": categories, "sae_lens_id": sae_id, "sae_lens_release_id": "rel",
        "sae_cfg_dict": {"hook_name": HOOK, "d_sae": 1024, "architecture": "jumprelu"},
    }))
    return path


def test_saebench_imports_merge_and_are_marked(tmp_path: Path) -> None:
    """A core-eval file and a run of the same release SAE are one entry; imported values, the
    source and the uncentred explained variance are marked as such."""
    ours = write_run(tmp_path / "ours",
                     rows_of("gs12", {CE: around(0.95), KL: around(0.9)}, started=40.0,
                             source="rel:layer_12/width_16k/canonical"),
                     rows_of("other", {CE: around(0.5), "l0": 8.0}, started=40.0))
    imported = core_file(tmp_path / "gs12_eval_results.json",
                         model_performance_preservation__ce_loss_score=0.99,
                         reconstruction_quality__explained_variance=0.97, sparsity__l0=80.0)
    markdown = build([ours, imported], tmp_path / "out").read_text()
    table = board(tmp_path / "out").set_index("dictionary")
    assert list(table.index) == ["layer_12/width_16k/canonical", "other"]
    entry = table.iloc[0]
    assert entry[CE] == 0.99 and entry[KL] == 0.9  # the newer, imported, CE; our KL
    assert entry["imported"] == f"{CE};explained_variance_saebench;l0"
    assert entry["architecture"] == "jumprelu" and entry["d_sae"] == 1024
    lines = table_lines(markdown)
    assert "explained_variance_saebench (SAEBench's EV) ↑" in lines[0]
    assert " 0.99 † |" in lines[2] and " 0.9 [0.899, 0.901] |" in lines[2]
    assert "| rel:layer_12/width_16k/canonical · SAEBench core † |" in lines[2]
    assert " 80 † |" in lines[2] and "†" not in lines[3]
    assert "† imported from SAEBench core-eval results" in markdown
    assert "`explained_variance_saebench` is SAEBench 0.6.0's explained variance, 1 − " \
           "E‖x − x̂‖² / (E‖x‖² − (E‖x‖²/d_in)²): it runs higher than saebench's centred" \
        in markdown


def test_a_folder_of_core_files(tmp_path: Path) -> None:
    folder = tmp_path / "eval_results" / "core" / "rel"
    folder.mkdir(parents=True)
    for number, (score, l0) in enumerate(((0.9, 20.0), (0.8, 10.0))):
        core_file(folder / f"sae{number}_eval_results.json", f"sae{number}",
                  model_performance_preservation__ce_loss_score=score, sparsity__l0=l0)
    build([tmp_path / "eval_results"], tmp_path / "out")
    assert ranked(tmp_path / "out") == [(1, "sae0"), (2, "sae1")]
    assert board(tmp_path / "out")[f"pareto_{CE}"].tolist() == [True, True]


# --------------------------------------------------------------------------- the example run


def test_the_example_run_has_a_table_per_hook(tmp_path: Path) -> None:
    run = shutil.copytree(EXAMPLE, tmp_path / "example")
    markdown = build([run], tmp_path / "out").read_text()
    hooks = {h for h in read_results(run)["hook"] if "," not in h}
    assert len(hooks) == 11
    for hook in hooks:
        assert f"\n### `{hook}`\n" in markdown
        assert table_lines(markdown, hook)[2].split("|")[1].strip() == "1"
    assert f"(frontier-08-zoo-{HOOK}-ce_loss_recovered_zero.png)" in markdown
    assert "layers-zoo-ce_loss_recovered_zero.png" in markdown
    table = board(tmp_path / "out")
    family = table[table["family"] == "resid-topk16"]
    assert sorted(family["layer"]) == [0, 1, 2, 3]
    at_hook = table[table["hook"] == HOOK]
    assert at_hook["dictionary"].iloc[0] == "resid-L2-topk32"
    assert at_hook["dictionary"].iloc[-1] == "resid-L2-poor"
    # every dictionary of the run once, each with its own numbers (ct-clt and its shuffled
    # control share weights but not identity)
    assert sorted(table["dictionary"]) == sorted(set(read_results(run)["dictionary"]))
    clt = table.set_index("dictionary").loc[["ct-clt", "ct-clt-shuffled"], CE]
    assert clt["ct-clt"] > 0.9 > 0.2 > clt["ct-clt-shuffled"]
    committed = pd.read_csv(EXAMPLE / CSV_FILE)
    assert sorted(committed["dictionary"]) == sorted(table["dictionary"])


# --------------------------------------------------------------------------- command line


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="saebench leaderboard")
    leaderboard.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_builds_and_exits_0(tmp_path: Path, zoo_like: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    args = parse([str(zoo_like), "-o", str(tmp_path / "out"), "--metric", KL])
    assert args.func is leaderboard.run
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / MARKDOWN_FILE)
    assert "Ranked by `kl_div_score[zero]`" in (tmp_path / "out" / MARKDOWN_FILE).read_text()


def test_cli_exit_codes(tmp_path: Path, zoo_like: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    header_only = tmp_path / "header" / "results.csv"
    header_only.parent.mkdir()
    header_only.write_text((zoo_like / "results.csv").read_text().splitlines()[0] + "\n")
    not_results = tmp_path / "notes.csv"
    not_results.write_text("a,b\n1,2\n")
    not_core = tmp_path / "sparse_probing_eval_results.json"
    not_core.write_text(json.dumps({"eval_type_id": "sparse_probing"}))
    cases = {
        str(tmp_path / "missing"): "no such file or directory",
        str(empty): "holds no results.csv and no *_eval_results.json file",
        str(header_only): "holds no results",
        str(not_results): "is not a saebench results file",
        str(not_core): "field 'eval_type_id' is 'sparse_probing', not 'core'",
    }
    for source, message in cases.items():
        assert leaderboard.run(parse([str(zoo_like), source, "-o", str(tmp_path / "o")])) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("saebench leaderboard: ")
        assert err.count("\n") == 1
    assert leaderboard.run(parse([str(zoo_like), "-o", str(tmp_path / "o"),
                                  "--metric", "nope[zero]"])) == 2
    assert "no row has the metric key 'nope[zero]'" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert leaderboard.run(parse([str(zoo_like), "-o", str(a_file)])) == 2
    assert "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        parse([str(zoo_like)])  # no -o
    assert exit_info.value.code == 2


def test_leaderboard_imports_no_torch_at_module_level() -> None:
    imported = imported_modules(leaderboard)
    assert "torch" not in {m.split(".")[0] for m in imported}
    assert "matplotlib.pyplot" not in imported
