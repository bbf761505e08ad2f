#!/usr/bin/env bash
# Build every Triton kernel of a training step for sm_80 and sm_90 without a GPU (bench/gpu_build.py: the triton
# backend's ops on meta tensors at the LLM-scale and the tests' shapes, in fp32/bf16/fp16, each kernel compiled by
# Triton's own ptxas instead of launched). Fails when a build could not launch (registers, shared memory) or spills
# registers at LLM scale. The two architectures build in parallel, each in a fresh Triton cache (a cold build, as on
# a new machine); their tables go to stdout. Environment: PYTHON (default: .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
pids=()
for arch in 80 90; do
    env -u TRITON_INTERPRET TRITON_CACHE_DIR="$tmp/cache_$arch" \
        "$PYTHON" bench/gpu_build.py --arch "$arch" --check >"$tmp/sm_$arch.log" 2>&1 &
    pids+=($!)
done
status=0
for i in 0 1; do
    arch=$([ "$i" = 0 ] && echo 80 || echo 90)
    if wait "${pids[$i]}"; then result=ok; else result=FAILED; status=1; fi
    grep -v '^sm_' "$tmp/sm_$arch.log" || true
    echo "check_triton: sm_$arch $result"
done
echo "check_triton: $(( $(date +%s) - start )) s"
exit $status
