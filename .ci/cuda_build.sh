#!/usr/bin/env bash
# Build sparsegen's CUDA kernels against the CUDA build of torch on a machine without a GPU, and check
# that the produced extension holds them.
#
#   bash .ci/cuda_build.sh          (what `make cuda-build` runs)
#
# Creates (or reuses) the virtual environment .venv-cuda with torch==$SPARSEGEN_CUDA_TORCH (default
# 2.14.1, a CUDA 13 build), builds into build/cuda/ (the in-place CPU build is left alone) and checks:
#   * the .so carries sm_90 machine code for the kernels (cuobjdump),
#   * importing it registers a CUDA kernel for every *_cuda op (the dispatcher is asked; no GPU needed).
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 9.0), MAX_JOBS (default 2),
# SPARSEGEN_CUDA_VENV (default .venv-cuda).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${SPARSEGEN_CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_VERSION="${SPARSEGEN_CUDA_TORCH:-2.14.1}"
PY="$VENV/bin/python"

step() { printf '\n== %s\n' "$*"; }

step "virtual environment $VENV (torch $TORCH_VERSION)"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
if ! "$PY" - "$TORCH_VERSION" <<'PYEOF' 2>/dev/null; then
import sys
import numpy, ninja, setuptools, wheel, torch  # noqa: F401
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert torch.version.cuda, "CPU build of torch"
PYEOF
  "$PY" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" numpy ninja setuptools wheel
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda_build: no nvcc under CUDA_HOME=$CUDA_HOME" >&2
  exit 1
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# The CUDA 13 wheels keep the toolkit headers torch's headers include (cuda_runtime_api.h & co) here.
if [ -d "$SITE/nvidia/cu13/include" ]; then
  export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export PATH="$VENV/bin:$CUDA_HOME/bin:$PATH"
unset SPARSEGEN_SKIP_CUDA
"$CUDA_HOME/bin/nvcc" --version | tail -n 2

step "build (build/cuda/lib, build/cuda/tmp)"
"$PY" setup.py build_ext --build-lib build/cuda/lib --build-temp build/cuda/tmp

SO="build/cuda/lib/sparsegen_kernels/_C.so"
if [ ! -f "$SO" ]; then
  SO="$(find build/cuda/lib/sparsegen_kernels -maxdepth 1 -name '_C*.so' | head -n 1)"
fi
if [ -z "$SO" ] || [ ! -f "$SO" ]; then
  echo "cuda_build: no extension produced under build/cuda/lib" >&2
  exit 1
fi
echo "built $SO ($(du -h "$SO" | cut -f1))"

step "device code in $SO"
# cuobjdump: from PATH, the toolkit, or the copy bundled with triton (the toolkit here may lack it).
CUOBJDUMP="$(command -v cuobjdump || true)"
[ -n "$CUOBJDUMP" ] || { [ -x "$CUDA_HOME/bin/cuobjdump" ] && CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"; } || true
[ -n "$CUOBJDUMP" ] || CUOBJDUMP="$(find "$SITE/triton" -name cuobjdump -type f 2>/dev/null | head -n 1)"
KERNELS="topk_warp_kernel topk_block_kernel compact_layout_kernel scatter_compact_kernel compact_to_nhwc_kernel
    gather_channel_kernel finalize_kernel input_grad_kernel weight_grad_kernel"
missing=0
if [ -n "$CUOBJDUMP" ]; then
  echo "using $CUOBJDUMP"
  ELF="$("$CUOBJDUMP" --list-elf "$SO")"
  echo "$ELF"
  if ! grep -q "sm_90" <<<"$ELF"; then
    echo "cuda_build: no sm_90 device code in $SO" >&2
    exit 1
  fi
  TEXT="$("$CUOBJDUMP" --list-text "$SO")"
  for kernel in $KERNELS; do
    n="$(grep -c "$kernel" <<<"$TEXT" || true)"
    printf '  %-24s %3s sm_90 functions\n' "$kernel" "$n"
    [ "$n" -gt 0 ] || missing=1
  done
else
  echo "no cuobjdump found: checking the registered kernel names in the binary instead"
  for kernel in $KERNELS; do
    n="$(grep -a -o "[_A-Za-z0-9]*${kernel}[_A-Za-z0-9]*" "$SO" | sort -u | wc -l)"
    printf '  %-24s %3s instantiations\n' "$kernel" "$n"
    [ "$n" -gt 0 ] || missing=1
  done
fi
if [ "$missing" -ne 0 ]; then
  echo "cuda_build: kernels missing from $SO" >&2
  exit 1
fi

step "CUDA kernels registered for every provider op (_sparsegen_cuda::*)"
"$PY" - "$SO" <<'PYEOF'
import importlib.util
import sys

import torch

spec = importlib.util.spec_from_file_location("sparsegen_kernels._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
ops = ["topk_compact", "topk_mask", "compact_to_dense", "compact_gather", "sparse_conv_transpose2d",
       "sparse_conv_transpose2d_input_grad", "sparse_conv_transpose2d_weight_grad"]
bad = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"_sparsegen_cuda::{op}", "CUDA")]
for op in ops:
    print(f"  _sparsegen_cuda::{op:38s} {'CUDA kernel' if op not in bad else 'MISSING'}")
print("torch.cuda.is_available():", torch.cuda.is_available(), "(not needed for this check)")
sys.exit(1 if bad else 0)
PYEOF
echo
echo "cuda_build: OK"
