#!/usr/bin/env bash
# One-command GPU run of the torch/JAX comparison (torch and a CUDA build of JAX preinstalled; no
# network needed). Appends a section to benchmarks/RESULTS.md and, when OUT is set, writes the
# console log there as it runs and copies RESULTS.md and the profile there at the end.
#
# Environment: LIMIT_S (default 480) kills the benchmark after that many seconds so the copies
# still happen; BUDGET_S (default 280) is when the benchmark stops starting optional work;
# WORKLOADS overrides the GPU-sized default shapes. Extra arguments go to bench_hvp.py.
# If optree is missing and wheels sit in .whl/, they are installed into /tmp/site first. For a
# machine without internet, fetch one for its Python (3.12 here) beforehand; with torch 2.11 take
# optree < 0.20 (see the README's "Supported versions"):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 -d .whl optree==0.19.0
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
if ! python3 -c "import optree" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX must not grab the memory torch measures
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
log="$out/gpu_run.log"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, jax, optree; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| jax', jax.__version__, jax.devices(), '| optree', optree.__version__)"
} 2>&1 | tee "$log"
# GPU-sized batches: at the CPU shapes an H100-class GPU finishes a gradient in tens of
# microseconds and every ratio measures launch overhead; the small MLP shape runs last for that.
workloads="${WORKLOADS:-mlp:8192,transformer:256,cnn:1024,mlp}"
timeout --signal=INT --kill-after=20 "${LIMIT_S:-480}" \
    python3 benchmarks/bench_hvp.py --device cuda --jax --record --workloads "$workloads" \
    --hvp-modes fwd-rev,rev-rev --budget-s "${BUDGET_S:-280}" --profile "$out/profile.md" "$@" \
    2>&1 | tee -a "$log"
status=$?
cp benchmarks/RESULTS.md "$out/RESULTS.md"
exit "$status"
