"""Small stand-ins shared by the tests: tiny random models and toy dictionaries.

    >>> from toys import Identity, tiny_model, width
    >>> model = tiny_model()
    >>> as_dictionary(Identity(), hook="blocks.0.hook_mlp_out", d_in=width(model, hook), ...)
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

HOOKS = ["blocks.{l}.hook_resid_pre", "blocks.{l}.hook_mlp_out", "blocks.{l}.hook_attn_out",
         "blocks.{l}.mlp.hook_post", "blocks.{l}.attn.hook_z", "blocks.{l}.hook_resid_post"]
"""Hook templates of every site kind a dictionary can sit at (`.format(l=layer)`)."""


def tiny_config(n_layers: int = 2, seed: int = 0, **overrides) -> HookedTransformerConfig:
    """A 16-wide, 2-head random transformer config (LayerNorm unless overridden)."""
    fields = dict(n_layers=n_layers, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=12,
                  d_vocab=29, act_fn="gelu", normalization_type="LN", seed=seed)
    return HookedTransformerConfig(**(fields | overrides))


def tiny_model(n_layers: int = 2, seed: int = 0, **overrides) -> HookedTransformer:
    """A random `tiny_config` model in eval mode, without a tokenizer."""
    return HookedTransformer(tiny_config(n_layers, seed, **overrides)).eval()


def width(model: HookedTransformer, hook: str) -> int:
    """The activation width at `hook` (per-head hooks flattened)."""
    if hook.endswith("mlp.hook_post"):
        return model.cfg.d_mlp
    if hook.endswith("hook_z"):
        return model.cfg.n_heads * model.cfg.d_head
    return model.cfg.d_model


def tokens_for(model: HookedTransformer, n: int, seed: int) -> torch.Tensor:
    """`n` random full-length token rows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (n, model.cfg.n_ctx), generator=g)


class Identity:
    """A dictionary whose features are the activation itself."""

    def encode(self, x):
        return x

    def decode(self, f):
        return f


class Zero(Identity):
    """A dictionary that reconstructs nothing."""

    def decode(self, f):
        return torch.zeros_like(f)


def lossy(f: torch.Tensor) -> torch.Tensor:
    """A deterministic shrunken, distorted copy of `f`."""
    return 0.6 * f + 0.3 * torch.tanh(f).flip(-1)


class Scaled(Identity):
    """A lossy dictionary: `lossy` of the activation."""

    def decode(self, f):
        return lossy(f)
