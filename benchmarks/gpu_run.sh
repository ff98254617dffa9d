#!/usr/bin/env bash
# One-command GPU run of the torch/JAX comparison (torch and a CUDA build of JAX preinstalled; no
# network needed). Appends a section to benchmarks/RESULTS.md and, when OUT is set, copies
# RESULTS.md and the console log there. Extra arguments go to bench_hvp.py, e.g. --note "...".
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX must not grab the memory torch measures
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch, jax; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| jax', jax.__version__, jax.devices())" || true
log="$(mktemp)"
status=0
python benchmarks/bench_hvp.py --device cuda --jax --record "$@" 2>&1 | tee "$log" || status=$?
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
    cp "$log" "$OUT/gpu_run.log"
fi
exit "$status"
