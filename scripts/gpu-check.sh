#!/usr/bin/env bash
# The GPU measurements as one script, to run on a machine with an NVIDIA GPU.
# Prepare on any machine, CIFAR_DIR being a folder with the CIFAR-10 binary files:
#   scripts/build-cuda.sh --features cudnn                  # .gpu/trainer, .gpu/env.sh
#   scripts/cifar-subset.sh CIFAR_DIR .gpu/cifar 1000 2000
# then copy the repository with .gpu/ to the GPU machine and run scripts/gpu-check.sh there,
# under a time limit above GPU_CHECK_BUDGET.
# Results go to $OUT (or /tmp/gpu-check): the tables, JSON, nvidia-smi samples and logs.
#
# The whole script keeps to GPU_CHECK_BUDGET seconds (default 540). Each step's own limit is
# cut to what is left, and a step that would start with under 20 s left is skipped and says
# so in steps.log; the steps run most important first, and the summary is always written.
# The steps' own limits add up to more than the default budget.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}; mkdir -p "$out"
. .gpu/env.sh
py=${CAMBRIAN_PYTHON:-python3}
t=.gpu/trainer
budget=${GPU_CHECK_BUDGET:-540}
log() { echo "== $(date +%T) $*" | tee -a "$out/steps.log"; }
# limited SECONDS COMMAND...: COMMAND under `timeout`, with SECONDS cut to the budget left
# (less 10 s for what follows); skipped, with exit status 124, when under 20 s are left.
limited() {
  local limit=$1 left=$((budget - SECONDS - 10))
  shift
  if ((left < 20)); then
    log "skipped, budget spent: $*"
    return 124
  fi
  ((limit > left)) && limit=$left
  timeout "$limit" "$@"
}

log "device"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
limited 60 $py -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' >> "$out/nvidia-smi.txt" 2>&1

# 0. Our CUDA kernels against Candle's operations on the GPU (outputs and gradients).
log "check-ops"
limited 120 $t check-ops --device cuda > "$out/check-ops.txt" 2> "$out/check-ops.log"
echo "check-ops exit $?" >> "$out/check-ops.txt"
# The cuDNN convolutions too, when the binary has them (scripts/build-cuda.sh --features cudnn).
limited 120 env CAMBRIAN_CONV=cudnn $t check-ops --device cuda >> "$out/check-ops.txt" 2>> "$out/check-ops.log"
echo "check-ops (CAMBRIAN_CONV=cudnn) exit $?" >> "$out/check-ops.txt"

# 1. Candle against PyTorch eager on the same GPU: the three reference DNAs, batch 50 and 256,
#    float32, with per-operation times; then the same with Candle's composed operations (what
#    our kernels replace) and PyTorch with TF32, for reference.
for b in 50 256; do
  log "bench batch $b"
  limited 150 $t bench --device cuda --batch $b --steps 30 --warmup 5 --ops --torch "$py" \
    > "$out/bench-b$b.txt" 2> "$out/bench-b$b.log"
done
log "bench batch 256, one GEMM per convolution pass (no sample groups)"
limited 100 env CAMBRIAN_CONV_GROUPS=1 $t bench --device cuda --batch 256 --steps 30 --warmup 5 --ops \
  > "$out/bench-b256-one-group.txt" 2>> "$out/bench-b256.log"
log "bench batch 256, composed ops; TF32 for both"
limited 100 $t bench --device cuda --batch 256 --steps 30 --warmup 5 --ops --composed \
  > "$out/bench-b256-composed.txt" 2>> "$out/bench-b256.log"
limited 100 $t bench --device cuda --batch 256 --steps 30 --warmup 5 --tf32 --torch "$py" --torch-args=--tf32 \
  > "$out/bench-b256-tf32.txt" 2>> "$out/bench-b256.log"
for b in 50 256; do
  log "bench batch $b, cuDNN convolutions"
  limited 100 env CAMBRIAN_CONV=cudnn $t bench --device cuda --batch $b --steps 30 --warmup 5 --ops \
    > "$out/bench-b$b-cudnn.txt" 2>> "$out/bench-b$b.log"
done

# 2. GPU utilisation with one and with four worker loops on one device (small, early models).
cat > "$out/util.yaml" <<YAML
apiVersion: cambrian.dev/v1alpha1
kind: EvolutionExperiment
metadata:
  name: gpu-utilisation
spec:
  population: 16
  workers: 4
  training:
    steps: 256
    batchSize: 50
    momentum: 0.9
    weightDecay: 0.0001
    initialLearningRate: 0.05
  store:
    url: file:///tmp/gpu-util
  stop:
    wallTime: 30s
YAML
for loops in 1 4; do
  log "utilisation with $loops loops"
  rm -rf /tmp/gpu-util
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 \
    > "$out/util-$loops.csv" 2>/dev/null &
  smi=$!
  limited 80 $t worker --manifest "$out/util.yaml" --data .gpu/cifar --device cuda --loops $loops \
    > "$out/util-$loops.log" 2>&1
  kill $smi 2>/dev/null
  awk -F, '{s+=$1; n++} END {if (n) printf "loops=%d mean GPU utilisation %.1f%% over %d samples\n", '"$loops"', s/n, n}' \
    "$out/util-$loops.csv" | tee -a "$out/utilisation.txt"
  grep -c "individual born" "$out/util-$loops.log" | sed "s/^/loops=$loops individuals born in 30 s: /" | tee -a "$out/utilisation.txt"
done

# 3. A short real evolution on the CIFAR-10 subset: validation accuracy over time.
cat > "$out/evolve.yaml" <<YAML
apiVersion: cambrian.dev/v1alpha1
kind: EvolutionExperiment
metadata:
  name: gpu-evolution
spec:
  population: 20
  workers: 4
  training:
    steps: 512
    batchSize: 50
    momentum: 0.9
    weightDecay: 0.0001
    initialLearningRate: 0.05
  data:
    validationImages: 500
  store:
    url: file:///tmp/gpu-evolution
  stop:
    wallTime: 80s
YAML
log "evolution"
rm -rf /tmp/gpu-evolution
limited 120 $t run "$out/evolve.yaml" --data .gpu/cifar --device cuda --out "$out/evolution" \
  > "$out/evolution.txt" 2> "$out/evolution.log"
log "done"
# Everything that matters in one place (one file to copy back).
for f in check-ops.txt bench-b50.txt bench-b256.txt bench-b256-one-group.txt bench-b256-composed.txt \
         bench-b256-tf32.txt bench-b50-cudnn.txt bench-b256-cudnn.txt utilisation.txt evolution.txt; do
  echo "### $f"; grep -v "^ok" "$out/$f" 2>/dev/null
done > "$out/summary.txt"
cat "$out/summary.txt"
