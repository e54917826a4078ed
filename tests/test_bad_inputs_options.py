"""Option values no computation can use, refused before anything runs.

- A value refused from the option alone (an infinite clamp or edit value) is a collection
  error of one line: `file:line: checks[i].options.<option>: <what is wrong> (<what is
  allowed>)`, no traceback (`COLLECTION_CASES`).
- A value refused by what the check's dictionaries have (feature ids past a dictionary's
  width, a write hook index past the splice's, a replacement model short of the model's
  layers) fails just that check as `<check id>: [error] <file>:<line>: <field>: ...`, with an
  `error` row in results.csv, while the suite's other checks run (`CHECK_CASES`).

Every suite file is collected by one in-process pytest run (the model loaded once, 256
tokens), which each case reads.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from saebench import loading
from saebench.zoo import paths

pytest_plugins = ["pytester"]

HEAD = """\
model: zoo
data: {source: zoo, n_tokens: 256}
defaults: {options: {n_boot: 20}}
dictionaries:
  good: {zoo: resid-L2-topk16}
  l3: {zoo: resid-L3-topk16}
  ct: {zoo: ct-transcoders}
  short: {circuit_tracer: short}
checks:
"""

# file -> (check, field under checks[0], message regex after `field: `)
COLLECTION_CASES = {
    "clamp_inf": ("{metric: clamp_effect, dictionaries: [good], read: [l3], "
                  "options: {value: .inf}}", "options.value",
                  r"must be max or a finite number, got inf"),
    "clamp_minus_inf": ("{metric: clamp_effect, dictionaries: [good], read: [l3], "
                        "options: {value: -.inf}}", "options.value",
                        r"must be max or a finite number, got -inf"),
    "edit_inf": ("{metric: ce_loss_recovered, dictionaries: [good], "
                 "options: {edits: [{features: [3], value: .inf}]}}", "options.edits",
                 r"item 0: .*must be a finite number, got inf"),
}

# check id -> (check, field under its checks[i], message regex after `field: `), each an
# [error] of its own
CHECK_CASES = {
    "good::features-5000": (
        "metric: l0, dictionaries: [good], options: {features: [7, 5000]}", "options.features",
        r"feature ids \[5000\] are outside 'good', whose 1024 features are 0\.\.1023$"),
    "good+l3::features": (
        "metric: ce_loss_recovered, splice: [good, l3], options: {features: [3]}",
        "options.features", r"feature ids \[3\] address the features of a check's one "
                            r"dictionary that reads one hook and writes one; this check splices "
                            r"2 dictionaries$"),
    "ct::layer-5": (
        "metric: per_layer_error, dictionaries: [ct], options: {layer: 5}", "options.layer",
        r"index 5 is outside the 4 write hooks of the splice \(blocks\.0\.hook_mlp_out, "
        r"blocks\.1\.hook_mlp_out, blocks\.2\.hook_mlp_out, blocks\.3\.hook_mlp_out\); "
        r"allowed: 0\.\.3, or -4\.\.-1 counting from the end$"),
    "ct::layer-minus-5": (
        "metric: per_layer_error, dictionaries: [ct], options: {layer: -5}", "options.layer",
        r"index -5 is outside the 4 write hooks of the splice \(.*\); allowed: 0\.\.3, or "
        r"-4\.\.-1 counting from the end$"),
    "good+l3::layer-2": (
        "metric: per_layer_error, splice: [good, l3], options: {layer: 2}", "options.layer",
        r"index 2 is outside the 2 write hooks of the splice \(blocks\.2\.hook_resid_pre, "
        r"blocks\.3\.hook_resid_pre\); allowed: 0\.\.1, or -2\.\.-1 counting from the end$"),
    "short::next_token_agreement": (
        "metric: next_token_agreement, dictionaries: [short]", None,
        r"a transcoder_set of layers 0\.\.2 replaces part of a model of 4 layers "
        r"\(layer_3\.safetensors missing\); add the missing files, or give args: "
        r"\{layers: \[0, 1, 2\]\} to evaluate a replacement of those layers only$"),
}

# check id -> (check, verdict): beside the bad ones, in the same suite
GOOD_CHECKS = {
    "good::l0": ('metric: l0, dictionaries: [good], options: {features: [7]}, '
                 'threshold: "<= 100"', "pass"),
    "ct::layer-3": ("metric: per_layer_error, dictionaries: [ct], options: {layer: 3}",
                    "measured"),
    "ct::layer-minus-1": ("metric: per_layer_error, dictionaries: [ct], options: {layer: -1}",
                          "measured"),
    "good::clamp": ("metric: clamp_effect, dictionaries: [good], read: [l3], "
                    "options: {top_n: 8, pairs: 1, sequences: 1, value: 4.0}", "measured"),
}


def _short_set(directory: Path) -> None:
    """The zoo's transcoder set without its last layer's file."""
    directory.mkdir()
    zoo = loading.zoo_dir() / paths.dictionary_dir("ct-transcoders")
    (directory / "config.yaml").write_text((zoo / "config.yaml").read_text())
    for i in range(3):
        save_file(load_file(zoo / f"layer_{i}.safetensors"),
                  str(directory / f"layer_{i}.safetensors"))


def _checks_suite() -> tuple[str, dict[str, tuple[int, int]]]:
    """checks.yaml and each check's (line, index)."""
    entries = {**{cid: entry for cid, (entry, *_) in CHECK_CASES.items()},
               **{cid: entry for cid, (entry, _) in GOOD_CHECKS.items()}}
    text = HEAD + "".join(f'  - {{id: "{cid}", {entry}}}\n' for cid, entry in entries.items())
    lines = text.splitlines()
    where = {}
    for index, cid in enumerate(entries):
        (line,) = [n for n, t in enumerate(lines, start=1) if f'id: "{cid}"' in t]
        where[cid] = (line, index)
    return text, where


