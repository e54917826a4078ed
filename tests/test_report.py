"""Tests of saebench.report: the Markdown report (sections, attention list, summary matrix,
plots, folded check tables, baseline comparison), CSV reads behind it, the command line."""

from __future__ import annotations

import ast
import doctest
import json
import math
import re
from pathlib import Path

import pytest

from saebench import plots, report, results
from saebench.report import VERDICT_MARKS, render_report, write_report
from saebench.results import (
    FEATURE_COLUMNS,
    PER_PROMPT_BASE_COLUMNS,
    PER_PROMPT_COLUMNS,
    append_rows,
    new_run_id,
    read_per_prompt,
    read_results,
    read_table,
)

PROVENANCE = {
    "run_id": "20261123-081530-ab12", "model": "toy", "hook": "blocks.2.hook_resid_pre",
    "saebench_version": "0.1.0", "sae_lens_version": "6.50.0",
    "transformer_lens_version": "3.0.0", "torch_version": "2.4.0", "device": "cpu",
    "dtype": "float32", "token_set": "heldout", "seed": 0,
}
SECTIONS = ["## What needs attention", "## Summary", "## Plots", "## Checks", "## Worst prompts",
            "## Feature ablations"]


def result(check_id: str, verdict: str, value: float = 0.5, **fields) -> dict:
    """A results.csv row with provenance, an interval around `value`, n = 64 and the message
    `checks.judge` writes for a pass or fail; dictionary and metric come from a check id
    `<set>::<metric key>` (else resid-L2-topk16 and ce_loss_recovered)."""
    dictionary, _, key = check_id.rpartition("::")
    metric = key.split("[")[0] if dictionary else "ce_loss_recovered"
    row = {**PROVENANCE, "suite": "toy", "check_id": check_id,
           "dictionary": dictionary or "resid-L2-topk16", "metric": metric, "value": value,
           "ci_low": value - 0.1, "ci_high": value + 0.1, "n": 64, "threshold": ">= 0.9",
           "verdict": verdict, "higher_is_better": True, "architecture": "topk",
           "d_sae": 1024, "duration_s": 0.25}
    row = {**row, **fields}
    judged = "meets" if verdict in ("pass", "xpass") else "fails"
    row.setdefault("message", f"{row['metric']} = {report.format_value(row['value'])} "
                              f"[{row['ci_low']:.4g}, {row['ci_high']:.4g}] (n=64) "
                              f"{judged} {row['threshold']}")
    return row


