#!/usr/bin/env bash
# Writes a smaller CIFAR-10 in the official binary layout: the first N records of each
# training batch and the first M of the test batch, so that real data is small enough to copy
# to a GPU machine with the binary.
#   scripts/cifar-subset.sh SRC DST [N=1000] [M=2000]
set -euo pipefail
src=$1; dst=$2; n=${3:-1000}; m=${4:-2000}
mkdir -p "$dst"
for i in 1 2 3 4 5; do head -c $((n * 3073)) "$src/data_batch_$i.bin" > "$dst/data_batch_$i.bin"; done
head -c $((m * 3073)) "$src/test_batch.bin" > "$dst/test_batch.bin"
ls -la "$dst" >&2
