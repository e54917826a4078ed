"""saebench's core metrics against sae_lens' `run_evals`: same tokens, same dictionaries.

    python benchmarks/core_vs_sae_lens.py                  # zoo and gpt2, CPU
    python benchmarks/core_vs_sae_lens.py --setting zoo --device cuda
    python benchmarks/core_vs_sae_lens.py --setting vocab256k   # logits memory, CPU

Settings: `zoo`, the toy zoo's residual SAEs on its held-out tokens; `gpt2`, a randomly
initialised GPT-2-small-shaped model (12 layers, d_model 768, vocabulary 50257) with one
random TopK SAE per layer at `hook_resid_pre`. For each, in one process and alternating
(saebench, sae_lens, saebench, ...), it times saebench's `evaluate` and sae_lens'
`run_evals` computing the metrics both compute (CE loss score, KL score, L0, explained
variance, MSE, cosine, L2 ratio), reports the median of each and their ratio, the
pass-count floor (one clean pass, one ablation suffix per hook and one spliced suffix per
dictionary, timed as bare forward passes), and the peak memory each adds (CUDA allocations
on a GPU; on the CPU the peak resident memory of one run in a fresh process).

`vocab256k` is about memory: a random model with Gemma's 256,000-token vocabulary but
tiny otherwise (2 layers, d_model 64) and 3 random TopK SAEs, on batches of 8 x 128
positions, so that logits dominate (one [8, 128, 256000] float32 tensor is 1 GiB). It
compares saebench chunked (`evaluate(..., max_memory="256MiB")`, `--max-memory`), saebench
unchunked (a budget of 64 GiB: one chunk per batch) and sae_lens `run_evals`: times
alternating in one process, peak resident memory each in a fresh process.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from sae_lens import SAE, ActivationsStore, TopKSAE, TopKSAEConfig
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.activation_scaler import ActivationScaler
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saebench import chunks, evaluate, loading
from saebench.engine import resolve_device

SHARED_METRICS = ["ce_loss_recovered", "kl_div_score", "l0", "explained_variance", "mse",
                  "cossim", "l2_ratio"]


def zoo_setting(n_seqs: int) -> tuple[HookedTransformer, list[SAE], torch.Tensor]:
    """The zoo model, its residual SAEs (every layer plus the sweep), held-out tokens."""
    model = loading.load_zoo_model()
    names = [n for n in loading.zoo_dictionary_names() if n.startswith("resid-")
             and not n.endswith("-poor")]
    return model, [loading.load_zoo_dictionary(n) for n in names], \
        loading.load_heldout_tokens()[:n_seqs]


def random_topk_saes(hooks: list[str], d_in: int, d_sae: int, seq_len: int, model_name: str,
                     k: int = 32, seed: int = 0) -> list[SAE]:
    """One random TopK SAE (weights N(0, 0.02)) per hook."""
    torch.manual_seed(seed)
    saes = []
    for hook in hooks:
        sae = TopKSAE(TopKSAEConfig(
            k=k, d_in=d_in, d_sae=d_sae,
            metadata=SAEMetadata(hook_name=hook, prepend_bos=True, context_size=seq_len,
                                 model_name=model_name)))
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_(0, 0.02)
        saes.append(sae)
    return saes


def random_tokens(n_seqs: int, seq_len: int, d_vocab: int, bos: int) -> torch.Tensor:
    """Uniform random token ids in [1, d_vocab) with `bos` at position 0 (seeded)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, d_vocab, (n_seqs, seq_len), generator=generator)
    tokens[:, 0] = bos
    return tokens


def gpt2_setting(n_seqs: int, d_sae: int, seq_len: int) -> tuple[HookedTransformer, list[SAE],
                                                                    torch.Tensor]:
    """A random GPT-2-small-shaped model with one random TopK SAE per layer."""
    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
        d_vocab=50257, act_fn="gelu_new", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg)
    model.eval()
    saes = random_topk_saes([f"blocks.{layer}.hook_resid_pre" for layer in range(cfg.n_layers)],
                            768, d_sae, seq_len, "gpt2-shaped-random")
    return model, saes, random_tokens(n_seqs, seq_len, cfg.d_vocab, bos=50256)


VOCAB256K_BOS = 2
UNCHUNKED = "64GiB"
"""A logits budget no batch here reaches: saebench then sends a whole batch through the
unembedding at once."""


