"""A catalogue of bad inputs, each with the outcome the user sees ("a gate that never passes
what it cannot vouch for").

- A problem of the whole suite (schema, model, data, tokens) is a collection error naming
  file, line and field, without a traceback (`SUITE_ERRORS`, `OPTION_ERRORS`,
  `THRESHOLD_ERRORS`, `TOKEN_ERRORS`).
- A problem of one dictionary, task or check fails just the checks that use it as
  `<check id>: [error] <file>:<line>: <field>: ...`, with a row of verdict `error` in
  results.csv, while the other checks of the suite still run and pass (`DICTIONARY_ERRORS`,
  `CHECK_ERRORS`, `TASK_ERRORS`); a NaN in a dictionary fails all its checks; a splice that
  changes nothing counted is `[empty]`; `error`, `unstable` and `empty` under `expect: fail`
  fail instead of xfailing.
- Option values that cannot work are a one-line usage error (`CLI_ERRORS`).
- `--saebench-resume` re-judges, recomputes or refuses stored rows (`RESUME_CASES`).
- A check's row does not depend on which other checks were selected.

To stay fast, most cases share one in-process pytest run (`catalogue`): every suite file of
the tables above lies in one directory and is collected with
`--continue-on-collection-errors`, so the model is loaded once, and each case asserts its
own part of that run's output and results.csv.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from saebench import loading
from saebench.checks import RunSettings, SuiteRun
from saebench.metrics.registry import METRICS
from saebench.suite import SuiteError, load_suite

pytest_plugins = ["pytester"]

HEAD = """\
model: zoo
data: {source: zoo, n_tokens: 1024}
defaults: {options: {n_boot: 50}}
"""
GOOD = "dictionaries: {good: {zoo: resid-L2-topk16}}\n"
L0_CHECK = 'checks: [{metric: l0, dictionaries: [good], threshold: "<= 100"}]\n'
IOI = "He walked to the farm. Then, Rose and Paul walked to the forest. Paul showed a flower to"
RUN_ARGS = ("-m", "eval", "-p", "no:cacheprovider", "-rA")


# ---------------------------------------------------------------------------- helpers

@dataclass
class Run:
    """What one pytest run left: its directory, exit code, whole output, and results.csv."""

    path: Path
    ret: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return f"{self.out}\n{self.err}"

    def run_dirs(self, report_dir: str = "reports") -> list[Path]:
        root = self.path / report_dir
        return sorted(root.iterdir()) if root.is_dir() else []

    def results(self, report_dir: str = "reports") -> pd.DataFrame:
        (run_dir,) = self.run_dirs(report_dir)
        return pd.read_csv(run_dir / "results.csv", keep_default_na=False,
                           na_values=[""])

    def row(self, check_id: str) -> dict:
        rows = self.results()
        found = rows[rows["check_id"] == check_id]
        assert len(found) == 1, f"{len(found)} rows for {check_id!r} in results.csv"
        return found.iloc[0].to_dict()

    def section(self, title: str) -> str:
        """The body of the output section headed `____ title ____` (a failure or an error
        while collecting), stripped."""
        lines = self.out.splitlines()
        head = re.compile(r"^_{2,} (.+?) _{2,}$")
        for i, line in enumerate(lines):
            match = head.match(line)
            if match and match[1] == title:
                body = []
                for rest in lines[i + 1:]:
                    if head.match(rest) or rest.startswith("====="):
                        break
                    body.append(rest)
                return "\n".join(body).strip()
        raise AssertionError(f"no output section {title!r}; output ends:\n{self.out[-4000:]}")


def run_pytest(pytester: pytest.Pytester, *args: str) -> Run:
    """An in-process pytest run. A warning raised while it configures itself (a resumed
    row it refuses) is printed on stderr by a plain run, but in process it reaches this
    test's warning recorder instead: saebench's are recorded here and added to `err`."""
    with warnings.catch_warnings(record=True) as caught:
        result = pytester.runpytest(*RUN_ARGS, *args)
    shown = [f"{w.category.__name__}: {w.message}" for w in caught
             if issubclass(w.category, UserWarning) and "saebench" in w.filename]
    return Run(pytester.path, result.ret, "\n".join(result.outlines),
               "\n".join([*result.errlines, *shown]))


_SHARED: dict[str, Run] = {}


def shared_run(name: str, pytester: pytest.Pytester, build: Callable[[Path], list[str]],
               *args: str) -> Run:
    """One pytest run shared by every case that asks for `name`: the first such case builds
    the files in its pytester directory (`build` returns the paths to collect) and runs it;
    later cases read the same output and results."""
    if name not in _SHARED:
        paths = build(pytester.path)
        pytester.syspathinsert()
        _SHARED[name] = run_pytest(pytester, *args, *paths)
    return _SHARED[name]


def line_of(text: str, fragment: str) -> int:
    """The 1-based number of the only line of `text` holding `fragment`."""
    found = [i for i, line in enumerate(text.splitlines(), start=1) if fragment in line]
    assert len(found) == 1, f"{fragment!r} is on lines {found}"
    return found[0]


def assert_collection_error(run: Run, file: str, line: int, field: str, message: str) -> str:
    """`file` failed to collect with one located line `file:line: field: <message regex>`,
    and no traceback."""
    body = run.section(f"ERROR collecting {file}")
    assert "Traceback" not in body and not re.search(r"\.py:\d+: in ", body), body
    assert len(body.splitlines()) == 1, body
    pattern = rf"^\S*{re.escape(file)}:{line}: {re.escape(field)}: .*{message}"
    assert re.search(pattern, body), f"{pattern!r} does not match:\n{body}"
    return body


def assert_collected(run: Run, file: str) -> None:
    """`file` was collected: its problems are those of its checks, not of the suite."""
    title = f"ERROR collecting {file}"
    assert title not in run.out, f"{title}:\n{run.section(title)}"


def assert_verdict(run: Run, check_id: str, verdict: str, message: str) -> dict:
    """`check_id` failed with `<check id>: [verdict] <message regex>` in the output, and its
    results.csv row has that verdict and message."""
    row = run.row(check_id)
    assert row["verdict"] == verdict, row["message"]
    assert re.search(message, row["message"]), f"{message!r} vs {row['message']!r}"
    shown = [line for line in run.out.splitlines()
             if line.startswith(f"{check_id}: [{verdict}] ")]
    assert shown, f"no line '{check_id}: [{verdict}] ...' in the output"
    assert re.search(message, shown[0]), shown[0]
    assert f"FAILED {run_suite_of(check_id)}::{check_id}" in run.out
    return row


def run_suite_of(check_id: str) -> str:
    """The node path of the catalogue suite holding `check_id`."""
    name = check_id.split("::")[0] if check_id.startswith("solo") else "items"
    return f"suites/{name}.yaml"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def ioi_rows(n: int) -> list[dict]:
    return [{"prompt": p.prompt, "answer": p.answer, "distractor": p.distractor}
            for p in loading.load_task("ioi")[:n]]


# ---------------------------------------------------------------------------- dictionaries

def _save(zoo: str, directory: Path) -> Path:
    loading.load_zoo_dictionary(zoo).save_model(str(directory))
    return directory


def _cfg(directory: Path, change: Callable[[dict], None]) -> None:
    path = directory / "cfg.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def _truncate(directory: Path) -> None:
    weights = directory / "sae_weights.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _pickle_weights(directory: Path) -> None:
    state = loading.load_zoo_dictionary("resid-L2-topk16").state_dict()
    torch.save(state, directory / "sae_weights.safetensors")


def _nan_b_dec(directory: Path) -> None:
    sae = loading.load_zoo_dictionary("resid-L2-topk16")
    with torch.no_grad():
        sae.b_dec[3] = math.nan
    sae.save_model(str(directory))


def _meta(key: str, value: str) -> Callable[[dict], None]:
    return lambda cfg: cfg["metadata"].__setitem__(key, value)


DAMAGES: dict[str, tuple[str | None, Callable[[Path], None]]] = {
    "empty-dir": (None, lambda d: d.mkdir()),
    "no-cfg": ("resid-L2-topk16", lambda d: (d / "cfg.json").unlink()),
    "no-weights": ("resid-L2-topk16", lambda d: (d / "sae_weights.safetensors").unlink()),
    "cfg-bad-json": ("resid-L2-topk16", lambda d: (d / "cfg.json").write_text("{d_in: 128")),
    "cfg-not-object": ("resid-L2-topk16", lambda d: (d / "cfg.json").write_text("[128]")),
    "unknown-arch": ("resid-L2-topk16", lambda d: _cfg(d, lambda c: c.update(
        architecture="mystery"))),
    "cfg-missing-d_sae": ("resid-L2-topk16", lambda d: _cfg(d, lambda c: c.pop("d_sae"))),
    "truncated": ("resid-L2-topk16", _truncate),
    "pickled": ("resid-L2-topk16", _pickle_weights),
    "cfg-vs-weights": ("resid-L2-topk16", lambda d: _cfg(d, lambda c: c.update(d_sae=2048))),
    "hook-absent": ("resid-L2-topk16", lambda d: _cfg(d, _meta("hook_name",
                                                              "blocks.9.hook_resid_pre"))),
    "width": ("mlp_post-L3-topk32", lambda d: _cfg(d, _meta("hook_name",
                                                           "blocks.2.hook_resid_pre"))),
    "write-hook-absent": ("transcoder-L3", lambda d: _cfg(d, _meta("hook_name_out",
                                                                  "blocks.3.hook_mlp_outt"))),
    "nan": (None, _nan_b_dec),
}


@pytest.fixture(scope="module")
def saes(tmp_path_factory) -> Path:
    """One damaged sae_lens directory per entry of DAMAGES, plus a good one, built once."""
    root = tmp_path_factory.mktemp("saes")
    _save("resid-L2-topk16", root / "good")
    for name, (zoo, damage) in DAMAGES.items():
        if zoo is not None:
            _save(zoo, root / name)
        damage(root / name)
    return root


# ---------------------------------------------------------------------------- suite errors

def _suite(middle: str = "", checks: str = L0_CHECK, head: str = HEAD,
           dictionaries: str = GOOD) -> str:
    return head + middle + dictionaries + checks


def _check(text: str) -> str:
    """A suite whose only check is `text` (a flow mapping on one line)."""
    return _suite(checks=f"checks:\n  - {text}\n")


def _options(options: str, metric: str = "ce_loss_recovered", threshold: str = ">= 0.5",
             task: str | None = None) -> str:
    on_task = f"task: {task}, " if task else ""
    return _suite(middle=f"tasks: {{{task}: {{zoo: ioi}}}}\n" if task else "",
                  checks=f'checks:\n  - {{metric: {metric}, dictionaries: [good], {on_task}'
                         f'options: {{{options}}}, threshold: "{threshold}"}}\n')


def _owner(option: str) -> tuple[str, str | None]:
    """A metric that takes `option` (ce_loss_recovered for the common ones), and the task
    its check needs (a task metric's)."""
    owner = next((m for m in METRICS.values() if option in m.options), None)
    if owner is None:
        return "ce_loss_recovered", None
    return owner.name, "ok" if owner.kind == "task" else None


BOMB = ("model:\n  name: gpt2-small\n  from_pretrained_kwargs:\n"
        "    a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(f"    {y}: &{y} [{', '.join([f'*{x}'] * 9)}]\n"
                  for x, y in zip("abcdefgh", "bcdefghi", strict=True))
        + GOOD + "checks:\n  - metric: ce_loss_recovered\n    dictionaries: [good]\n")

