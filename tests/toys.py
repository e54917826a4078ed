"""Small stand-ins shared by the tests: tiny random models and toy dictionaries.

    >>> from toys import Identity, tiny_model, width
    >>> model = tiny_model()
    >>> as_dictionary(Identity(), hook="blocks.0.hook_mlp_out", d_in=width(model, hook), ...)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


MINI_SUITE = """\
suite: mini
model: zoo
data: {source: zoo, n_tokens: 1024}
tasks: {quote: {zoo: closing_quote}}
dictionaries:
  good: {zoo: resid-L2-topk16}
  poor: {zoo: resid-L2-poor}
  early: {zoo: resid-L1-topk16}
  mlp: {zoo: transcoder-L3}
defaults:
  options: {n_boot: 50, batch_size: 16}
checks:
  - metric: ce_loss_recovered
    dictionaries: [good, early, mlp]
    options: {ablation: zero}
    threshold: ">= 0.5"
  - metric: l0
    dictionaries: [good, poor]
    threshold: "<= 20"
  - metric: logit_diff_recovered
    dictionaries: [good, early]
    task: quote
    threshold: ">= 0.5"
  - metric: feature_ablation
    dictionaries: [early]
    task: quote
    options: {k: 2}
"""
"""A suite of five prefix groups (tokens at layers 1, 2 and 3, a task at layers 1 and 2),
with per-prompt and feature tables: what shards, merges and Ray runs are compared on."""


def run_suite(where: Path, out: str, *args: str) -> None:
    """Run the suite `where/mini.yaml` in a fresh process with one torch thread (so values
    are bit-identical between processes), writing its run directory under `where/out`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "eval", "mini.yaml", "-q",
                           "-p", "no:cacheprovider", f"--saebench-report-dir={out}", *args],
                          cwd=where, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]




def run_suite_files(where: Path, files: list[str], out: str, *args: str) -> Path:
    """Run suite files of `where` as one run in a fresh process with one torch thread; the
    run directory it wrote under `where/out`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "eval", *files, "-q",
                           "-p", "no:cacheprovider", f"--saebench-report-dir={out}", *args],
                          cwd=where, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return max((where / out).iterdir(), key=lambda p: p.stat().st_mtime)