def vocab256k_setting(n_seqs: int, seq_len: int = 128) -> tuple[HookedTransformer, list[SAE],
                                                                   torch.Tensor]:
    """A random 2-layer, d_model-64 model with a 256,000-token vocabulary and 3 TopK SAEs."""
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=seq_len,
        d_vocab=256000, act_fn="gelu_new", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg)
    model.eval()
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    saes = random_topk_saes(hooks, 64, 1024, seq_len, "vocab256k-random")
    return model, saes, random_tokens(n_seqs, seq_len, cfg.d_vocab, bos=VOCAB256K_BOS)


def run_sae_lens(model, saes, tokens, batch_size: int,
                 special: list[int] | None = None) -> None:
    """sae_lens' `run_evals` for every SAE, over exactly `tokens`. `special`: the token ids
    excluded (default: the tokenizer's special tokens, or GPT-2's 50256 without one)."""
    n_batches = len(tokens) // batch_size
    config = EvalConfig(
        batch_size_prompts=batch_size, n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches, compute_kl=True, compute_ce_loss=True,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_l2_norms=True)
    dataset = Dataset.from_dict({"tokens": tokens.tolist()})
    if special is None:
        special = [50256] if model.tokenizer is None else True
    for sae in saes:
        store = ActivationsStore.from_sae(model, sae, dataset, streaming=False,
                                          context_size=tokens.shape[1],
                                          store_batch_size_prompts=batch_size,
                                          n_batches_in_buffer=2)
        run_evals(sae, store, model, ActivationScaler(), config,
                  exclude_special_tokens=special)


def run_saebench(model, saes, tokens, batch_size: int, special: list[int] | None = None,
                 **kwargs) -> None:
    """saebench's `evaluate` for every SAE at once (metrics sae_lens also computes).
    `special`: the token ids excluded (default: the tokenizer's); `kwargs` go to
    `evaluate`."""
    evaluate(model, {f"sae{i}": s for i, s in enumerate(saes)}, tokens, SHARED_METRICS,
             batch_size=batch_size, device=next(model.parameters()).device, progress=False,
             n_boot=1000, exclude_special_tokens=True if special is None else special,
             **kwargs)