# name -> (suite text, fragment on the offending line, field, message regex)
SUITE_ERRORS: dict[str, tuple[str, str, str, str]] = {
    "unknown model name": (_suite().replace("model: zoo", "model: gpt2-smal"),
                           "model:", "model", r"'gpt2-smal' is not a TransformerLens model "
                           r"name.*gpt2-small"),
    "model dir without a config": (_suite().replace("model: zoo", "model: {path: empty_dir}"),
                                   "model:", "model", r"cannot read the model config"),
    "n_tokens below one row": (_suite().replace("n_tokens: 1024", "n_tokens: 100"),
                               "data:", "data", r"n_tokens 100 is less than one row of 128"),
    "n_tokens beyond the data": (_suite().replace("n_tokens: 1024", "n_tokens: 10000000"),
                                 "data:", "data", r"needs 78125 rows of 128 tokens.* has 581"),
    "context longer than n_ctx": (_suite().replace("n_tokens: 1024", "context: 256"),
                                  "data:", "data", r"context 256 is longer than the model's "
                                  r"n_ctx \(128\)"),
    "context of one token": (_suite().replace("n_tokens: 1024", "context: 1"),
                             "data:", "data.context", r"integer >= 2"),
    "unknown data.source key": (_suite().replace("source: zoo",
                                                 "source: {path: docs.jsonl, colum: text}"),
                                "data:", "data.source.colum", r"unknown key \(did you mean "
                                r"'column'\?\)"),
    "split on a path source": (_suite().replace("source: zoo",
                                                "source: {path: docs.jsonl, split: train}"),
                               "data:", "data.source.split", r"only applies to hf"),
    "unknown defaults.options key": (_suite().replace("{n_boot: 50}", "{n_boots: 50}"),
                                     "defaults:", "defaults.options.n_boots",
                                     r"unknown option 'n_boots' \(did you mean 'n_boot'\?\)"),
    "unknown edits key": (_options("edits: [{feature: [1]}]"), "edits", "checks[0].options.edits",
                          r"item 0 must be a mapping with features"),
    "allow_factory not a boolean": (_suite("allow_factory: yes please\n"), "allow_factory",
                                    "allow_factory", r"true or false"),
    "factory without allow_factory": (
        _suite(dictionaries='dictionaries:\n  f: {factory: "badfactories:good", '
                            'hook: blocks.2.hook_resid_pre}\n',
               checks='checks: [{metric: l0, dictionaries: [f], threshold: "<= 100"}]\n'),
        "factory:", "dictionaries.f.factory", r"allow_factory: true"),
    "missing dictionary directory": (
        _suite(dictionaries="dictionaries: {good: {path: saes_nowhere/x}}\n"),
        "saes_nowhere", "dictionaries.good.path", r"'saes_nowhere/x' does not exist"),
    "dictionary path is a file": (
        _suite(dictionaries="dictionaries: {good: {path: docs.jsonl}}\n"),
        "path: docs.jsonl", "dictionaries.good.path", r"'docs.jsonl' not a directory"),
    "positions on a reconstruction metric": (
        _options("positions: [0]", metric="l0"), "positions", "checks[0].options.positions",
        r"l0 is measured on the dictionary's reconstruction of every position.*positions does "
        r"not apply"),
    "alias bomb in edits": (BOMB + "    options: {edits: *i}\n", "options:",
                            "checks[0].options.edits", r"item 0 must be a mapping"),
    "alias bomb in positions": (BOMB + "    options: {positions: *i}\n", "options:",
                                "checks[0].options.positions", r"non-empty list of integers"),
}

