"""`circuit_tracer:` dictionaries: a directory circuit-tracer reads, a per-layer transcoder
set or a cross-layer transcoder (CLT), spliced as a *replacement model*: every layer's MLP
output replaced at once, each layer's features reading the spliced model.

circuit-tracer (`circuit-tracer` on PyPI) pins transformers <= 4.57 and an older
transformer-lens than sae-lens needs, so it cannot be installed beside saebench. This module
reads its on-disk format with safetensors and runs its equations, as its loaders
(`load_transcoder_set`, `load_transcoder`, `load_clt`) and activation functions define them:

- `config.yaml`: `model_kind` (`transcoder_set` or `cross_layer_transcoder`),
  `feature_input_hook` and `feature_output_hook`, hook names under `blocks.{layer}.`
  (e.g. `ln2.hook_normalized` and `hook_mlp_out`); for a transcoder set, `activation`
  (`topk` with `k`: the k largest pre-activations kept as they are, no ReLU; `relu`;
  `jump_relu`, or left out: JumpReLU `pre * (pre > threshold)` where every layer stores a
  threshold, ReLU where none does). A CLT's loader reads no activation: JumpReLU with
  stored thresholds, else ReLU, which an `activation` key may only confirm. `model_name`,
  `scan`, `revision`, `repo_id`, `subfolder` (which model and weights) and `lazy_encoder`,
  `lazy_decoder` (when weights are read) change no number and are ignored; any other key,
  `transcoders:` (per-layer paths, possibly on the hub) included, is refused.
- a transcoder set: `layer_{i}.safetensors` per layer, with `W_enc` [d_tc, d_model], `W_dec`
  [d_tc, d_model], `b_enc`, `b_dec`, and optionally `W_skip` [d_model, d_model] (adds
  `x @ W_skip.T`; every layer or none), `activation_function.threshold` and `k` (the value
  circuit-tracer writes beside a TopK's weights, which must agree with the config).
- a CLT: per source layer i, `W_enc_{i}.safetensors` (`W_enc_{i}` [d_tc, d_model],
  `b_enc_{i}`, `b_dec_{i}`, optionally `threshold_{i}`) and `W_dec_{i}.safetensors`
  (`W_dec_{i}` [d_tc, n_layers - i, d_model]); layer j's output is
  `b_dec_j + Σ_{i ≤ j} f_i @ W_dec_i[:, j - i]`.

Any other tensor is refused. The files must cover layers 0..n-1 (a CLT claims n in
`W_dec_0`'s shape), and n must be the model's layer count (`coverage_problem`, once the model
is known) unless `args: {layers: [0, ..., n-1]}` says that only those are replaced.

Each layer becomes one part (`splice.Dictionary` with `part_of` the entry's name); a CLT's
layer-i part writes every MLP output from layer i on. `args: {shuffle_decoders: <seed>}`
gives the control with each layer's decoder vectors permuted among its features (same
weights, no feature→output mapping): a replacement model that must fail its checks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from saebench import located
from saebench.options import quote

if TYPE_CHECKING:
    from saebench.suite import DictionarySpec, Suite

from saebench.dictionaries import DictionaryInfo, Format, register_format, sha256_of

CONFIG_FILE = "config.yaml"
KINDS = ("transcoder_set", "cross_layer_transcoder")
ACTIVATIONS = ("relu", "jump_relu", "topk")
REQUIRED_KEYS = ("model_kind", "feature_input_hook", "feature_output_hook")
IGNORED_KEYS = ("model_name", "scan", "revision", "repo_id", "subfolder", "lazy_encoder",
                "lazy_decoder")
"""Config keys that name the model and weights or say when weights are read: no number
depends on them."""
CONFIG_KEYS = (*REQUIRED_KEYS, "activation", "k", *IGNORED_KEYS)
ARGS = ("shuffle_decoders", "layers")
ARCHITECTURE = "circuit_tracer-"
"""The prefix of the `DictionaryInfo.architecture` of this format's entries."""
_OPTIONAL = ("threshold", "W_skip", "k")
_LAYER_FILES = {"transcoder_set": re.compile(r"^layer_(\d+)\.safetensors$"),
                "cross_layer_transcoder": re.compile(r"^W_(?:enc|dec)_(\d+)\.safetensors$")}


