"""sae_lens dictionaries: `path:` (a directory `SAE.save_model` wrote) and `release:` (a
sae_lens pretrained release and `sae_id:`, from the hub).

A directory holds `cfg.json` and `sae_weights.safetensors`; `cfg.json` is parsed by sae_lens'
own config class for its architecture and the safetensors header checked before anything is
loaded. A directory a training SAE wrote (BatchTopK, Matryoshka, the training classes of the
others) is loaded with its training class and converted as sae_lens' `save_inference_model`
converts it. Releases are checked offline against sae_lens' pretrained directory.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from safetensors import SafetensorError, safe_open

from saebench import located

if TYPE_CHECKING:
    from saebench.suite import DictionarySpec

from saebench.dictionaries import (
    DictionaryInfo,
    Format,
    register_format,
    require_files,
    sha256_of,
)

WEIGHTS_FILE = "sae_weights.safetensors"
IDENTITY_FILES = ("cfg.json", WEIGHTS_FILE)


def probe_directory(spec: DictionarySpec, directory: Path, source: str,
                    suite_path: Path | None) -> DictionaryInfo:
    """What a sae_lens directory says (hooks, widths, architecture, identity), with the
    entry's `hook`/`hook_out` overrides; a problem is a located error at the entry."""
    try:
        info = _probe_sae_lens_dir(directory)
    except ValueError as err:
        raise located.error_at(suite_path, spec.line, f"dictionaries.{spec.name}",
                               str(err)) from None
    identity = {"source": source, "sha256": sha256_of(directory / n for n in IDENTITY_FILES)}
    read = spec.hook or info["read"]
    write = spec.hook_out or (info["write"] if info["write"] != info["read"] else read)
    return DictionaryInfo(read, write, info["d_in"], info["d_out"], info["d_sae"], identity,
                          info["architecture"])


def _probe_path(spec: DictionarySpec, suite_path: Path | None) -> DictionaryInfo:
    directory = located.local_path(spec.ref, suite_path)
    return probe_directory(spec, directory, f"path:{directory}", suite_path)


def _load_path(spec: DictionarySpec, device: str | torch.device, suite_path: Path | None,
               allow_factory: bool = False) -> Any:
    directory = located.local_path(spec.ref, suite_path)
    try:
        return load_directory(directory, str(device))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise located.error_at(suite_path, spec.line, f"dictionaries.{spec.name}",
                               f"{directory}: cannot load a sae_lens dictionary "
                               f"({located.first_line(err)}); expected cfg.json + "
                               "sae_weights.safetensors as SAE.save_model writes them") from err


def _probe_release(spec: DictionarySpec, suite_path: Path | None) -> DictionaryInfo:
    return DictionaryInfo(spec.hook, spec.hook_out or spec.hook, None, None, None,
                          {"source": f"{spec.ref}:{spec.sae_id}"})


def _load_release(spec: DictionarySpec, device: str | torch.device, suite_path: Path | None,
                  allow_factory: bool = False) -> Any:
    from sae_lens import SAE

    from saebench.resolve import release_lookup  # resolve imports this package

    field = f"dictionaries.{spec.name}"
    release, sae_id = spec.ref, spec.sae_id or ""
    try:
        release_lookup(release, sae_id)
    except ValueError as err:
        raise located.error_at(suite_path, spec.line, field, str(err)) from None
    with located.hub_access(located.where_of(suite_path, spec.line, field),
                            f"SAE {sae_id!r} of release {release!r}"):
        return SAE.from_pretrained(release, sae_id, device=str(device))


