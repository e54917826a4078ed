"""How a dictionary replaces an activation during a forward pass.

A *dictionary* reads an activation at one TransformerLens hook and writes a reconstruction
at a hook: an SAE (read hook = write hook) or a transcoder (e.g. read
`blocks.L.ln2.hook_normalized`, write `blocks.L.hook_mlp_out`). `as_dictionary` wraps sae_lens
SAEs and transcoders, any object with `encode`/`decode`, and plain callables into one
`Dictionary`; `splice_hooks` and `ablation_hooks` build `fwd_hooks` for
`model.run_with_hooks`, also in passes started mid-model with `start_at_layer`:

    >>> d = as_dictionary(sae)                      # hooks from sae.cfg.metadata
    >>> mask = position_mask(-1, *tokens.shape)     # splice at the last position only
    >>> logits = model.run_with_hooks(tokens, fwd_hooks=splice_hooks([d], mask=mask))

Per-head hooks (`attn.hook_z` and the like, [batch, pos, n_heads, d_head]) are flattened to
[..., n_heads * d_head] before encoding and restored after decoding. sae_lens SAEs with
`reshape_activations="hook_z"` reshape inside `encode`/`decode` themselves and remember
`d_head` from the last `encode`; that reshaping is switched off only for the duration of each
call here and restored afterwards, so the same object keeps working with sae_lens.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

Hook = Callable[..., Tensor | None]

_PER_HEAD_HOOKS = frozenset({
    "hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k",
    "hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in",
})
_EMBED_HOOKS = frozenset({"hook_embed", "hook_pos_embed", "hook_tokens"})
_HOOK_Z_STATE = ("reshape_fn_in", "reshape_fn_out", "d_head", "hook_z_reshaping_mode")
_STATEFUL_NORMS = ("layer_norm", "constant_norm_rescale")
ABLATION_KINDS = ("zero", "mean")


def _per_head(hook: str) -> bool:
    return hook.rsplit(".", 1)[-1] in _PER_HEAD_HOOKS


@dataclass(frozen=True)
class FeatureEdit:
    """Set features of one dictionary to a value between encode and decode.

    `value=0.0` zeroes the features (the seeds' "direction ablation"); any other value clamps
    them to it at every spliced position.

        >>> FeatureEdit("blocks.1.hook_resid_pre", features=(3, 17))
    """

    dictionary: str
    features: tuple[int, ...]
    value: float = 0.0

    def __post_init__(self) -> None:
        features = (self.features,) if isinstance(self.features, int) else self.features
        object.__setattr__(self, "features", tuple(int(f) for f in features))


@contextmanager
def _native_reshaping_off(module: Any) -> Iterator[None]:
    """Switch off sae_lens' in-module hook_z reshaping for one call, then restore it exactly."""
    if not getattr(module, "hook_z_reshaping_mode", False):
        yield
        return
    saved = {key: module.__dict__[key] for key in _HOOK_Z_STATE if key in module.__dict__}
    module.turn_off_forward_pass_hook_z_reshaping()
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(module, key, value)


def _param_dtype(module: Any) -> torch.dtype | None:
    if isinstance(module, torch.nn.Module):
        param = next(module.parameters(), None)
        if param is not None:
            return param.dtype
    return None


def _hooks_tuple(hooks: str | Sequence[str]) -> tuple[str, ...]:
    return (hooks,) if isinstance(hooks, str) else tuple(hooks)


def takes_input(decode: Callable[..., Any]) -> bool:
    """Whether a `decode` method takes the input activation after the features
    (`decode(features, x)`, the saebench protocol) rather than the features alone."""
    try:
        params = list(inspect.signature(decode).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


@dataclass(frozen=True)
class Dictionary:
    """A dictionary adapted to one interface: encode at `read_hooks`, decode for `write_hooks`.

    Most dictionaries read one hook and write one (`read_hook`, `write_hook`); a part of a
    replacement model may write several (a cross-layer transcoder's features of one layer
    write every later MLP output), and then `decode` returns one reconstruction per write
    hook. Dictionaries with the same `part_of` are parts of one replacement model: spliced
    together, their reconstructions at a shared write hook are summed.

    `kind` is "sae_lens", "encode_decode" (any object with `encode`/`decode`) or "callable"
    (the object's call returns the reconstruction, or a container holding it at `output`).
    Widths are None where the object does not say; `d_sae` is None for callables, which
    expose no feature activations. Build one with `as_dictionary`.
    """

    name: str
    read_hooks: tuple[str, ...]
    write_hooks: tuple[str, ...]
    d_in: int | None
    d_out: int | None
    d_sae: int | None
    module: Any
    kind: str = "sae_lens"
    output: int | str | None = None
    part_of: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "read_hooks", _hooks_tuple(self.read_hooks))
        object.__setattr__(self, "write_hooks", _hooks_tuple(self.write_hooks))
        if not self.read_hooks or not self.write_hooks:
            raise ValueError(f"dictionary {self.name!r} needs a read hook and a write hook")
        several = len(self.read_hooks) > 1 or len(self.write_hooks) > 1
        if several and set(self.read_hooks) & set(self.write_hooks):
            raise ValueError(f"dictionary {self.name!r}: a dictionary with several hooks must "
                             "read and write different ones")
        if several and self.kind == "callable":
            raise ValueError(f"dictionary {self.name!r}: a callable reads and writes one hook")

    def _single(self, hooks: tuple[str, ...], role: str) -> str:
        if len(hooks) != 1:
            raise ValueError(f"dictionary {self.name!r} {role}s {len(hooks)} hooks "
                             f"({', '.join(hooks)}), not one")
        return hooks[0]

    @property
    def read_hook(self) -> str:
        """The one hook the dictionary reads (ValueError when it reads several)."""
        return self._single(self.read_hooks, "read")

    @property
    def write_hook(self) -> str:
        """The one hook the dictionary writes (ValueError when it writes several)."""
        return self._single(self.write_hooks, "write")

    @property
    def single(self) -> bool:
        """Whether the dictionary reads one hook and writes one (not a part writing several)."""
        return len(self.read_hooks) == len(self.write_hooks) == 1

    @property
    def hooks(self) -> tuple[str, ...]:
        """Every hook the dictionary reads or writes, once each."""
        return tuple(dict.fromkeys(self.read_hooks + self.write_hooks))

    @property
    def is_transcoder(self) -> bool:
        """Whether the read and write hooks differ."""
        return self.read_hooks != self.write_hooks

    @property
    def architecture(self) -> str:
        """sae_lens' architecture name (topk, jumprelu, transcoder, ...), else the class name."""
        cfg = getattr(self.module, "cfg", None)
        if self.kind == "sae_lens" and callable(getattr(cfg, "architecture", None)):
            return str(cfg.architecture())
        return type(self.module).__name__

    @property
    def has_features(self) -> bool:
        """Whether the dictionary exposes feature activations (encode/decode)."""
        return self.kind != "callable"

    def _flatten(self, x: Tensor, hook: str) -> Tensor:
        """x as the module expects it: per-head activations flattened, width checked."""
        width = x.shape[-1]
        if _per_head(hook) and x.dim() >= 2 and width != self.d_in:
            x, width = x.flatten(-2), x.shape[-2] * x.shape[-1]
        if self.d_in is not None and width != self.d_in:
            raise ValueError(
                f"dictionary {self.name!r} expects width d_in={self.d_in} at "
                f"{hook!r}, but the activation there has width {width} "
                f"(shape {tuple(x.shape)})")
        dtype = _param_dtype(self.module)
        return x if dtype is None else x.to(dtype)

    def _inputs(self, x: Tensor | Sequence[Tensor]) -> Tensor | tuple[Tensor, ...]:
        """The read-hook activation(s) flattened: one tensor, or a tuple for several hooks."""
        if len(self.read_hooks) == 1:
            return self._flatten(x, self.read_hooks[0])
        if isinstance(x, Tensor) or len(x) != len(self.read_hooks):
            raise ValueError(f"dictionary {self.name!r} reads {len(self.read_hooks)} hooks; "
                             "pass one activation per read hook")
        return tuple(self._flatten(a, h) for a, h in zip(x, self.read_hooks, strict=True))

    def shape_like(self, out: Tensor, like: Tensor | None, hook: str) -> Tensor:
        """A reconstruction for write hook `hook` shaped and typed like the activation there."""
        if like is None:
            return out
        per_head = _per_head(hook) and like.dim() >= 2
        width = like.shape[-2] * like.shape[-1] if per_head else like.shape[-1]
        if out.shape[-1] != width and out.shape[-2:] != like.shape[-2:]:
            raise ValueError(
                f"dictionary {self.name!r} writes width {out.shape[-1]} at "
                f"{hook!r}, but the activation there has width {width} "
                f"(shape {tuple(like.shape)})")
        if per_head and out.shape[-1] == width:
            out = out.unflatten(-1, like.shape[-2:])
        return out.to(like.dtype)

    def _require_features(self) -> None:
        if not self.has_features:
            raise ValueError(
                f"dictionary {self.name!r} is a callable that returns only a reconstruction; "
                "feature metrics and feature edits need an object with encode/decode")

    def encode(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """Feature activations [..., d_sae] of the activation `x` as it appears at the read
        hook (a tuple, one per read hook, for a dictionary reading several)."""
        self._require_features()
        with _native_reshaping_off(self.module):
            feats = self.module.encode(self._inputs(x))
        return feats.to_dense() if feats.is_sparse else feats

    def _needs_input(self) -> tuple[bool, bool]:
        """(skip path, run-time normalisation state): what decoding needs the input x for,
        for a module whose own `decode` takes the features alone."""
        skip = isinstance(getattr(self.module, "W_skip", None), Tensor)
        return skip, (self.kind == "sae_lens"
                      and self.module.cfg.normalize_activations in _STATEFUL_NORMS)

    def decode(self, feats: Tensor, like: Tensor | Sequence[Tensor] | None = None, *,
               x: Tensor | Sequence[Tensor] | None = None) -> Tensor | tuple[Tensor, ...]:
        """Reconstruction from features, shaped and typed like `like` (the write-hook
        activation; a tuple, one per write hook, for a dictionary writing several, which
        then returns a tuple).

        A module whose `decode(features, x)` takes the input gets `x` (the saebench
        protocol). For one that takes the features alone, skip transcoders (a `W_skip`
        tensor: sae_lens', sparsify's) get `x @ W_skip.T` added, and sae_lens SAEs
        normalising at run time ("layer_norm", "constant_norm_rescale") undo the input's
        scale: both need the read-hook activation `x` that the features came from.
        """
        self._require_features()
        with_input = takes_input(self.module.decode)
        skip, norm = (False, False) if with_input else self._needs_input()
        if (with_input or skip or norm) and x is None:
            raise ValueError(f"dictionary {self.name!r} needs the input activation to decode "
                             "(skip connection or run-time normalisation); pass x=")
        inputs = self._inputs(x) if x is not None else None
        with _native_reshaping_off(self.module):
            if norm:
                self.module.run_time_activation_norm_fn_in(inputs)
            out = self.module.decode(feats, inputs) if with_input else self.module.decode(feats)
        if skip:
            w_skip = self.module.W_skip
            out = out + inputs.to(w_skip.dtype) @ w_skip.T
        if len(self.write_hooks) == 1:
            return self.shape_like(out, like, self.write_hooks[0])
        if isinstance(out, Tensor) or len(out) != len(self.write_hooks):
            raise ValueError(f"dictionary {self.name!r} writes {len(self.write_hooks)} hooks, "
                             "so its decode must return one reconstruction per write hook")
        likes = like if like is not None else (None,) * len(out)
        return tuple(self.shape_like(o, li, h)
                     for o, li, h in zip(out, likes, self.write_hooks, strict=True))

    def check_edits(self, edits: Sequence[FeatureEdit]) -> tuple[FeatureEdit, ...]:
        """The edits naming this dictionary, validated (features exist, encode/decode present)."""
        own = tuple(e for e in edits if e.dictionary == self.name)
        if own:
            self._require_features()
        for edit in own:
            bad = [f for f in edit.features
                   if f < 0 or (self.d_sae is not None and f >= self.d_sae)]
            if bad:
                raise IndexError(f"feature edit on {self.name!r}: features {bad} are outside "
                                 f"0..{self.d_sae - 1} (d_sae={self.d_sae})")
        return own

    def apply_edits(self, feats: Tensor, edits: Sequence[FeatureEdit]) -> Tensor:
        """`feats` with this dictionary's edits applied (a copy); edits on others are ignored."""
        own = self.check_edits(edits)
        if not own:
            return feats
        feats = feats.clone()
        for edit in own:
            feats[..., list(edit.features)] = edit.value
        return feats

    def _call(self, x: Tensor, like: Tensor | None) -> Tensor:
        result = self.module(self._flatten(x, self.read_hook))
        if self.output is None:
            if not isinstance(result, Tensor):
                raise ValueError(f"dictionary {self.name!r} returned a {type(result).__name__}; "
                                 "name the reconstruction with output=<index or key>")
            return self.shape_like(result, like, self.write_hook)
        try:
            if isinstance(self.output, int) or isinstance(result, Mapping):
                picked = result[self.output]
            else:
                picked = getattr(result, self.output)
        except (IndexError, KeyError, AttributeError, TypeError) as err:
            raise ValueError(f"dictionary {self.name!r}: its output has no element "
                             f"{self.output!r} ({type(result).__name__})") from err
        return self.shape_like(picked, like, self.write_hook)

    def reconstruct(self, x: Tensor, like: Tensor | None = None,
                    edits: Sequence[FeatureEdit] = ()) -> tuple[Tensor, Tensor | None]:
        """(reconstruction, features) of the read-hook activation `x`, with `edits` applied.

        `like` is the write-hook activation (defaults to `x` for an SAE); features are those
        decoded (after edits), None for callables.
        """
        if like is None and not self.is_transcoder:
            like = x
        if not self.has_features:
            self.check_edits(edits)
            return self._call(x, like), None
        feats = self.apply_edits(self.encode(x), edits)
        return self.decode(feats, like, x=x), feats


def _cfg_value(obj: Any, key: str) -> Any:
    """`key` from obj.cfg.metadata, obj.cfg (object or mapping) or obj itself, else None."""
    cfg = getattr(obj, "cfg", None)
    for source in (getattr(cfg, "metadata", None), cfg, obj):
        if source is None:
            continue
        value = source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)
        if value is not None:
            return value
    return None


def _weight_dim(obj: Any, attr: str, dim: int) -> int | None:
    weight = getattr(obj, attr, None)
    return int(weight.shape[dim]) if isinstance(weight, Tensor) and weight.dim() == 2 else None


def random_like(dictionary: Dictionary, seed: int) -> Dictionary:
    """A dictionary of the same shape, hooks and name with random weights: the null model of
    `random_baseline`. A sae_lens SAE is a fresh one of its config, initialised by sae_lens
    under `seed`; another module is a copy whose every floating parameter holds its own
    entries in a random order (same values and scale, no learned structure).

        >>> random_like(dictionary, seed=0).d_sae == dictionary.d_sae
        True
    """
    import copy

    module = dictionary.module
    if dictionary.kind == "sae_lens":
        from sae_lens import SAE

        with torch.random.fork_rng(devices=[]):  # drawn on the CPU: the same on any device
            torch.manual_seed(seed)
            fresh = SAE.from_dict({**module.cfg.to_dict(), "device": "cpu"})
        return replace(dictionary, module=fresh.to(next(module.parameters()).device))
    params = [p for p in getattr(module, "parameters", lambda: [])() if p.is_floating_point()]
    if not params:
        raise ValueError(f"dictionary {dictionary.name!r} has no weights to randomise; "
                         "random_baseline needs an nn.Module dictionary")
    fresh = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in fresh.parameters():
            if param.is_floating_point():
                order = torch.randperm(param.numel(), generator=generator).to(param.device)
                param.copy_(param.flatten()[order].view_as(param))
    return replace(dictionary, module=fresh)


def as_dictionary(
    obj: Any,
    *,
    name: str | None = None,
    hook: str | Sequence[str] | None = None,
    hook_out: str | Sequence[str] | None = None,
    output: int | str | None = None,
    d_in: int | None = None,
    d_out: int | None = None,
    d_sae: int | None = None,
    part_of: str | None = None,
) -> Dictionary:
    """Adapt a sae_lens SAE/transcoder, an encode/decode object or a callable to `Dictionary`.

    Hooks come from `hook`/`hook_out`, else the object's `read_hooks`/`write_hooks` (the
    saebench protocol), else `obj.cfg.metadata.hook_name`/`hook_name_out` (or
    `obj.cfg.hook_name`); the write hooks default to the read hook. `output` names the
    reconstruction in what the object's call returns (index, key or attribute) and makes
    the call, not encode/decode, the reconstruction path, as for older research code:

        >>> as_dictionary(autoencoder, hook="blocks.0.mlp.hook_post", output=1)
    """
    if isinstance(obj, Dictionary):
        write = obj.write_hooks if obj.is_transcoder else hook or obj.write_hooks
        return replace(obj, name=name or obj.name, read_hooks=hook or obj.read_hooks,
                       write_hooks=hook_out or write, part_of=part_of or obj.part_of)
    from sae_lens import SAE

    is_sae_lens = isinstance(obj, SAE)
    if is_sae_lens and output is None:
        kind = "sae_lens"
    elif output is None and callable(getattr(obj, "encode", None)) \
            and callable(getattr(obj, "decode", None)):
        kind = "encode_decode"
    elif callable(obj):
        kind = "callable"
    else:
        raise TypeError(f"cannot adapt {type(obj).__name__} as a dictionary: it needs "
                        "encode/decode methods or must be callable")
    label = name or type(obj).__name__
    read = hook or getattr(obj, "read_hooks", None) or _cfg_value(obj, "hook_name")
    if not read:
        raise ValueError(f"no read hook for dictionary {label!r}: pass hook=... or set "
                         "read_hooks, cfg.metadata.hook_name (sae_lens) or cfg.hook_name")
    if is_sae_lens and obj.cfg.metadata.hook_head_index is not None:
        raise ValueError(f"dictionary {label!r} is a single-head SAE (hook_head_index="
                         f"{obj.cfg.metadata.hook_head_index}), which splicing does not support")
    read = _hooks_tuple(read)
    write = _hooks_tuple(hook_out or getattr(obj, "write_hooks", None)
                         or _cfg_value(obj, "hook_name_out") or read)
    d_in = d_in or _cfg_value(obj, "d_in") or _weight_dim(obj, "W_enc", 0)
    d_out = d_out or _cfg_value(obj, "d_out") or _weight_dim(obj, "W_dec", 1)
    if d_out is None and write == read:
        d_out = d_in
    if kind == "callable":
        d_sae = None
    else:
        d_sae = d_sae or _cfg_value(obj, "d_sae") or _weight_dim(obj, "W_enc", 1) \
            or _weight_dim(obj, "W_dec", 0)
        if d_sae is None:
            raise ValueError(f"cannot tell the number of features of {label!r}; pass d_sae=")
    if name is None:
        name = ",".join(read) if write == read else f"{','.join(read)}->{','.join(write)}"
    return Dictionary(name=name, read_hooks=read, write_hooks=write, d_in=d_in, d_out=d_out,
                      d_sae=d_sae, module=obj, kind=kind, output=output, part_of=part_of)


def _broadcast_mask(mask: Tensor, act: Tensor, hook: str) -> Tensor:
    if mask.shape != act.shape[:2]:
        raise ValueError(f"position mask of shape {tuple(mask.shape)} does not match the "
                         f"activation at {hook!r} of shape {tuple(act.shape)}")
    return mask.to(act.device).reshape(*mask.shape, *([1] * (act.dim() - 2)))


def reached_positions(mask: Tensor) -> Tensor:
    """[b, t]: the positions at or after the first True of `mask` [b, t] in each row, the
    only ones a splice at `mask` can change."""
    return mask.int().cummax(dim=1).values.bool()


def position_mask(
    positions: int | Sequence[int] | Tensor | None,
    batch: int,
    seq_len: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """A bool mask [batch, seq_len] that is True at the positions to splice.

    `positions`: None (all), an int (negative counts from the end), a sequence of ints (the
    same positions in every row), a LongTensor [batch] (one position per row, e.g. each
    prompt's answer position in a padded batch) or a bool tensor [batch, seq_len] (returned).

        >>> position_mask(torch.tensor([2, -1]), batch=2, seq_len=4)
        tensor([[False, False,  True, False],
                [False, False, False,  True]])
    """
    if positions is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if isinstance(positions, Tensor):
        if positions.dtype == torch.bool:
            if positions.shape != (batch, seq_len):
                raise ValueError(f"bool position mask has shape {tuple(positions.shape)}, "
                                 f"expected {(batch, seq_len)}")
            return positions.to(device)
        if positions.is_floating_point() or positions.is_complex():
            raise TypeError(f"positions must be integers, got a {positions.dtype} tensor")
        if positions.dim() == 0:
            positions = int(positions)
        elif positions.dim() == 1 and len(positions) == batch:
            rows = positions.to(device=device, dtype=torch.long)
            _check_range(rows, seq_len)
            mask = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
            mask[torch.arange(batch, device=device), rows % seq_len] = True
            return mask
        else:
            raise ValueError(f"a positions tensor must have shape [batch]=[{batch}] (one per "
                             f"row), got {tuple(positions.shape)}; pass a list for the same "
                             "positions in every row")
    cols = [positions] if isinstance(positions, int) else list(positions)
    if any(isinstance(p, bool) or not hasattr(p, "__index__") for p in cols):
        raise TypeError(f"positions must be ints, got {positions!r}")
    cols = [operator.index(p) for p in cols]
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    _check_range(cols_t, seq_len)
    mask = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    mask[:, cols_t % seq_len] = True
    return mask


def _check_range(positions: Tensor, seq_len: int) -> None:
    bad = positions[(positions < -seq_len) | (positions >= seq_len)]
    if len(bad):
        raise IndexError(f"positions {bad.tolist()} are out of range for sequences of length "
                         f"{seq_len} (valid: {-seq_len}..{seq_len - 1})")


class _Splice:
    """One dictionary's part of a spliced pass: it keeps the activations at its read hooks
    (from the pass itself, so upstream splices reach it), reconstructs when its first write
    hook runs (in every pass, so nothing of a pass cut short is reused), and gives each
    write hook its reconstruction."""

    def __init__(self, d: Dictionary, edits: tuple[FeatureEdit, ...], error_term: bool,
                 record: dict | None) -> None:
        self.d, self.edits, self.error_term, self.record = d, edits, error_term, record
        self.reads: dict[str, Tensor] = {}
        self.pending: dict[str, tuple[Tensor, Tensor | None]] = {}

    def capture(self, hook_name: str) -> Hook:
        def hook_fn(act: Tensor, hook: Any) -> None:
            self.reads[hook_name] = act

        return hook_fn

    def _input(self, hook_name: str, act: Tensor) -> Tensor | tuple[Tensor, ...]:
        d = self.d
        if not d.is_transcoder:
            return act
        missing = [h for h in d.read_hooks if h not in self.reads]
        if missing:
            raise RuntimeError(
                f"dictionary {d.name!r}: the write hook {hook_name!r} ran before the read "
                f"hook {missing[0]!r}; start the pass at or before the read hook's layer")
        x = tuple(self.reads.pop(h) for h in d.read_hooks)
        return x[0] if len(x) == 1 else x

    def _reconstruct(self, hook_name: str, act: Tensor) -> None:
        """Encode and decode for every write hook: (reconstruction, unedited one or None)."""
        d, x = self.d, self._input(hook_name, act)
        clean = None
        if d.has_features:
            feats = d.apply_edits(raw := d.encode(x), self.edits)
            recon = d.decode(feats, x=x)
            if self.error_term and self.edits:
                clean = d.decode(raw, x=x)
        else:
            feats, recon = None, d._call(x, None)
        many = len(d.write_hooks) > 1
        recons = recon if many else (recon,)
        cleans = (clean if many else (clean,)) if clean is not None else (None,) * len(recons)
        self.pending = dict(zip(d.write_hooks, zip(recons, cleans, strict=True), strict=True))
        if self.record is not None:
            self.record[d.name] = {"x": x, "feats": feats, "recon": recon}

    def at(self, hook_name: str, act: Tensor) -> tuple[Tensor, Tensor | None]:
        """(reconstruction, unedited reconstruction or None) for the write hook `hook_name`,
        shaped like its activation `act`."""
        if hook_name not in self.pending:
            self._reconstruct(hook_name, act)
        recon, clean = self.pending.pop(hook_name)
        shaped = self.d.shape_like(recon, act, hook_name)
        if self.record is not None and len(self.d.write_hooks) == 1:
            self.record[self.d.name].update(target=act, recon=shaped)
        return shaped, None if clean is None else self.d.shape_like(clean, act, hook_name)


def _write_hook(hook_name: str, splices: list[_Splice], *, error_term: bool,
                mask: Tensor | None, written: dict | None) -> Hook:
    """The write-hook function: the activation replaced by the sum of the reconstructions of
    the dictionaries writing there (one, or the parts of a replacement model)."""

    def hook_fn(act: Tensor, hook: Any) -> Tensor:
        pairs = [s.at(hook_name, act) for s in splices]
        if not error_term:
            out = functools.reduce(operator.add, (r for r, _ in pairs))
        elif any(c is not None for _, c in pairs):
            out = act + functools.reduce(operator.add, (r - c for r, c in pairs if c is not None))
        else:
            out = act
        if mask is not None and out is not act:
            out = torch.where(_broadcast_mask(mask, act, hook_name), out, act)
        for s in splices:
            if s.record is not None and len(s.d.write_hooks) == 1:
                s.record[s.d.name]["out"] = out
        if written is not None:
            written[hook_name] = out
        return out

    return hook_fn


def _check_shared(dictionaries: Sequence[Dictionary]) -> None:
    """Names are unique, and a write hook is shared only by parts of one replacement model."""
    names = [d.name for d in dictionaries]
    repeated = sorted({n for n in names if names.count(n) > 1})
    owners: dict[str, list[str | None]] = {}
    for d in dictionaries:
        for hook in d.write_hooks:
            owners.setdefault(hook, []).append(d.part_of)
    shared = sorted(h for h, parts in owners.items()
                    if len(parts) > 1 and (None in parts or len(set(parts)) > 1))
    for label, values in (("name", repeated), ("write hook", shared)):
        if values:
            raise ValueError(f"several dictionaries share the {label} {values}; splice "
                             "them in separate passes")


def splice_hooks(
    dictionaries: Sequence[Dictionary],
    *,
    error_term: bool = False,
    mask: Tensor | None = None,
    edits: Sequence[FeatureEdit] = (),
    record: dict | None = None,
    written: dict | None = None,
) -> list[tuple[str, Hook]]:
    """`fwd_hooks` that splice each dictionary in at its write hooks, where `mask` is True.

    Elsewhere the original activation is kept (mask None = every position). Each dictionary
    reads its input from the pass itself, so in a set spliced together a later dictionary
    sees what earlier ones wrote (errors compound, as in a replacement model); parts of one
    replacement model (`Dictionary.part_of`) writing one hook have their reconstructions
    summed. With `error_term` the written activation is `original + (recon_edited - recon)`:
    exactly the clean activation without edits, the edits' effect on top of the error with
    them. Edits naming dictionaries not in the list are ignored. With `record` a dict, each
    dictionary stores `record[name] = {"x", "feats", "recon"}` (read activation, decoded
    features after edits, None for callables, and reconstruction; a tuple for several write
    hooks) and, writing one hook, `"target"` and `"out"` (the original activation there and
    what was written). With `written` a dict, `written[hook]` is what each write hook got.

        >>> logits = model.run_with_hooks(resid, start_at_layer=1,
        ...                               fwd_hooks=splice_hooks([d1, d2], mask=mask))
    """
    _check_shared(dictionaries)
    hooks: list[tuple[str, Hook | None]] = []
    writers: dict[str, list[_Splice]] = {}
    for d in dictionaries:
        own = d.check_edits(edits)
        if error_term and not own and record is None and written is None:
            continue
        part = _Splice(d, own, error_term, record)
        if d.is_transcoder:
            hooks.extend((h, part.capture(h)) for h in d.read_hooks)
        for h in d.write_hooks:
            if h not in writers:
                writers[h] = []
                hooks.append((h, None))
            writers[h].append(part)
    return [(h, fn or _write_hook(h, writers[h], error_term=error_term, mask=mask,
                                  written=written)) for h, fn in hooks]


def _mean_like(mean: Tensor, act: Tensor, hook: str) -> Tensor:
    mean = mean.to(device=act.device, dtype=act.dtype)
    if mean.dim() == act.dim() - 1 and mean.shape[0] > act.shape[1]:
        mean = mean[: act.shape[1]]
    try:
        return torch.broadcast_to(mean, act.shape)
    except RuntimeError as err:
        raise ValueError(f"mean of shape {tuple(mean.shape)} does not broadcast to the "
                         f"activation at {hook!r} of shape {tuple(act.shape)}") from err


def ablation_hooks(
    hook: str,
    kind: str,
    *,
    mean: Tensor | None = None,
    mask: Tensor | None = None,
) -> list[tuple[str, Hook]]:
    """`fwd_hooks` that ablate the activation at `hook` where `mask` is True (None = all).

    kind "zero" writes zeros; "mean" writes `mean`, of shape [d], [seq, d] (per position,
    cut to the pass's length) or the activation's trailing shape ([n_heads, d_head] at
    hook_z). Unlike sae_lens' zero-ablation hook, the mask is respected.
    """
    if kind not in ABLATION_KINDS:
        raise ValueError(f"unknown ablation kind {kind!r}; choose from {', '.join(ABLATION_KINDS)}")
    if kind == "mean" and mean is None:
        raise ValueError(f"mean ablation at {hook!r} needs the mean activation (mean=...)")

    hook_name = hook

    def hook_fn(act: Tensor, hook: Any) -> Tensor:
        new = torch.zeros_like(act) if kind == "zero" else _mean_like(mean, act, hook_name)
        if mask is None:
            return new
        return torch.where(_broadcast_mask(mask, act, hook_name), new, act)

    return [(hook, hook_fn)]


def hook_layer(hook_name: str) -> int:
    """The block index of a hook (`blocks.{L}.…` -> L), for `start_at_layer`.

    Embedding hooks (`hook_embed`, `hook_pos_embed`) give 0, but they fire only in a pass
    that starts from tokens, not in one started with `start_at_layer=0`. Hooks after the
    last block (`ln_final.*`, `unembed.*`) raise ValueError: their layer is the model's
    n_layers, which the name does not tell.
    """
    parts = hook_name.split(".")
    if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
        return int(parts[1])
    if hook_name in _EMBED_HOOKS:
        return 0
    raise ValueError(f"hook {hook_name!r} is not inside a transformer block; its layer is "
                     "unknown without the model")
