#!/usr/bin/env bash
# The GPU work of a session with a lent device (the `device` tool: 10 minutes a command, 30 a session), in stages
# that each fit one command. Run from the repository root on the device machine; results land under $OUT.
#
#   SAEFAST_COMMIT=<hash> bash bench/gpu_session.sh build test     # CUDA extension + every kernel/op test on CUDA
#   SAEFAST_COMMIT=<hash> bash bench/gpu_session.sh bench           # saefast bench --preset gpu (bf16, LLM scale)
#   SAEFAST_COMMIT=<hash> bash bench/gpu_session.sh pytest-bench    # the same cases as pytest-benchmark JSON
#   SAEFAST_COMMIT=<hash> bash bench/gpu_session.sh distributed     # torchrun on one GPU vs one process
#
# The device machine gets a copy of the working tree without .git: SAEFAST_COMMIT names the commit it is (the
# reports record it). Everything needed is in the device image (torch, triton, nvcc, pytest, pytest-benchmark,
# safetensors, tqdm, matplotlib, scikit-learn); nothing is downloaded. Commit the reports under bench/results/.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

stage_build() {
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())"
        nvcc --version | tail -n 1
        echo "commit ${SAEFAST_COMMIT:-unknown}"
    } > "$OUT/device.txt" 2>&1
    cat "$OUT/device.txt"
    # builds saefast._C with the CUDA kernels (sm_90a for Hopper) against the image's torch, offline
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=16 \
        python3 -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 \
        || { echo "build failed: see build.log"; tail -n 30 "$OUT/build.log"; return 1; }
    python3 -c "import saefast; print('native:', saefast.native.available(), 'cuda kernels:', \
saefast.native.supports(__import__('torch').device('cuda')))"
}

stage_test() {
    # every kernel and op test on CUDA: fp32, bf16 and fp16 (the interpreter skips half precision; CUDA runs it)
    python3 -m pytest -q -p no:cacheprovider tests/ops tests/sharpen/test_stats.py tests/sharpen/test_targets.py \
        tests/sharpen/test_aux_loss.py tests/sharpen/test_runner.py tests/bench tests/training/test_host_syncs.py \
        tests/data/test_store.py::test_cuda_batches_arrive_on_the_device 2>&1 | tee "$OUT/tests.log" | tail -n 15
}

stage_bench() {
    python3 -m saefast bench --preset gpu --warmup 2 --repeats 10 --json "$OUT/gpu.json" \
        --markdown "$OUT/gpu.md" --png "$OUT/gpu.png" 2>&1 | tee "$OUT/bench.log" | tail -n 40
}

stage_pytest_bench() {
    SAEFAST_BENCH_PRESET=gpu python3 -m pytest -q -p no:cacheprovider bench --benchmark-only \
        --benchmark-json "$OUT/gpu_pytest_benchmark.json" --benchmark-columns=median,rounds \
        --benchmark-group-by=param:case 2>&1 | tail -n 60
}

stage_distributed() {
    # torchrun on the GPU: the single-process run, the same under torchrun with 1 rank (NCCL), and 2 ranks sharing
    # the one GPU (gloo: NCCL refuses two ranks per GPU), member- and data-parallel; max |Δ| of every tensor
    local store="$OUT/dist_store" args=(--kind bagging --members 2 --latents 4096 --k 32 --steps 50
        --batch-size 4096 --seed 0 --device cuda --no-progress --checkpoint-minutes 0)
    python3 -c "import torch; from saefast.data.store import write_store; \
write_store('$store', torch.randn(262144, 512, generator=torch.Generator().manual_seed(0)), shard_tokens=65536)"
    python3 -m saefast train --data "$store" --out "$OUT/dist_single" "${args[@]}" 2>&1 | tail -n 2
    for run in "1 members" "1 data" "2 members" "2 data"; do
        set -- $run
        python3 -m torch.distributed.run --standalone --nproc_per_node="$1" -m saefast train --data "$store" \
            --out "$OUT/dist_$1_$2" --parallel "$2" "${args[@]}" 2>&1 | tail -n 2
    done
    python3 - "$OUT" <<'PY' 2>&1 | tee "$OUT/distributed.txt"
import sys, saefast as sf
out = sys.argv[1]
single = sf.load(f"{out}/dist_single").state_dict()
for run in ("1_members", "1_data", "2_members", "2_data"):
    other = sf.load(f"{out}/dist_{run}").state_dict()
    worst = max((single[n].double() - other[n].double()).abs().max().item() for n in single)
    print(f"{run}: max |single - distributed| = {worst:.3g}")
PY
}

for stage in "$@"; do
    case "$stage" in
        build) stage_build || status=1 ;;
        test) stage_test || status=1 ;;
        bench) stage_bench || status=1 ;;
        pytest-bench) stage_pytest_bench || status=1 ;;
        distributed) stage_distributed || status=1 ;;
        *) echo "unknown stage $stage (build, test, bench, pytest-bench, distributed)"; exit 2 ;;
    esac
done
exit $status