def cells(line: str) -> list[str]:
    """The cells of one Markdown table row (escaped `\\|` stays inside its cell), no-break
    spaces read as spaces."""
    return [c.strip().replace("\xa0", " ") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def table_lines(text: str, after: str) -> list[str]:
    """The rows of the first table after the text `after`, header row included (not the
    separator row, which starts with "|-")."""
    body = text.split(after, 1)[1].split("\n\n|", 1)[1]
    table = ("|" + body).split("\n\n", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| ")]


def folded(text: str, summary: str) -> str:
    """The body of the `<details>` block whose summary starts with `summary`."""
    block = text.split(f"<details><summary>{summary}", 1)[1]
    head, body = block.split("</summary>\n", 1)
    return body.split("</details>", 1)[0]


def folded_rows(text: str, summary: str) -> list[list[str]]:
    """The cells of the table in a `<details>` block, header row first."""
    return [cells(line) for line in folded(text, summary).splitlines() if line.startswith("| ")]


# --------------------------------------------------------------------------- the report


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run with two suites, every kind of verdict and a NaN value."""
    rows = [
        result("resid-L2-topk16::l0", "pass", 16.0, threshold="<= 70", higher_is_better=False),
        result("resid-L2-topk16::ce_loss_recovered[zero]", "fail",
               parts={"ce_clean": 3.2, "ce_spliced": 3.5, "n_pred": 72216.0},
               options={"ablation": "zero"}),
        result("resid-L2-topk16::kl_div", "error", math.nan, ci_low=math.nan,
               ci_high=math.nan, n=None, threshold="<= 0.2",
               message="kl_div could not be computed (overflow): KL | see\nthe parts"),
        result("resid-L2-poor::ce_loss_recovered[zero]", "xfail", 0.2),
        result("resid-L2-topk16::explained_variance", "unstable", 0.81234567,
               message="explained_variance = 0.8123 [0.7123, 0.9123] (n=64) is unstable: "
                       "the variance is 0"),
        result("resid-L2-poor::l0", "pass", 4.0, threshold="<= 70"),
        result("resid-L2-topk16::logit_diff_recovered[ioi]", "pass", 0.95, task="ioi",
               threshold="ci_low >= 0.8"),
        result("gpt2-L0::ce_loss_recovered[zero]", "skipped", math.nan, suite="big",
               model="gpt2", hook="blocks.0.hook_resid_pre", message="no network"),
    ]
    append_rows(tmp_path / "results.csv", rows[:3])
    append_rows(tmp_path / "results.csv", rows[3:])
    return tmp_path


def test_report_summary_and_provenance(run_dir: Path) -> None:
    text = render_report(run_dir)
    assert text.startswith("# saebench report 20261123-081530-ab12\n")
    assert ("8 checks: 3 ✅ pass, 1 ❌ fail, 1 🚫 xfail, 1 💥 error, 1 ❓ unstable, "
            "1 ⏩ skipped") in text
    assert text.count("Provenance:") == 1
    assert ("Provenance: saebench 0.1.0 · sae_lens 6.50.0 · transformer_lens 3.0.0 · "
            "torch 2.4.0 · device cpu · dtype float32 · token set heldout · seed 0") in text
    assert "Baseline" not in text and "vs baseline" not in text  # the run has none


def test_sections_in_order(run_dir: Path) -> None:
    append_rows(run_dir / "per_prompt.csv", [
        {"suite": "toy", "check_id": "resid-L2-topk16::logit_diff_recovered[ioi]",
         "dictionary": "resid-L2-topk16", "task": "ioi", "prompt_index": 0, "prompt": "p",
         "ld_clean": 4.0, "ld_spliced": 3.0}])
    append_rows(run_dir / "features.csv", [
        {"suite": "toy", "check_id": "resid-L2-topk16::feature_ablation[ioi,k=1]",
         "dictionary": "resid-L2-topk16", "task": "ioi", "feature": 3, "effect": 0.5}])
    text = render_report(run_dir)
    starts = [text.index(f"\n{section}\n") for section in SECTIONS]
    assert starts == sorted(starts)
    assert text.index("Provenance:") < starts[0]
    assert all(text.count(f"\n{section}\n") == 1 for section in SECTIONS)


def test_attention_lists_what_failed(run_dir: Path) -> None:
    text = render_report(run_dir)
    header, *rows = table_lines(text, "## What needs attention")
    assert cells(header) == ["verdict", "check", "value [95% CI]", "threshold", "message"]
    listed = [cells(line) for line in rows]
    assert [r[:2] for r in listed] == [  # in run order; two suites: the suite is named
        ["❌ fail", "toy: resid-L2-topk16::ce_loss_recovered[zero]"],
        ["💥 error", "toy: resid-L2-topk16::kl_div"],
        ["❓ unstable", "toy: resid-L2-topk16::explained_variance"]]
    fail, error, unstable = listed
    assert fail[2:] == ["0.5 [0.4, 0.6]", ">= 0.9", "—"]  # its message only restated the row
    assert error[2:] == ["—", "<= 0.2",
                         "kl_div could not be computed (overflow): KL \\| see the parts"]
    assert unstable[2:] == ["0.8123 [0.7123, 0.9123]", ">= 0.9", "is unstable: the variance is 0"]
    assert "Nothing failed" not in text


def test_attention_nothing_failed_and_notices(tmp_path: Path) -> None:
    append_rows(tmp_path / "results.csv", [
        result("a::l0", "pass", 16.0, threshold="<= 70"), result("b::l0", "xfail", 99.0),
        result("c::l0", "skipped", math.nan)])
    text = render_report(tmp_path)
    attention = text.split("## What needs attention\n", 1)[1].split("\n## ", 1)[0]
    assert attention.strip() == "Nothing failed."
    append_rows(tmp_path / "results.csv", [
        result("d::l0", "xpass", 16.0), result("e::l0", "empty", math.nan),
        result("f::l0", "noisy", 16.0, vs_baseline="noisy", delta=-0.5, delta_ci_low=-1.2,
               delta_ci_high=0.2, comparison="unpaired", tolerance=0.25)])
    text = render_report(tmp_path)
    listed = [cells(line)[:2] for line in table_lines(text, "## What needs attention")[1:]]
    assert listed[:2] == [["❗ xpass", "d::l0"], ["⭕ empty", "e::l0"]]
    notice = text.split("Notice: 🟡 noisy", 1)[1].split("\n", 1)[0]
    assert notice.endswith("(reported, not failed):")
    header, noisy = map(cells, table_lines(text, "Notice: 🟡 noisy"))
    assert noisy[:2] == ["🟡 noisy", "f::l0"]
    assert "-0.5 [-1.2, +0.2] 🟡 noisy (unpaired, tol 0.25)" in noisy
    assert ["f::l0"] not in [row[1:2] for row in listed]  # a notice, not a failure


def test_summary_matrix(run_dir: Path) -> None:
    text = render_report(run_dir)
    header, *rows = table_lines(text, "### Suite toy · model toy")
    assert cells(header) == ["dictionary", "L0", "loss rec.", "EV", "LD ioi"]  # no KL score
    matrix = [cells(line) for line in rows]
    assert [row[0] for row in matrix] == [
        "resid-L2-topk16<br><sub>blocks.2.hook_resid_pre · topk · d_sae 1024</sub>",
        "resid-L2-poor<br><sub>blocks.2.hook_resid_pre · topk · d_sae 1024</sub>"]
    assert [row[1:] for row in matrix] == [
        ["16 ✅", "0.5 ❌", "0.8123 ❓", "0.95 ✅"],
        ["4 ✅", "0.2 🚫", "—", "—"]]
    assert "16\xa0✅" in text and "❌\xa0fail" in text  # kept on one line in a narrow column
    legend = text.split(rows[-1] + "\n\n", 1)[1].split("\n", 1)[0]
    assert legend.startswith("<sub>✅ pass: meets its threshold · ❌ fail")
    assert "🚫 xfail: expected to fail, and did" in legend and "💥" not in legend
    assert "loss rec. = `ce_loss_recovered[zero]`" in legend and "KL score" not in legend
    assert "LD ioi = `logit_diff_recovered[ioi]`" in legend
    big = [cells(line) for line in table_lines(text, "### Suite big · model gpt2")]
    assert big == [["dictionary", "loss rec."],
                   ["gpt2-L0<br><sub>blocks.0.hook_resid_pre · topk · d_sae 1024</sub>",
                    "— ⏩"]]


def test_matrix_rows_of_spliced_sets_and_no_key_metric(tmp_path: Path) -> None:
    hooks = "blocks.0.hook_resid_pre,blocks.3.hook_resid_pre"
    append_rows(tmp_path / "results.csv", [
        result("pair::ce_loss_recovered[zero]", "pass", 0.99, dictionary="a-L0+a-L3",
               hook=hooks, architecture="topk+topk", d_sae=None),
        result("a-L0::cossim", "pass", 0.99)])
    text = render_report(tmp_path)
    header, pair, single = table_lines(text, "### Suite toy · model toy")
    assert cells(pair) == ["pair<br><sub>blocks.{0,3}.hook_resid_pre · topk</sub>", "0.99 ✅"]
    assert cells(single)[1:] == ["—"]  # a row per dictionary, even without a key metric
    append_rows(tmp_path / "results.csv", [result("x::cossim", "pass", suite="other")])
    assert "No key metric" in render_report(tmp_path).split("### Suite other", 1)[1]


def test_checks_folded_per_dictionary(run_dir: Path) -> None:
    text = render_report(run_dir)
    checks = text.split("\n## Checks\n", 1)[1]
    assert all(f"| {c} " in checks for c in read_results(run_dir)["check_id"])  # greppable
    summary = ("<b>resid-L2-topk16</b> · <code>blocks.2.hook_resid_pre</code> · 5 checks: "
               "2 ✅ pass, 1 ❌ fail, 1 💥 error, 1 ❓ unstable</summary>")
    assert f"<details><summary>{summary}\n\n| check" in checks  # a blank line: Markdown
    header, l0, ce, kl, ev, ld = folded_rows(checks, "<b>resid-L2-topk16</b>")
    assert header == ["check", "value [95% CI]", "n", "threshold", "verdict", "message",
                      "parts"]
    assert l0[:5] == ["resid-L2-topk16::l0", "16 [15.9, 16.1]", "64", "<= 70", "✅ pass"]
    assert l0[5] == ce[5] == ld[5] == "—"  # pass and fail messages restate the row
    assert ce[6] == "ce_clean=3.2, ce_spliced=3.5, …"  # whole items only, within 40 characters
    assert kl[1:3] == ["—", "—"] and kl[5].endswith("KL \\| see the parts")
    assert ev[5] == "is unstable: the variance is 0"
    poor = folded_rows(checks, "<b>resid-L2-poor</b>")
    assert poor[0] == ["check", "value [95% CI]", "n", "threshold", "verdict", "parts"]
    assert "Δ vs baseline" not in text
    assert text.index("### Suite toy · 7 checks") < text.index("### Suite big · 1 check:")
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)
    assert not re.search(r"(?<![\w.-])-1\b", text)  # no sentinel


# --------------------------------------------------------------------------- baseline


def baseline_run(tmp_path: Path, missing: list[str]) -> Path:
    """A run compared with a baseline: same, regression, noisy, new; `missing` checks."""
    compared = {"comparison": "paired", "tolerance": 0.005}
    append_rows(tmp_path / "results.csv", [
        result("a::l0", "pass", 16.0, threshold="<= 70", vs_baseline="same", delta=0.0,
               delta_ci_low=-0.0012, delta_ci_high=0.00081, baseline_value=16.0, **compared,
               message="l0 = 16 [15.9, 16.1] (n=64) meets <= 70; vs baseline 16: Δ = +0 "
                       "[-0.0012, +0.00081] (positive is better; paired bootstrap over the "
                       "same sequences; tolerance 0.005) → same"),
        result("a::ce_loss_recovered[zero]", "regression", 0.95, vs_baseline="regression",
               delta=-0.021, delta_ci_low=-0.026, delta_ci_high=-0.016, baseline_value=0.971,
               **compared,
               message="ce_loss_recovered = 0.95 [0.85, 1.05] (n=64) meets >= 0.9; vs baseline"
                       " 0.971: Δ = -0.021 [-0.026, -0.016] (positive is better; paired "
                       "bootstrap over the same sequences; tolerance 0.005) → regression"),
        result("a::explained_variance", "noisy", 0.95, vs_baseline="noisy", delta=-0.01,
               delta_ci_low=-0.03, delta_ci_high=0.01, **compared),
        result("a::cossim", "pass", 0.95, vs_baseline="new",
               message="cossim = 0.95 [0.85, 1.05] (n=64) meets >= 0.9"),
    ])
    note = {"path": "suites/baselines/toy", "missing": missing}
    (tmp_path / "baseline.json").write_text(json.dumps(note))
    return tmp_path


def test_vs_baseline(tmp_path: Path) -> None:
    text = render_report(baseline_run(tmp_path, ["a::mse", "a::kl_div"]))
    assert ("Baseline `suites/baselines/toy`: 1 same, 1 📉 regression, 1 🟡 noisy, 1 new, "
            "2 missing from this run") in text
    header, *rows = table_lines(text, "## What needs attention")
    assert cells(header)[4:] == ["Δ vs baseline", "message"]
    assert [cells(line)[1:] for line in rows] == [
        ["a::ce_loss_recovered[zero]", "0.95 [0.85, 1.05]", ">= 0.9",
         "-0.021 [-0.026, -0.016] 📉 regression (tol 0.005)", "—"]]
    header, l0, ce, ev, cossim = folded_rows(text, "<b>a</b>")
    assert header == ["check", "value [95% CI]", "n", "threshold", "verdict",
                      "Δ vs baseline", "parts"]  # no message says more than its row
    assert l0[4:6] == ["✅ pass", "0 [-0.0012, +0.00081] same"]
    assert ce[4] == "📉 regression"
    assert cossim[5] == "new"
    assert "Δ vs baseline: new − baseline, oriented so that positive is better" in text


def test_missing_from_this_run(tmp_path: Path) -> None:
    text = render_report(baseline_run(tmp_path, ["a::mse", "a::kl_div"]))
    attention = text.split("## What needs attention\n", 1)[1].split("\n## ", 1)[0]
    assert ("Missing from this run: 2 check(s) of the baseline (`suites/baselines/toy`):\n\n"
            "- `a::mse`\n- `a::kl_div`") in attention
    many = [f"a::m{i}" for i in range(12)]
    text = render_report(baseline_run(tmp_path, many))
    body = folded(text, "Missing from this run: 12 check(s)")
    assert body.strip().splitlines() == [f"- `{c}`" for c in many]
    assert "(<code>suites/baselines/toy</code>)</summary>" in text
    (tmp_path / "baseline.json").write_text("{torn")
    assert "Baseline: baseline.json is unreadable (Expecting" in render_report(tmp_path)
    (tmp_path / "baseline.json").write_text('{"path": "old", "missing": "a::l0"}')
    assert "Missing from this run" not in render_report(tmp_path)  # not a list: ignored


# --------------------------------------------------------------------------- plots


def frontier_run(tmp_path: Path) -> Path:
    """Three single dictionaries of one family at layers 1 and 2, a spliced set, a task and a
    deliberately poor dictionary (xfail)."""
    rows = []
    for name, layer, l0, ce in (("resid-L1-topk16", 1, 16.0, 0.99),
                                ("resid-L2-topk16", 2, 16.0, 0.98),
                                ("resid-L2-topk4", 2, 4.0, 0.95)):
        hook = f"blocks.{layer}.hook_resid_pre"
        rows += [result(f"{name}::l0", "pass", l0, hook=hook, threshold="<= 70"),
                 result(f"{name}::ce_loss_recovered[zero]", "pass", ce, hook=hook,
                        ci_low=ce - 0.01, ci_high=ce + 0.005)]
    rows += [
        result("pair::ce_loss_recovered[zero]", "pass", 0.97,
               dictionary="resid-L1-topk16+resid-L2-topk16",
               hook="blocks.1.hook_resid_pre,blocks.2.hook_resid_pre"),
        result("resid-L2-topk16::logit_diff_recovered[ioi]", "pass", 0.9, task="ioi"),
        result("resid-L2-topk16::logit_diff_recovered[ioi,zero]", "pass", 0.7, task="ioi"),
        result("resid-L2-poor::l0", "pass", 16.0),
        result("resid-L2-poor::ce_loss_recovered[zero]", "xfail", -0.2),
    ]
    append_rows(tmp_path / "results.csv", rows)
    return tmp_path


def test_plot_frames(tmp_path: Path, monkeypatch) -> None:
    drawn: dict[str, tuple] = {}

    def recorder(name: str):
        def draw(frame, *args, **kwargs):
            drawn[name] = (frame, args, kwargs)
            return args[-1] if args else None
        return draw

    for name in ("frontier_plot", "layer_curves", "interval_bars"):
        monkeypatch.setattr(plots, name, recorder(name))
    planned = report.plan_plots(read_results(frontier_run(tmp_path)))
    assert [p.path for p in planned] == ["plots/toy-l0-vs-loss-recovered.png",
                                         "plots/toy-loss-recovered-by-layer.png",
                                         "plots/toy-logit-diff-recovered.png"]
    for plot in planned:
        plot.draw(tmp_path / plot.path)
    frame, (x, y, _), kwargs = drawn["frontier_plot"]
    assert (x, kwargs["label"], kwargs["group"]) == ("l0", "dictionary", "hook")
    assert frame["dictionary"].tolist() == ["resid-L1-topk16", "resid-L2-topk16",
                                            "resid-L2-topk4"]  # no spliced set, no xfail
    assert frame[[y, f"{y}_ci_low", f"{y}_ci_high"]].iloc[2].tolist() == pytest.approx(
        [0.95, 0.94, 0.955])
    frame, _, kwargs = drawn["layer_curves"]
    assert frame[["family", "layer"]].values.tolist() == [
        ["resid-topk16", 1], ["resid-topk16", 2], ["resid-topk4", 2]]
    assert frame[kwargs["metric"]].tolist() == [0.99, 0.98, 0.95]
    frame, _, kwargs = drawn["interval_bars"]
    assert frame[["dictionary", "task", kwargs["value"]]].values.tolist() == [
        ["resid-L2-topk16", "ioi", 0.9]]  # the plain task check, not its [ioi,zero] variant
    assert (kwargs["low"], kwargs["high"], kwargs["reference"]) == ("ci_low", "ci_high", 1.0)


def test_plots_written_and_referenced(tmp_path: Path) -> None:
    run_dir = frontier_run(tmp_path)
    text = render_report(run_dir)
    assert not (run_dir / "plots").exists()  # rendering draws nothing
    path = write_report(run_dir)
    assert path.read_text() == text  # the same report, now with its plots drawn
    section = text.split("\n## Plots\n", 1)[1].split("\n## ", 1)[0]
    assert "Checks expected to fail (🚫 xfail) are left out of the plots." in section
    links = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", section)
    assert links == ["plots/toy-l0-vs-loss-recovered.png",
                     "plots/toy-loss-recovered-by-layer.png", "plots/toy-logit-diff-recovered.png"]
    for link in links:
        assert (run_dir / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_plots_without_something_to_show(tmp_path: Path) -> None:
    append_rows(tmp_path / "results.csv", [result("a::l0", "pass", 16.0),
                                           result("a::ce_loss_recovered[zero]", "pass", 0.9)])
    assert "## Plots" not in render_report(tmp_path)  # one point is no frontier
    write_report(tmp_path)
    assert not (tmp_path / "plots").exists()


# --------------------------------------------------------------------------- per prompt, features


def test_worst_prompts(tmp_path: Path) -> None:
    losses = [0.1, 2.0, 0.5, 3.0, -1.0, 1.0]
    ids = {"run_id": "r", "suite": "toy", "check_id": "ioi::ld", "task": "ioi",
           "answer": " Mary", "distractor": " John"}
    rows = [{**ids, "dictionary": "d1", "prompt_index": i, "prompt": f"p{i}: a|b\nc",
             "ld_clean": 4.0, "ld_spliced": 4.0 - loss, "ld_ablated": 0.5}
            for i, loss in enumerate(losses)]
    rows.append({**ids, "dictionary": "d2", "prompt_index": 0, "prompt": "other",
                 "ld_clean": 4.0, "ld_spliced": -10.0})
    append_rows(tmp_path / "per_prompt.csv", rows)
    append_rows(tmp_path / "per_prompt.csv", [{**ids, "check_id": "ioi::dla", "dictionary": "d1",
                                               "prompt_index": 3, "prompt": "p3: a|b\nc",
                                               "dla_remainder": 0.25}])
    append_rows(tmp_path / "results.csv", [result("ioi::ld", "pass")])
    header = (tmp_path / "per_prompt.csv").read_text().split("\n", 1)[0]
    assert header.split(",") == PER_PROMPT_COLUMNS  # long format
    wide = read_per_prompt(tmp_path)
    assert list(wide.columns) == [*PER_PROMPT_BASE_COLUMNS, "ld_clean", "ld_spliced",
                                  "ld_ablated", "dla_remainder"]
    text = render_report(tmp_path, worst_prompts=3)
    header, *lines = folded_rows(text, "toy · ioi · d1 · worst loss 3")
    assert [line[0] for line in lines] == ["3", "1", "5"]
    assert lines[0][1] == "p3: a\\|b↵c"
    assert "0.25" in lines[0]  # the other check's quantity joins the same prompt
    assert len(folded_rows(text, "toy · ioi · d2")) == 2
    assert "## Worst prompts" not in render_report(tmp_path, worst_prompts=0)
    with pytest.raises(ValueError, match="quantity 'promt'"):
        append_rows(tmp_path / "per_prompt.csv", [{**ids, "promt": "typo"}])


def test_features_section(tmp_path: Path) -> None:
    append_rows(tmp_path / "results.csv", [result("d1::feature_ablation[ioi,k=2]", "pass")])
    ids = {"run_id": "r", "suite": "toy", "check_id": "d1::feature_ablation[ioi,k=2]",
           "dictionary": "d1", "task": "ioi"}
    append_rows(tmp_path / "features.csv", [
        {**ids, "feature": f, "mean_activation": 1.0 / (f + 1), "active_share": 0.5,
         "effect": -0.25, "ci_low": -0.5, "ci_high": math.nan} for f in (7, 3)
    ])
    assert list(read_table(tmp_path / "features.csv").columns) == FEATURE_COLUMNS
    text = render_report(tmp_path)
    _, *lines = folded_rows(text, "<code>d1::feature_ablation[ioi,k=2]</code> · d1 · ioi")
    assert [line[0] for line in lines] == ["7", "3"]
    assert "[-0.5, —]" in lines[0] and "-0.25" in lines[1]


def test_fidelity_and_clamp_tables(tmp_path: Path) -> None:
    append_rows(tmp_path / "results.csv", [result("d1::feature_fidelity", "pass")])
    ids = {"run_id": "r", "suite": "toy", "dictionary": "d1"}
    fidelity = {**ids, "check_id": "d1::feature_fidelity", "table": "fidelity"}
    clamp = {**ids, "check_id": "d1::feature_clamp", "table": "clamp", "read_dictionary": "d2"}
    append_rows(tmp_path / "features.csv", [
        *({**fidelity, "feature": f, "active_share": 0.1, "mean_activation": 0.5,
           "correlation": 1 - f / 100} for f in range(12)),
        {**clamp, "feature": 4, "read_feature": 9, "correlation": 0.75, "clamp_value": 2.0,
         "effect": 0.5, "ci_low": 0.25, "ci_high": 0.75},
        {**ids, "check_id": "d1::feature_cards", "table": "card", "feature": 4,
         "active_share": 0.1, "mean_activation": 0.5, "max_activation": 3.0}])
    text = render_report(tmp_path)
    assert "## Feature ablations" not in text  # no row of the ablation table
    _, *lines = folded_rows(text, "<code>d1::feature_fidelity</code> · d1 · 12 features")
    assert [line[0] for line in lines] == [str(f) for f in range(11, 1, -1)]  # 10 lowest
    header, line = folded_rows(text, "<code>d1::feature_clamp</code> · d1 · reads d2")
    assert header[:2] == ["feature", "read feature"]
    assert line == ["4", "9", "0.75", "2", "0.5", "[0.25, 0.75]"]
    assert "<b>d1</b> · 1 feature card</summary>" in text
    assert "#### feature 4 of d1" in text


def test_no_optional_sections_without_their_files(run_dir: Path) -> None:
    text = render_report(run_dir)
    assert "## Worst prompts" not in text and "## Feature ablations" not in text


# --------------------------------------------------------------------------- files, command line


def shown_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".lock"))


def test_write_report_replaces_atomically(run_dir: Path, monkeypatch) -> None:
    (run_dir / "report.md").write_text("old report")
    path = write_report(run_dir)
    assert path == run_dir / "report.md" and path.read_text() == render_report(run_dir)
    expected = [".results.csv.lock", "plots", "report.md", "results.csv"]
    assert shown_files(run_dir) == expected  # no temporary left
    path.write_text("old report")

    def crash(*args) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_report(run_dir)
    assert path.read_text() == "old report"  # never half written
    assert shown_files(run_dir) == expected  # no temporary left


def test_main(run_dir: Path, tmp_path_factory, capsys) -> None:
    missing = tmp_path_factory.mktemp("other") / "nope"
    assert report.main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    missing.mkdir()
    assert report.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert "results.csv" in err and str(missing) in err
    assert report.main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.md")
    assert (run_dir / "report.md").read_text().startswith("# saebench report")
    assert report.main([str(run_dir / "results.csv"), "--worst-prompts", "0"]) == 0


# --------------------------------------------------------------------------- small pieces


def test_new_run_id_sorts_by_time() -> None:
    from datetime import datetime

    early = new_run_id(datetime(2026, 1, 2, 3, 4, 5))
    late = new_run_id(datetime(2026, 1, 2, 3, 4, 6))
    assert re.fullmatch(r"20260102-030405-[0-9a-f]{4}", early) and early < late
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{4}", new_run_id())
    assert len({new_run_id() for _ in range(20)}) > 1


def test_marks_cover_every_verdict() -> None:
    verdicts = {"pass", "fail", "measured", "xfail", "xpass", "error", "empty", "unstable",
                "skipped", "regression", "noisy"}
    assert set(VERDICT_MARKS) == set(report.VERDICT_MEANINGS) == verdicts
    assert len(set(VERDICT_MARKS.values())) == len(VERDICT_MARKS)
    assert not any("\ufe0f" in mark for mark in VERDICT_MARKS.values())


def test_docstring_examples_of_formatters() -> None:
    runner = doctest.DocTestRunner()
    functions = (report.format_value, report.format_ci, report.format_delta,
                 report.split_check_id, report._compact_hooks, report._json_items,
                 report._visible, report._markdown, results.new_run_id)
    for function in functions:
        module = results if function is results.new_run_id else report
        for test in doctest.DocTestFinder().find(function, globs=vars(module)):
            runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def imported_modules(module) -> set[str]:
    """The modules a module's source imports."""
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module == "saebench"
                 for alias in node.names}
    return imported | {node.module for node in ast.walk(tree)
                       if isinstance(node, ast.ImportFrom) and node.module}


def test_report_imports_rows_and_plots_only() -> None:
    imported = imported_modules(report) - {"saebench", "saebench.results", "saebench.plots",
                                           "saebench.verdicts"}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "pytest", "saebench")}
