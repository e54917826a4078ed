"""saebench's `evaluate` against SAEBench 0.6.0's core eval and sae_lens' `run_evals`.

    bash benchmarks/saebench_core.sh                       # makes SAEBench's venv, runs this
    python benchmarks/saebench_core_vs.py --sae-bench-python VENV/bin/python --setting zoo

Settings as in benchmarks/core_vs_sae_lens.py: `zoo`, the toy zoo's residual SAEs on its
held-out tokens; `gpt2`, a randomly initialised GPT-2-small-shaped model with 12 random
TopK SAEs at every `hook_resid_pre` (few tokens by default so it finishes in minutes on a
CPU). The setting is built once, in this process, and saved to a temporary directory: the
model's configuration (JSON) and weights (safetensors), each SAE with sae_lens'
`save_model`, the tokens (safetensors) and the excluded token ids. Then, one fresh process
per tool per repeat, alternating saebench / sae_lens / SAEBench, each process loads
exactly those and times one call of its tool over all SAEs after a one-batch warm-up:

- saebench: `saebench.evaluate` (CE loss score, KL score, L0, explained variance, MSE,
  cosine, L2 ratio; 1,000 bootstrap resamples), in this Python;
- sae_lens: `sae_lens.evals.run_evals` per SAE, the same metrics, in this Python;
- SAEBench: `sae_bench.evals.core.main.run_evals` per SAE (the function SAEBench's own
  `multiple_evals` calls once it has loaded a model and SAEs from the hub), the SAE first
  passed through `sae_bench_utils.general_utils.load_and_format_sae` as `multiple_evals`
  does for an SAE object, with an `ActivationsStore` over the saved tokens (not shuffled),
  KL, CE, L2, sparsity and variance metrics on, the feature-wise statistics off (saebench
  computes no counterpart); in SAEBench's own virtual environment (`--sae-bench-python`).

It prints the median seconds of each, the peak resident memory each call added (Linux,
/proc/self/clear_refs), the CE loss and KL scores of the first SAE from each tool (a check
that all three measured the same thing), and the ratios sae_lens / saebench and
SAEBench / saebench.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
TOOLS = ("saebench", "sae_lens", "sae_bench")
LABELS = {"saebench": "saebench `evaluate`", "sae_lens": "sae_lens `run_evals`",
          "sae_bench": "SAEBench 0.6.0 core `run_evals`"}


# -- the shared data -------------------------------------------------------------------------

def save_setting(setting: str, args: argparse.Namespace, out: Path) -> dict:
    """Build `setting` with benchmarks/core_vs_sae_lens.py and save what every tool loads."""
    sys.path.insert(0, str(HERE))
    from core_vs_sae_lens import build_setting

    model, saes, tokens, batch_size = build_setting(setting, args)
    if model.tokenizer is not None:
        from sae_lens.util import get_special_token_ids
        special = sorted(get_special_token_ids(model.tokenizer))
    else:
        special = [50256]
    config = {}
    for f in dataclasses.fields(model.cfg):
        value = getattr(model.cfg, f.name)
        if f.init and f.name not in ("device", "dtype"):
            try:
                config[f.name] = json.loads(json.dumps(value))
            except TypeError:
                continue
    (out / "model.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    names = []
    for i, sae in enumerate(saes):
        sae.save_model(str(out / f"sae{i}"))
        names.append(f"sae{i}")
    save_file({"tokens": tokens.contiguous()}, str(out / "tokens.safetensors"))
    meta = {"setting": setting, "batch_size": batch_size, "special": special, "saes": names,
            "hooks": [s.cfg.metadata.hook_name for s in saes], "tokens": list(tokens.shape)}
    (out / "meta.json").write_text(json.dumps(meta))
    return meta


def load_setting(data: Path):
    """(model, SAEs, tokens, meta) as saved by `save_setting`, on the CPU."""
    from sae_lens import SAE
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    meta = json.loads((data / "meta.json").read_text())
    cfg = HookedTransformerConfig(**json.loads((data / "model.json").read_text()),
                                  device="cpu", dtype=torch.float32)
    model = HookedTransformer(cfg, move_to_device=True)
    model.load_state_dict(load_file(str(data / "model.safetensors")), strict=True)
    model.eval()
    saes = [SAE.load_from_disk(str(data / name), device="cpu") for name in meta["saes"]]
    tokens = load_file(str(data / "tokens.safetensors"))["tokens"]
    return model, saes, tokens, meta


# -- one tool in one process -----------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _run_saebench(model, saes, tokens, bs, special) -> dict:
    sys.path.insert(0, str(HERE))
    from core_vs_sae_lens import SHARED_METRICS

    from saebench import evaluate

    df = evaluate(model, {f"sae{i}": s for i, s in enumerate(saes)}, tokens, SHARED_METRICS,
                  batch_size=bs, device="cpu", progress=False, n_boot=1000,
                  exclude_special_tokens=special)
    first = df[df["dictionary"] == "sae0"].set_index("metric")["value"]
    return {"ce_loss_score": float(first["ce_loss_recovered"]),
            "kl_div_score": float(first["kl_div_score"])}


def _store(model, sae, tokens, bs):
    from datasets import Dataset
    from sae_lens import ActivationsStore

    return ActivationsStore.from_sae(model, sae, Dataset.from_dict({"tokens": tokens.tolist()}),
                                     streaming=False, context_size=tokens.shape[1],
                                     store_batch_size_prompts=bs, n_batches_in_buffer=2)


def _run_sae_lens(model, saes, tokens, bs, special) -> dict:
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    n = len(tokens) // bs
    config = EvalConfig(
        batch_size_prompts=bs, n_eval_reconstruction_batches=n,
        n_eval_sparsity_variance_batches=n, compute_kl=True, compute_ce_loss=True,
        compute_sparsity_metrics=True, compute_variance_metrics=True, compute_l2_norms=True)
    first = None
    for sae in saes:
        metrics, _ = run_evals(sae, _store(model, sae, tokens, bs), model, ActivationScaler(),
                               config, exclude_special_tokens=special)
        first = first or metrics
    return {"ce_loss_score": first["model_performance_preservation"]["ce_loss_score"],
            "kl_div_score": first["model_behavior_preservation"]["kl_div_score"]}


def _run_sae_bench(model, saes, tokens, bs, special) -> dict:
    from sae_bench.evals.core.eval_config import CoreEvalConfig
    from sae_bench.evals.core.main import run_evals
    from sae_bench.sae_bench_utils.general_utils import load_and_format_sae

    n = len(tokens) // bs
    config = CoreEvalConfig(
        model_name="random", batch_size_prompts=bs, n_eval_reconstruction_batches=n,
        n_eval_sparsity_variance_batches=n, context_size=tokens.shape[1], compute_kl=True,
        compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=False,
        compute_featurewise_weight_based_metrics=False)
    first = None
    for sae in saes:
        _, sae, _ = load_and_format_sae("custom", sae, "cpu")
        metrics, _ = run_evals(sae, _store(model, sae, tokens, bs), model, config,
                               ignore_tokens=set(special))
        first = first or metrics
    return {"ce_loss_score": first["model_performance_preservation"]["ce_loss_score"],
            "kl_div_score": first["model_behavior_preservation"]["kl_div_score"]}


RUNNERS = {"saebench": _run_saebench, "sae_lens": _run_sae_lens, "sae_bench": _run_sae_bench}


def child(tool: str, data: Path) -> None:
    """Load the saved setting, warm `tool` up on one batch, time one call; print JSON."""
    import warnings
    warnings.simplefilter("ignore")
    torch.set_grad_enabled(False)
    model, saes, tokens, meta = load_setting(data)
    bs, special = meta["batch_size"], meta["special"]
    RUNNERS[tool](model, saes[:1], tokens[:bs], bs, special)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    scores = RUNNERS[tool](model, saes, tokens, bs, special)
    seconds = time.perf_counter() - start
    added = max(0, _status_kib("VmHWM") - before) / 1024
    print(json.dumps({"seconds": seconds, "rss_added_mib": added, **scores}))


# -- the comparison --------------------------------------------------------------------------

def run_child(python: str, tool: str, data: Path) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--child", tool, "--data", str(data)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tool} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(setting: str, args: argparse.Namespace) -> str:
    pythons = {"saebench": sys.executable, "sae_lens": sys.executable,
               "sae_bench": args.sae_bench_python}
    with tempfile.TemporaryDirectory(prefix="saebench-core-vs-") as tmp:
        data = Path(tmp)
        meta = save_setting(setting, args, data)
        runs: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
        for repeat in range(args.repeats):
            order = TOOLS if repeat % 2 == 0 else TOOLS[::-1]
            for tool in order:
                runs[tool].append(run_child(pythons[tool], tool, data))
                print(f"  {setting} repeat {repeat + 1}: {tool} "
                      f"{runs[tool][-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    med = {t: statistics.median(r["seconds"] for r in runs[t]) for t in TOOLS}
    n_seqs, seq_len = meta["tokens"]
    lines = [
        f"### {setting}: {len(meta['saes'])} SAEs, {n_seqs * seq_len:,} tokens "
        f"({n_seqs} x {seq_len}), batch {meta['batch_size']}, CPU, torch {torch.__version__}; "
        f"one process per tool per run, alternating",
        "",
        f"| tool | seconds (median of {args.repeats}) | all runs | peak RSS added, MiB "
        "| CE loss score, sae0 | KL score, sae0 |",
        "|---|---|---|---|---|---|",
        *(f"| {LABELS[t]} | {med[t]:.2f} | "
          f"{', '.join(format(r['seconds'], '.1f') for r in runs[t])} | "
          f"{max(r['rss_added_mib'] for r in runs[t]):.0f} | "
          f"{runs[t][0]['ce_loss_score']:.4f} | {runs[t][0]['kl_div_score']:.4f} |"
          for t in TOOLS),
        "",
        f"- sae_lens / saebench: **{med['sae_lens'] / med['saebench']:.2f}x**",
        f"- SAEBench 0.6.0 / saebench: **{med['sae_bench'] / med['saebench']:.2f}x**",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=["zoo", "gpt2", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpt2-seqs", type=int, default=4)
    parser.add_argument("--gpt2-d-sae", type=int, default=4096)
    parser.add_argument("--zoo-seqs", type=int, default=128)
    parser.add_argument("--sae-bench-python", default=None,
                        help="the Python of a virtual environment with sae-bench==0.6.0")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data)
        return
    if not args.sae_bench_python:
        parser.error("--sae-bench-python is required (benchmarks/saebench_core.sh makes one)")
    torch.set_grad_enabled(False)
    settings = ["zoo", "gpt2"] if args.setting == "all" else [args.setting]
    for setting in settings:
        print(bench(setting, args), flush=True)


if __name__ == "__main__":
    main()