def _activation(pre: Tensor, rule: str, threshold: Tensor | None, k: int | None) -> Tensor:
    """circuit-tracer's activation functions: ReLU, JumpReLU `pre * (pre > threshold)`, and
    TopK, which keeps the k largest pre-activations as they are (no ReLU) and zeroes the rest."""
    if rule == "topk":
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    return pre * (pre > threshold) if rule == "jump_relu" else pre.relu()


class TranscoderLayer(torch.nn.Module):
    """One layer of a circuit-tracer replacement model: features read one hook and write
    one (a transcoder of a set) or several (a CLT layer: every later MLP output).

    `encode(x)` gives dense features; `decode(features, x)` the reconstruction, a tuple
    with one entry per write hook when there are several (the saebench protocol). `rule`
    is the activation (`ACTIVATIONS`), `k` TopK's.
    """

    def __init__(self, tensors: dict[str, Tensor], read_hook: str,
                 write_hooks: tuple[str, ...], rule: str, k: int | None = None) -> None:
        super().__init__()
        self.W_enc = torch.nn.Parameter(tensors["W_enc"], requires_grad=False)
        self.b_enc = torch.nn.Parameter(tensors["b_enc"], requires_grad=False)
        self.W_dec = torch.nn.Parameter(tensors["W_dec"], requires_grad=False)  # [f, n_out, d]
        self.b_dec = torch.nn.Parameter(tensors["b_dec"], requires_grad=False)
        threshold = tensors.get("threshold") if rule == "jump_relu" else None  # else unused
        for name, value in (("threshold", threshold), ("W_skip", tensors.get("W_skip"))):
            setattr(self, name, None if value is None
                    else torch.nn.Parameter(value, requires_grad=False))
        self.rule, self.k = rule, k
        self.read_hooks, self.write_hooks = (read_hook,), write_hooks
        self.d_sae, self.d_in = self.W_enc.shape
        self.d_out = self.W_dec.shape[-1]

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [..., d_tc]."""
        pre = x.to(self.W_enc.dtype) @ self.W_enc.T + self.b_enc
        return _activation(pre, self.rule, self.threshold, self.k)

    def decode(self, feats: Tensor, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        """This layer's contribution to each write hook (its own output bias on the first)."""
        out = (feats.to(self.W_dec.dtype) @ self.W_dec.flatten(1)).unflatten(
            -1, self.W_dec.shape[1:])
        parts = list(out.unbind(-2))
        parts[0] = parts[0] + self.b_dec
        if self.W_skip is not None:
            parts[0] = parts[0] + x.to(self.W_skip.dtype) @ self.W_skip.T
        return parts[0] if len(parts) == 1 else tuple(parts)


def _read_config(directory: Path) -> dict[str, Any]:
    """config.yaml's keys, each checked (`CONFIG_KEYS`); a problem is a ValueError."""
    import yaml

    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a circuit-tracer directory: expected {CONFIG_FILE}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid YAML ({located.first_line(err)})") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) and raw[k]
                                            for k in REQUIRED_KEYS):
        raise ValueError(f"{path}: not a circuit-tracer config (needs {', '.join(REQUIRED_KEYS)}"
                         f" as strings)")
    if "transcoders" in raw:
        raise ValueError(f"{path}: transcoders: (per-layer paths) is not read; give a directory "
                         "of layer_{i}.safetensors files (circuit-tracer's "
                         "save_transcoders_to_cache writes one)")
    unknown = sorted(set(raw) - set(CONFIG_KEYS), key=str)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; circuit-tracer's keys: "
                         f"{', '.join(CONFIG_KEYS)}")
    if raw["model_kind"] not in KINDS:
        raise ValueError(f"{path}: model_kind {raw['model_kind']!r} is not one of "
                         f"{', '.join(KINDS)}")
    if raw.get("activation") not in (None, *ACTIVATIONS):
        raise ValueError(f"{path}: activation {raw['activation']!r} is not one of "
                         f"{', '.join(ACTIVATIONS)} (or left out)")
    k = raw.get("k")
    if (raw.get("activation") == "topk") != (k is not None):
        raise ValueError(f"{path}: k goes with activation: topk, and only with it "
                         f"(activation {raw.get('activation')!r}, k {k!r})")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{path}: k must be an integer >= 1, got {k!r}")
    return raw


@contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """`path` opened with safetensors; an unreadable (truncated, pickled) file is a
    ValueError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file "
                         f"({located.first_line(err)})") from None


def _files(kind: str, layers: Iterable[int]) -> list[str]:
    """The file names that hold `layers` of a `kind`."""
    if kind == "transcoder_set":
        return [f"layer_{i}.safetensors" for i in layers]
    return [f"{w}_{i}.safetensors" for i in layers for w in ("W_enc", "W_dec")]


def _claimed_layers(directory: Path, kind: str) -> int:
    """How many layers the files say they cover: one past the highest layer file, or for a
    CLT at least the outputs `W_dec_0` writes; every file of layers 0..n-1 must be there."""
    found = [int(m[1]) for p in directory.iterdir() if (m := _LAYER_FILES[kind].match(p.name))]
    if not found:
        raise ValueError(f"{directory}: no layer files of a {kind} ({_files(kind, [0])[0]}, ...)")
    n_layers, why = max(found) + 1, f"its files go up to layer {max(found)}"
    first = directory / "W_dec_0.safetensors"
    if kind == "cross_layer_transcoder" and first.is_file():
        with _opened(first) as f:
            shape = f.get_slice("W_dec_0").get_shape() if "W_dec_0" in set(f.keys()) else []
        if len(shape) == 3 and shape[1] > n_layers:
            n_layers, why = shape[1], f"W_dec_0 writes {shape[1]} layers"
    missing = [name for name in _files(kind, range(n_layers)) if not (directory / name).is_file()]
    if missing:
        raise ValueError(f"{directory}: a {kind} of layers 0..{n_layers - 1} ({why}), but "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    return n_layers


def _tensor_names(kind: str, layer: int) -> dict[str, tuple[str, str]]:
    """Where each tensor `TranscoderLayer` takes is stored: name -> (file, stored name)."""
    if kind == "transcoder_set":
        file = f"layer_{layer}.safetensors"
        return {"W_enc": (file, "W_enc"), "b_enc": (file, "b_enc"), "W_dec": (file, "W_dec"),
                "b_dec": (file, "b_dec"), "threshold": (file, "activation_function.threshold"),
                "W_skip": (file, "W_skip"), "k": (file, "k")}
    enc, dec = f"W_enc_{layer}.safetensors", f"W_dec_{layer}.safetensors"
    return {"W_enc": (enc, f"W_enc_{layer}"), "b_enc": (enc, f"b_enc_{layer}"),
            "b_dec": (enc, f"b_dec_{layer}"), "threshold": (enc, f"threshold_{layer}"),
            "W_dec": (dec, f"W_dec_{layer}")}


def _read_layer(directory: Path, kind: str, layer: int, shapes_only: bool) -> dict[str, Any]:
    """Layer `layer`'s tensors (or their shapes; `k`'s value either way) under the names
    `TranscoderLayer` takes; a file holding a tensor of no known name is refused."""
    names = _tensor_names(kind, layer)
    out: dict[str, Any] = {}
    for file in dict.fromkeys(f for f, _ in names.values()):  # each file opened once
        wanted = {stored: key for key, (f, stored) in names.items() if f == file}
        with _opened(directory / file) as f:
            present = set(f.keys())
            unknown = sorted(present - set(wanted))
            if unknown:
                raise ValueError(f"{directory / file}: unknown tensor(s) {unknown}; circuit-"
                                 f"tracer stores {', '.join(wanted)}")
            for stored, key in wanted.items():
                if stored in present:
                    out[key] = (tuple(f.get_slice(stored).get_shape())
                                if shapes_only and key != "k" else f.get_tensor(stored))
                elif key not in _OPTIONAL:
                    raise ValueError(f"{directory / file}: no tensor {stored!r}")
    return out


def _shape(value: Any) -> tuple[int, ...]:
    """The shape of a tensor, or a shape as it is."""
    return tuple(value) if isinstance(value, tuple) else tuple(value.shape)


def _check_layer(out: dict[str, Any], kind: str, layer: int, n_layers: int, where: Path) -> None:
    """The shapes of one layer's tensors (`_read_layer`) against each other."""
    d_tc, d_model = _shape(out["W_enc"])
    expected = {"b_enc": (d_tc,), "b_dec": (d_model,), "threshold": (d_tc,),
                "W_skip": (d_model, d_model), "k": (),
                "W_dec": (d_tc, d_model) if kind == "transcoder_set"
                else (d_tc, n_layers - layer, d_model)}
    names = _tensor_names(kind, layer)
    for key, want in expected.items():
        if key in out and _shape(out[key]) != want:
            raise ValueError(f"{where / names[key][0]}: {names[key][1]} has shape "
                             f"{list(_shape(out[key]))}, expected {list(want)} "
                             f"(from W_enc {[d_tc, d_model]})")


