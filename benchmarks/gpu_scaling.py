"""saebench's `evaluate` against sae_lens' `run_evals` on one GPU, at two model scales.

    bash benchmarks/gpu.sh                # on a machine with a CUDA device (< 5 minutes)
    bash benchmarks/gpu.sh --smoke        # tiny shapes on the CPU: checks the script runs

Two randomly initialised models, float32, no network: a GPT-2-small-shaped one (12
layers, d_model 768, vocabulary 50,257) with 12 random TopK SAEs (d_sae 16,384, one per
layer at `hook_resid_pre`) and a Gemma-2-2B-shaped one (TransformerLens' gemma-2-2b
configuration: 26 layers, d_model 2304, vocabulary 256,000, GQA, soft caps, local/global
attention) with 4 random TopK SAEs (d_sae 16,384) at `hook_resid_post` of layers 5, 12, 19
and 24. Both tools get the same tokens, dictionaries and excluded token (the BOS id) and
compute the metrics both compute (CE loss score, KL score, L0, explained variance, MSE,
cosine, L2 ratio; saebench with 1,000 bootstrap resamples, stacking on CUDA by default).

In one process per model, alternating tools (saebench N, sae_lens N, saebench 1, sae_lens
1, then again), it times each tool with all N dictionaries and with one (the middle
layer's), and prints per tool: tokens/s with N dictionaries, seconds per additional
dictionary ((t_N - t_1) / (N - 1)), and the peak GPU memory of the N-dictionary run
(`torch.cuda.max_memory_allocated`, the peak statistics reset before each tool's run;
"added" is the peak minus what was allocated before the run: model, SAEs, tokens); then the
ratios sae_lens / saebench. Medians over `--repeats`.

Time estimate (float32 on an H100/H200-class card, taking 25 TFLOP/s effective, a third of
the FP32 peak, for PyTorch's matmuls and the logits' memory traffic). A forward pass costs
about 2 x (non-embedding + unembedding parameters) FLOPs per token: 0.25 GFLOP for the
GPT-2 shape (85M + 39M), 5.2 GFLOP for the Gemma shape (2.03B + 0.59B). Per token, sae_lens
runs 3 full passes per SAE (clean, spliced, zero-ablated) plus a pass up to the SAE's layer
(sparsity and variance); saebench one clean pass, one suffix pass from the hook per SAE and
one ablated suffix per hook that zero-ablation reduces to one row. One repeat (N and 1
dictionaries, both tools) is then about 54 full passes for the GPT-2 shape (42.5 + 3.6
sae_lens, 6.5 + 1.5 saebench) and 22 for the Gemma shape (14.5 + 3.5, 2.5 + 1.5):
    GPT-2:  54 x 0.25 GFLOP x 65,536 tokens = 0.88 PFLOP -> 35 s a repeat
    Gemma:  22 x 5.2 GFLOP x 8,192 tokens   = 0.94 PFLOP -> 38 s a repeat
Two repeats each: about 150 s, plus a one-batch warm-up per tool and model, building the
models on the GPU and imports (about 30 s): about 3 minutes, under 5 with margin. The
script prints its own wall time; `--repeats 1` halves the timed part.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from core_vs_sae_lens import random_tokens, random_topk_saes, run_sae_lens, run_saebench
from transformer_lens import HookedTransformer, HookedTransformerConfig

GPT2_BOS = 50256
GEMMA_BOS = 2
TOOLS = {"saebench": run_saebench, "sae_lens": run_sae_lens}


@dataclass
class Setting:
    """A model shape, its SAEs' hooks and width, and the tokens it is timed on."""

    name: str
    cfg: dict
    hooks: list[str]
    d_sae: int
    n_seqs: int
    seq_len: int
    batch_size: int
    bos: int


def gpt2_cfg(smoke: bool) -> dict:
    """GPT-2 small's shape (or a tiny one of the same kind)."""
    if smoke:
        return dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=128,
                    d_vocab=1000, act_fn="gelu_new", normalization_type="LN")
    return dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
                d_vocab=50257, act_fn="gelu_new", normalization_type="LN")


def gemma2_cfg(smoke: bool) -> dict:
    """TransformerLens' gemma-2-2b configuration (or a tiny one of the same kind)."""
    shape = (dict(n_layers=2, d_model=64, n_heads=4, d_head=16, n_key_value_heads=2,
                  d_mlp=256, d_vocab=2000, n_ctx=128, window_size=16)
             if smoke else
             dict(n_layers=26, d_model=2304, n_heads=8, d_head=256, n_key_value_heads=4,
                  d_mlp=9216, d_vocab=256000, n_ctx=8192, window_size=4096))
    return dict(**shape, eps=1e-6, act_fn="gelu_pytorch_tanh", initializer_range=0.02,
                normalization_type="RMS", rotary_base=10000.0, rotary_dim=shape["d_head"],
                positional_embedding_type="rotary", use_attn_scale=True, use_local_attn=True,
                attn_types=["local", "global"] * (shape["n_layers"] // 2),
                attn_scores_soft_cap=50.0, output_logits_soft_cap=30.0, gated_mlp=True,
                final_rms=True, use_normalization_before_and_after=True,
                original_architecture="Gemma2ForCausalLM")


def settings(smoke: bool, gpt2_seqs: int, gemma_seqs: int) -> list[Setting]:
    """The two settings, at full size or (`smoke`) tiny."""
    if smoke:
        return [
            Setting("GPT-2-small-shaped (smoke)", gpt2_cfg(True),
                    [f"blocks.{i}.hook_resid_pre" for i in range(2)], 128, 8, 32, 4, 999),
            Setting("Gemma-2-2B-shaped (smoke)", gemma2_cfg(True),
                    [f"blocks.{i}.hook_resid_post" for i in range(2)], 128, 8, 32, 4, GEMMA_BOS),
        ]
    return [
        Setting("GPT-2-small-shaped", gpt2_cfg(False),
                [f"blocks.{i}.hook_resid_pre" for i in range(12)], 16384, gpt2_seqs, 128, 32,
                GPT2_BOS),
        Setting("Gemma-2-2B-shaped", gemma2_cfg(False),
                [f"blocks.{i}.hook_resid_post" for i in (5, 12, 19, 24)], 16384, gemma_seqs,
                128, 8, GEMMA_BOS),
    ]


def build(setting: Setting, device: torch.device):
    """(model, SAEs, tokens) on `device`; the model's weights are made there directly."""
    with torch.device(device):
        cfg = HookedTransformerConfig(**setting.cfg, seed=0, device=str(device))
        model = HookedTransformer(cfg)
    model.eval()
    saes = random_topk_saes(setting.hooks, cfg.d_model, setting.d_sae, setting.seq_len,
                            setting.name)
    for sae in saes:
        sae.to(device)
    tokens = random_tokens(setting.n_seqs, setting.seq_len, cfg.d_vocab, setting.bos)
    return model, saes, tokens.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn) -> tuple[float, float, float]:
    """(seconds, peak MiB allocated, peak MiB added over what was allocated before)."""
    gc.collect()
    peak = added = float("nan")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    _sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        added = peak - base / 2**20
    return seconds, peak, added