# name -> (option text, field under checks[0].options, message regex)
OPTION_ERRORS: dict[str, tuple[str, str, str]] = {
    "batch_size 0": ("batch_size: 0", "batch_size", r"integer >= 1, got 0"),
    "n_boot -1": ("n_boot: -1", "n_boot", r"integer >= 1, got -1"),
    "positions true": ("positions: true", "positions", r"integer or a non-empty list"),
    "positions []": ("positions: []", "positions", r"non-empty list of integers.*got \[\]"),
    "positions 1.5": ("positions: 1.5", "positions", r"got 1\.5"),
    "positions beyond any sequence": ("positions: 100000000000000000000000", "positions",
                                      r"position 100000000000000000000000 is out of range"),
    "edits negative feature": ("edits: [{features: [-3]}]", "edits", r"non-negative integers"),
    "edits boolean feature": ("edits: [{features: [true]}]", "edits", r"non-negative integers"),
    "edits non-number value": ("edits: [{features: [3], value: big}]", "edits",
                               r"value a number.*'big'"),
    "edits NaN value": ("edits: [{features: [3], value: .nan}]", "edits", r"must be a number"),
    "edits not a list": ("edits: 3", "edits", r"must be a list of"),
    "edits empty features": ("edits: [{features: []}]", "edits", r"must not be empty"),
    "normalize bogus": ("normalize: bogus", "normalize", r"none, zero, mean, got 'bogus'"),
    "share bogus": ("share: bogus", "share", r"signed, abs, got 'bogus'"),
    "baseline bogus": ("baseline: bogus", "baseline", r"isotropic, covariance, got 'bogus'"),
    "k 0": ("k: 0", "k", r"integer >= 1, got 0"),
    "n_draws 0": ("n_draws: 0", "n_draws", r"integer >= 1, got 0"),
    "dense_threshold 1.5": ("dense_threshold: 1.5", "dense_threshold", r"in \[0, 1\], got 1\.5"),
    "error_term a string": ("error_term: 'yes'", "error_term", r"true or false, got 'yes'"),
    "seed 1.5": ("seed: 1.5", "seed", r"must be an integer, got 1\.5"),
    "seed beyond 64 bits": ("seed: 100000000000000000000000", "seed",
                            r"100000000000000000000000"),
    "ablation null": ("ablation: null", "ablation", r"one of zero, mean, got None"),
    "random_baseline a string": ("random_baseline: 'yes'", "random_baseline",
                                 r"true or false, got 'yes'"),
}

# name -> (metric, threshold, message regex): thresholds decided by the metric's range
THRESHOLD_ERRORS: dict[str, tuple[str, str, str]] = {
    "mse >= 0": ("mse", ">= 0", r"'>= 0' can never fail: mse always lies in \[0, inf\]"),
    "l0 >= 0": ("l0", ">= 0", r"can never fail"),
    "dead_fraction <= 1": ("dead_fraction", "<= 1", r"can never fail.*\[0, 1\]"),
    "cossim <= 1": ("cossim", "<= 1", r"can never fail.*\[-1, 1\]"),
    "dead_fraction >= 2": ("dead_fraction", ">= 2", r"can never pass"),
    "kl_div < 0": ("kl_div", "< 0", r"can never pass"),
    "explained_variance > 1": ("explained_variance", "> 1", r"can never pass"),
    "ci_low on dead_fraction": ("dead_fraction", "ci_low <= 0.5", r"no bootstrap interval.*"
                                r"put the threshold on its value \('<= 0.5'\)"),
    "ci_high on dead_fraction": ("dead_fraction", "ci_high <= 0.5", r"no bootstrap interval"),
    "margin without a random baseline": ("ce_loss_recovered", "margin_low >= 0.01",
                                         r"'margin_low >= 0.01' is on the margin over a "
                                         r"random-weight dictionary: set options: "
                                         r"\{random_baseline: true\}"),
}

def _tokens(name: str) -> Callable[[Path], None]:
    """A writer of the token file of TOKEN_ERRORS[name]."""
    from safetensors.torch import save_file

    def write(path: Path) -> None:
        rows = loading.load_heldout_tokens()[:8]
        content = {
            "float ids": {"tokens": rows.float()},
            "ids outside the vocabulary": {"tokens": rows.clone().index_fill_(1,
                                                                              torch.tensor([5]),
                                                                              9999)},
            "negative ids": {"tokens": -rows - 1},
            "rows longer than n_ctx": {"tokens": torch.zeros(4, 256, dtype=torch.long)},
            "empty tensor": {"tokens": torch.zeros(0, 128, dtype=torch.long)},
            "no tokens entry": {"ids": rows},
            "3-d tensor": {"tokens": rows.view(2, 4, 128)},
        }[name]
        save_file(content, str(path))
    return write


def _pickled_object(path: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"tokens": Path("x")}))


# name -> (file name, writer, message regex), for data: {source: {path: <file name>}}
TOKEN_ERRORS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "float ids": ("float.safetensors", _tokens("float ids"),
                  r"token ids must be integers, got dtype torch\.float32"),
    "ids outside the vocabulary": ("oov.safetensors", _tokens("ids outside the vocabulary"),
                                   r"token ids range over \[0, 9999\], outside the model's "
                                   r"vocabulary \[0, 156\)"),
    "negative ids": ("negative.safetensors", _tokens("negative ids"), r"outside the model's "
                     r"vocabulary"),
    "rows longer than n_ctx": ("wide.safetensors", _tokens("rows longer than n_ctx"),
                               r"rows of 256 tokens are longer than the model's n_ctx \(128\)"),
    "empty tensor": ("empty.safetensors", _tokens("empty tensor"),
                     r"(less than one row|needs 8 rows of 128 tokens, but \S+ has 0)"),
    "no tokens entry": ("nokey.safetensors", _tokens("no tokens entry"),
                        r"no 'tokens' entry \(found: ids\)"),
    "3-d tensor": ("cube.safetensors", _tokens("3-d tensor"), r"got shape \[2, 4, 128\]"),
    "pt list": ("list.pt", lambda p: torch.save([1, 2, 3], p), r"expected a tensor of token "
                r"ids, got list"),
    "pt pickled object": ("object.pt", _pickled_object, r"cannot read token ids"),
    "garbage safetensors": ("garbage.safetensors", lambda p: p.write_bytes(b"\x00" * 20),
                            r"cannot read token ids"),
    "jsonl bad JSON": ("docs_bad.jsonl", lambda p: p.write_text(
        '{"text": "Rose walked to the farm ."}\n{oops\n'), r"docs_bad\.jsonl:2: not valid JSON"),
    "jsonl without the text column": ("docs_body.jsonl", lambda p: p.write_text(
        '{"body": "Rose walked ."}\n'), r"docs_body\.jsonl:1: expected an object with a string "
        r"field 'text'"),
    "empty text file": ("empty.txt", lambda p: p.write_text("\n\n"),
                        r"(less than one row|needs 8 rows of 128 tokens, but \S+ has 0)"),
}


