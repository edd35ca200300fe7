#!/usr/bin/env python3
"""Trains one DNA on CIFAR-10 with PyTorch the way `trainer train` does (same network as
bench/torch_reference.py, 45,000/5,000 split, per-channel normalisation, pad-4/crop/flip
augmentation, SGD with momentum 0.9 and weight decay 1e-4, batch 50, the DNA's learning rate),
so that the accuracy `trainer train` reaches can be checked against an independent
implementation:

    python3 bench/torch_train.py bench/dna/conv3.json --data DIR --steps 2560
    cargo run --release -p trainer -- train bench/dna/conv3.json --data DIR --steps 2560

The split is drawn by numpy, not by the trainer's ChaCha stream: the two validation sets are
different samples of the same size, so expect agreement within sampling noise (about ±1.4
points at 5,000 images), not to the digit.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import Net  # noqa: E402


def load(folder):
    rows = [np.fromfile(os.path.join(folder, f"data_batch_{i}.bin"), dtype=np.uint8).reshape(-1, 3073) for i in range(1, 6)]
    data = np.concatenate(rows)
    return data[:, 1:].reshape(-1, 3, 32, 32), data[:, 0].astype(np.int64)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dna")
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=2560)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    with open(args.dna) as f:
        dna = json.load(f)
    images, labels = load(args.data)
    order = rng.permutation(len(labels))
    val, train = order[:5000], order[5000:]
    x = torch.tensor(images, dtype=torch.float32) / 255.0
    mean = x[train].mean(dim=(0, 2, 3), keepdim=True)
    std = x[train].std(dim=(0, 2, 3), keepdim=True)
    x = (x - mean) / std
    y = torch.tensor(labels)
    model = Net(dna)
    opt = torch.optim.SGD(model.parameters(), lr=dna["learning_rate"], momentum=0.9, weight_decay=1e-4)
    padded = F.pad(x[train], (4, 4, 4, 4))
    started = time.time()
    model.train()
    perm = rng.permutation(len(train))
    cursor = 0
    losses = []
    for step in range(args.steps):
        if cursor + 50 > len(perm):
            perm, cursor = rng.permutation(len(train)), 0
        idx = perm[cursor:cursor + 50]
        cursor += 50
        crops = []
        for i, (dy, dx) in zip(idx, rng.integers(0, 9, size=(50, 2))):
            crop = padded[i, :, dy:dy + 32, dx:dx + 32]
            crops.append(crop.flip(2) if rng.random() < 0.5 else crop)
        batch = torch.stack(crops)
        loss = F.cross_entropy(model(batch), y[train][idx])
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.time() - started
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x[val][i:i + 500]).argmax(1) for i in range(0, 5000, 500)])
    accuracy = (predictions == y[val]).float().mean().item()
    window = min(50, len(losses))
    print(f"training loss        {np.mean(losses[:window]):.4f} (first {window} steps), {np.mean(losses[-window:]):.4f} (last {window})")
    print(f"validation accuracy  {accuracy:.4f}")
    print(f"wall time            {seconds:.1f} s ({args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