class Run:
    """The output and results of the one pytest run over every suite file."""

    def __init__(self, root: Path, out: str, where: dict[str, tuple[int, int]]) -> None:
        self.root, self.out, self.where = root, out, where
        (run_dir,) = sorted((root / "reports").iterdir())
        self.rows = pd.read_csv(run_dir / "results.csv", keep_default_na=False, na_values=[""])

    def section(self, title: str) -> str:
        """The body of the output section `____ title ____`."""
        match = re.search(rf"^_+ {re.escape(title)} _+$\n(.*?)(?=^_{{2,}} |^=====)", self.out,
                          re.M | re.S)
        assert match, f"no section {title!r} in:\n{self.out[-3000:]}"
        return match[1].strip()

    def row(self, check_id: str) -> dict:
        found = self.rows[self.rows["check_id"] == check_id]
        assert len(found) == 1, f"{len(found)} rows for {check_id!r}"
        return found.iloc[0].to_dict()


_RUN: dict[str, Run] = {}


@pytest.fixture
def run(pytester: pytest.Pytester) -> Run:
    """One in-process pytest run over every suite of this file, shared by its cases."""
    if "run" not in _RUN:
        suites = pytester.path / "suites"
        suites.mkdir()
        _short_set(suites / "short")
        for name, (check, *_) in COLLECTION_CASES.items():
            (suites / f"{name}.yaml").write_text(f"{HEAD}  - {check}\n")
        text, where = _checks_suite()
        (suites / "checks.yaml").write_text(text)
        result = pytester.runpytest("-m", "eval", "-p", "no:cacheprovider", "-rA",
                                    "--continue-on-collection-errors", "suites")
        _RUN["run"] = Run(pytester.path, "\n".join(result.outlines), where)
    return _RUN["run"]


@pytest.mark.parametrize("name", COLLECTION_CASES)
def test_a_value_no_computation_can_use_is_a_located_collection_error(run, name):
    _, field, message = COLLECTION_CASES[name]
    body = run.section(f"ERROR collecting suites/{name}.yaml")
    assert "Traceback" not in body and len(body.splitlines()) == 1, body
    line = HEAD.count("\n") + 1
    pattern = rf"^\S*suites/{name}\.yaml:{line}: checks\[0\]\.{re.escape(field)}: {message}"
    assert re.search(pattern, body), f"{pattern!r} vs {body!r}"


@pytest.mark.parametrize("check_id", CHECK_CASES)
def test_a_value_the_checks_dictionaries_cannot_serve_is_an_error_of_that_check(run, check_id):
    _, field, message = CHECK_CASES[check_id]
    line, index = run.where[check_id]
    if field is None:  # a problem of the dictionary entry it uses
        entry = HEAD.splitlines().index("  short: {circuit_tracer: short}") + 1
        where = rf"\S*suites/checks\.yaml:{entry}: dictionaries\.short: "
    else:
        where = rf"\S*suites/checks\.yaml:{line}: checks\[{index}\]\.{re.escape(field)}: "
    row = run.row(check_id)
    assert row["verdict"] == "error", row["message"]
    assert re.fullmatch(where + message, row["message"]), row["message"]
    shown = [t for t in run.out.splitlines() if t.startswith(f"{check_id}: [error] ")]
    assert len(shown) == 1 and re.fullmatch(rf"{re.escape(check_id)}: \[error\] {where}{message}",
                                            shown[0]), shown
    assert f"FAILED suites/checks.yaml::{check_id}" in run.out
    assert "Traceback" not in run.out


@pytest.mark.parametrize("check_id", GOOD_CHECKS)
def test_the_other_checks_of_the_suite_still_run(run, check_id):
    row = run.row(check_id)
    assert row["verdict"] == GOOD_CHECKS[check_id][1], row["message"]
    assert math.isfinite(float(row["value"]))