def _file_name(case: str) -> str:
    return re.sub(r"[^\w]+", "_", case).strip("_") + ".yaml"


def _collection_files(root: Path) -> dict[str, tuple[str, int, str, str]]:
    """Every collection-error case as a suite file in `root`: name -> (file, line, field,
    message regex)."""
    cases = {}
    (root / "empty_dir").mkdir()
    (root / "docs.jsonl").write_text('{"text": "Rose walked to the farm ."}\n')
    for name, (text, fragment, field, message) in SUITE_ERRORS.items():
        cases[name] = (text, line_of(text, fragment), field, message)
    for name, (option, field, message) in OPTION_ERRORS.items():
        metric, task = _owner(field)
        text = _options(option, metric=metric, task=task)
        cases[name] = (text, line_of(text, "- {metric"), f"checks[0].options.{field}", message)
    for name, (metric, threshold, message) in THRESHOLD_ERRORS.items():
        text = _check(f'{{metric: {metric}, dictionaries: [good], threshold: "{threshold}"}}')
        cases[name] = (text, line_of(text, "- {metric"), "checks[0].threshold", message)
    text = _options("random_baseline: true", metric="l0", threshold="<= 100")
    cases["random_baseline on l0"] = (
        text, line_of(text, "- {metric"), "checks[0].options.random_baseline",
        r"random_baseline applies to the ratio metrics measured on token data "
        r"\(ce_loss_recovered, kl_div_score\), not to l0")
    text = HEAD.replace("{n_boot: 50}}", '{n_boot: 50}, threshold: ">= 0"}') + GOOD + \
        "checks:\n  - metric: l0\n    dictionaries: [good]\n"
    cases["impossible default threshold"] = (text, line_of(text, "- metric"),
                                             "checks[0].threshold (from defaults.threshold)",
                                             r"'>= 0' can never fail: l0")
    for name, (file, writer, message) in TOKEN_ERRORS.items():
        writer(root / file)
        text = _suite().replace("source: zoo", f"source: {{path: {file}}}")
        cases[name] = (text, line_of(text, "data:"), "data.source.path", message)
    out = {}
    assert len({_file_name(name) for name in cases}) == len(cases)
    for name, (text, line, field, message) in cases.items():
        file = _file_name(name)
        (root / file).write_text(text)
        out[name] = (file, line, field, message)
    return out


COLLECTION_CASES = [*SUITE_ERRORS, *OPTION_ERRORS, *THRESHOLD_ERRORS,
                    "random_baseline on l0", "impossible default threshold", *TOKEN_ERRORS]


# ---------------------------------------------------------------------------- one suite,
# many bad dictionaries, tasks and checks

FACTORIES = '''\
"""Factories for the catalogue's suites."""
from saebench import loading


def good():
    return loading.load_zoo_dictionary("resid-L2-topk16")


def wrong_width():
    return loading.load_zoo_dictionary("mlp_post-L3-topk32")


def not_a_dictionary():
    return 42


def raises():
    raise RuntimeError("the factory broke")


def forward_raises():
    def reconstruct(x):
        raise RuntimeError("boom in forward")
    return reconstruct


NOT_CALLABLE = "a string"
'''

# dictionary name -> (entry, message regex of its [error])
FACTORY_ERRORS: dict[str, tuple[str, str]] = {
    "factory-unimportable": ('{factory: "no_such_module_xyz:make", hook: blocks.2.hook_resid_pre}',
                             r"cannot import factory 'no_such_module_xyz:make' "
                             r"\(ModuleNotFoundError"),
    "factory-no-attribute": ('{factory: "badfactories:missing", hook: blocks.2.hook_resid_pre}',
                             r"cannot import factory 'badfactories:missing' \(AttributeError"),
    "factory-not-callable": ('{factory: "badfactories:NOT_CALLABLE", '
                             'hook: blocks.2.hook_resid_pre}', r"is not callable"),
    "factory-non-dictionary": ('{factory: "badfactories:not_a_dictionary", '
                               'hook: blocks.2.hook_resid_pre}',
                               r"cannot adapt int as a dictionary"),
    "factory-raises": ('{factory: "badfactories:raises", hook: blocks.2.hook_resid_pre}',
                       r"RuntimeError: the factory broke"),
    "factory-wrong-width": ('{factory: "badfactories:wrong_width", '
                            'hook: blocks.2.hook_resid_pre}',
                            r"d_in=512, but the model's activation at 'blocks\.2\.hook_resid_pre'"
                            r" has width 128"),
}

# damaged dictionary -> message regex of its [error] (after `dictionaries.<name>: `)
DICTIONARY_ERRORS: dict[str, str] = {
    # (messages are cut to 300 characters, so each pattern stops before long paths could
    # push its end out)
    "empty-dir": r"empty-dir is not a sae_lens dictionary directory: expected cfg\.json and "
                 r"sae_weights\.safetensors",
    "no-cfg": r"no-cfg is not a sae_lens dictionary directory: expected cfg\.json",
    "no-weights": r"no-weights is not a sae_lens dictionary directory: expected cfg\.json",
    "cfg-bad-json": r"cfg\.json: not valid JSON",
    "cfg-not-object": r"cfg\.json: expected a JSON object",
    "unknown-arch": r"unknown architecture 'mystery'; sae_lens knows standard, gated",
    "cfg-missing-d_sae": r"cfg\.json: not a valid topk config \(TypeError",
    "truncated": r"sae_weights\.safetensors: (not a readable safetensors file|truncated)",
    "pickled": r"sae_weights\.safetensors: not a readable safetensors file",
    "cfg-vs-weights": r"W_enc has shape \[128, 1024\], but cfg\.json says \[128, 2048\]",
    "hook-absent": r"reads hook 'blocks\.9\.hook_resid_pre', which the model does not have; "
                   r"similar hooks: blocks\.\d\.hook_resid_pre",
    "width": r"d_in=512, but the model's activation at 'blocks\.2\.hook_resid_pre' has width "
             r"128 \(d_model\)",
    "write-hook-absent": r"writes hook 'blocks\.3\.hook_mlp_outt', which the model does not "
                         r"have",
}

