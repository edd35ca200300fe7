#!/usr/bin/env bash
# Builds the CUDA trainer on a machine without a GPU or a CUDA toolkit, for Hopper GPUs
# (compute capability 9.0: H100, H200), linked against glibc 2.28 so that it runs on older
# images. Everything it fetches goes under $CUDA_TOOLCHAIN_DIR (default ~/.cache/cuda13):
#   - CUDA 13.0 nvcc, headers and libraries from NVIDIA's PyPI wheels (the versions PyTorch
#     2.11 cu130 pins, whose PTX a 580 driver can compile);
#   - a link-time stub of the driver library (the real libcuda.so.1 comes from the driver);
#   - zig (PyPI ziglang) and cargo-zigbuild as the linker.
#
#   scripts/build-cuda.sh [--features cuda|cudnn]      # writes .gpu/trainer and .gpu/env.sh
#
# Then, on the GPU machine: `. .gpu/env.sh && .gpu/trainer bench --device cuda`.
# The first build compiles Candle's CUDA kernels with nvcc and takes several minutes; later
# builds are quick (figures: docs/PERFORMANCE.md, Build, CI and test-server timings).
set -euo pipefail
cd "$(dirname "$0")/.."
features=cuda
if [ "${1:-}" = "--features" ]; then features=$2; fi

root=${CUDA_TOOLCHAIN_DIR:-$HOME/.cache/cuda13}
py=$root/py; home=$root/home
mkdir -p "$root"
log() { echo "build-cuda: $*" >&2; }

if [ ! -x "$py/nvidia/cu13/bin/nvcc" ]; then
  log "installing CUDA 13.0 wheels into $py"
  python3 -m pip install --quiet --no-deps --target "$py" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 >&2
fi
if [ ! -e "$root/cudnn/nvidia/cudnn/lib/libcudnn.so.9" ]; then
  python3 -m pip install --quiet --no-deps --target "$root/cudnn" nvidia-cudnn-cu13==9.19.0.56 >&2
fi
c=$py/nvidia/cu13
if [ ! -e "$home/lib64/stubs/libcuda.so" ]; then
  log "laying out $home"
  mkdir -p "$home/lib64/stubs"
  ln -sfn "$c/bin" "$home/bin"; ln -sfn "$c/include" "$home/include"; ln -sfn "$c/nvvm" "$home/nvvm"
  for f in "$c"/lib/*.so.*; do b=$(basename "$f"); ln -sfn "$f" "$home/lib64/$b"; ln -sfn "$f" "$home/lib64/${b%%.so*}.so"; done
  ln -sfn "$root/cudnn/nvidia/cudnn/lib/libcudnn.so.9" "$home/lib64/libcudnn.so"
  # No wheel ships the driver library: link against a stub exporting every cu* symbol of
  # cuda.h; the real libcuda.so.1 is the GPU machine's.
  tmp=$(mktemp -d)
  gcc -E -P -I"$c/include" "$c/include/cuda.h" -o "$tmp/cuda_pp.h"
  grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' "$tmp/cuda_pp.h" | sed 's/\s*($//' | sort -u \
    | awk '{print "int "$1"(void){return 999;}"}' > "$tmp/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib64/stubs/libcuda.so" "$tmp/stub.c"
  # zig's linker does not fall back from -lmoe (candle-kernels asks for it) to libmoe.a; an
  # empty shared library satisfies it and --as-needed drops it.
  echo "" > "$tmp/empty.c" && gcc -shared -fPIC -o "$home/lib64/libmoe.so" "$tmp/empty.c"
  rm -rf "$tmp"
fi
if ! "$root/zig/bin/python" -c 'import ziglang' 2>/dev/null; then
  log "installing zig (PyPI ziglang) and cargo-zigbuild"
  python3 -m venv "$root/zig" >&2 && "$root/zig/bin/pip" install --quiet ziglang==0.17.0 >&2
fi
if [ ! -x "$root/tools/bin/cargo-zigbuild" ]; then
  cargo install --quiet --locked cargo-zigbuild --version 0.24.1 --root "$root/tools" >&2
fi

export CUDA_HOME=$home CUDA_PATH=$home
export PATH=$home/bin:$root/zig/bin:$root/tools/bin:$PATH
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
# A separate target folder: the CUDA build must not invalidate the CPU one.
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-target/cuda}
log "building the trainer with --features $features"
cargo zigbuild --release --features "$features" --target x86_64-unknown-linux-gnu.2.28 -p trainer --bin trainer
mkdir -p .gpu
cp "$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/trainer" .gpu/trainer
# No debug information: the binary stays small enough to copy to the GPU machine.
strip .gpu/trainer 2>/dev/null || true
cp scripts/gpu-env.sh .gpu/env.sh
ls -la .gpu/trainer >&2
