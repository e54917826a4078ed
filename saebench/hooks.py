"""Hook names from other ecosystems, mapped to TransformerLens hook names in one place.

sparsify, dictionary_learning and circuit-tracer name where a dictionary sits by the Hugging
Face module it hooks (`layers.6`, `model.layers.6.mlp`, `transformer.h.6.attn`), not by a
TransformerLens hook. A module has an input and an output: an SAE at it reads and writes
its output, a transcoder reads its input and writes its output.

| module path (any `model.`, `transformer.`, `gpt_neox.` prefix) | input hook | output hook |
|---|---|---|
| `layers.N`, `h.N` (a whole block) | blocks.N.hook_resid_pre | blocks.N.hook_resid_post |
| `layers.N.mlp` | blocks.N.ln2.hook_normalized | blocks.N.hook_mlp_out |
| `layers.N.self_attn`, `.attn` | blocks.N.ln1.hook_normalized | blocks.N.hook_attn_out |

    >>> module_hooks("model.layers.6.mlp")
    ('blocks.6.ln2.hook_normalized', 'blocks.6.hook_mlp_out')

dictionary_learning's demos name an activation instead of a module: `resid_post_layer_N`,
`mlp_out_layer_N`, `attn_out_layer_N` are `blocks.N.hook_resid_post` (`activation_hook`).
"""

from __future__ import annotations

import re

_PREFIX = re.compile(r"^(?:(?:model|transformer|gpt_neox|base_model)\.)*")
_MODULES: tuple[tuple[re.Pattern[str], str, str, str], ...] = (
    # (module path pattern, its canonical form, input hook, output hook); N is the layer
    (re.compile(r"^(?:layers|h)\.(\d+)$"), "layers.{n}", "blocks.{n}.hook_resid_pre",
     "blocks.{n}.hook_resid_post"),
    (re.compile(r"^(?:layers|h)\.(\d+)\.mlp$"), "layers.{n}.mlp",
     "blocks.{n}.ln2.hook_normalized", "blocks.{n}.hook_mlp_out"),
    (re.compile(r"^(?:layers|h)\.(\d+)\.(?:self_attn|attn|attention)$"), "layers.{n}.self_attn",
     "blocks.{n}.ln1.hook_normalized", "blocks.{n}.hook_attn_out"),
)
_ACTIVATION = re.compile(r"^(resid_post|mlp_out|attn_out)_layer_(\d+)$")
FORMS = "layers.N, layers.N.mlp, layers.N.self_attn (or h.N..., with a model. prefix)"


def module_hooks(module: str) -> tuple[str, str]:
    """(input hook, output hook) of a Hugging Face module path; ValueError naming the forms
    it knows when there is no mapping."""
    bare = _PREFIX.sub("", module)
    for pattern, _, read, write in _MODULES:
        match = pattern.match(bare)
        if match:
            return read.format(n=match[1]), write.format(n=match[1])
    raise ValueError(f"no TransformerLens hook is known for the module {module!r}; known "
                     f"forms: {FORMS}; give hook: (and hook_out:) in the suite")


def activation_hook(name: str) -> str:
    """The hook of an activation named as dictionary_learning's demos name it
    (`resid_post_layer_3` -> `blocks.3.hook_resid_post`); ValueError for another name."""
    match = _ACTIVATION.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not an activation name such as resid_post_layer_3")
    return f"blocks.{match[2]}.hook_{match[1]}"


def module_path(output_hook: str) -> str:
    """The canonical Hugging Face module path whose output is `output_hook` (the inverse of
    `module_hooks` on outputs); ValueError when there is none."""
    for _, canonical, _, output in _MODULES:
        match = re.fullmatch(re.escape(output).replace(r"\{n\}", r"(\d+)"), output_hook)
        if match:
            return canonical.format(n=match[1])
    raise ValueError(f"no Hugging Face module path is known for the hook {output_hook!r}")


_BLOCK_ORDER = ("hook_resid_pre", "ln1.", "attn.", "hook_attn_out", "hook_resid_mid", "ln2.",
                "mlp.", "hook_mlp_out", "hook_resid_post")
"""The parts of a TransformerLens block in the order its hooks run."""


def hook_order(hook: str) -> tuple[int, int]:
    """(layer, place within the block) of a `blocks.N....` hook: a hook runs before another
    when its order is smaller (within one sublayer the order is shared); `embed`-level hooks
    come first and `ln_final` last.

        >>> hook_order("blocks.2.hook_mlp_out") < hook_order("blocks.3.hook_resid_pre")
        True
    """
    if not hook.startswith("blocks."):
        return (-1, 0) if hook.startswith(("hook_embed", "hook_pos_embed")) else (1 << 30, 0)
    _, layer, rest = hook.split(".", 2)
    place = next((i for i, part in enumerate(_BLOCK_ORDER) if rest.startswith(part)),
                 len(_BLOCK_ORDER))
    return (int(layer), place)
