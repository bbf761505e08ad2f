#!/usr/bin/env bash
# Compile-check saefast's CUDA sources without a GPU and without a CUDA build of torch.
#
#   1. csrc/cuda/launchers.h parses as plain C (C99) and as C++17, warnings as errors;
#   2. every csrc/cuda/*.cu compiles with nvcc alone (no torch headers), -O3 -std=c++17, for
#      sm_80 and sm_90a, all warnings (host compiler -Wall -Wextra, ptxas spills / local memory) as errors;
#   3. csrc/cuda_bindings.cpp passes g++ -fsyntax-only -DWITH_CUDA against the torch headers (found with
#      `$PYTHON -c 'import torch.utils.cpp_extension'`) and the CUDA headers, with -Wall -Wextra -Werror (torch
#      and CUDA headers included as system headers, so only our warnings count). The standard is C++20
#      (BINDINGS_STD to change it): torch 2.13's headers need it and torch.utils.cpp_extension builds with it.
#
# The steps run in parallel; the object files go to a temporary directory that is removed on exit.
# Without nvcc the check is skipped (exit 0); without a python that imports torch, step 3 is skipped.
# Environment: NVCC (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc, else /usr/local/cuda/bin/nvcc),
# PYTHON (default: .venv/bin/python), CXX (default: g++), CC (default: gcc), BINDINGS_STD (default: c++20).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s.%N)

NVCC=${NVCC:-$(command -v nvcc || true)}
for candidate in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
    if [ -z "$NVCC" ] && [ -x "$candidate" ]; then NVCC=$candidate; fi
done
if [ -z "$NVCC" ] || ! "$NVCC" --version >/dev/null 2>&1; then
    echo "check_cuda: nvcc not found (set NVCC or CUDA_HOME); CUDA compile check skipped"
    exit 0
fi
PYTHON=${PYTHON:-.venv/bin/python}
CXX=${CXX:-g++}
CC=${CC:-gcc}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The CUDA include directory nvcc itself uses (nvcc may be a wrapper script outside the toolkit tree).
touch "$tmp/empty.cu"
cuda_inc=$("$NVCC" --dryrun -c "$tmp/empty.cu" -o "$tmp/empty.o" 2>&1 |
    sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1 | sed 's/[[:space:]]*$//')
if [ -z "$cuda_inc" ] || [ ! -f "$cuda_inc/cuda_runtime.h" ]; then
    cuda_inc="$(dirname "$(dirname "$(readlink -f "$NVCC")")")/include"
fi
if [ ! -f "$cuda_inc/cuda_runtime.h" ]; then
    echo "check_cuda: cannot find cuda_runtime.h next to $NVCC (got '$cuda_inc')" >&2
    exit 1
fi
echo "check_cuda: $("$NVCC" --version | tail -n 2 | head -n 1) ($NVCC), CUDA headers $cuda_inc"

# Each check runs in the background with its output in $tmp/<name>.log; results are reported in order.
names=()
descs=()
pids=()
run() {  # run NAME DESCRIPTION COMMAND...
    local name=$1 desc=$2
    shift 2
    names+=("$name")
    descs+=("$desc")
    ("$@") >"$tmp/$name.log" 2>&1 &
    pids+=($!)
}

run header-c "csrc/cuda/launchers.h as C99 ($CC -fsyntax-only -Wall -Wextra -Werror -pedantic)" \
    "$CC" -fsyntax-only -x c -std=c99 -Wall -Wextra -Werror -pedantic -isystem "$cuda_inc" csrc/cuda/launchers.h
run header-cxx "csrc/cuda/launchers.h as C++17 ($CXX -fsyntax-only -Wall -Wextra -Werror -pedantic)" \
    "$CXX" -fsyntax-only -x c++ -std=c++17 -Wall -Wextra -Werror -pedantic -isystem "$cuda_inc" csrc/cuda/launchers.h

nvcc_flags=(-c -O3 -Werror all-warnings -Xcompiler -Wall,-Wextra -Xptxas -warn-spills,-warn-lmem-usage)
for cu in csrc/cuda/*.cu; do
    base=$(basename "$cu" .cu)
    run "nvcc-$base" "$cu: nvcc -O3 -std=c++17 sm_80 + sm_90a, warnings (incl. spills) as errors" \
        "$NVCC" "${nvcc_flags[@]}" -std=c++17 \
        -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a \
        "$cu" -o "$tmp/$base.o"
done

torch_flags=()
if torch_inc=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))" \
    2>/dev/null); then
    have_macros=0
    for p in $torch_inc; do
        torch_flags+=(-isystem "$p")
        if [ -f "$p/c10/cuda/impl/cuda_cmake_macros.h" ]; then have_macros=1; fi
    done
    # CPU wheels ship c10/cuda but not its generated cuda_cmake_macros.h; the header allows doing without.
    if [ "$have_macros" -eq 0 ]; then torch_flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE); fi
    std=${BINDINGS_STD:-c++20}
    run bindings "csrc/cuda_bindings.cpp: $CXX -std=$std -fsyntax-only -DWITH_CUDA -Wall -Wextra -Werror" \
        "$CXX" -std="$std" -fsyntax-only -DWITH_CUDA -Wall -Wextra -Werror "${torch_flags[@]}" \
        -isystem "$cuda_inc" csrc/cuda_bindings.cpp
else
    echo "check_cuda: $PYTHON cannot import torch; csrc/cuda_bindings.cpp syntax check skipped"
fi

failed=0
for i in "${!names[@]}"; do
    if wait "${pids[$i]}"; then
        echo "  ok    ${descs[$i]}"
    else
        echo "  FAIL  ${descs[$i]}"
        sed 's/^/        /' "$tmp/${names[$i]}.log"
        failed=1
    fi
done
elapsed=$(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo "?")
if [ "$failed" -ne 0 ]; then
    echo "check_cuda: FAILED (${elapsed}s)"
    exit 1
fi
echo "check_cuda: all ${#names[@]} checks passed (${elapsed}s)"
