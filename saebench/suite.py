"""The suite schema: parse and validate a YAML suite into checks, with file:line errors.

A suite names a model, data, dictionaries, tasks and checks. `load_suite` turns the file
into a `Suite` of `Check`s (one check = one pytest item) and rejects bad input with a
`SuiteError` whose text is `file:line: field: message`, the field being the dotted path
of the offending entry (`checks[2].threshold`). `validate_resolved` repeats the checks
that need the loaded objects: hooks, widths and single-token task answers.

    >>> suite = load_suite("my_suite.yaml")         # the example below
    >>> [c.id for c in suite.checks][:2]
    ['resid-L0-topk16::ce_loss_recovered[zero]', 'resid-L1-topk16::ce_loss_recovered[zero]']

A complete suite (every key shown; only `model`, `dictionaries` and `checks` are required):

```yaml
suite: toy                    # name, default: the file's stem
model: zoo                    # "zoo" | a TransformerLens name (gpt2-small) | {path: model_dir}
                              # | {name: gpt2-small,
                              #    from_pretrained_kwargs: {center_writing_weights: true}}
data:                         # default: the zoo's held-out tokens
  source: zoo                 # zoo | {path: tokens.safetensors|.pt|.txt|.jsonl}
                              # | a list of them (`by: source` breaks a check down by it)
                              # | {hf: NeelNanda/pile-10k, split: train, column: text}
  n_tokens: 32768             # default: all of them
  context: 128                # default: the model's n_ctx (zoo: its rows)
  seed: 0
allow_factory: true           # `factory:` dictionaries run code: refused unless true
dictionaries:                 # name -> one of zoo: | path: | release: + sae_id: | factory:
  "resid-L{layer}-topk16": {zoo: "resid-L{layer}-topk16", for: {layer: [0, 1, 2, 3]}}
  resid-L2-poor: {zoo: resid-L2-poor}
  mine: {path: saes/my_sae}   # a sae_lens directory, relative to this file; `hook:` and
                              # `hook_out:` override the hooks its cfg.json names
  "res-jb-L{layer}": {release: gpt2-small-res-jb, sae_id: "blocks.{layer}.hook_resid_pre",
                      for: {layer: "0..11"}}          # "a..b" is an inclusive range
  custom: {factory: "mypkg.mod:make_sae", args: {width: 512}, hook: blocks.0.hook_resid_pre}
tasks:                        # name -> {zoo: ioi} | {path: tasks/x.jsonl}
  ioi: {zoo: ioi}
defaults:                     # applied to every check, overridable per check
  options: {ablation: zero, batch_size: 16}
  threshold: null
checks:
  - metric: ce_loss_recovered
    dictionaries: ["resid-L*"]          # names or globs: one check per matching dictionary
    options: {ablation: zero}
    threshold: ">= 0.85"                # "<op> <number>", or "ci_low >= 0.8" / "ci_high <= 0.1"
  - metric: ce_loss_recovered
    dictionaries: [resid-L2-poor]
    threshold: ">= 0.85"
    expect: fail                        # an xfail: the gate must reject this dictionary
  - metric: explained_variance
    dictionaries: ["resid-L*"]
    baseline: {tolerance: 0.005}        # vs --saebench-baseline: or {rel_tolerance: 0.02}
  - metric: ce_loss_recovered
    splice: [resid-L0-topk16, resid-L3-topk16]       # spliced together: one check on the set
    id: resid-L0+L3                     # optional id override
    threshold: ">= 0.8"
  - metric: logit_diff_recovered
    dictionaries: [resid-L2-topk16]
    task: ioi
    threshold: ">= 0.8"
```

Details of the contract:

- `{var}` placeholders in a dictionary's name are expanded over `for:` (a list or an
  inclusive range `"a..b"`; several variables expand to their product) and substituted in
  the entry's string fields (`zoo`, `path`, `release`, `sae_id`, `factory`, `hook`,
  `hook_out` and the
  string values of `args`). Names may use letters, digits and `_ . - /`.
- Paths (`path:` models, dictionaries, tasks and data) are relative to the suite file's
  directory and must exist when the suite is loaded.
- Check ids are `{set}::{metric}[{task},{options}]`: the set is the dictionary name, or the
  names of a spliced set joined by `+`; the brackets hold the task and the check's *own*
  options that change results (`OPTIONS`; `ablation` by value, the others as `key=value`)
  and are left out when empty. Ids must be unique; `id:` overrides one (`name` or
  `set::name`; pytest shows `file::set::name`, and `file::set` selects a whole set).
- `threshold: ">= 0.85"` must be quoted in YAML (a bare `>` starts a block scalar).
- `expect: fail` needs a threshold; `options` are checked against the metric's own
  (`Metric.options`) and those every check takes (`OPTIONS`); `defaults.options` apply to
  the checks whose metric takes them.
- `read:` (metrics that read a dictionary without splicing it, such as feature_fidelity)
  names one or more dictionaries, like `dictionaries:`; one check per dictionary read.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from saebench.options import (
    Option,
    boolean,
    choice_option,
    integer,
    non_negative,
    number,
    positive_int,
    quote,
)

MESSAGE_LIMIT = 1000
"""At most this many characters of a user's value are quoted in a message."""


class SuiteError(ValueError):
    """Bad suite input, located: `str(err)` is `file:line: field: message`.

        >>> str(SuiteError("toy.yaml", 12, "checks[2].threshold", "bad threshold"))
        'toy.yaml:12: checks[2].threshold: bad threshold'
    """

    def __init__(self, file: str, line: int, field: str, message: str) -> None:
        super().__init__(file, line, field, message)
        self.file, self.line, self.field, self.message = file, line, field, message

    def __str__(self) -> str:
        message = self.message
        if len(message) > MESSAGE_LIMIT:
            message = f"{message[:MESSAGE_LIMIT]}… ({len(message) - MESSAGE_LIMIT} characters cut)"
        return f"{self.file}:{self.line}: {self.field}: {message}"


# ---------------------------------------------------------------------------- thresholds

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq,
}
TARGETS = ("value", "ci_low", "ci_high", "margin", "margin_low", "margin_high")
MARGIN_TARGETS = TARGETS[3:]
"""Targets measured only with `random_baseline: true`: how much better than a random-weight
dictionary of the same shape the value is, and that difference's paired interval."""
_THRESHOLD_RE = re.compile(
    r"^\s*(?:(?P<target>[A-Za-z_]\w*)\s*)?(?P<op>>=|<=|==|>|<)\s*(?P<bound>\S+)\s*$")
_THRESHOLD_FORMS = ("expected '<op> <number>' (e.g. '>= 0.85') or '<target> <op> <number>' "
                    "(e.g. 'ci_low >= 0.8'), with op one of >=, >, <=, <, == and target one "
                    "of value, ci_low, ci_high, margin, margin_low, margin_high (the last "
                    "three need random_baseline: true)")