# task name -> (rows of its JSONL file, message regex of its [error] after `tasks.<name>: `)
TASK_ERRORS: dict[str, tuple[list, str]] = {
    "two-token-answer": ([{"answer": "Rose Paul"}], r"prompt 1 .*answer 'Rose Paul' is 2 tokens"
                         r".*must be single tokens"),
    "two-token-distractor": ([{"distractor": "to the"}], r"distractor 'to the' is 2 tokens"),
    "unknown-answer": ([{"answer": "Zyzzyva"}], r"answer 'Zyzzyva' is not in the tokenizer's "
                       r"vocabulary"),
    "unknown-distractor": ([{"distractor": "Zyzzyva"}], r"distractor 'Zyzzyva' is not in the "
                           r"tokenizer's vocabulary"),
    "prompt-too-long": ([{"prompt": " ".join(["Rose"] * 200)}], r"\S+\.jsonl: prompt 1 has 201 "
                        r"tokens, more than the model's n_ctx \(128\)"),
    "pos-999": ([{"pos": 999}], r"\S+\.jsonl: prompt 1: answer position 999 is outside its "
                r"\d+ tokens"),
    "pos-minus-999": ([{"pos": -999}], r"\S+\.jsonl: prompt 1: answer position -999 is outside"),
    "bad-json": ('{"prompt": "a", "answer": "b", "distractor": "c"}\n{oops\n',
                 r"bad-json\.jsonl:2: not valid JSON"),
    "missing-field": ('{"prompt": "a", "answer": "b"}\n',
                      r"missing-field\.jsonl:1: field 'distractor' must be a non-empty string"),
    "unknown-field": ('{"prompt": "a", "answer": "b", "distractor": "c", "weight": 2}\n',
                      r"unknown field\(s\) \['weight'\]"),
    "row-not-an-object": ('["a", "b", "c"]\n', r"row-not-an-object\.jsonl:1: a row must be a "
                          r"JSON object"),
    "no-prompts": ("\n\n", r"no-prompts\.jsonl: no prompts"),
    "unknown-words": ([{"prompt": "Zyzzyva qwerty Rose"}], r"prompt 1 .* holds words outside "
                      r"the tokenizer's vocabulary"),
}

# check id -> (check entry after `id`, field after `checks[i].`, verdict, message regex)
CHECK_ERRORS: dict[str, tuple[str, str, str, str]] = {
    "good::edit-feature-5000": ("metric: ce_loss_recovered, dictionaries: [good], "
                                "options: {edits: [{features: [3, 5000]}]}",
                                "options.edits", "error",
                                r"features \[5000\] of 'good' are outside 0\.\.1023"),
    "good::k-5000": ("metric: feature_ablation, dictionaries: [good], task: ok, "
                     "options: {k: 5000}", "options.k", "error",
                     r"k=5000 is more than the dictionary's d_sae 1024"),
    "good::position-500": ("metric: ce_loss_recovered, dictionaries: [good], "
                           "options: {positions: 500}", "options.positions", "error",
                           r"positions \[500\] are out of range for sequences of length 128"),
    "good::position-minus-500": ("metric: kl_div, dictionaries: [good], "
                                 "options: {positions: -500}", "options.positions", "error",
                                 r"out of range for sequences of length 128"),
    "good::positions-1-and-200": ("metric: delta_ce, dictionaries: [good], "
                                  "options: {positions: [1, 200]}", "options.positions",
                                  "error", r"out of range"),
    "good::task-position-60": ("metric: logit_diff_recovered, dictionaries: [good], task: ok, "
                               "options: {positions: 60}", "options.positions", "error",
                               r"\[60\] lie outside prompt 0 of task 'ok', which has \d+ tokens"),
}

# check id -> (check entry, message regex of its [empty])
EMPTY_CHECKS: dict[str, tuple[str, str]] = {
    "good::bos-only": ("metric: ce_loss_recovered, dictionaries: [good], "
                       "options: {positions: 0}", r"nothing was measured for ce_loss_recovered"),
    "good::last-only": ("metric: ce_loss_recovered, dictionaries: [good], "
                        "options: {positions: -1}", r"nothing was measured.*n_pred_spliced is 0"),
    "good::bos-only-kl-score": ("metric: kl_div_score, dictionaries: [good], "
                                "options: {positions: [0]}", r"nothing was measured"),
    "good::task-bos-only": ("metric: sign_agreement, dictionaries: [good], task: ok, "
                            "options: {positions: 0}", r"nothing was measured for sign_agreement"),
}

NAN_METRICS = ("l0", "dead_fraction", "explained_variance", "ce_loss_recovered",
               "logit_diff_recovered")
PASSING = ("good::l0", "good::ce_loss_recovered", "good::logit_diff_recovered[ok]",
           "path-good::mse", "factory-good::cossim")


def _items_suite(root: Path, saes: Path) -> tuple[str, dict]:
    """items.yaml: good and bad dictionaries, tasks and checks in one suite."""
    write_jsonl(root / "ok.jsonl", ioi_rows(16))
    ok = ioi_rows(1)[0]
    for name, (rows, _) in TASK_ERRORS.items():
        if isinstance(rows, str):
            (root / f"{name}.jsonl").write_text(rows)
        else:
            write_jsonl(root / f"{name}.jsonl", [ok, *({**ok, **r} for r in rows)])
    lines = [HEAD.rstrip("\n"), "allow_factory: true", "tasks:", "  ok: {path: ok.jsonl}"]
    lines += [f"  {name}: {{path: {name}.jsonl}}" for name in TASK_ERRORS]
    lines += ["dictionaries:", "  good: {zoo: resid-L2-topk16}",
              f"  path-good: {{path: {json.dumps(str(saes / 'good'))}}}",
              "  factory-good: {factory: \"badfactories:good\", hook: blocks.2.hook_resid_pre}"]
    lines += [f"  {name}: {{path: {json.dumps(str(saes / name))}}}" for name in DAMAGES]
    lines += [f"  {name}: {entry}" for name, (entry, _) in FACTORY_ERRORS.items()]
    checks = [
        'id: "good::l0", metric: l0, dictionaries: [good], threshold: "<= 100"',
        'id: "good::ce_loss_recovered", metric: ce_loss_recovered, dictionaries: [good], '
        'threshold: ">= 0.5"',
        'id: "good::logit_diff_recovered[ok]", metric: logit_diff_recovered, '
        'dictionaries: [good], task: ok, threshold: ">= 0.5"',
        'id: "path-good::mse", metric: mse, dictionaries: [path-good], threshold: "<= 10"',
        'id: "factory-good::cossim", metric: cossim, dictionaries: [factory-good], '
        'threshold: ">= 0.5"',
    ]
    checks += [f'id: "{name}::l0", metric: l0, dictionaries: [{name}], threshold: "<= 100"'
               for name in (*DICTIONARY_ERRORS, *FACTORY_ERRORS)]
    checks += [f'id: "good::{name}", metric: logit_diff_recovered, dictionaries: [good], '
               f'task: {name}' for name in TASK_ERRORS]
    checks += [f'id: "{cid}", {entry}' for cid, (entry, *_) in CHECK_ERRORS.items()]
    checks += [f'id: "{cid}", {entry}' for cid, (entry, _) in EMPTY_CHECKS.items()]
    checks += [f'id: "nan::{m}", metric: {m}, dictionaries: [nan]'
               + (", task: ok" if m == "logit_diff_recovered" else "") for m in NAN_METRICS]
    checks += [
        'id: "factory-forward-raises::ce", metric: ce_loss_recovered, '
        'dictionaries: [factory-forward-raises], threshold: ">= 0.5"',
        'id: "nan::xfail-error", metric: ce_loss_recovered, dictionaries: [nan], '
        'threshold: ">= 0.9", expect: fail',
        'id: "good::xfail-empty", metric: ce_loss_recovered, dictionaries: [good], '
        'options: {positions: 0}, threshold: ">= 0.9", expect: fail',
        'id: "good::xfail-real", metric: ce_loss_recovered, dictionaries: [good], '
        'threshold: ">= 0.9999", expect: fail',
    ]
    lines.append("  factory-forward-raises: {factory: \"badfactories:forward_raises\", "
                 "hook: blocks.2.hook_resid_pre}")
    lines.append("checks:")
    lines += [f"  - {{{c}}}" for c in checks]
    text = "\n".join(lines) + "\n"
    index = {re.match(r'id: "([^"]+)"', c)[1]: i for i, c in enumerate(checks)}
    return text, index


