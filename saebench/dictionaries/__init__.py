"""The dictionary formats a suite can name, one module each, in one registry.

A format is the YAML key of a dictionary entry (`zoo:`, `path:`, `release:`, `factory:`),
the further keys it takes, how its value is checked when the suite is parsed, and two
functions: `probe` reads what the entry's files say without loading weights (hooks, widths,
identity), `load` returns the live object, which `saebench.splice.as_dictionary` adapts (or,
for a replacement model, a tuple of adapted `splice.Dictionary` parts).
Every entry may also give `hook:` and `hook_out:` (its read and write hooks). A new format
is one module that calls `register_format`:

    register_format(Format(name="mine", ref="directory", probe=probe, load=load,
                           summary="a directory written by my trainer"))

This module imports nothing heavy: the formats import their libraries when they load.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REF_KINDS = ("zoo", "directory", "name", "factory")
"""What an entry's value is: a zoo dictionary name, a directory (relative to the suite
file), a name passed on as it is (a release), or a factory's `module:callable`."""
COMMON_KEYS = ("hook", "hook_out", "for")
"""Keys every dictionary entry may give besides its format's own."""


@dataclass(frozen=True)
class DictionaryInfo:
    """What a dictionary entry's files say before its weights are loaded.

    Hooks and widths are None where the format does not say without loading (releases,
    factories); a replacement model (several parts, one per layer) lists its hooks
    comma-separated and counts the features of every part in `d_sae`; `identity` names
    exactly which dictionary this is (its source and a hash of its files), so a stored
    result can be matched to it.
    """

    read_hook: str | None
    write_hook: str | None
    d_in: int | None
    d_out: int | None
    d_sae: int | None
    identity: dict[str, str]
    architecture: str | None = None

    @property
    def read_hooks(self) -> tuple[str, ...]:
        """The hooks read (a replacement model's `read_hook` lists several, comma-separated)."""
        return tuple(self.read_hook.split(",")) if self.read_hook else ()

    @property
    def write_hooks(self) -> tuple[str, ...]:
        """The hooks written, as `read_hooks`."""
        return tuple(self.write_hook.split(",")) if self.write_hook else ()

    @property
    def single(self) -> bool:
        """Whether the entry reads one hook and writes one (not a replacement model); True
        while its hooks are unknown."""
        return len(self.read_hooks) <= 1 and len(self.write_hooks) <= 1


@dataclass(frozen=True)
class Format:
    """One dictionary format.

    `probe(spec, suite_path) -> DictionaryInfo` and `load(spec, device, suite_path,
    allow_factory) -> object` raise a located error (`saebench.located.error_at`) for a
    problem of the entry; `keys` are the format's own YAML keys, `required` those of them it
    cannot do without; `runs_code` formats need `allow_factory: true` in the suite.
    """

    name: str
    ref: str
    probe: Callable[..., DictionaryInfo]
    load: Callable[..., Any]
    summary: str
    keys: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    runs_code: bool = False

    def __post_init__(self) -> None:
        if self.ref not in REF_KINDS:
            raise ValueError(f"format {self.name!r}: ref must be one of {REF_KINDS}, "
                             f"got {self.ref!r}")
        if set(self.required) - set(self.keys):
            raise ValueError(f"format {self.name!r}: required keys must be among its keys")


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format, *, replace: bool = False) -> Format:
    """Add `fmt` to `FORMATS`; re-registering a name needs `replace=True`."""
    if fmt.name in FORMATS and not replace:
        raise ValueError(f"dictionary format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered format called `name`; a KeyError listing the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown dictionary format {name!r}; known: "
                       f"{', '.join(FORMATS)}") from None


def require_files(directory: Path, names: tuple[str, ...], kind: str, writer: str) -> None:
    """Refuse (ValueError) a `directory` that does not hold every file of `names`, saying
    what it holds: the first check of every directory format.

        >>> require_files(Path("saes/x"), ("cfg.json", "sae.safetensors"), "sparsify",
        ...               "SparseCoder.save_to_disk")
    """
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    if not all((directory / name).is_file() for name in names):
        found = ", ".join(sorted(p.name for p in directory.iterdir())[:8]) or "nothing"
        raise ValueError(f"{directory} is not a {kind} directory: expected "
                         f"{' and '.join(names)} (as {writer} writes them); found {found}")


def sha256_of(paths: Iterable[Path]) -> str:
    """A short sha256 over the bytes of `paths`, streamed: a dictionary's identity."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:16]


BUILT_IN = ("zoo", "sae_lens", "sparsify", "dictionary_learning", "circuit_tracer", "factory")
"""The modules of the formats that ship with saebench, imported (and so registered) in this
order, the order messages list them in: zoo, path, release, sparsify, dictionary_learning,
circuit_tracer, factory."""
for _module in BUILT_IN:
    importlib.import_module(f"saebench.dictionaries.{_module}")