def bench(setting: Setting, device: torch.device, repeats: int) -> str:
    """Time both tools with N dictionaries and with one; a Markdown block of the figures."""
    started = time.perf_counter()
    model, saes, tokens = build(setting, device)
    built = time.perf_counter() - started
    one = [saes[len(saes) // 2]]
    n, bs, special = len(saes), setting.batch_size, [setting.bos]
    for runner in TOOLS.values():  # warm-up: one batch, one dictionary
        runner(model, one, tokens[:bs], bs, special=special)
    runs: dict[tuple[str, int], list[tuple[float, float, float]]] = {
        (tool, k): [] for k in (n, 1) for tool in TOOLS}
    for _ in range(repeats):
        for k, dicts in ((n, saes), (1, one)):
            for tool, runner in TOOLS.items():
                runs[tool, k].append(timed(device, lambda r=runner, d=dicts:
                                           r(model, d, tokens, bs, special=special)))
    med = {key: statistics.median(s for s, _, _ in v) for key, v in runs.items()}
    peak = {key: max(p for _, p, _ in v) for key, v in runs.items()}
    added = {key: max(a for _, _, a in v) for key, v in runs.items()}
    n_tok = tokens.numel()
    tps = {tool: n_tok / med[tool, n] for tool in TOOLS}
    per_dict = {tool: (med[tool, n] - med[tool, 1]) / (n - 1) for tool in TOOLS}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [
        f"### {setting.name}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
        f"vocab {model.cfg.d_vocab:,} ({params:,.1f}M parameters), {n} TopK SAEs "
        f"(d_sae {setting.d_sae:,}); {n_tok:,} tokens ({len(tokens)} x {tokens.shape[1]}), "
        f"batch {bs}, float32, {name}; medians of {repeats} (built in {built:.1f} s)",
        "",
        f"| tool | s, {n} SAEs | s, 1 SAE | tokens/s, {n} SAEs | s per extra SAE "
        f"| peak MiB, {n} SAEs | peak added MiB, {n} SAEs |",
        "|---|---|---|---|---|---|---|",
        *(f"| {tool} | {med[tool, n]:.2f} | {med[tool, 1]:.2f} | {tps[tool]:,.0f} | "
          f"{per_dict[tool]:.3f} | {_mib(peak[tool, n])} | {_mib(added[tool, n])} |"
          for tool in TOOLS),
        "",
        f"- sae_lens / saebench, time with {n} SAEs: "
        f"**{med['sae_lens', n] / med['saebench', n]:.2f}x**; with 1 SAE: "
        f"{med['sae_lens', 1] / med['saebench', 1]:.2f}x",
        f"- sae_lens / saebench, seconds per extra SAE: "
        f"**{_ratio(per_dict['sae_lens'], per_dict['saebench'])}**",
        f"- sae_lens / saebench, peak memory with {n} SAEs: "
        f"{_ratio(peak['sae_lens', n], peak['saebench', n])} (added: "
        f"{_ratio(added['sae_lens', n], added['saebench', n])})",
        "",
    ]
    return "\n".join(lines)


def _mib(value: float) -> str:
    return "n/a (CPU)" if value != value else f"{value:,.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 and a == a and b == b else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU, to check the script runs end to end")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpt2-seqs", type=int, default=512, help="sequences of 128 tokens")
    parser.add_argument("--gemma-seqs", type=int, default=64, help="sequences of 128 tokens")
    parser.add_argument("--setting", choices=["gpt2", "gemma2", "all"], default="all")
    args = parser.parse_args()
    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu.sh: refusing to run: no CUDA device is visible to torch "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); this "
              "benchmark needs one GPU. `bash benchmarks/gpu.sh --smoke` runs tiny "
              "shapes on the CPU to check the script itself.", file=sys.stderr)
        sys.exit(2)
    else:
        device = torch.device("cuda")
    torch.set_grad_enabled(False)
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("ignore", DeprecationWarning)
    started = time.perf_counter()
    chosen = settings(args.smoke, args.gpt2_seqs, args.gemma_seqs)
    if args.setting != "all":
        chosen = [chosen[0 if args.setting == "gpt2" else 1]]
    for setting in chosen:
        print(bench(setting, device, args.repeats), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"total wall time {time.perf_counter() - started:.0f} s (torch {torch.__version__})")


if __name__ == "__main__":
    main()
