# Source on the GPU machine before running a CUDA build of the trainer (build-cuda.sh copies it
# to .gpu/env.sh). It finds the CUDA 13 libraries (cuBLAS, cuRAND, cuDNN) of the machine's
# PyTorch environment and puts them on LD_LIBRARY_PATH; libcuda.so.1 comes from the driver.
# Candle ships PTX that the driver compiles on first use: the cache keeps that to one run.
_py=python3; [ -x /opt/torch/.venv/bin/python3 ] && _py=/opt/torch/.venv/bin/python3
export CAMBRIAN_PYTHON=$_py
_dirs=""
for _s in $($_py -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
  for _d in $(find "$_s/nvidia" \( -name 'libcublas.so*' -o -name 'libcurand.so*' -o -name 'libcudnn.so*' \
              -o -name 'libnvrtc.so*' -o -name 'libcudart.so*' \) -printf '%h\n' 2>/dev/null | sort -u); do
    case ":$_dirs:" in *":$_d:"*) ;; *) _dirs="${_dirs:+$_dirs:}$_d";; esac
  done
done
export LD_LIBRARY_PATH="${_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_CACHE_PATH=${CUDA_CACHE_PATH:-/tmp/cuda-jit-cache} CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}
mkdir -p "$CUDA_CACHE_PATH"
unset _dirs _s _d