@torch.no_grad()
def floor_passes(model, saes, tokens, batch_size: int) -> None:
    """The pass-count floor as bare forward passes: clean, + ablation and splice suffixes."""
    layers = [int(s.cfg.metadata.hook_name.split(".")[1]) for s in saes]
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size]
        _, cache = model.run_with_cache(
            batch, names_filter=[f"blocks.{layer}.hook_resid_pre" for layer in set(layers)])
        for layer in sorted(set(layers)) + layers:
            model(cache[f"blocks.{layer}.hook_resid_pre"], start_at_layer=layer)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_peak(setting: str, tool: str, args: argparse.Namespace) -> str:
    """Peak resident memory in MiB that `tool` adds, in a fresh process (Linux), as
    "first run / second run": the setting is built, the peak-RSS mark reset
    (`/proc/self/clear_refs`) and the tool run; the new peak minus the resident memory before
    the run is the figure. The first run includes imports and allocator growth, the second
    what a warmed-up process needs. A fresh process keeps one tool from reusing memory
    another one freed."""
    cmd = [sys.executable, __file__, "--setting", setting, "--child", tool,
           "--gpt2-seqs", str(args.gpt2_seqs), "--gpt2-d-sae", str(args.gpt2_d_sae),
           "--zoo-seqs", str(args.zoo_seqs), "--vocab-seqs", str(args.vocab_seqs),
           "--max-memory", args.max_memory]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def _child(args: argparse.Namespace) -> None:
    model, saes, tokens, batch_size = build_setting(args.setting, args)
    runner = runners(args.setting, args)[args.child]
    added, seconds = [], []
    for _ in range(2):
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        runner(model, saes, tokens, batch_size)
        seconds.append(time.perf_counter() - start)
        added.append(max(0, _status_kib("VmHWM") - before) / 1024)
    print(f"seconds {seconds[0]:.2f} / {seconds[1]:.2f}", file=sys.stderr)
    print(f"{added[0]:.0f} / {added[1]:.0f}")


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(seconds, peak CUDA memory in MiB the call added; NaN on the CPU, see `cpu_peak`)."""
    gc.collect()
    peak = float("nan")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return time.perf_counter() - start, peak


RUNNERS = {"saebench": run_saebench, "sae_lens": run_sae_lens, "floor": floor_passes}
VOCAB_TOOLS = ("saebench-chunked", "saebench-unchunked", "sae_lens")


def runners(setting: str, args: argparse.Namespace) -> dict[str, Callable]:
    """The tools timed in `setting`, by name."""
    if setting != "vocab256k":
        return RUNNERS
    special = [VOCAB256K_BOS]
    return {"saebench-chunked": partial(run_saebench, special=special,
                                        max_memory=args.max_memory),
            "saebench-unchunked": partial(run_saebench, special=special, max_memory=UNCHUNKED),
            "sae_lens": partial(run_sae_lens, special=special)}


def build_setting(setting: str, args: argparse.Namespace):
    """(model, saes, tokens, batch size) of a setting."""
    if setting == "zoo":
        return (*zoo_setting(args.zoo_seqs), 16)
    if setting == "vocab256k":
        return (*vocab256k_setting(args.vocab_seqs), 8)
    return (*gpt2_setting(args.gpt2_seqs, args.gpt2_d_sae, seq_len=128), 4)


def bench(name: str, setting: str, args: argparse.Namespace, device) -> str:
    """Alternate the tools `args.repeats` times; a Markdown table of medians and ratios."""
    model, saes, tokens, batch_size = build_setting(setting, args)
    repeats = args.repeats
    model.to(device)
    for s in saes:
        s.to(device)
    tokens = tokens.to(device)
    tools = runners(setting, args)
    results: dict[str, list[tuple[float, float]]] = {tool: [] for tool in tools}
    for _ in range(repeats):
        for tool, runner in tools.items():
            results[tool].append(timed(lambda r=runner: r(model, saes, tokens, batch_size)))
    med = {tool: statistics.median(t for t, _ in runs) for tool, runs in results.items()}
    peak = {tool: f"{max(m for _, m in runs):.0f}" for tool, runs in results.items()}
    if device.type == "cpu":
        peak = {tool: cpu_peak(setting, tool, args) for tool in tools}
    lines = [
        f"### {name}: {len(saes)} SAEs, {tokens.numel()} tokens "
        f"({len(tokens)} x {tokens.shape[1]}), batch {batch_size}, device {device}",
        "",
        f"| measure | seconds (median of {repeats}) | peak memory added, MiB"
        f"{' (first / second run)' if device.type == 'cpu' else ''} |",
        "|---|---|---|",
        *(f"| {tool} | {med[tool]:.2f} | {peak[tool]} |" for tool in tools),
        "",
    ]
    if setting == "vocab256k":
        first = {tool: float(peak[tool].split("/")[0]) for tool in tools}
        per_chunk = chunks.positions_per_chunk(model.cfg.d_vocab, max_memory=args.max_memory)
        lines += [
            f"- chunked: max_memory {args.max_memory}, {per_chunk} positions per chunk "
            f"({-(-batch_size * tokens.shape[1] // per_chunk)} chunks per batch); unchunked: "
            f"max_memory {UNCHUNKED}, one chunk per batch",
            f"- time, saebench chunked / unchunked: "
            f"**{med['saebench-chunked'] / med['saebench-unchunked']:.3f}x** (target <= 1.10)",
            f"- peak memory (first run), saebench chunked / sae_lens: "
            f"**{_ratio(first['saebench-chunked'], first['sae_lens'])}** (target <= 0.50); "
            f"unchunked / sae_lens: {_ratio(first['saebench-unchunked'], first['sae_lens'])}",
            "",
        ]
    else:
        lines += [
            f"- speed-up over sae_lens `run_evals`: "
            f"**{med['sae_lens'] / med['saebench']:.2f}x**",
            f"- saebench / pass-count floor: **{med['saebench'] / med['floor']:.2f}x**",
            "",
        ]
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=["zoo", "gpt2", "vocab256k", "all"], default="all",
                        help="all: zoo and gpt2")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpt2-seqs", type=int, default=8)
    parser.add_argument("--gpt2-d-sae", type=int, default=4096)
    parser.add_argument("--zoo-seqs", type=int, default=256)
    parser.add_argument("--vocab-seqs", type=int, default=8,
                        help="vocab256k: sequences of 128 tokens (batches of 8; default one batch)")
    parser.add_argument("--max-memory", default="256MiB",
                        help="vocab256k: saebench's chunked logits budget")
    parser.add_argument("--child", choices=[*RUNNERS, *VOCAB_TOOLS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.child:
        _child(args)
        return
    device = resolve_device(args.device)
    names = {"zoo": "toy zoo residual SAEs", "gpt2": "GPT-2-small-shaped random model",
             "vocab256k": "256,000-token vocabulary, random 2-layer d_model-64 model"}
    settings = ["zoo", "gpt2"] if args.setting == "all" else [args.setting]
    print("\n".join(bench(names[s], s, args, device) for s in settings))


if __name__ == "__main__":
    main()
