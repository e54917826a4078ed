#!/usr/bin/env bash
# saebench's `evaluate` against SAEBench 0.6.0's core eval (`sae_bench.evals.core.main`).
#
#     bash benchmarks/saebench_core.sh                         # zoo and GPT-2-shaped, CPU
#     bash benchmarks/saebench_core.sh --setting zoo --repeats 3
#
# SAEBench 0.6.0 pins its own dependencies (numpy < 2, datasets < 4, torchvision, ...), so
# it gets a virtual environment of its own, made on first use in benchmarks/.venv-sae-bench
# (gitignored; SAE_BENCH_VENV moves it; about 3 GB). First the CPU builds of torch 2.13.0
# (the version the project is measured with; SAEBench asks only torch >= 2.1) and, where
# the index has it, torchvision 0.28.0, without their dependencies, from TORCH_INDEX
# (default: PyTorch's CPU wheels); then sae-bench==0.6.0 from PyPI with torch held at
# 2.13.0, which keeps that build. SAEBench's core eval does not use torchvision; a
# torchvision that does not load (PyPI's, built for CUDA torch, beside a CPU torch: "operator
# torchvision::nms does not exist") breaks `import transformers`, so it is uninstalled
# then. saebench runs under the Python that runs this script (PYTHON, default `python`: the
# project's environment). Everything after the script's name goes to
# benchmarks/saebench_core_vs.py (its docstring says what it measures).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
venv=${SAE_BENCH_VENV:-$here/.venv-sae-bench}
python=${PYTHON:-python}
torch_index=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}

if ! "$venv/bin/python" -c "import sae_bench.evals.core.main" >/dev/null 2>&1; then
    echo "saebench_core.sh: installing sae-bench==0.6.0 into $venv" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet --no-deps torch==2.13.0 torchvision==0.28.0 \
        --index-url "$torch_index" ||
        "$venv/bin/python" -m pip install --quiet --no-deps torch==2.13.0 \
            --index-url "$torch_index"
    "$venv/bin/python" -m pip install --quiet sae-bench==0.6.0 torch==2.13.0
    if ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
        echo "saebench_core.sh: torchvision does not load beside this torch build;" \
             "uninstalling it (SAEBench's core eval does not use it)" >&2
        "$venv/bin/python" -m pip uninstall --quiet --yes torchvision
    fi
    "$venv/bin/python" -c "import sae_bench.evals.core.main" || {
        echo "saebench_core.sh: sae_bench.evals.core.main does not import in $venv" >&2
        exit 1
    }
fi

exec "$python" "$here/saebench_core_vs.py" --sae-bench-python "$venv/bin/python" "$@"
