"""`zoo:` dictionaries: the embedded toy zoo's, by name (sae_lens directories in the package)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from saebench.suite import DictionarySpec

from saebench.dictionaries import DictionaryInfo, Format, register_format


def _probe(spec: DictionarySpec, suite_path: Path | None) -> DictionaryInfo:
    from saebench import loading
    from saebench.dictionaries.sae_lens import probe_directory
    from saebench.zoo import paths

    directory = loading.zoo_dir() / paths.dictionary_dir(spec.ref)
    return probe_directory(spec, directory, f"zoo:{spec.ref}", suite_path)


def _load(spec: DictionarySpec, device: str | torch.device, suite_path: Path | None,
          allow_factory: bool = False) -> Any:
    from saebench import loading

    return loading.load_zoo_dictionary(spec.ref, device)


register_format(Format(name="zoo", ref="zoo", probe=_probe, load=_load,
                       summary="a dictionary of the toy zoo, by name"))
