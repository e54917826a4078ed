#!/usr/bin/env bash
# saebench against sae_lens on one GPU: GPT-2-small-shaped (12 SAEs) and Gemma-2-2B-shaped
# (4 SAEs) random models; tokens/s, seconds per additional dictionary, peak GPU memory and
# the ratios. About 3 minutes on an H100/H200-class card (estimate in
# benchmarks/gpu_scaling.py); no network. Refuses without a CUDA device.
#
#     bash benchmarks/gpu.sh                 # on a GPU machine, project environment active
#     bash benchmarks/gpu.sh --smoke         # tiny shapes on the CPU: checks the script
#     bash benchmarks/gpu.sh --repeats 1     # other options: python benchmarks/gpu_scaling.py -h
#
# PYTHON picks the interpreter (default `python`).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python}" "$here/gpu_scaling.py" "$@"
