"""A TopK sweep at one hook: one suffix pass stacked along the batch against one per SAE.

The toy zoo's layer-2 residual SAEs (k = 4, 8, 16, 32, and the poor one) are evaluated on
the same held-out tokens for the downstream metrics (CE loss score, KL, next-token
agreement), with `stack=True` (one stacked spliced pass per batch) or `stack=False` (one
spliced pass per SAE). The script times its own `evaluate` calls (model and dictionaries
loaded once, `--repeats` calls, median) and prints them; the headline ratio pairs whole
processes, `--stack on` against `--stack off` (see benchmarks/RESULTS.md).

    python benchmarks/sweep_stacking.py --stack on --tokens 16384 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saebench import evaluate, loading

SWEEP = ("resid-L2-topk4", "resid-L2-topk8", "resid-L2-topk16", "resid-L2-topk32",
         "resid-L2-poor")
METRICS = ("ce_loss_recovered", "kl_div", "next_token_agreement")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack", choices=("on", "off"), required=True)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens evaluated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = loading.load_zoo_model()
    saes = {name: loading.load_zoo_dictionary(name) for name in SWEEP}
    tokens = loading.load_heldout_tokens()
    tokens = tokens[: max(1, args.tokens // tokens.shape[1])]
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        df = evaluate(model, saes, tokens, METRICS, batch_size=args.batch_size, n_boot=0,
                      progress=False, stack=args.stack == "on")
        seconds.append(time.perf_counter() - started)
    ce = df[df["metric"] == "ce_loss_recovered"].set_index("dictionary")["value"]
    print(f"stack {args.stack}: {len(tokens) * tokens.shape[1]} tokens, {len(SWEEP)} SAEs, "
          f"median {statistics.median(seconds):.2f} s of {args.repeats}; ce_loss_recovered "
          + ", ".join(f"{k} {v:.6f}" for k, v in ce.items()))


if __name__ == "__main__":
    main()