def _rule(cfg: dict[str, Any], layers: list[dict[str, Any]], path: Path) -> str:
    """The activation every layer's features go through (`ACTIVATIONS`), from the config
    and the stored thresholds, as circuit-tracer's loaders decide it; a contradiction is a
    ValueError."""
    stored = {"threshold": [i for i, t in enumerate(layers) if "threshold" in t],
              "W_skip": [i for i, t in enumerate(layers) if "W_skip" in t],
              "k": [i for i, t in enumerate(layers) if "k" in t]}
    for name in ("threshold", "W_skip"):
        if stored[name] and len(stored[name]) != len(layers):
            raise ValueError(f"{path}: layers {stored[name]} store {name} and the others do not; "
                             "every layer or none must")
    given, kind = cfg.get("activation"), cfg["model_kind"]
    default = "jump_relu" if stored["threshold"] else "relu"
    if kind == "cross_layer_transcoder" and given not in (None, default):
        raise ValueError(f"{path}: activation {given!r} on a cross_layer_transcoder, whose "
                         f"features circuit-tracer runs as {default} (JumpReLU where "
                         "threshold_{i} is stored, ReLU otherwise)")
    if given == "jump_relu" and not stored["threshold"]:
        raise ValueError(f"{path}: activation jump_relu, but no layer stores "
                         "activation_function.threshold")
    bad_k = [i for i in stored["k"] if int(layers[i]["k"]) != cfg.get("k")]
    if bad_k:
        raise ValueError(f"{path}: layers {bad_k} store k="
                         f"{int(layers[bad_k[0]]['k'])}, but the config says k: {cfg.get('k')}")
    if cfg.get("k") is not None and cfg["k"] > layers[0]["W_enc"][0]:
        raise ValueError(f"{path}: k={cfg['k']} is more than the {layers[0]['W_enc'][0]} "
                         "features of a layer")
    return given or default


def _check_args(args: Mapping[str, Any], n_layers: int) -> None:
    """The entry's `args:` (`ARGS`): a seed for `shuffle_decoders`, and `layers`, which must
    be the layers the files hold."""
    unknown = sorted(set(args) - set(ARGS))
    if unknown:
        raise ValueError(f"args {unknown} do not apply; circuit_tracer takes {', '.join(ARGS)}")
    seed = args.get("shuffle_decoders")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"args.shuffle_decoders must be an integer seed, got {seed!r}")
    if "layers" in args and args["layers"] != list(range(n_layers)):
        raise ValueError(f"args.layers is {quote(args['layers'])}, but the files hold "
                         f"layers {list(range(n_layers))}: give those (the layers replaced)")


def _inspect(spec: DictionarySpec, suite_path: Path | None
             ) -> tuple[Path, dict[str, Any], int, list[dict[str, Any]], str]:
    """The entry's directory, config, layer count, per-layer tensor shapes and activation
    rule; a problem is a located error."""
    directory = located.local_path(spec.ref, suite_path)
    try:
        if not directory.is_dir():
            raise ValueError(f"{directory} is not a directory")
        cfg = _read_config(directory)
        kind = cfg["model_kind"]
        n_layers = _claimed_layers(directory, kind)
        shapes = [_read_layer(directory, kind, i, True) for i in range(n_layers)]
        for i, layer in enumerate(shapes):
            _check_layer(layer, kind, i, n_layers, directory)
        widths = [s["W_enc"] for s in shapes]
        if len(set(widths)) > 1:
            raise ValueError(f"{directory}: the layers' W_enc shapes differ ({widths}); "
                             "circuit-tracer needs one d_transcoder and d_model for all")
        rule = _rule(cfg, shapes, directory / CONFIG_FILE)
        if spec.hook or spec.hook_out:
            raise ValueError("hook:/hook_out: do not apply: a circuit-tracer model's hooks come "
                             "from its config.yaml (feature_input_hook, feature_output_hook)")
        _check_args(spec.args, n_layers)
    except (ValueError, OSError) as err:
        raise located.error_at(suite_path, spec.line, f"dictionaries.{spec.name}",
                               str(err)) from None
    return directory, cfg, n_layers, shapes, rule