def _single_sequence_suite() -> str:
    """solo-unstable.yaml: one sequence, so every interval is unstable."""
    return HEAD.replace("n_tokens: 1024", "n_tokens: 128") + GOOD + \
        'checks:\n  - {id: "solo-unstable::l0", metric: l0, dictionaries: [good], ' \
        'threshold: "<= 1", expect: fail}\n'


def _pos_bool_suite(root: Path) -> str:
    """solo-pos-bool.yaml: a task with `pos: true`, which should fail only its checks."""
    ok = ioi_rows(1)[0]
    write_jsonl(root / "pos_true.jsonl", [ok, {**ok, "pos": True}])
    return HEAD + "tasks: {t: {path: pos_true.jsonl}}\n" + GOOD + \
        'checks:\n  - {id: "solo-pos-bool::l0", metric: l0, dictionaries: [good], ' \
        'threshold: "<= 100"}\n  - {id: "solo-pos-bool::ld", metric: logit_diff_recovered, ' \
        'dictionaries: [good], task: t}\n'


SOLO_SUITES = {"solo-unstable.yaml": lambda root: _single_sequence_suite(),
               "solo-pos-bool.yaml": _pos_bool_suite}
CATALOGUE: dict[str, object] = {}


def _build_catalogue(saes: Path) -> Callable[[Path], list[str]]:
    def build(root: Path) -> list[str]:
        # Under `suites/` (the default suite directory), so that one path collects them all:
        # naming ~80 suite files one by one makes collection itself take many seconds.
        suites = root / "suites"
        suites.mkdir()
        CATALOGUE["collection"] = {
            name: (f"suites/{file}", *rest)
            for name, (file, *rest) in _collection_files(suites).items()}
        (root / "badfactories.py").write_text(FACTORIES)
        text, index = _items_suite(suites, saes)
        (suites / "items.yaml").write_text(text)
        CATALOGUE["items"] = (text, index)
        for name, make in SOLO_SUITES.items():
            (suites / name).write_text(make(suites))
        return ["--continue-on-collection-errors", "suites"]
    return build


@pytest.fixture
def catalogue(pytester, saes) -> Run:
    return shared_run("catalogue", pytester, _build_catalogue(saes))


def _where(check_id: str, field: str) -> str:
    text, index = CATALOGUE["items"]
    line = line_of(text, f'id: "{check_id}"')
    return rf"\S*items\.yaml:{line}: checks\[{index[check_id]}\]\.{re.escape(field)}: .*"


def _entry(name: str, section: str) -> str:
    text, _ = CATALOGUE["items"]
    line = line_of(text, f"  {name}: {{")
    return rf"\S*items\.yaml:{line}: {section}\.{re.escape(name)}: .*"


# ---------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("case", COLLECTION_CASES)
def test_suite_problem_is_a_located_collection_error(catalogue, case):
    file, line, field, message = CATALOGUE["collection"][case]
    body = catalogue.section(f"ERROR collecting {file}")
    assert len(body) <= 600, f"{len(body)} characters: {body[:300]}..."
    assert_collection_error(catalogue, file, line, field, message)


@pytest.mark.parametrize("check_id", PASSING)
def test_good_checks_beside_bad_ones_still_pass(catalogue, check_id):
    row = catalogue.row(check_id)
    assert row["verdict"] == "pass", row["message"]
    assert f"PASSED suites/items.yaml::{check_id}" in catalogue.out


@pytest.mark.parametrize("name", list(DICTIONARY_ERRORS))
def test_damaged_dictionary_is_an_error_of_its_checks(catalogue, name):
    assert_verdict(catalogue, f"{name}::l0", "error",
                   _entry(name, "dictionaries") + DICTIONARY_ERRORS[name])


@pytest.mark.parametrize("name", list(FACTORY_ERRORS))
def test_bad_factory_is_an_error_of_its_checks(catalogue, name):
    assert_verdict(catalogue, f"{name}::l0", "error",
                   _entry(name, "dictionaries") + FACTORY_ERRORS[name][1])


def test_a_dictionary_that_fails_in_the_forward_pass_is_an_error(catalogue):
    assert_verdict(catalogue, "factory-forward-raises::ce", "error",
                   r"the computation failed: RuntimeError: boom in forward")


@pytest.mark.parametrize("name", list(TASK_ERRORS))
def test_bad_task_is_an_error_of_its_checks(catalogue, name):
    assert_verdict(catalogue, f"good::{name}", "error",
                   _entry(name, "tasks") + TASK_ERRORS[name][1])


@pytest.mark.parametrize("check_id", list(CHECK_ERRORS))
def test_bad_check_option_is_an_error_of_that_check(catalogue, check_id):
    _, field, verdict, message = CHECK_ERRORS[check_id]
    assert_verdict(catalogue, check_id, verdict, _where(check_id, field) + message)


@pytest.mark.parametrize("check_id", list(EMPTY_CHECKS))
def test_a_splice_that_changes_nothing_counted_is_empty(catalogue, check_id):
    row = assert_verdict(catalogue, check_id, "empty", EMPTY_CHECKS[check_id][1])
    assert math.isnan(row["value"])


@pytest.mark.parametrize("metric", NAN_METRICS)
def test_nan_in_the_decoder_bias_fails_every_check_of_the_dictionary(catalogue, metric):
    unit = "prompt" if metric == "logit_diff_recovered" else "sequence"
    row = assert_verdict(catalogue, f"nan::{metric}", "error",
                         rf"dictionary 'nan' gives a non-finite reconstruction.* the first at "
                         rf"{unit} \d+, position \d+")
    assert math.isnan(row["value"])


@pytest.mark.parametrize("check_id", ["nan::xfail-error", "good::xfail-empty",
                                      "solo-unstable::l0"])
def test_expect_fail_never_hides_an_error_unstable_or_empty_verdict(catalogue, check_id):
    verdict = {"nan": "error", "good": "empty", "solo-unstable": "unstable"}[
        check_id.split("::")[0]]
    suite = run_suite_of(check_id)
    assert f"FAILED {suite}::{check_id}" in catalogue.out
    assert f"XFAIL {suite}::{check_id}" not in catalogue.out
    shown = [line for line in catalogue.out.splitlines() if line.startswith(f"{check_id}: ")]
    assert shown and shown[0].startswith(f"{check_id}: [{verdict}] "), shown
    if check_id == "solo-unstable::l0":
        assert "a single sequence" in shown[0]


def test_expect_fail_still_xfails_a_real_failure(catalogue):
    assert "XFAIL suites/items.yaml::good::xfail-real" in catalogue.out
    assert catalogue.row("good::xfail-real")["verdict"] == "xfail"