@dataclass(frozen=True)
class Threshold:
    """A pass condition on one column of a result row: `value`, `ci_low` or `ci_high`, or
    with a random baseline `margin`, `margin_low` or `margin_high`.

        >>> t = parse_threshold("ci_low >= 0.8")
        >>> t.passes({"value": 0.9, "ci_low": 0.85}), str(t)
        (True, 'ci_low >= 0.8')
    """

    target: str
    op: str
    bound: float

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"threshold target must be one of {', '.join(TARGETS)}, "
                             f"got {self.target!r}")
        if self.op not in _OPS:
            raise ValueError(f"threshold op must be one of {', '.join(_OPS)}, got {self.op!r}")
        if not math.isfinite(self.bound):
            raise ValueError(f"threshold bound must be a finite number, got {self.bound!r}")

    def passes(self, row: Mapping[str, float]) -> bool:
        """Whether `row[target] <op> bound`; a missing, NaN or infinite value never passes."""
        value = row.get(self.target)
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        return math.isfinite(value) and _OPS[self.op](value, self.bound)

    def __str__(self) -> str:
        prefix = "" if self.target == "value" else f"{self.target} "
        return f"{prefix}{self.op} {_number_text(self.bound)}"

    def decided_over(self, low: float, high: float) -> str | None:
        """"always" when every number in [low, high] passes, "never" when none does, else None.

            >>> [parse_threshold(t).decided_over(0, 1) for t in (">= 0", "> 0", ">= 2")]
            ['always', None, 'never']
        """
        test = _OPS[self.op]
        if self.op == "==":
            inside = low <= self.bound <= high
            return "always" if low == high == self.bound else (None if inside else "never")
        lower_side = self.op in (">=", ">")
        if test(low if lower_side else high, self.bound):
            return "always"
        if not test(high if lower_side else low, self.bound):
            return "never"
        return None


def _number_text(x: float) -> str:
    """`0.9`, `2`, `-inf`: a bound as a person writes it."""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def parse_threshold(text: str) -> Threshold:
    """Parse `">= 0.85"`, `"value < 2"`, `"ci_low >= 0.8"` or `"ci_high <= 0.1"`.

    Raises ValueError saying which forms are accepted.
    """
    if not isinstance(text, str):
        raise ValueError(f"a threshold is a quoted string such as '>= 0.85', got {quote(text)}")
    match = _THRESHOLD_RE.match(text)
    if match is None:
        raise ValueError(f"bad threshold {quote(text)}: {_THRESHOLD_FORMS}")
    target = match["target"] or "value"
    if target not in TARGETS:
        raise ValueError(f"bad threshold {quote(text)}: unknown target {target!r}; "
                         f"use one of {', '.join(TARGETS)}")
    try:
        bound = float(match["bound"])
    except ValueError:
        raise ValueError(f"bad threshold {quote(text)}: {quote(match['bound'])} is not a "
                         "number") from None
    if not math.isfinite(bound):
        raise ValueError(f"bad threshold {quote(text)}: the bound must be a finite number")
    return Threshold(target, match["op"], bound)


# ---------------------------------------------------------------------------- check options

@dataclass(frozen=True)
class Edit:
    """The `edits` option: set `features` of `dictionary` to `value` between encode and decode.

    `dictionary` may be left out in the YAML when the check has a single dictionary.
    """

    dictionary: str | None
    features: tuple[int, ...]
    value: float = 0.0


SEED_RANGE = (0, 2**63 - 1)
"""Seeds are what a torch generator takes: non-negative and below 2**63."""
MAX_POSITION = 2**31 - 1


def _seed(value: Any) -> int:
    seed = integer(value, SEED_RANGE[0])
    if seed > SEED_RANGE[1]:
        raise ValueError(f"must be an integer in [0, 2**63 - 1], got {quote(value)}")
    return seed


class _OutOfRange(ValueError):
    pass


def _position(value: Any) -> int:
    position = integer(value)
    if abs(position) > MAX_POSITION:
        raise _OutOfRange(f"position {quote(value)} is out of range (|position| <= 2**31 - 1)")
    return position


def _positions(value: Any) -> str | int | tuple[int, ...]:
    if value in ("all", "answer"):
        return value
    try:
        if isinstance(value, list) and value:
            return tuple(_position(v) for v in value)
        if not isinstance(value, list):
            return _position(value)
    except _OutOfRange:
        raise
    except ValueError:
        pass
    raise ValueError(f'must be "all", "answer" (task checks: each prompt\'s answer position), '
                     f"an integer or a non-empty list of integers (negative counts from the "
                     f"end), got {quote(value)}")


def _feature_ids(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of feature ids, got {quote(value)}")
    return tuple(integer(v, 0) for v in value)


def _edits(value: Any) -> tuple[Edit, ...]:
    form = "a list of {dictionary: name, features: [ints], value: number}"
    if not isinstance(value, list):
        raise ValueError(f"must be {form}, got {quote(value)}")
    edits = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"dictionary", "features", "value"} \
                or "features" not in item:
            raise ValueError(f"item {i} must be a mapping with features (and optionally "
                             f"dictionary and value): {form}, got {quote(item)}")
        dictionary = item.get("dictionary")
        if dictionary is not None and not isinstance(dictionary, str):
            raise ValueError(f"item {i}: dictionary must be a name, got {quote(dictionary)}")
        features = item["features"]
        features = [features] if not isinstance(features, list) else features
        try:
            feats = tuple(integer(f, 0) for f in features)
            value_ = number(item.get("value", 0.0))
        except ValueError as err:
            raise ValueError(f"item {i}: features are non-negative integers and value a "
                             f"number ({err})") from None
        if not feats:
            raise ValueError(f"item {i}: features must not be empty")
        edits.append(Edit(dictionary, feats, value_))
    return tuple(edits)


OPTIONS: dict[str, Option] = {
    "batch_size": Option("sequences per engine batch", positive_int, 16, in_id=None),
    "positions": Option('where to splice: "all", "answer", an integer or a list of integers',
                        _positions, "all", changes_passes=True),
    "error_term": Option("add the reconstruction error back (true) or not (false)", boolean,
                         False, changes_passes=True),
    "n_boot": Option("bootstrap resamples for the confidence interval", positive_int, 1000,
                     in_id=None),
    "seed": Option("seed for the bootstrap and random baselines", _seed, 0, in_id=None),
    "edits": Option("feature edits: [{dictionary, features: [ints], value}]", _edits, (),
                    changes_passes=True),
    "random_baseline": Option("also measure a random-weight dictionary of the same shape "
                              "(ratio metrics): random_value and the margin over it",
                              boolean, False),
    "features": Option("feature ids whose cards (contexts, logit lens) the report shows",
                       _feature_ids, (), in_id=None, indexes="feature"),
    "by": choice_option("a breakdown, one more row per bucket: none, position (buckets of "
                        "token position) or source (the data's sources)",
                        "none", "position", "source", in_id="key"),
}
"""The options every check takes; a metric's own options are in its `Metric.options`."""
SPLICE_ONLY = ("positions", "error_term")
"""Options that only a metric measured on a spliced run can take."""


def option_table(metric: str) -> dict[str, Option]:
    """The options a check on `metric` takes: the metric's own, then the common ones."""
    from saebench.metrics.registry import get_metric

    return {**get_metric(metric).options, **OPTIONS}


