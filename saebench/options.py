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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    not exceed, checked once the dictionary's shape is known."""

    help: str
    parse: Callable[[Any], Any]
    default: Any = None
    in_id: str | None = "key"
    changes_passes: bool = False
    shapes_run: bool = False
    choices: tuple[str, ...] = ()
    each: bool = False
    at_most: str | None = None

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
    """`value` as a float (an int or float, not a bool, not NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"must be a number, got {quote(value)}")
    return float(value)


def non_negative(value: Any) -> float:
    """`value` as a finite float >= 0."""
    result = number(value)
    if not 0 <= result < math.inf:
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
