"""`sparsify:` dictionaries: a directory EleutherAI's sparsify (`eai-sparsify`) wrote for one
hookpoint, loaded by sparsify's own `SparseCoder.load_from_disk` (`pip install
"saebench[sparsify]"`).

The directory holds `cfg.json` (sparsify's `SparseCoderConfig` plus `d_in`) and
`sae.safetensors` (`encoder.weight` [latents, d_in], `encoder.bias`, `W_dec` [latents, d_in],
`b_dec`, and `W_skip` [d_in, d_in] with a skip connection); it is named after the Hugging Face
module it was trained on (`layers.6`, `layers.6.mlp`). Without `hook:`, that name is mapped to
TransformerLens hooks: an SAE reads and writes the module's output, a transcoder reads its
input and writes its output. The probe reads the config and the weights header only.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from saebench import hooks, located

if TYPE_CHECKING:
    from saebench.suite import DictionarySpec

from saebench.dictionaries import (
    DictionaryInfo,
    Format,
    register_format,
    require_files,
    sha256_of,
)
from saebench.dictionaries.sae_lens import check_weights_header

WEIGHTS_FILE = "sae.safetensors"
IDENTITY_FILES = ("cfg.json", WEIGHTS_FILE)
ACTIVATIONS = ("topk", "groupmax")


class SparsifyCoder(torch.nn.Module):
    """A sparsify `SparseCoder` with dense features, as `splice.as_dictionary` adapts it.

    `encode` scatters the top-k activations into zeros [..., d_sae]; `decode` multiplies dense
    features by `W_dec`, so edited features decode too. `W_skip` is exposed for
    `splice.Dictionary.decode`, which adds `x @ W_skip.T` as sparsify's forward does.
    """

    def __init__(self, coder: Any, hook_name: str, hook_name_out: str) -> None:
        super().__init__()
        self.coder = coder
        self.hook_name, self.hook_name_out = hook_name, hook_name_out
        self.d_in = self.d_out = int(coder.d_in)
        self.d_sae = int(coder.num_latents)

    @property
    def W_skip(self) -> Tensor | None:
        """The skip connection [d_in, d_in] (out += x @ W_skip.T), None without one."""
        return self.coder.W_skip

    def encode(self, x: Tensor) -> Tensor:
        """Dense feature activations [..., d_sae]: sparsify's top-k, scattered into zeros."""
        top = self.coder.encode(x.reshape(-1, x.shape[-1]))  # groupmax needs [N, d_in]
        dense = top.top_acts.new_zeros(top.top_acts.shape[0], self.d_sae)
        dense.scatter_(-1, top.top_indices, top.top_acts)
        return dense.reshape(*x.shape[:-1], self.d_sae)

    def decode(self, feats: Tensor) -> Tensor:
        """The reconstruction `feats @ W_dec + b_dec` (without the skip term, which needs x)."""
        return feats.to(self.coder.W_dec.dtype) @ self.coder.W_dec + self.coder.b_dec


def sparsify_hooks(module: str, transcode: bool) -> tuple[str, str] | None:
    """TransformerLens (read, write) hooks of a sparsify module name (`saebench.hooks`): an
    SAE reads and writes the module's output, a transcoder reads its input; None when the
    name has no mapping."""
    try:
        given, output = hooks.module_hooks(module)
    except ValueError:
        return None
    return (given if transcode else output), output