def test_a_boolean_answer_position_is_an_error_of_its_task_checks(catalogue):
    """`pos: true` in one task fails that task's checks; the suite's other checks run."""
    assert_collected(catalogue, "suites/solo-pos-bool.yaml")
    assert "PASSED suites/solo-pos-bool.yaml::solo-pos-bool::l0" in catalogue.out
    assert re.search(r"solo-pos-bool::ld: \[error\] \S*solo-pos-bool\.yaml:4: tasks\.t: .*pos",
                     catalogue.out)


# ---------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def api_models() -> dict:
    return {}


def _prepared(tmp_path: Path, text: str, models: dict) -> SuiteRun:
    path = tmp_path / "api.yaml"
    path.write_text(text)
    run = SuiteRun(load_suite(path), RunSettings(device="cpu"), models)
    run.prepare()
    return run


@pytest.mark.parametrize("name", ["truncated", "pickled", "hook-absent", "width",
                                  "unknown-arch"])
def test_damaged_dictionary_is_known_at_collection_without_loading(tmp_path, saes, api_models,
                                                                    name, monkeypatch):
    """prepare() (collection) finds the problem; nothing has to be computed or loaded."""
    from saebench import resolve

    def no_loading(*args, **kwargs):
        raise AssertionError("a path dictionary was loaded at collection")

    monkeypatch.setattr(resolve, "resolve_dictionary", no_loading)
    text = HEAD + f"dictionaries: {{bad: {{path: {json.dumps(str(saes / name))}}}}}\n" + \
        'checks: [{metric: l0, dictionaries: [bad], threshold: "<= 100"}]\n'
    run = _prepared(tmp_path, text, api_models)
    problem = run.problem(run.suite.checks[0])
    assert problem is not None and problem.verdict == "error"
    assert problem.message.startswith(f"{tmp_path / 'api.yaml'}:4: dictionaries.bad: ")
    row = run.result(run.suite.checks[0])
    assert row["verdict"] == "error" and math.isnan(row["value"])


def test_the_alias_bomb_message_is_bounded_in_the_api(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + "    options: {edits: *i}\n")
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    assert info.value.field == "checks[0].options.edits"
    assert len(str(info.value)) < 600


# ---------------------------------------------------------------------------- the CLI

CLI_ERRORS: dict[str, tuple[list[str], str]] = {
    "tokens -5": (["--saebench-tokens=-5"], r"--saebench-tokens -5: expected a positive"),
    "tokens 0": (["--saebench-tokens", "0"], r"--saebench-tokens 0: expected a positive"),
    "device gpu": (["--saebench-device=gpu"], r"--saebench-device 'gpu': expected cpu, cuda"),
    "device cuda:x": (["--saebench-device=cuda:x"], r"--saebench-device 'cuda:x'"),
    "dtype float8": (["--saebench-dtype=float8"], r"--saebench-dtype 'float8': expected one of"),
    "report dir is a file": (["--saebench-report-dir=mini.yaml"], r"--saebench-report-dir "
                             r"mini\.yaml: not a directory"),
    "resume of a missing directory": (["--saebench-resume=reports/none"],
                                      r"--saebench-resume: no run directory reports/none"),
    "resume of a file": (["--saebench-resume=mini.yaml"], r"--saebench-resume: no run directory"),
    "resume of a foreign results.csv": (["--saebench-resume=foreign"],
                                        r"--saebench-resume foreign: \S*results\.csv is not a "
                                        r"saebench results file: it has no check_id.*start a "
                                        r"new run"),
    "report dir inside a file": (["--saebench-report-dir=mini.yaml/reports"],
                                 r"--saebench-report-dir mini\.yaml/reports"),
    "seed beyond 64 bits": (["--saebench-seed=100000000000000000000000"],
                            r"--saebench-seed 100000000000000000000000"),
    "max memory lots": (["--saebench-max-memory=lots"],
                        r"--saebench-max-memory: memory size 'lots': expected a number of "
                        r"bytes or a size such as 512MiB"),
    "chunk positions 0": (["--saebench-chunk-positions=0"],
                          r"--saebench-chunk-positions: chunk positions 0: expected a "
                          r"positive integer"),
}
ARGPARSE_ERRORS = {"tokens abc": "--saebench-tokens=abc", "seed 1.5": "--saebench-seed=1.5"}


@pytest.fixture
def mini(pytester) -> pytest.Pytester:
    pytester.makefile(".yaml", mini=_suite())
    (pytester.path / "foreign").mkdir()
    (pytester.path / "foreign" / "results.csv").write_text("check,score\na::l0,3\n")
    return pytester


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_values_that_cannot_work_are_a_one_line_usage_error(mini, case):
    args, message = CLI_ERRORS[case]
    run = run_pytest(mini, "mini.yaml", *args)
    assert run.ret == pytest.ExitCode.USAGE_ERROR
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run.err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in run.text
    assert not run.run_dirs()


@pytest.mark.parametrize("case", list(ARGPARSE_ERRORS))
def test_cli_values_of_the_wrong_type_are_a_usage_error(mini, case):
    run = run_pytest(mini, "mini.yaml", ARGPARSE_ERRORS[case])
    assert run.ret == pytest.ExitCode.USAGE_ERROR
    assert "invalid int value" in run.err and "Traceback" not in run.text


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_on_a_machine_without_it_is_a_collection_error(mini, device):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run = run_pytest(mini, "mini.yaml", f"--saebench-device={device}")
    assert run.ret == pytest.ExitCode.INTERRUPTED
    body = run.section("ERROR collecting mini.yaml")
    assert "CUDA is not available" in body and "Traceback" not in body
    assert len(body.splitlines()) == 1, body


def test_a_token_count_the_suite_cannot_use_is_a_located_collection_error(mini):
    run = run_pytest(mini, "mini.yaml", "--saebench-tokens=100")
    assert run.ret == pytest.ExitCode.INTERRUPTED
    body = run.section("ERROR collecting mini.yaml")
    assert re.fullmatch(r"\S*mini\.yaml:2: data: n_tokens 100 is less than one row of 128 "
                        r"tokens", body), body


# ---------------------------------------------------------------------------- resume

RESUME_SUITE = HEAD + GOOD + """\
checks:
  - {metric: cossim, dictionaries: [good], threshold: ">= 0.9"}
  - {metric: l0, dictionaries: [good], threshold: "<= 100"}
  - {metric: explained_variance, dictionaries: [good], threshold: ">= 0.5"}
  - {metric: dead_fraction, dictionaries: [good], threshold: "<= 0.5"}
"""
RESUME_IDS = ["good::cossim", "good::l0", "good::explained_variance", "good::dead_fraction"]


def _base_run(root: Path) -> list[str]:
    (root / "r.yaml").write_text(RESUME_SUITE)
    return ["r.yaml"]


@pytest.fixture
def resumable(pytester) -> tuple[pytest.Pytester, Path, pd.DataFrame]:
    """A finished run of r.yaml copied into this test's directory, and its rows."""
    base = shared_run("resume-base", pytester, _base_run)
    assert base.ret == pytest.ExitCode.OK, base.out[-3000:]
    (source,) = base.run_dirs()
    target = pytester.path / "resumed" / source.name
    shutil.copytree(source, target)
    (pytester.path / "r.yaml").write_text(RESUME_SUITE)
    return pytester, target, pd.read_csv(target / "results.csv", keep_default_na=False,
                                         na_values=[""])