def every_option() -> dict[str, Option]:
    """Every option some check can take (what `defaults.options` may set)."""
    from saebench.metrics.registry import METRICS

    table: dict[str, Option] = {}
    for metric in METRICS.values():
        table |= metric.options
    return {**table, **OPTIONS}


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, Edit):
        features = "+".join(map(str, value.features))
        return f"{value.dictionary}:{features}={_render(value.value)}"
    if isinstance(value, tuple):
        return "[" + ",".join(_render(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class ModelSpec:
    """The suite's model: `kind` "zoo", "transformer_lens" (by `name`) or "path" (a local dir);
    `kwargs` go to `from_pretrained`."""

    kind: str
    name: str | None = None
    path: str | None = None
    kwargs: dict = field(default_factory=dict)
    line: int = field(default=0, compare=False, repr=False)


@dataclass(frozen=True)
class DataSpec:
    """Where tokens come from: `kind` "zoo" (held-out tokens), "path" (a token or text file),
    "hf" (a dataset `hf` with `split` and text `column`) or "sources" (several of them, in
    `sources`). `line` is that of `data:`."""

    kind: str = "zoo"
    path: str | None = None
    hf: str | None = None
    split: str | None = None
    column: str | None = None
    n_tokens: int | None = None
    context: int | None = None
    seed: int = 0
    line: int = 0
    sources: tuple[DataSpec, ...] = ()
    """With `kind` "sources": the sources, concatenated in order (`n_tokens` per source)."""


@dataclass(frozen=True)
class DictionarySpec:
    """One dictionary entry after `for:` expansion.

    `kind` is "zoo", "path", "release" or "factory"; `ref` is the zoo name, the resolved
    directory, the release, or the factory's "module:callable". `line` is the entry's line.
    """

    name: str
    kind: str
    ref: str
    release: str | None = None
    sae_id: str | None = None
    args: dict = field(default_factory=dict)
    hook: str | None = None
    hook_out: str | None = None
    line: int = 0


@dataclass(frozen=True)
class TaskSpec:
    """A prompt set: `kind` "zoo" (`ref` a zoo task name) or "path" (`ref` a JSONL file)."""

    name: str
    kind: str
    ref: str
    line: int = 0


@dataclass(frozen=True)
class Check:
    """One metric on one dictionary (or a set spliced together): one pytest item.

    `options` are the effective options (defaults merged with the check's own), sorted and
    hashable; `dict(check.options)` gives a mapping. `line` is the check's line.
    """

    id: str
    suite: str
    metric: str
    dictionaries: tuple[str, ...]
    task: str | None
    options: tuple[tuple[str, Any], ...]
    threshold: Threshold | None
    expect: str
    line: int
    where: str = ""
    """The check's entry in the file (`checks[3]`), for located errors."""
    tolerance: tuple[float | None, float | None] = (None, None)
    """How much worse than its baseline the value may be: (absolute, relative to the
    baseline's value); (None, None) takes the metric's default."""
    read: str | None = None
    """The dictionary the check reads without splicing (`read:`), for metrics that read one."""

    @property
    def group_key(self) -> tuple:
        """Checks that one engine run can compute share this key: the suite (its model and
        data), the dictionary set, the task and the options that change the passes (left out
        when equal to their default)."""
        passes = frozenset((k, v) for k, v in self.options
                           if k in OPTIONS and OPTIONS[k].changes_passes
                           and v != OPTIONS[k].default)
        return (self.suite, self.dictionaries, self.task, self.read, passes)


@dataclass(frozen=True)
class Suite:
    """A validated suite file."""

    path: Path
    name: str
    model: ModelSpec
    data: DataSpec
    dictionaries: dict[str, DictionarySpec]
    tasks: dict[str, TaskSpec]
    checks: tuple[Check, ...]
    allow_factory: bool = False


# ---------------------------------------------------------------------------- parsing

TOP_KEYS = ("suite", "model", "data", "allow_factory", "dictionaries", "tasks", "defaults",
            "checks")
MODEL_KEYS = ("name", "path", "from_pretrained_kwargs")
DATA_KEYS = ("source", "n_tokens", "context", "seed")
SOURCE_KEYS = ("path", "hf", "split", "column")
TOKEN_SUFFIXES = (".safetensors", ".pt", ".txt", ".jsonl")
TASK_KEYS = ("zoo", "path")


def _one_of(formats: Mapping) -> str:
    """`zoo:, path:, release: (with sae_id:) or factory:` for the formats' keys."""
    names = [f"{name}:" + (f" (with {', '.join(k + ':' for k in fmt.required)})"
                           if fmt.required else "") for name, fmt in formats.items()]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
DEFAULTS_KEYS = ("options", "threshold")
CHECK_KEYS = ("metric", "dictionaries", "splice", "read", "task", "options", "threshold",
              "expect", "id", "baseline")
BASELINE_KEYS = ("tolerance", "rel_tolerance")
EXPECT = ("pass", "fail")
MAX_EXPANSION = 10_000

_NAME_RE = re.compile(r"^[\w.\-/]+$")
_ZOO_NAME_RE = re.compile(r"^[\w.\-]+$")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_RANGE_RE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")
_NULL = "tag:yaml.org,2002:null"


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class _Map:
    """A YAML mapping with its keys' nodes: `items[key] = (key_node, value_node)`."""

    path: str
    items: dict[str, tuple[Node, Node]]

    def get(self, key: str) -> Node | None:
        return self.items[key][1] if key in self.items else None

    def sub(self, key: str) -> str:
        return _join(self.path, key)


class _Parser:
    """Walks the composed YAML tree; every error is a SuiteError with file, line and field."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = str(path)
        self.base = path.parent
        self.constructor = SafeConstructor()
        self.allow_factory = False
        self._zoo_names: list[str] | None = None
        self._metrics: list[str] | None = None

    def fail(self, where: Node | int, path: str, message: str) -> NoReturn:
        line = where if isinstance(where, int) else _line(where)
        raise SuiteError(self.file, line, path or "(top level)", message)

    # -- typed access --------------------------------------------------------

    def value(self, node: Node, path: str) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, TypeError, ValueError, RecursionError) as err:
            self.fail(node, path, f"cannot read this value: {err}")

    def describe(self, node: Node) -> str:
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, TypeError, ValueError):
            return quote(node.value)
        if value is None:
            return "nothing (null)"
        if isinstance(value, bool):
            return f"the boolean {str(value).lower()}"
        if isinstance(value, int | float):
            return f"the number {quote(value)}"
        return quote(value)

    def mapping(self, node: Node, path: str, allowed: Iterable[str] | None = None,
                required: Iterable[str] = ()) -> _Map:
        if not isinstance(node, MappingNode):
            self.fail(node, path, f"expected a mapping, got {self.describe(node)}")
        try:
            self.constructor.flatten_mapping(node)
        except yaml.YAMLError as err:
            self.fail(node, path, f"bad merge key: {err}")
        allowed = None if allowed is None else tuple(allowed)
        items: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node, path) if isinstance(key_node, ScalarNode) else None
            if not isinstance(key, str) or not key:
                self.fail(key_node, path, f"keys must be non-empty strings, got "
                                          f"{self.describe(key_node)}")
            if key in items:
                self.fail(key_node, _join(path, key),
                          f"duplicate key (first at line {_line(items[key][0])})")
            if allowed is not None and key not in allowed:
                self.fail(key_node, _join(path, key),
                          f"unknown key{_suggest(key, allowed)}; allowed keys: "
                          f"{', '.join(allowed)}")
            items[key] = (key_node, value_node)
        for key in required:
            if key not in items:
                self.fail(node, _join(path, key), "required key missing")
        return _Map(path, items)

    def sequence(self, node: Node, path: str) -> list[Node]:
        if not isinstance(node, SequenceNode):
            self.fail(node, path, f"expected a list, got {self.describe(node)}")
        return list(node.value)

    def scalar(self, node: Node, path: str, expected: str) -> Any:
        if not isinstance(node, ScalarNode):
            self.fail(node, path, f"expected {expected}, got {self.describe(node)}")
        return self.value(node, path)

    def string(self, node: Node, path: str) -> str:
        value = self.scalar(node, path, "a string")
        if not isinstance(value, str) or not value.strip():
            self.fail(node, path, f"expected a non-empty string, got {self.describe(node)}")
        return value

    def optional(self, node: Node | None, path: str, check: Callable[[Any], Any]) -> Any:
        """None for an absent or null value, else `check(value)`; its ValueError located."""
        if node is None:
            return None
        value = self.scalar(node, path, "a scalar")
        if value is None:
            return None
        try:
            return check(value)
        except ValueError as err:
            self.fail(node, path, str(err))

    def local_path(self, node: Node, path: str, text: str, kind: str) -> str:
        """`text` resolved against the suite's directory; it must be an existing `kind`."""
        try:
            resolved = (self.base / Path(text).expanduser()).resolve()
            found = resolved.is_dir() if kind == "directory" else resolved.is_file()
        except (OSError, RuntimeError, ValueError) as err:
            self.fail(node, path, f"bad path {text!r}: {err}")
        if not found:
            what = "not a directory" if resolved.is_file() else (
                "not a file" if resolved.exists() else "does not exist")
            self.fail(node, path, f"{kind} {text!r} {what} (looked for {resolved}, relative "
                                  f"to the suite file's directory)")
        return str(resolved)

    # -- sections --------------------------------------------------------------

    def suite(self, root: Node | None) -> Suite:
        if root is None:
            self.fail(1, "", "the suite file is empty; it needs model, dictionaries and checks")
        top = self.mapping(root, "", TOP_KEYS, required=("model", "dictionaries", "checks"))
        name = self.path.stem
        if (node := top.get("suite")) is not None:
            name = self.string(node, "suite")
        if (node := top.get("allow_factory")) is not None:
            self.allow_factory = bool(self.optional(node, "allow_factory", boolean))
        model = replace(self.model(top.items["model"][1]), line=_line(top.items["model"][0]))
        data = self.data(*top.items["data"]) if "data" in top.items else DataSpec()
        tasks = self.tasks(top.get("tasks"))
        dictionaries = self.dictionaries(top.items["dictionaries"][1])
        defaults, threshold = self.defaults(top.get("defaults"))
        checks = self.checks(top.items["checks"][1], name, dictionaries, tasks, defaults,
                             threshold, max(len(data.sources), 1))
        return Suite(self.path, name, model, data, dictionaries, tasks, checks,
                     self.allow_factory)

    def model(self, node: Node) -> ModelSpec:
        if isinstance(node, ScalarNode):
            name = self.string(node, "model")
            return ModelSpec("zoo", "zoo") if name == "zoo" else ModelSpec("transformer_lens",
                                                                             name)
        spec = self.mapping(node, "model", MODEL_KEYS)
        if ("name" in spec.items) == ("path" in spec.items):
            self.fail(node, "model", "give either name: (zoo or a TransformerLens model name) "
                                     "or path: (a local model directory)")
        kwargs: dict = {}
        if (kw := spec.get("from_pretrained_kwargs")) is not None:
            self.mapping(kw, "model.from_pretrained_kwargs")
            kwargs = self.value(kw, "model.from_pretrained_kwargs")
        if (path_node := spec.get("path")) is not None:
            text = self.string(path_node, "model.path")
            return ModelSpec("path", None, self.local_path(path_node, "model.path", text,
                                                           "directory"), kwargs)
        name = self.string(spec.items["name"][1], "model.name")
        if name == "zoo":
            if kwargs:
                self.fail(kw, "model.from_pretrained_kwargs", "the zoo model takes none")
            return ModelSpec("zoo", "zoo")
        return ModelSpec("transformer_lens", name, None, kwargs)

    def data(self, key_node: Node, node: Node) -> DataSpec:
        spec = self.mapping(node, "data", DATA_KEYS)
        n_tokens = self.optional(spec.get("n_tokens"), "data.n_tokens", positive_int)
        context = self.optional(spec.get("context"), "data.context", lambda v: integer(v, 2))
        seed = self.optional(spec.get("seed"), "data.seed", _seed) or 0
        common = dict(n_tokens=n_tokens, context=context, seed=seed, line=_line(key_node))
        source = spec.get("source")
        if not isinstance(source, SequenceNode):
            return self.source(source, "data.source", common)
        items = self.sequence(source, "data.source")
        if len(items) < 2:
            self.fail(source, "data.source", "a list of sources needs at least two (or give "
                                             "the one source itself)")
        parts = tuple(self.source(item, f"data.source[{i}]", common)
                      for i, item in enumerate(items))
        names = [source_name(p) for p in parts]
        if len(set(names)) < len(names):
            self.fail(source, "data.source", f"two sources have the same name ({', '.join(names)}"
                                             "); rename a file")
        return DataSpec("sources", sources=parts, **common)

    def source(self, source: Node | None, path: str, common: dict) -> DataSpec:
        """One data source: zoo, {path: file} or {hf: dataset, ...}."""
        if source is None or (isinstance(source, ScalarNode) and source.tag != _NULL
                              and self.value(source, path) == "zoo"):
            return DataSpec("zoo", **common)
        form = "zoo, {path: tokens file} or {hf: dataset, split: train, column: text}"
        if not isinstance(source, MappingNode):
            self.fail(source, path, f"expected {form} (or a list of them), got "
                                    f"{self.describe(source)}")
        src = self.mapping(source, path, SOURCE_KEYS)
        if ("path" in src.items) == ("hf" in src.items):
            self.fail(source, path, f"give either path: or hf: ({form})")
        if (path_node := src.get("path")) is not None:
            for key in ("split", "column"):
                if key in src.items:
                    self.fail(src.items[key][0], src.sub(key), "only applies to hf: data")
            text = self.string(path_node, f"{path}.path")
            if not text.endswith(TOKEN_SUFFIXES):
                self.fail(path_node, f"{path}.path",
                          f"expected a file ending in {', '.join(TOKEN_SUFFIXES)}, got {text!r}")
            return DataSpec("path", self.local_path(path_node, f"{path}.path", text, "file"),
                            **common)
        hf, split, column = (self.string(src.items[key][1], src.sub(key)) if key in src.items
                             else default for key, default in
                             (("hf", ""), ("split", "train"), ("column", "text")))
        return DataSpec("hf", None, hf, split, column, **common)

    def tasks(self, node: Node | None) -> dict[str, TaskSpec]:
        from saebench import loading

        if node is None:
            return {}
        tasks: dict[str, TaskSpec] = {}
        for name, (key_node, value_node) in self.mapping(node, "tasks").items.items():
            path = f"tasks.{name}"
            if not _NAME_RE.match(name):
                self.fail(key_node, path, "task names may use letters, digits and _ . - /")
            spec = self.mapping(value_node, path, TASK_KEYS)
            if len(spec.items) != 1:
                self.fail(value_node, path, "give exactly one of zoo: (a zoo task name) or "
                                            "path: (a JSONL file of prompt/answer/distractor)")
            kind, (_, ref_node) = next(iter(spec.items.items()))
            ref_path = spec.sub(kind)
            ref = self.string(ref_node, ref_path)
            if kind == "zoo" and not _ZOO_NAME_RE.match(ref):
                self.fail(ref_node, ref_path, f"{ref!r} is not a zoo task name")
            if kind == "path":
                # its rows are read when the suite is prepared: a bad row fails that task only
                ref = self.local_path(ref_node, ref_path, ref, "file")
            else:
                try:
                    loading.load_task(ref)
                except (OSError, ValueError) as err:
                    self.fail(ref_node, ref_path, str(err))
            tasks[name] = TaskSpec(name, kind, ref, _line(key_node))
        return tasks

    # -- dictionaries ------------------------------------------------------------

    def zoo_names(self, node: Node, path: str) -> list[str]:
        from saebench import loading

        if self._zoo_names is None:
            try:
                self._zoo_names = loading.zoo_dictionary_names()
            except (OSError, ValueError, KeyError) as err:
                self.fail(node, path, f"cannot read the zoo's catalogue: {err}")
        return self._zoo_names

    def expansions(self, name: str, key_node: Node, entry: _Map) -> list[dict[str, str]]:
        """The `for:` bindings of an entry: one dict of variable -> text per dictionary."""
        placeholders = list(dict.fromkeys(_PLACEHOLDER_RE.findall(name)))
        for_node = entry.get("for")
        if for_node is None:
            if placeholders:
                self.fail(key_node, entry.path, f"placeholder {{{placeholders[0]}}} in the "
                          f"name needs values: add for: {{{placeholders[0]}: [...]}}")
            return [{}]
        variables = self.mapping(for_node, entry.sub("for"))
        if not variables.items:
            self.fail(for_node, entry.sub("for"), "expected at least one variable")
        values: dict[str, list[str]] = {}
        total = 1
        for var, (var_node, list_node) in variables.items.items():
            path = _join(variables.path, var)
            if var not in placeholders:
                self.fail(var_node, path, f"{{{var}}} does not appear in the name {name!r}, "
                                          "so every expansion would get the same name")
            values[var] = self.for_values(list_node, path)
            total *= len(values[var])
            if total > MAX_EXPANSION:
                self.fail(for_node, entry.sub("for"),
                          f"expands to more than {MAX_EXPANSION} dictionaries")
        for placeholder in placeholders:
            if placeholder not in values:
                self.fail(key_node, entry.path, f"placeholder {{{placeholder}}} has no values "
                                                f"in for: (it has {', '.join(values)})")
        return [dict(zip(values, combo, strict=True))
                for combo in itertools.product(*values.values())]

    def for_values(self, node: Node, path: str) -> list[str]:
        form = 'a list of values or an inclusive range such as "0..11"'
        if isinstance(node, ScalarNode):
            text = self.value(node, path)
            match = _RANGE_RE.match(text) if isinstance(text, str) else None
            if match is None:
                self.fail(node, path, f"expected {form}, got {self.describe(node)}")
            start, stop = int(match[1]), int(match[2])
            if start > stop:
                self.fail(node, path, f"empty range {text!r}: the start is after the end")
            if stop - start >= MAX_EXPANSION:
                self.fail(node, path, f"range {text!r} has more than {MAX_EXPANSION} values")
            return [str(i) for i in range(start, stop + 1)]
        out = []
        for i, item in enumerate(self.sequence(node, path)):
            value = self.scalar(item, f"{path}[{i}]", "a string or a number")
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                self.fail(item, f"{path}[{i}]",
                          f"expected a string or a number, got {self.describe(item)}")
            out.append(str(value))
        if not out:
            self.fail(node, path, f"expected {form}, got an empty list")
        if len(set(out)) != len(out):
            self.fail(node, path, "values repeat, so expanded names would collide")
        return out

    def substitute(self, text: str, binding: Mapping[str, str], node: Node, path: str) -> str:
        def replace(match: re.Match) -> str:
            if match[1] not in binding:
                self.fail(node, path, f"placeholder {{{match[1]}}} has no values in for:")
            return binding[match[1]]

        return _PLACEHOLDER_RE.sub(replace, text)

    def dictionaries(self, node: Node) -> dict[str, DictionarySpec]:
        from saebench.dictionaries import COMMON_KEYS  # the formats import this module
        from saebench.dictionaries import FORMATS as formats

        entries = self.mapping(node, "dictionaries")
        if not entries.items:
            self.fail(node, "dictionaries", "no dictionaries defined")
        out: dict[str, DictionarySpec] = {}
        for template, (key_node, value_node) in entries.items.items():
            path = f"dictionaries.{template}"
            keys = (*formats, *COMMON_KEYS, *(k for f in formats.values() for k in f.keys))
            entry = self.mapping(value_node, path, tuple(dict.fromkeys(keys)))
            kinds = [k for k in formats if k in entry.items]
            if len(kinds) != 1:
                self.fail(value_node, path, "give exactly one of " + _one_of(formats)
                          + (f"; got {', '.join(kinds)}" if kinds else ""))
            kind, fmt = kinds[0], formats[kinds[0]]
            for key, (k_node, _) in entry.items.items():
                if key not in (kind, *COMMON_KEYS, *fmt.keys):
                    self.fail(k_node, entry.sub(key), f"does not apply to {kind}: dictionaries")
            for key in fmt.required:
                if key not in entry.items:
                    self.fail(value_node, entry.sub(key), f"required for {kind}: dictionaries")
            if fmt.runs_code and not self.allow_factory:
                self.fail(entry.items[kind][0], entry.sub(kind),
                          f"{kind} dictionaries run code from the suite; set "
                          "allow_factory: true at the top of the suite to allow them")
            for binding in self.expansions(template, key_node, entry):
                spec = self.dictionary(template, key_node, entry, kind, binding)
                if spec.name in out:
                    self.fail(key_node, path, f"dictionary {spec.name!r} is defined twice "
                                              f"(first at line {out[spec.name].line})")
                out[spec.name] = spec
        return out

    def dictionary(self, template: str, key_node: Node, entry: _Map, kind: str,
                   binding: Mapping[str, str]) -> DictionarySpec:
        name = self.substitute(template, binding, key_node, entry.path)
        if not _NAME_RE.match(name):
            self.fail(key_node, entry.path, f"dictionary name {name!r} may only use letters, "
                                            "digits and _ . - /")

        def text(key: str) -> str | None:
            node = entry.get(key)
            if node is None:
                return None
            return self.substitute(self.string(node, entry.sub(key)), binding, node,
                                   entry.sub(key))

        ref_node, ref_path = entry.items[kind][1], entry.sub(kind)
        ref = self.substitute(self.string(ref_node, ref_path), binding, ref_node, ref_path)
        from saebench.dictionaries import FORMATS

        fmt = FORMATS[kind]
        if fmt.ref == "zoo":
            names = self.zoo_names(ref_node, ref_path)
            if ref not in names:
                self.fail(ref_node, ref_path, f"the zoo has no dictionary {ref!r}"
                          f"{_suggest(ref, names)}; it has: {', '.join(names)}")
        elif fmt.ref == "directory":
            ref = self.local_path(ref_node, ref_path, ref, "directory")
        elif fmt.ref == "factory" and not _FACTORY_RE.match(ref):
            self.fail(ref_node, ref_path, f"expected 'package.module:callable', got {ref!r}")
        args: dict = {}
        if (args_node := entry.get("args")) is not None:
            self.mapping(args_node, entry.sub("args"))
            args = {k: self.substitute(v, binding, args_node, entry.sub("args"))
                    if isinstance(v, str) else v
                    for k, v in self.value(args_node, entry.sub("args")).items()}
        return DictionarySpec(name, kind, ref, release=ref if kind == "release" else None,
                              sae_id=text("sae_id"), args=args, hook=text("hook"),
                              hook_out=text("hook_out"), line=_line(key_node))

    # -- checks --------------------------------------------------------------------

    def metric(self, node: Node, path: str) -> str:
        from saebench.metrics.registry import metric_names

        name = self.string(node, path)
        if self._metrics is None:
            self._metrics = list(metric_names())
        if name not in self._metrics:
            self.fail(node, path, f"unknown metric {name!r}{_suggest(name, self._metrics)}; "
                                  f"known metrics: {', '.join(self._metrics)}")
        return name

    def options(self, node: Node | None, path: str, table: Mapping[str, Option],
                metric: str | None = None) -> dict[str, tuple[Any, Node, str]]:
        """Validated options (`table`: those allowed): key -> (value, value node, field)."""
        if node is None:
            return {}
        spec = self.mapping(node, path)
        for key, (key_node, _) in spec.items.items():
            if key not in table:
                known = every_option()
                what = (f"{metric} takes no option {key!r}" if metric and key in known
                        else f"unknown option {key!r}{_suggest(key, known)}")
                self.fail(key_node, spec.sub(key), f"{what}; "
                          f"{'its' if metric else 'known'} options: {', '.join(table)}")
        out = {}
        for key, (key_node, value_node) in spec.items.items():
            # an alias (`*name`) is the anchor's node, which starts where the anchor does
            blame = value_node if _line(value_node) >= _line(key_node) else key_node
            value = self.value(value_node, spec.sub(key))
            try:
                out[key] = (table[key].parse(value), blame, spec.sub(key))
            except ValueError as err:
                self.fail(blame, spec.sub(key), f"{err} ({table[key].help})")
        return out

    def threshold(self, node: Node, path: str) -> Threshold | None:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return None
        value = self.scalar(node, path, "a quoted threshold such as '>= 0.85'")
        try:
            return parse_threshold(value)
        except ValueError as err:
            self.fail(node, path, str(err))

    def defaults(self, node: Node | None) -> tuple[dict, Threshold | None]:
        if node is None:
            return {}, None
        spec = self.mapping(node, "defaults", DEFAULTS_KEYS)
        threshold = spec.get("threshold")
        return (self.options(spec.get("options"), "defaults.options", every_option()),
                None if threshold is None else self.threshold(threshold, "defaults.threshold"))

    def patterns(self, node: Node, path: str, defined: Mapping[str, DictionarySpec]
                 ) -> list[str]:
        """Dictionary names matching a name, a glob, or a list of them (defined order)."""
        items = [(node, path)] if isinstance(node, ScalarNode) else [
            (item, f"{path}[{i}]") for i, item in enumerate(self.sequence(node, path))]
        if not items:
            self.fail(node, path, "expected at least one dictionary name or pattern")
        names: list[str] = []
        for item, item_path in items:
            pattern = self.string(item, item_path)
            matches = [n for n in defined if fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                what = (f"pattern {pattern!r} matches no dictionary"
                        if any(c in pattern for c in "*?[")
                        else f"undefined dictionary {pattern!r}{_suggest(pattern, defined)}")
                if _PLACEHOLDER_RE.search(pattern):
                    glob = _PLACEHOLDER_RE.sub("*", pattern)
                    what += f" (checks refer to expanded names: use a glob such as {glob!r})"
                self.fail(item, item_path, f"{what}; defined: {', '.join(defined)}")
            names += [n for n in matches if n not in names]
        return names

    def checks(self, node: Node, suite: str, dictionaries: Mapping[str, DictionarySpec],
               tasks: Mapping[str, TaskSpec], defaults: dict, default_threshold: Threshold | None,
               sources: int = 1) -> tuple[Check, ...]:
        from saebench.metrics.registry import METRICS, get_metric

        items = self.sequence(node, "checks")
        if not items:
            self.fail(node, "checks", "no checks defined")
        out: list[Check] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            path = f"checks[{i}]"
            spec = self.mapping(item, path, CHECK_KEYS, required=("metric",))
            metric = self.metric(spec.items["metric"][1], spec.sub("metric"))
            if ("dictionaries" in spec.items) == ("splice" in spec.items):
                self.fail(item, path, "give either dictionaries: (one check per dictionary) "
                                      "or splice: (one check on the set spliced together)")
            key = "splice" if "splice" in spec.items else "dictionaries"
            names = self.patterns(spec.items[key][1], spec.sub(key), dictionaries)
            sets = [tuple(names)] if key == "splice" else [(n,) for n in names]
            if len(sets[0]) > 1 and getattr(get_metric(metric), "kind", "") == "reconstruction":
                self.fail(spec.items[key][1], spec.sub(key),
                          f"{metric} describes a single dictionary's reconstruction; it "
                          "cannot be measured on a spliced set")
            task = None
            is_task_metric = getattr(get_metric(metric), "kind", "") == "task"
            if (task_node := spec.get("task")) is not None:
                task = self.string(task_node, spec.sub("task"))
                if task not in tasks:
                    known = ", ".join(tasks) or "none"
                    self.fail(task_node, spec.sub("task"), f"undefined task {task!r}"
                              f"{_suggest(task, tasks)}; defined tasks: {known}")
                if not is_task_metric:
                    self.fail(task_node, spec.sub("task"), f"{metric} is measured on the "
                              "suite's token data, not on a task's prompts; remove task:")
            elif is_task_metric:
                self.fail(item, path, f"{metric} is measured on a task's prompts: give task:")
            reads = self.reads(item, spec, metric, dictionaries)
            table = option_table(metric)
            own = self.options(spec.get("options"), spec.sub("options"), table, metric)
            if getattr(get_metric(metric), "kind", "") == "reconstruction":
                for key in set(own) & set(SPLICE_ONLY):
                    self.fail(own[key][1], own[key][2], f"{metric} is measured on the "
                              "dictionary's reconstruction of every position, without "
                              f"splicing, so {key} does not apply")
            options = {**{k: v for k, v in defaults.items() if k in table}, **own}
            self.check_breakdown(metric, options, sources)
            if options.get("random_baseline", (False,))[0] \
                    and not get_metric(metric).random_baseline:
                _, node, where = options["random_baseline"]
                takers = [m.name for m in METRICS.values() if m.random_baseline]
                self.fail(node, where, f"random_baseline applies to the ratio metrics measured "
                          f"on token data ({', '.join(takers)}), not to {metric}")
            threshold = default_threshold
            if (threshold_node := spec.get("threshold")) is not None:
                threshold = self.threshold(threshold_node, spec.sub("threshold"))
            if threshold is not None:
                where = spec.get("threshold")
                self.check_threshold(metric, threshold, {k: v for k, (v, _, _) in options.items()},
                                     where or item, spec.sub("threshold") if where else
                                     f"{path}.threshold (from defaults.threshold)")
            expect = "pass"
            if (expect_node := spec.get("expect")) is not None:
                expect = self.scalar(expect_node, spec.sub("expect"), "pass or fail")
                if expect not in EXPECT:
                    self.fail(expect_node, spec.sub("expect"),
                              f"expected pass or fail, got {self.describe(expect_node)}")
                if expect == "fail" and threshold is None:
                    self.fail(expect_node, spec.sub("expect"),
                              "expect: fail needs a threshold for the check to fail")
            tolerance = self.tolerance(spec.get("baseline"), spec.sub("baseline"))
            custom_id = None
            if (id_node := spec.get("id")) is not None:
                custom_id = self.string(id_node, spec.sub("id"))
                parts = custom_id.split("::")
                if len(parts) > 2 or not all(part.strip() for part in parts):
                    self.fail(id_node, spec.sub("id"), f"{custom_id!r}: an id is `name` or "
                              "`set::name`, with non-empty parts")
                if len(sets) * len(reads) > 1:
                    self.fail(id_node, spec.sub("id"), f"this check expands to "
                              f"{len(sets) * len(reads)} checks, which cannot share one id")
            for members, read in itertools.product(sets, reads):
                resolved = self.resolve_edits(options, members)
                ident = custom_id or check_id(members, metric, task, {
                    k: resolved[k] for k in own}, read)
                where, where_path = (id_node, spec.sub("id")) if custom_id else (item, path)
                if ident in seen:
                    self.fail(where, where_path, f"duplicate check id {ident!r} (first from "
                              f"the check at line {seen[ident]}); set id: to tell them apart")
                seen[ident] = _line(item)
                out.append(Check(ident, suite, metric, members, task,
                                 tuple(sorted(resolved.items())), threshold, expect,
                                 _line(item), path, tolerance, read))
        return tuple(out)

    def check_breakdown(self, metric: str, options: dict[str, tuple[Any, Node, str]],
                        sources: int) -> None:
        """Refuse a `by:` breakdown the metric does not take, or `by: source` on data with
        one source."""
        from saebench.metrics.registry import get_metric

        by, node, where = options.get("by", ("none", None, ""))
        if by == "none":
            return
        takes = getattr(get_metric(metric), "breaks_down", ("position", "source"))
        if by not in takes:
            self.fail(node, where, f"{metric} has no breakdown by {by} (it takes: "
                                   f"{', '.join(takes) or 'none'})")
        if by == "source" and sources < 2:
            self.fail(node, where, "by: source needs data with several sources (data.source: "
                                   "a list)")

    def reads(self, item: Node, spec: _Map, metric: str, dictionaries: Mapping[str, DictionarySpec]
              ) -> list[str | None]:
        """The dictionaries a check reads without splicing (`read:`, one check each), or
        [None] for a metric that reads none."""
        from saebench.metrics.registry import get_metric

        takes = getattr(get_metric(metric), "reads", False)
        node = spec.get("read")
        if node is None:
            if takes:
                self.fail(item, spec.path, f"{metric} reads a dictionary it does not "
                          "splice: give read: (a name, a glob or a list of them)")
            return [None]
        if not takes:
            self.fail(node, spec.sub("read"), f"{metric} reads no other dictionary; remove "
                                              "read:")
        return self.patterns(node, spec.sub("read"), dictionaries)

    def tolerance(self, node: Node | None, path: str) -> tuple[float | None, float | None]:
        """A check's `baseline: {tolerance: 0.01}` or `{rel_tolerance: 0.02}`."""
        if node is None:
            return (None, None)
        spec = self.mapping(node, path, BASELINE_KEYS)
        if len(spec.items) != 1:
            self.fail(node, path, "give one of tolerance: (absolute) or rel_tolerance: (a "
                                  "share of the baseline's value)")
        values = [self.optional(spec.get(key), spec.sub(key), non_negative)
                  for key in BASELINE_KEYS]
        return (values[0], values[1])

    def check_threshold(self, metric: str, threshold: Threshold, options: dict[str, Any],
                        node: Node, path: str) -> None:
        """Refuse a threshold that the metric's range decides before anything is measured, or
        one on an interval the metric does not have."""
        from saebench.metrics.registry import get_metric

        spec = get_metric(metric)
        if threshold.target in MARGIN_TARGETS:
            if not options.get("random_baseline"):
                self.fail(node, path, f"'{threshold}' is on the margin over a random-weight "
                                      "dictionary: set options: {random_baseline: true}")
            return
        if threshold.target != "value" and not spec.bootstrap:
            on_value = f"{threshold.op} {_number_text(threshold.bound)}"
            self.fail(node, path, f"{metric} has no bootstrap interval (see its description), "
                                  f"so {threshold.target} is never measured; put the threshold "
                                  f"on its value ('{on_value}')")
        low, high = spec.value_range(options)
        decided = threshold.decided_over(low, high)
        if decided is not None:
            outcome = "can never fail" if decided == "always" else "can never pass"
            self.fail(node, path, f"'{threshold}' {outcome}: {metric} always lies in "
                                  f"[{_number_text(low)}, {_number_text(high)}]")

    def resolve_edits(self, options: dict[str, tuple[Any, Node, str]],
                      members: tuple[str, ...]) -> dict[str, Any]:
        """Option values, with each edit's dictionary filled in and checked against the set."""
        values = {k: v for k, (v, _, _) in options.items()}
        if "edits" not in options:
            return values
        _, node, path = options["edits"]
        edits = []
        for i, edit in enumerate(values["edits"]):
            if edit.dictionary is None:
                if len(members) != 1:
                    self.fail(node, path, f"item {i} must name its dictionary: the check "
                                          f"splices {', '.join(members)}")
                edit = Edit(members[0], edit.features, edit.value)
            elif edit.dictionary not in members:
                self.fail(node, path, f"item {i} edits {edit.dictionary!r}, which this check "
                                      f"does not splice ({', '.join(members)})")
            edits.append(edit)
        values["edits"] = tuple(edits)
        return values


def source_name(spec: DataSpec) -> str:
    """How a data source is named in breakdowns: `zoo`, its file's name, or the dataset."""
    if spec.kind == "path":
        return Path(spec.path).name
    return spec.hf if spec.kind == "hf" else spec.kind


def check_id(members: tuple[str, ...], metric: str, task: str | None,
             own: Mapping[str, Any], read: str | None = None) -> str:
    """A check's id, `set::metric[task,read=name,options]` (see the module docstring): the
    metric's own options first, then the common ones, each in its table's order.

        >>> check_id(("a",), "ce_loss_recovered", None, {"ablation": "zero"})
        'a::ce_loss_recovered[zero]'
    """
    parts = [task] if task else []
    parts += [f"read={read}"] if read else []
    for key, option in option_table(metric).items():
        if key in own and option.in_id is not None:
            value = _render(own[key])
            parts.append(value if option.in_id == "value" else f"{key}={value}")
    suffix = f"[{','.join(parts)}]" if parts else ""
    return f"{'+'.join(members)}::{metric}{suffix}"


def _compose(text: str, file: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        message = " ".join(str(p) for p in (err.context, err.problem) if p)
        if "block scalar" in message:
            message += ' (quote thresholds: threshold: ">= 0.85")'
        raise SuiteError(file, mark.line + 1 if mark else 1, "(yaml syntax)", message) from None
    except yaml.YAMLError as err:
        position = getattr(err, "position", None)
        line = text[:position].count("\n") + 1 if isinstance(position, int) else 1
        raise SuiteError(file, line, "(yaml syntax)", str(err)) from None
    except RecursionError:
        raise SuiteError(file, 1, "(yaml syntax)", "nested too deeply") from None


def load_suite(path: str | Path) -> Suite:
    """Read, parse and validate a suite file (safe YAML only).

    Zoo names, local paths and task files are checked now; hooks, widths and task tokens
    need the loaded objects and are checked by `validate_resolved`.

        >>> suite = load_suite("my_suite.yaml")
        >>> suite.checks[0].id
        'resid-L0-topk16::ce_loss_recovered[zero]'
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SuiteError(str(path), 1, "(file)", f"cannot read the suite file: {err}") from None
    return _Parser(path).suite(_compose(text, str(path)))


# ---------------------------------------------------------------------------- resolved objects

_D_MODEL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out",
                  "hook_attn_out", "hook_embed", "hook_pos_embed", "hook_mlp_in",
                  "hook_normalized")
_D_MLP_HOOKS = ("hook_pre", "hook_post", "hook_pre_linear")


def hook_width(cfg: Any, hook: str) -> tuple[int, str] | None:
    """The activation width at `hook` from a TransformerLens config, and what it is, or None
    for hooks whose width is not a config constant.

        >>> hook_width(model.cfg, "blocks.0.attn.hook_z")
        (128, 'n_heads * d_head')
    """
    parts = hook.split(".")
    last, module = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if last in _D_MODEL_HOOKS and module not in ("mlp", "attn"):
        return int(cfg.d_model), "d_model"
    if module == "mlp" and last in _D_MLP_HOOKS and cfg.d_mlp is not None:
        return int(cfg.d_mlp), "d_mlp"
    if module == "attn" and last in ("hook_z", "hook_q"):
        return int(cfg.n_heads * cfg.d_head), "n_heads * d_head"
    if module == "attn" and last in ("hook_k", "hook_v"):
        heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        return int(heads * cfg.d_head), "n_key_value_heads * d_head"
    return None


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def validate_resolved(suite: Suite, model: Any, dictionaries: Mapping[str, Any],
                      tasks: Mapping[str, list]) -> None:
    """Check loaded objects against the model: hooks exist, widths match, answers are tokens.

    `dictionaries` maps suite dictionary names to loaded objects (anything
    `saebench.splice.as_dictionary` adapts); `tasks` maps task names to their prompts.
    Each problem is a SuiteError at the dictionary's or task's entry in the suite.

        >>> validate_resolved(suite, model, {"mine": sae}, {"ioi": load_task("ioi")})
    """
    from saebench.splice import as_dictionary

    file = str(suite.path)
    for name, obj in dictionaries.items():
        spec = suite.dictionaries[name]
        try:
            adapted = as_dictionary(obj, name=name, hook=spec.hook)
        except (TypeError, ValueError) as err:
            raise SuiteError(file, spec.line, f"dictionaries.{name}",
                             f"cannot use what was loaded: {err}") from None
        validate_dictionary(file, spec, model, (",".join(adapted.read_hooks), adapted.d_in),
                            (",".join(adapted.write_hooks), adapted.d_out))
    if suite.data.context is not None and suite.data.context > model.cfg.n_ctx:
        raise SuiteError(file, suite.data.line, "data.context",
                         f"{suite.data.context} is longer than the model's n_ctx "
                         f"({model.cfg.n_ctx})")
    for name, prompts in tasks.items():
        validate_task(file, suite.tasks[name], model, prompts)


def validate_dictionary(file: str, spec: DictionarySpec, model: Any,
                        reads: tuple[str | None, int | None],
                        writes: tuple[str | None, int | None]) -> None:
    """The hooks a dictionary reads and writes, (hooks, width) each, fit the model: every
    hook exists and, where both are known, the widths agree. `hooks` is one hook name, a
    replacement model's comma-separated list, or None (unknown). A SuiteError at the entry
    if not."""
    where = f"dictionaries.{spec.name}"
    for role, (hooks, width) in (("reads", reads), ("writes", writes)):
        for hook in hooks.split(",") if hooks else ():
            _validate_hook(file, spec, model, where, role, hook, width)


def _validate_hook(file: str, spec: DictionarySpec, model: Any, where: str, role: str,
                   hook: str, width: int | None) -> None:
    """One hook of a dictionary exists in the model with the width the dictionary says."""
    if hook not in model.hook_dict:
        close = difflib.get_close_matches(hook, list(model.hook_dict), n=3)
        hint = f"; similar hooks: {', '.join(close)}" if close else ""
        raise SuiteError(file, spec.line, where,
                         f"{role} hook {quote(hook)}, which the model does not have{hint}")
    expected = hook_width(model.cfg, hook)
    if width is not None and expected is not None and int(width) != expected[0]:
        size = "d_in" if role == "reads" else "d_out"
        raise SuiteError(file, spec.line, where,
                         f"{size}={width}, but the model's activation at {hook!r} has "
                         f"width {expected[0]} ({expected[1]})")


def validate_task(file: str, spec: TaskSpec, model: Any, prompts: list) -> None:
    """Every prompt of a task fits the model: answers and distractors are single known
    tokens. A SuiteError at the task's entry if not."""
    if getattr(model, "tokenizer", None) is None:
        raise SuiteError(file, spec.line, f"tasks.{spec.name}",
                         "the model has no tokenizer, so answers cannot be checked")
    _check_single_tokens(model, prompts, file, spec)
    unk = model.tokenizer.unk_token_id
    for i, prompt in enumerate(prompts):
        ids = model.to_tokens(_field(prompt, "prompt"), prepend_bos=False, truncate=False)[0]
        problem = ("has no token" if len(ids) == 0 else
                   "holds words outside the tokenizer's vocabulary (they map to the unknown "
                   "token)" if unk is not None and bool((ids == unk).any()) else None)
        if problem is not None:
            raise SuiteError(file, spec.line, f"tasks.{spec.name}",
                             f"prompt {i} ({quote(_field(prompt, 'prompt'))}) {problem}")


def _check_single_tokens(model: Any, prompts: list, file: str, spec: TaskSpec) -> None:
    unk = model.tokenizer.unk_token_id
    verdicts: dict[str, str | None] = {}
    for i, prompt in enumerate(prompts):
        for key in ("answer", "distractor"):
            text = _field(prompt, key)
            if not isinstance(text, str) or not text:
                problem: str | None = "is not a non-empty string"
            else:
                if text not in verdicts:
                    verdicts[text] = _token_problem(model, text, unk)
                problem = verdicts[text]
            if problem is not None:
                raise SuiteError(file, spec.line, f"tasks.{spec.name}",
                                 f"prompt {i} ({_field(prompt, 'prompt')!r}): {key} {text!r} "
                                 f"{problem}; answers and distractors must be single tokens")


def _token_problem(model: Any, text: str, unk: int | None) -> str | None:
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        return f"is {len(ids)} tokens for the model's tokenizer ({pieces})"
    if unk is not None and ids[0] == unk:
        return "is not in the tokenizer's vocabulary (it maps to the unknown token)"
    return None
