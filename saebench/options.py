"""Check options: what each one is, its default, and its validator.

An `Option` belongs to a metric (`Metric.options`: `ablation` of ce_loss_recovered, `k` of
feature_ablation) or to every check (`saebench.suite.OPTIONS`: batch size, positions,
bootstrap); both the YAML parser and `saebench.evaluate` validate through it, so a
default or a range is stated once.

    >>> k = Option("how many top features", positive_int, 3)
    >>> k.parse(5), k.default
    (5, 3)
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saebench.dictionaries import DictionaryInfo

INDEX_KINDS = ("feature", "write_hook")
"""What an option's value may index (`Option.indexes`), checked by `index_problem` once the
check's dictionaries are known: `feature` ids of the check's one dictionary, each in
[0, d_sae); a `write_hook` of its splice, by position (negative from the end)."""
QUOTE_LIMIT = 200
"""At most this many characters of a user's value are quoted in a message."""
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 3, QUOTE_LIMIT, 60, 40
_QUOTE.maxdict = _QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxset = 6


def quote(value: Any) -> str:
    """`repr(value)`, bounded: nested containers and long strings are cut (a YAML alias bomb
    expands to millions of items; its message stays one line).

        >>> quote(list(range(100)))
        '[0, 1, 2, 3, 4, 5, ...]'
    """
    text = _QUOTE.repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[:QUOTE_LIMIT - 1] + "…"


@dataclass(frozen=True)
class Option:
    """One check option: its help text, validator and default; how it shows in check ids
    (`"value"`, `"key"` as key=value, or None); whether it changes the forward passes of
    every metric (`changes_passes`, the common options) or shapes the run of its own
    metric (`shapes_run`: checks differing in it never share an engine request); and, for
    `saebench.evaluate`, whether a row is reported per allowed value by default
    (`each`, with `choices`); `at_most` names a dictionary attribute (`d_sae`) the value may
    not exceed, and `indexes` what the value indexes (`INDEX_KINDS`), both checked once the
    dictionary's shape is known."""

    help: str
    parse: Callable[[Any], Any]
    default: Any = None
    in_id: str | None = "key"
    changes_passes: bool = False
    shapes_run: bool = False
    choices: tuple[str, ...] = ()
    each: bool = False
    at_most: str | None = None
    indexes: str | None = None

    def __post_init__(self) -> None:
        if self.indexes not in (None, *INDEX_KINDS):
            raise ValueError(f"indexes must be one of {INDEX_KINDS}, got {self.indexes!r}")

    def value(self, options: dict[str, Any], name: str) -> Any:
        """The validated value of option `name` in `options`, or the default."""
        if name not in options and self.default is None:
            return None
        value = options.get(name, self.default)
        try:
            return self.parse(value)
        except ValueError as err:
            raise ValueError(f"option {name}: {err} ({self.help})") from None


def integer(value: Any, minimum: int | None = None) -> int:
    """`value` as an int (not a bool), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {quote(value)}")
    if minimum is not None and value < minimum:
        raise ValueError(f"must be an integer >= {minimum}, got {quote(value)}")
    return value


def positive_int(value: Any) -> int:
    """`value` as an int >= 1."""
    return integer(value, 1)


def boolean(value: Any) -> bool:
    """`value`, which must be true or false."""
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {quote(value)}")
    return value


def number(value: Any) -> float:
    """`value` as a finite float (an int or float, not a bool, not NaN, not infinite): no
    computation can use an infinite edit or clamp, and an int beyond a float's range is one.

        >>> number(3)
        3.0
        >>> number(float("inf"))
        Traceback (most recent call last):
        ValueError: must be a finite number, got inf
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"must be a number, got {quote(value)}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ValueError(f"must be a finite number, got {quote(value)}")
    return result


def non_negative(value: Any) -> float:
    """`value` as a finite float >= 0."""
    result = number(value)
    if result < 0:
        raise ValueError(f"must be a finite number >= 0, got {quote(value)}")
    return result


def fraction(value: Any) -> float:
    """`value` as a float in [0, 1]."""
    result = number(value)
    if not 0 <= result <= 1:
        raise ValueError(f"must be a number in [0, 1], got {quote(value)}")
    return result


def choice(*allowed: str) -> Callable[[Any], str]:
    """A validator accepting exactly the strings `allowed`."""
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {quote(value)}")
        return value
    return parse


def choice_option(help: str, *allowed: str, in_id: str | None = "value",
                  shapes_run: bool = False, each: bool = False) -> Option:
    """An option taking one of `allowed`, the first being the default."""
    return Option(help, choice(*allowed), allowed[0], in_id=in_id, shapes_run=shapes_run,
                  choices=allowed, each=each)


def index_problem(table: Mapping[str, Option], values: Mapping[str, Any],
                  dictionaries: Mapping[str, DictionaryInfo | None], where: str) -> str | None:
    """The located problem (`<where>.<option>: ...`) of the first option of `table` whose
    value in `values` indexes what the check's `dictionaries` (name -> what its files say,
    in the check's order) do not have (`Option.indexes`); None when every value fits, or
    where a size is not known before loading (a factory's). Called at collection, so a
    check that cannot compute fails alone, before anything runs.

        >>> index_problem({"layer": LAYER}, {"layer": 5}, {"ct": info}, "s.yaml:9: checks[2]")
        's.yaml:9: checks[2].layer: index 5 is outside the 4 write hooks of the splice ...'
    """
    for name, option in table.items():
        value = values.get(name)
        if option.indexes == "feature" and value:
            problem = _feature_problem(value, dictionaries)
        elif option.indexes == "write_hook" and isinstance(value, int):
            problem = _hook_problem(value, dictionaries)
        else:
            continue
        if problem:
            return f"{where}.{name}: {problem}"
    return None


def _feature_problem(ids: tuple[int, ...], dictionaries: Mapping[str, DictionaryInfo | None]
                     ) -> str | None:
    """Feature ids address the features of a check's one dictionary, reading one hook and
    writing one (what `saebench.cards` makes cards for), and lie in [0, d_sae)."""
    if not dictionaries:
        return None
    (name, info), *others = dictionaries.items()
    if others or (info is not None and not info.single):
        what = (f"this check splices {len(others) + 1} dictionaries" if others
                else f"{name!r} is a replacement model")
        return (f"feature ids {quote(list(ids))} address the features of a check's one "
                f"dictionary that reads one hook and writes one; {what}")
    if info is None or info.d_sae is None:
        return None
    bad = [i for i in ids if i >= info.d_sae]
    if bad:
        return (f"feature ids {quote(bad)} are outside {name!r}, whose {info.d_sae} features "
                f"are 0..{info.d_sae - 1}")
    return None


def _hook_problem(index: int, dictionaries: Mapping[str, DictionaryInfo | None]) -> str | None:
    """A write hook index lies among the splice's write hooks (in the engine's order:
    each dictionary's, first occurrence), counted from 0 or, negative, from the end."""
    infos = list(dictionaries.values())
    if any(info is None or not info.write_hooks for info in infos):
        return None
    hooks = list(dict.fromkeys(h for info in infos for h in info.write_hooks))
    n = len(hooks)
    if -n <= index < n:
        return None
    shown = ", ".join(hooks[:4]) + (", ..." if n > 4 else "")
    return (f"index {index} is outside the {n} write hook{'s' if n > 1 else ''} of the splice "
            f"({shown}); allowed: 0..{n - 1}, or -{n}..-1 counting from the end")