def hooks_of(cfg: dict[str, Any], n_layers: int) -> tuple[list[str], list[str]]:
    """The read hook and the write hook of each layer, as TransformerLens names."""
    return ([f"blocks.{i}.{cfg['feature_input_hook']}" for i in range(n_layers)],
            [f"blocks.{i}.{cfg['feature_output_hook']}" for i in range(n_layers)])


def coverage_problem(suite: Suite, names: Iterable[str], infos: Mapping[str, DictionaryInfo],
                     n_layers: int) -> str | None:
    """The located problem of the first entry of `names` that is a circuit-tracer
    replacement model of fewer layers than the model's `n_layers` (its last layers' files
    missing, say) without `args: {layers: [...]}` saying that only those are replaced;
    None when there is none. A probe cannot tell: it does not know the model."""
    for name in names:
        info, spec = infos.get(name), suite.dictionaries.get(name)
        if info is None or spec is None or "layers" in spec.args \
                or not (info.architecture or "").startswith(ARCHITECTURE):
            continue
        covered = len(info.write_hooks)
        if covered < n_layers:
            kind = info.architecture.removeprefix(ARCHITECTURE)
            missing = _files(kind, range(covered, n_layers))
            shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
            where = located.where_of(suite.path, spec.line, f"dictionaries.{name}")
            return (f"{where}: a {kind} of layers 0..{covered - 1} replaces part of a model of "
                    f"{n_layers} layers ({shown} missing); add the missing files, or give "
                    f"args: {{layers: {list(range(covered))}}} to evaluate a replacement of "
                    "those layers only")
    return None


def _probe(spec: DictionarySpec, suite_path: Path | None) -> DictionaryInfo:
    directory, cfg, n_layers, shapes, _ = _inspect(spec, suite_path)
    reads, writes = hooks_of(cfg, n_layers)
    d_tc, d_model = shapes[0]["W_enc"]
    shuffled = spec.args.get("shuffle_decoders")
    identity = {"source": f"circuit_tracer:{directory}",
                "sha256": sha256_of([directory / CONFIG_FILE, *(
                    directory / f for f in _files(cfg["model_kind"], range(n_layers)))]),
                **({"shuffle_decoders": str(shuffled)} if shuffled is not None else {})}
    return DictionaryInfo(",".join(reads), ",".join(writes), d_model, d_model,
                          sum(s["W_enc"][0] for s in shapes), identity,
                          f"{ARCHITECTURE}{cfg['model_kind']}")


def shuffle_decoders(tensors: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """`tensors` with the decoder vectors (`W_dec` rows) permuted among the features."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(tensors["W_dec"].shape[0], generator=generator)
    return {**tensors, "W_dec": tensors["W_dec"][order.to(tensors["W_dec"].device)]}


def _load(spec: DictionarySpec, device: str | torch.device, suite_path: Path | None,
          allow_factory: bool = False) -> tuple[Any, ...]:
    from saebench.splice import as_dictionary

    directory, cfg, n_layers, _, rule = _inspect(spec, suite_path)
    kind = cfg["model_kind"]
    reads, writes = hooks_of(cfg, n_layers)
    seed = spec.args.get("shuffle_decoders")
    parts = []
    for i in range(n_layers):
        tensors = _read_layer(directory, kind, i, False)
        tensors.pop("k", None)
        if kind == "transcoder_set":
            tensors["W_dec"] = tensors["W_dec"].unsqueeze(1)
        if seed is not None:
            tensors = shuffle_decoders(tensors, seed + i)
        tensors = {k: v.to(device=device, dtype=torch.float32) for k, v in tensors.items()}
        outs = (writes[i],) if kind == "transcoder_set" else tuple(writes[i:])
        layer = TranscoderLayer(tensors, reads[i], outs, rule, cfg.get("k"))
        parts.append(as_dictionary(layer, name=f"{spec.name}/L{i}", part_of=spec.name))
    return tuple(parts)


register_format(Format(name="circuit_tracer", ref="directory", probe=_probe, load=_load,
                       keys=("args",),
                       summary="a circuit-tracer transcoder set or cross-layer transcoder "
                               "(config.yaml + safetensors), spliced at every layer at once"))
