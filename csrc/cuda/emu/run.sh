#!/usr/bin/env bash
# Run saefast's CUDA kernels and bindings WITHOUT a GPU, under a host emulation of the CUDA execution model, against
# float64 torch references and (for the encoders) the Triton kernels in Triton's interpreter. Test-only: nothing here
# is part of the extension build. About a minute on two cores (most of it compiling).
#
#   bash csrc/cuda/emu/run.sh         (PYTHON defaults to .venv/bin/python: a CPU torch, with triton)
#   ASAN=1 bash csrc/cuda/emu/run.sh  (kernels built with AddressSanitizer: an out-of-bounds read or write, e.g. of a
#                                      dropped slot's weight row, aborts with a report)
#
# Build: each csrc/cuda/*.cu is rewritten by transform.py (kernel launches -> emu::launch) and compiled by g++ with
# emu.h; bindings_on_cpu.inc compiles csrc/cuda_bindings.cpp registered for CPU tensors; the three objects link
# into one library that test_emulated.py loads with torch.ops.load_library.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
cd "$root"
PYTHON=${PYTHON:-.venv/bin/python}
CXX=${CXX:-g++}
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
touch "$tmp/empty.cu"
cuda_inc=$("$NVCC" --dryrun -c "$tmp/empty.cu" -o "$tmp/empty.o" 2>&1 |
    sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1 | sed 's/[[:space:]]*$//')
[ -f "$cuda_inc/cuda_runtime.h" ] || { echo "emu: CUDA headers not found (NVCC=$NVCC)" >&2; exit 1; }
torch_inc=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))")
torch_lib=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
torch_flags=()
for p in $torch_inc; do torch_flags+=(-isystem "$p"); done
[ -f "$(echo "$torch_inc" | cut -d' ' -f1)/c10/cuda/impl/cuda_cmake_macros.h" ] ||
    torch_flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)

kernel_flags=(-O2)
run_env=()
if [ "${ASAN:-0}" = 1 ]; then
    kernel_flags=(-O1 -g -fsanitize=address -fno-omit-frame-pointer)
    # libstdc++ preloaded too, so that ASan finds the real __cxa_throw (python itself does not link it).
    run_env=(LD_PRELOAD="$("$CXX" -print-file-name=libasan.so) $("$CXX" -print-file-name=libstdc++.so)"
             ASAN_OPTIONS=detect_leaks=0)
fi
echo "emu: building into $tmp"
objs=()
pids=()
for cu in csrc/cuda/*.cu; do
    base=$(basename "$cu" .cu)
    "$PYTHON" "$here/transform.py" "$cu" >"$tmp/$base.cpp"
    "$CXX" -std=c++20 "${kernel_flags[@]}" -fPIC -c -I"$here" -I"$root/csrc/cuda" -isystem "$cuda_inc" \
        "$tmp/$base.cpp" -o "$tmp/$base.o" &
    pids+=($!)
    objs+=("$tmp/$base.o")
done
"$CXX" -std=c++20 -O1 -fPIC -c -x c++ -DWITH_CUDA "${torch_flags[@]}" -isystem "$cuda_inc" -I"$root/csrc" \
    "$here/bindings_on_cpu.inc" -o "$tmp/bindings.o"
for pid in "${pids[@]}"; do wait "$pid"; done
"$CXX" -shared "${kernel_flags[@]}" "$tmp/bindings.o" "${objs[@]}" -o "$tmp/saefast_emu.so" \
    -L"$torch_lib" -ltorch -ltorch_cpu -lc10 -Wl,-rpath,"$torch_lib" -Wl,--no-undefined
echo "emu: running $here/test_emulated.py"
# The Triton reference kernels are imported from the source folder kernels/ as `saefast_triton`, not as
# saefast.kernels: importing saefast would load saefast._C, which registers the op namespace this library registers.
env "${run_env[@]}" SAEFAST_EMU_LIB="$tmp/saefast_emu.so" TRITON_INTERPRET=1 \
    PYTHONPATH="$root/kernels${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$here/test_emulated.py"