def _read_cfg(directory: Path) -> dict[str, Any]:
    """The checked fields of a sparsify directory's cfg.json; a problem is a ValueError."""
    require_files(directory, IDENTITY_FILES, "sparsify", "SparseCoder.save_to_disk")
    cfg_file = directory / "cfg.json"
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
        d_in = int(raw["d_in"])
        latents = int(raw.get("num_latents") or 0) or d_in * int(raw.get("expansion_factor", 32))
        cfg = {"d_in": d_in, "d_sae": latents, "k": int(raw.get("k", 32)),
               "activation": raw.get("activation", "topk"),
               "transcode": bool(raw.get("transcode", False)),
               "skip": bool(raw.get("skip_connection", False))}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{cfg_file}: not a sparsify config ({located.first_line(err)})"
                         ) from None
    if cfg["activation"] not in ACTIVATIONS:
        raise ValueError(f"{cfg_file}: unknown activation {cfg['activation']!r}; sparsify "
                         f"knows {', '.join(ACTIVATIONS)}")
    return cfg


def _weight_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shapes sparsify's `SparseCoder` gives its tensors for `cfg`."""
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
              "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    return {**shapes, "W_skip": (d_in, d_in)} if cfg["skip"] else shapes


def _architecture(cfg: dict[str, Any]) -> str:
    """`sparsify-topk`, `sparsify-transcoder`, `sparsify-skip-transcoder`, ..."""
    kind = "transcoder" if cfg["transcode"] else cfg["activation"]
    return f"sparsify-{'skip-' if cfg['skip'] else ''}{kind}"


def _hooks(spec: DictionarySpec, directory: Path, transcode: bool) -> tuple[str, str]:
    """The entry's (read, write) hooks: `hook`/`hook_out`, else the directory name's mapping
    (an SAE writes where it reads); a ValueError when neither says."""
    mapped = sparsify_hooks(directory.name, transcode) or (None, None)
    read = spec.hook or mapped[0]
    write = spec.hook_out or (mapped[1] if transcode else read)
    if read is None or write is None:
        needed = "hook: and hook_out:" if transcode else "hook:"
        raise ValueError(f"{directory}: cannot tell the hooks of sparsify module "
                         f"{directory.name!r} (mapped: {hooks.FORMS}); "
                         f"give {needed}")
    return read, write


def _inspect(spec: DictionarySpec, suite_path: Path | None
             ) -> tuple[Path, dict[str, Any], tuple[str, str]]:
    """The entry's directory, checked config and hooks; a problem is a located error."""
    directory = located.local_path(spec.ref, suite_path)
    try:
        cfg = _read_cfg(directory)
        check_weights_header(directory / WEIGHTS_FILE, _weight_shapes(cfg))
        return directory, cfg, _hooks(spec, directory, cfg["transcode"])
    except ValueError as err:
        raise located.error_at(suite_path, spec.line, f"dictionaries.{spec.name}",
                               str(err)) from None


def _probe(spec: DictionarySpec, suite_path: Path | None) -> DictionaryInfo:
    directory, cfg, (read, write) = _inspect(spec, suite_path)
    identity = {"source": f"sparsify:{directory}",
                "sha256": sha256_of(directory / n for n in IDENTITY_FILES)}
    return DictionaryInfo(read, write, cfg["d_in"], cfg["d_in"], cfg["d_sae"], identity,
                          _architecture(cfg))


def _load(spec: DictionarySpec, device: str | torch.device, suite_path: Path | None,
          allow_factory: bool = False) -> SparsifyCoder:
    field = f"dictionaries.{spec.name}"
    directory, _, (read, write) = _inspect(spec, suite_path)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its Triton notice stays off stdout
            from sparsify import SparseCoder
    except ImportError as err:
        raise located.error_at(suite_path, spec.line, field,
                               f"sparsify dictionaries need EleutherAI's sparsify "
                               f"({located.first_line(err)}); pip install "
                               '"saebench[sparsify]"') from None
    try:
        coder = SparseCoder.load_from_disk(directory, device=device)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise located.error_at(suite_path, spec.line, field,
                               f"{directory}: sparsify cannot load it "
                               f"({located.first_line(err)})") from err
    return SparsifyCoder(coder, read, write)


register_format(Format(name="sparsify", ref="directory", probe=_probe, load=_load,
                       summary="a sparsify directory (cfg.json + sae.safetensors)"))
