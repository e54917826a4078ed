"""`zoo:` dictionaries: the embedded toy zoo's, by name.

Each zoo dictionary is a directory in one of the published formats (its manifest entry
names which: sae_lens, sparsify, dictionary_learning or circuit_tracer); the entry is read
by that format's own probe and loader, with the zoo's name as its source. The manifest's
hooks are passed on to the single-hook formats (a sparsify directory in the zoo is not
named after its module); `args:` go to the format that takes them (circuit_tracer's
`shuffle_decoders`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from saebench.suite import DictionarySpec

from saebench import located
from saebench.dictionaries import DictionaryInfo, Format, get_format, register_format

FORMAT_OF = {"sae_lens": "path", "sparsify": "sparsify",
             "dictionary_learning": "dictionary_learning", "circuit_tracer": "circuit_tracer"}
"""The manifest's format name -> the registered format that reads it."""
SINGLE_HOOK = ("sae_lens", "sparsify", "dictionary_learning")


def format_entry(spec: DictionarySpec, suite_path: Path | None = None, zoo: Path | None = None
                 ) -> tuple[Format, DictionarySpec]:
    """The format of the zoo dictionary `spec` names (in the packaged zoo, or the zoo
    directory `zoo`), and `spec` as an entry of that format."""
    from saebench import loading
    from saebench.zoo import paths

    record = loading.zoo_manifest(zoo)["dictionaries"][spec.ref]
    kind = record.get("format", "sae_lens")
    fmt = get_format(FORMAT_OF[kind])
    if spec.args and "args" not in fmt.keys:
        raise located.error_at(suite_path, spec.line, f"dictionaries.{spec.name}.args",
                               f"zoo dictionary {spec.ref!r} is in the {kind} format, which "
                               "takes no args")
    hooks = {}
    if kind in SINGLE_HOOK:
        hooks = {"hook": spec.hook or record.get("hook"),
                 "hook_out": spec.hook_out or record.get("hook_out")}
    directory = loading.zoo_dir(zoo) / paths.dictionary_dir(spec.ref)
    return fmt, replace(spec, kind=fmt.name, ref=str(directory), **hooks)


def _probe(spec: DictionarySpec, suite_path: Path | None) -> DictionaryInfo:
    fmt, entry = format_entry(spec, suite_path)
    info = fmt.probe(entry, suite_path)
    return replace(info, identity={**info.identity, "source": f"zoo:{spec.ref}"})


def _load(spec: DictionarySpec, device: str | torch.device, suite_path: Path | None,
          allow_factory: bool = False) -> Any:
    fmt, entry = format_entry(spec, suite_path)
    return fmt.load(entry, device, suite_path, allow_factory)


register_format(Format(name="zoo", ref="zoo", probe=_probe, load=_load, keys=("args",),
                       summary="a dictionary of the toy zoo, by name"))