def _probe_sae_lens_dir(directory: Path) -> dict[str, Any]:
    """Hooks and widths from a sae_lens directory's config, its weights header checked; a
    training SAE's config is read by its training class and reported under the architecture
    it loads as (batchtopk as jumprelu)."""
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    require_files(directory, IDENTITY_FILES, "sae_lens dictionary", "SAE.save_model")
    cfg_file, weights = directory / "cfg.json", directory / WEIGHTS_FILE
    raw = _read_cfg(cfg_file)
    architecture = raw.get("architecture", "standard")
    training = _is_training_cfg(raw)
    if not training and architecture not in SAE_CLASS_REGISTRY:
        known = SAE_CLASS_REGISTRY | SAE_TRAINING_CLASS_REGISTRY
        raise ValueError(f"{cfg_file}: unknown architecture {architecture!r}"
                         f"{located.suggest(str(architecture), known)}; sae_lens knows "
                         f"{', '.join(SAE_CLASS_REGISTRY)} (inference SAEs) and "
                         f"{', '.join(SAE_TRAINING_CLASS_REGISTRY)} (training SAEs)")
    registry = SAE_TRAINING_CLASS_REGISTRY if training else SAE_CLASS_REGISTRY
    try:
        cfg = registry[architecture][1].from_dict(handle_config_defaulting(raw))
    except (TypeError, ValueError, KeyError) as err:
        kind = "training " if training else ""
        raise ValueError(f"{cfg_file}: not a valid {architecture} {kind}config "
                         f"({located.first_line(err)})") from None
    d_in, d_sae = int(cfg.d_in), int(cfg.d_sae)
    d_out = int(getattr(cfg, "d_out", None) or d_in)
    check_weights_header(weights, {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out)})
    read = cfg.metadata.hook_name
    if training:
        architecture = cfg.get_inference_config_class().architecture()
    return {"read": read, "write": getattr(cfg.metadata, "hook_name_out", None) or read,
            "d_in": d_in, "d_out": d_out, "d_sae": d_sae, "architecture": architecture}


def _read_cfg(cfg_file: Path) -> dict[str, Any]:
    """A sae_lens `cfg.json` as a dict; unreadable JSON or a non-object is a ValueError."""
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{cfg_file}: not valid JSON ({located.first_line(err)})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object")
    return raw


def _is_training_cfg(raw: dict[str, Any]) -> bool:
    """Whether a cfg.json was written by a training SAE's `save_model`: for a name shared with
    an inference SAE (topk, ...), sae_lens 6 metadata names it and training-only fields are
    there (`save_inference_model` drops those fields; pre-6 configs lack that metadata)."""
    architecture = raw.get("architecture", "standard")
    if architecture not in SAE_TRAINING_CLASS_REGISTRY:
        return False
    if architecture not in SAE_CLASS_REGISTRY:
        return True
    metadata = raw.get("metadata")
    if not isinstance(metadata, dict) or metadata.get("training_architecture") != architecture:
        return False
    training_only = ({f.name for f in fields(SAE_TRAINING_CLASS_REGISTRY[architecture][1])}
                     - {f.name for f in fields(SAE_CLASS_REGISTRY[architecture][1])})
    return not training_only.isdisjoint(raw)


def load_directory(directory: Path, device: str) -> Any:
    """A sae_lens directory as an inference SAE, converting one a training SAE saved.

    Loaded as saved, a training save would lose its conversion (TopK's decoder-norm fold)
    or not load at all (batchtopk is no inference architecture).
    """
    from sae_lens import SAE, TrainingSAE

    cfg_file = directory / "cfg.json"
    if cfg_file.is_file() and _is_training_cfg(_read_cfg(cfg_file)):
        return _as_inference_sae(TrainingSAE.load_from_disk(str(directory), device=device))
    return SAE.load_from_disk(str(directory), device=device)


def _as_inference_sae(training: Any) -> Any:
    """`training` as the SAE its `save_inference_model` + `SAE.load_from_disk` would give.

    The same sae_lens hooks convert the weights and config, without writing files.
    """
    from sae_lens import SAE

    state = training.state_dict()
    training.process_state_dict_for_saving_inference(state)
    sae = SAE.from_dict(training.cfg.get_inference_sae_cfg_dict())
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state)
    return sae


def check_weights_header(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """`path` is a complete safetensors file whose tensors in `shapes` have those shapes."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            found = {name: tuple(f.get_slice(name).get_shape()) for name in shapes
                     if name in names}
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({located.first_line(err)}); "
                         "a pickled or truncated file is refused") from None
    size = path.stat().st_size
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
              default=0)
    if 8 + header_len + end > size:
        raise ValueError(f"{path}: truncated ({size} bytes, its header describes "
                         f"{8 + header_len + end})")
    for name, shape in shapes.items():
        if name in found and found[name] != shape:
            raise ValueError(f"{path}: {name} has shape {list(found[name])}, but cfg.json "
                             f"says {list(shape)}")


register_format(Format(name="path", ref="directory", probe=_probe_path, load=_load_path,
                       summary="a sae_lens directory (cfg.json + sae_weights.safetensors)"))
register_format(Format(name="release", ref="name", probe=_probe_release, load=_load_release,
                       keys=("sae_id",), required=("sae_id",),
                       summary="a sae_lens pretrained release, with sae_id (hub)"))
