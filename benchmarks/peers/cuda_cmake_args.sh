#!/usr/bin/env bash
# Print, on line 1, the extra cmake arguments a CUDA build of llama.cpp needs on this machine, and on line 2 a folder
# for LD_LIBRARY_PATH (empty if none is needed):
# - the real nvcc (a wrapper script `exec .../bin/nvcc "$@"` stands for it) and its toolkit root;
# - when that toolkit has no cuBLAS (toolkits assembled from pip wheels keep it in site-packages' nvidia/cu13):
#   libcublas / libcublasLt and the folder of cublas_v2.h, found in site-packages;
# - when it has no libcuda (driver API, for ggml's VMM pool): the driver's libcuda found by ldconfig, else VMM off.
set -uo pipefail
NVCC=$(readlink -f "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")
if head -c 2 "$NVCC" | grep -q '#!'; then NVCC=$(grep -o '/[^ ]*/bin/nvcc' "$NVCC" | head -1); fi
ROOT=$(dirname "$(dirname "$NVCC")")
ARGS="-DCMAKE_CUDA_COMPILER=$NVCC -DCUDAToolkit_ROOT=$ROOT"
DIRS="$ROOT/lib64 $ROOT/lib $ROOT/targets/x86_64-linux/lib"
found() { for d in $DIRS; do ls "$d"/$1 "$d"/stubs/$1 > /dev/null 2>&1 && return 0; done; return 1; }
LDDIR=
if ! found 'libcublas.so*'; then
  LIB=$(python3 -c '
import glob, site, sys
for root in site.getsitepackages() + [site.getusersitepackages()] + sys.path:
    hits = sorted(glob.glob(root + "/nvidia/*/lib/libcublas.so*") + glob.glob(root + "/nvidia/cublas/lib/libcublas.so*"))
    if hits:
        print(hits[0])
        break
')
  if [ -n "$LIB" ]; then
    LDDIR=$(dirname "$LIB")
    INC=$(dirname "$LDDIR")/include
    LT=$(ls "$LDDIR"/libcublasLt.so* | head -1)
    ARGS="$ARGS -DCUDA_cublas_LIBRARY=$LIB -DCUDA_cublasLt_LIBRARY=$LT -DCMAKE_CXX_FLAGS=-I$INC -DCMAKE_CUDA_FLAGS=-I$INC"
  fi
fi
if ! found 'libcuda.so*'; then
  DRV=$(ldconfig -p 2> /dev/null | grep -o '/[^ ]*/libcuda\.so[.0-9]*$' | head -1)
  [ -n "$DRV" ] || DRV=$(ls /usr/local/nvidia/lib64/libcuda.so* /usr/lib/x86_64-linux-gnu/libcuda.so* 2> /dev/null | head -1)
  if [ -n "$DRV" ]; then ARGS="$ARGS -DCUDA_cuda_driver_LIBRARY=$DRV"; else ARGS="$ARGS -DGGML_CUDA_NO_VMM=ON"; fi
fi
echo "$ARGS"
echo "$LDDIR"
