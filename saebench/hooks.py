"""Hook names from other ecosystems, mapped to TransformerLens hook names in one place.

sparsify, dictionary_learning and circuit-tracer name where a dictionary sits by the Hugging
Face module it hooks (`layers.6`, `model.layers.6.mlp`, `transformer.h.6.attn`), not by a
TransformerLens hook. A module's output is what a dictionary at it reconstructs; an MLP
module also has an input (what a transcoder at it reads):

| module path (any `model.`, `transformer.`, `gpt_neox.` prefix) | read hook | write hook |
|---|---|---|
| `layers.N`, `h.N` (a whole block's output) | blocks.N.hook_resid_post | same |
| `layers.N.mlp` | blocks.N.ln2.hook_normalized | blocks.N.hook_mlp_out |
| `layers.N.self_attn`, `layers.N.attn`, `layers.N.attention` | blocks.N.hook_attn_out | same |

    >>> transformer_lens_hooks("model.layers.6.mlp")
    ('blocks.6.ln2.hook_normalized', 'blocks.6.hook_mlp_out')
"""

from __future__ import annotations

import re

_PREFIX = re.compile(r"^(?:(?:model|transformer|gpt_neox|base_model)\.)*")
_MODULES: tuple[tuple[re.Pattern[str], str, str, str], ...] = (
    # (module path pattern, its canonical form, read hook, write hook); N is the layer
    (re.compile(r"^(?:layers|h)\.(\d+)$"), "layers.{n}", "blocks.{n}.hook_resid_post",
     "blocks.{n}.hook_resid_post"),
    (re.compile(r"^(?:layers|h)\.(\d+)\.mlp$"), "layers.{n}.mlp",
     "blocks.{n}.ln2.hook_normalized", "blocks.{n}.hook_mlp_out"),
    (re.compile(r"^(?:layers|h)\.(\d+)\.(?:self_attn|attn|attention)$"), "layers.{n}.self_attn",
     "blocks.{n}.hook_attn_out", "blocks.{n}.hook_attn_out"),
)
FORMS = "layers.N, layers.N.mlp, layers.N.self_attn (or h.N..., with a model. prefix)"


def transformer_lens_hooks(module: str) -> tuple[str, str]:
    """(read hook, write hook) for a Hugging Face module path; ValueError naming the forms
    it knows when there is no mapping."""
    bare = _PREFIX.sub("", module)
    for pattern, _, read, write in _MODULES:
        match = pattern.match(bare)
        if match:
            return read.format(n=match[1]), write.format(n=match[1])
    raise ValueError(f"no TransformerLens hook is known for the module {module!r}; known "
                     f"forms: {FORMS}; give hook: (and hook_out:) in the suite")


def module_path(write_hook: str) -> str:
    """The canonical Hugging Face module path whose output is `write_hook` (the inverse of
    `transformer_lens_hooks` on write hooks); ValueError when there is none."""
    for _, canonical, _, write in _MODULES:
        match = re.fullmatch(re.escape(write).replace(r"\{n\}", r"(\d+)"), write_hook)
        if match:
            return canonical.format(n=match[1])
    raise ValueError(f"no Hugging Face module path is known for the hook {write_hook!r}")
