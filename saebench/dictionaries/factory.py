"""`factory: "package.module:callable"` dictionaries: the callable, called with `args:`,
returns the dictionary (any object `saebench.splice.as_dictionary` adapts). It runs code the
suite names, so a suite must say `allow_factory: true`; a module next to the suite file is
importable without PYTHONPATH. Its hooks come from the object or the entry's `hook:`.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saebench import located

if TYPE_CHECKING:
    from saebench.suite import DictionarySpec

from saebench.dictionaries import DictionaryInfo, Format, register_format


def _probe(spec: DictionarySpec, suite_path: Path | None) -> DictionaryInfo:
    args = json.dumps(spec.args, sort_keys=True, default=str)
    return DictionaryInfo(spec.hook, spec.hook_out or spec.hook, None, None, None,
                          {"source": f"factory:{spec.ref} {args}"})


def _load(spec: DictionarySpec, device: str | torch.device, suite_path: Path | None,
          allow_factory: bool = False) -> Any:
    return _call_factory(spec, allow_factory, suite_path, f"dictionaries.{spec.name}")


@contextmanager
def _importable_from(directory: Path | None) -> Iterator[None]:
    """Modules beside the suite file importable for the block (a factory's `mymodule:fn`
    needs no PYTHONPATH); sys.path is restored afterwards."""
    if directory is None:
        yield
        return
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        sys.path.remove(str(directory))


def _call_factory(spec: DictionarySpec, allow_factory: bool, suite_path: Path | None,
                  field: str) -> Any:
    """Import `module:callable` and call it with the entry's args."""
    if not allow_factory:
        raise located.error_at(suite_path, spec.line, field,
                     f"factory {spec.ref!r} would run code named in the suite; set "
                     "allow_factory: true at the top of the suite (or pass "
                     "allow_factory=True) to allow it")
    module_name, _, attribute = spec.ref.partition(":")
    try:
        with _importable_from(Path(suite_path).parent if suite_path is not None else None):
            target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise located.error_at(suite_path, spec.line, field,
                     f"cannot import factory {spec.ref!r} ({located.first_line(err)})") from None
    if not callable(target):
        raise located.error_at(suite_path, spec.line, field,
                               f"factory {spec.ref!r} is not callable")
    return target(**spec.args)


register_format(Format(name="factory", ref="factory", probe=_probe, load=_load, keys=("args",),
                       runs_code=True, summary="'package.module:callable' called with args"))