def _edit_csv(path: Path, check_id: str, **cells: str) -> None:
    rows = list(csv.reader(path.open(newline="")))
    header = rows[0]
    for row in rows[1:]:
        if row[header.index("check_id")] == check_id:
            for column, cell in cells.items():
                row[header.index(column)] = cell
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def _last_rows(run_dir: Path) -> pd.DataFrame:
    from saebench.results import read_results

    rows = read_results(run_dir).set_index("check_id")
    return rows.astype({"started_at": float})


def test_resume_rejudges_a_stored_value_against_a_tightened_threshold(resumable):
    pytester, run_dir, before = resumable
    (pytester.path / "r.yaml").write_text(RESUME_SUITE.replace('">= 0.9"', '">= 0.999"'))
    run = run_pytest(pytester, "r.yaml", f"--saebench-resume={run_dir}")
    assert "FAILED r.yaml::good::cossim" in run.out
    stored = before.set_index("check_id").loc["good::cossim"]
    assert re.search(rf"good::cossim: \[fail\] cossim = {stored['value']:.4g} .* fails >= 0.999",
                     run.out)
    after = _last_rows(run_dir)
    assert after.loc["good::cossim", "verdict"] == "fail"
    assert after.loc["good::cossim", "value"] == stored["value"]
    assert after.loc["good::cossim", "resumed"] == "re-judged"
    assert list(after.loc[RESUME_IDS[1:], "started_at"]) == list(
        before.set_index("check_id").loc[RESUME_IDS[1:], "started_at"])


def test_resume_with_another_token_count_recomputes(resumable):
    pytester, run_dir, before = resumable
    run = run_pytest(pytester, "r.yaml", f"--saebench-resume={run_dir}", "--saebench-tokens=2048")
    run_outcomes = re.findall(r"PASSED r\.yaml::(\S+)", run.out)
    assert sorted(run_outcomes) == sorted(RESUME_IDS)
    after = _last_rows(run_dir)
    old = before.set_index("check_id")
    for check_id in RESUME_IDS:
        assert after.loc[check_id, "token_set"] != old.loc[check_id, "token_set"]
        assert after.loc[check_id, "resumed"] == "recomputed"
        assert after.loc[check_id, "started_at"] > old.loc[check_id, "started_at"]


def _torn(path: Path, check_id: str) -> None:
    data = path.read_bytes()
    assert data.rstrip(b"\n").rsplit(b"\n", 1)[1].split(b",")[2].decode() == check_id
    path.write_bytes(data[:-40])


RESUME_CASES: dict[str, tuple[str, Callable[[Path], None], str | None]] = {
    "non-numeric value": ("good::l0", lambda p: _edit_csv(p, "good::l0", value="sixteen"),
                          r"refused.*good::l0.*column 'value' holds 'sixteen'"),
    "verdict contradicting value and threshold": (
        "good::explained_variance",
        lambda p: _edit_csv(p, "good::explained_variance", verdict="fail"),
        r"refused.*good::explained_variance: verdict fail, but value .* meets >= 0\.5"),
    "pass without a value": ("good::cossim", lambda p: _edit_csv(p, "good::cossim", value=""),
                             r"refused.*good::cossim: verdict pass without a finite value"),
    "unknown verdict": ("good::l0", lambda p: _edit_csv(p, "good::l0", verdict="probably"),
                        r"refused.*good::l0: unknown verdict 'probably'"),
    "torn last line": ("good::dead_fraction", lambda p: _torn(p, "good::dead_fraction"),
                       r"torn last row"),
    "stored error row": ("good::cossim", lambda p: _edit_csv(p, "good::cossim", verdict="error",
                                                             value="", message="it broke"),
                         None),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_refuses_a_damaged_row_and_recomputes_only_its_check(resumable, case):
    pytester, run_dir, before = resumable
    damaged, damage, warning = RESUME_CASES[case]
    damage(run_dir / "results.csv")
    run = run_pytest(pytester, "r.yaml", f"--saebench-resume={run_dir}")
    assert warning is None or re.search(warning, run.text), run.text[-3000:]
    assert sorted(re.findall(r"PASSED r\.yaml::(\S+)", run.out)) == sorted(RESUME_IDS)
    after = _last_rows(run_dir)
    old = before.set_index("check_id")
    if case != "torn last line":  # a torn row is dropped, so its check has no row at all
        assert after.loc[damaged, "resumed"] == "recomputed"
    assert after.loc[damaged, "started_at"] > old.loc[damaged, "started_at"]
    assert after.loc[damaged, "verdict"] == "pass"
    intact = [c for c in RESUME_IDS if c != damaged]
    assert list(after.loc[intact, "started_at"]) == list(old.loc[intact, "started_at"])


def test_resume_recomputes_a_check_whose_dictionary_changed(pytester, saes):
    """The same path, other weights: the stored row is stale and must not be reused."""
    shutil.copytree(saes / "good", pytester.path / "sae")
    pytester.makefile(".yaml", changed=HEAD + "dictionaries: {mine: {path: sae}}\n" +
                      'checks: [{metric: mse, dictionaries: [mine], threshold: "<= 10"}]\n')
    first = run_pytest(pytester, "changed.yaml")
    (run_dir,) = first.run_dirs()
    before = _last_rows(run_dir).loc["mine::mse"]
    sae = loading.SAE.load_from_disk(str(pytester.path / "sae"))
    with torch.no_grad():
        sae.b_dec += 0.5
    sae.save_model(str(pytester.path / "sae"))
    run_pytest(pytester, "changed.yaml", f"--saebench-resume={run_dir}")
    after = _last_rows(run_dir).loc["mine::mse"]
    assert after["resumed"] == "recomputed"
    assert after["started_at"] > before["started_at"]
    assert after["value"] != before["value"]


# ---------------------------------------------------------------------------- selection

SELECTION_SUITE = HEAD + GOOD + """\
checks:
  - {id: "good::draws2", metric: pathological_error, dictionaries: [good], options: {n_draws: 2}}
  - {id: "good::draws3", metric: pathological_error, dictionaries: [good], options: {n_draws: 3}}
"""
COLUMNS = ["value", "ci_low", "ci_high", "n", "verdict", "message"]


@pytest.mark.parametrize("n_draws", [2, 3])
def test_a_check_gives_the_same_row_alone_as_together(pytester, n_draws):
    check_id = f"good::draws{n_draws}"

    def build(root: Path) -> list[str]:
        (root / "sel.yaml").write_text(SELECTION_SUITE)
        return ["sel.yaml"]

    together = shared_run("selection", pytester, build)
    rows = together.results().set_index("check_id")
    assert check_id in rows.index, list(rows.index)
    if not (pytester.path / "sel.yaml").exists():
        (pytester.path / "sel.yaml").write_text(SELECTION_SUITE)
    alone = run_pytest(pytester, "sel.yaml", "-k", f"draws{n_draws}",
                       "--saebench-report-dir=alone")
    alone_rows = alone.results("alone").set_index("check_id")
    assert list(alone_rows.index) == [check_id]
    pd.testing.assert_series_equal(alone_rows.loc[check_id, COLUMNS],
                                   rows.loc[check_id, COLUMNS], check_names=False)


