#!/usr/bin/env python3
"""PyTorch reference for `trainer bench`: builds the same networks from the same DNA JSON
files and times them the same way, so that the two can be compared on one machine.

    python3 bench/torch_reference.py [--dnas bench/dna] [--batch 50] [--steps 20] [--ops] [--json]
    cargo run --release -p trainer -- bench --torch python3      # both, with ratios

The model mirrors trainer/src/model.rs: every backbone vertex sums its primary edge's output
and its skip inputs (nearest-resized, channels truncated or zero-padded), then applies BN+ReLU
or nothing; convolutions are padded "same" with odd filters; the last vertex, flattened,
feeds a linear layer. SGD with momentum 0.9 and weight decay 1e-4; batch norm with PyTorch's
defaults, which the Rust layer copies.
"""
import argparse
import glob
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def nearest_odd(x):
    return 2 * max(0, round_half_away((x - 1.0) / 2.0)) + 1


def round_half_away(x):
    # Rust's f64::round rounds halves away from zero; Python's round() rounds them to even.
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def stride(conv):
    return 1 << min(max(round_half_away(conv["log2_stride"]), 0), 30)


def channels(conv):
    return max(1, round_half_away(conv["channels"]))


class Net(nn.Module):
    def __init__(self, dna, classes=10, input_shape=(3, 32, 32)):
        super().__init__()
        vertices = dna["vertices"]
        index = {v["id"]: i for i, v in enumerate(vertices)}
        primary = {index[e["to"]]: e for e in dna["edges"] if e["role"] == "primary"}
        shapes = [input_shape]
        for i in range(1, len(vertices)):
            e = primary[i]
            c, h, w = shapes[i - 1]
            if e["type"] == "convolution":
                s = stride(e)
                shapes.append((channels(e), -(-h // s), -(-w // s)))
            else:
                shapes.append((c, h, w))
        self.shapes = shapes
        self.convs = nn.ModuleDict()
        self.norms = nn.ModuleDict()
        self.plan = []
        for i in range(1, len(vertices)):
            e = primary[i]
            conv = None
            if e["type"] == "convolution":
                cin, h, w = shapes[i - 1]
                kh, kw = nearest_odd(e["filter_height"]), nearest_odd(e["filter_width"])
                # Taps beyond 2*side-1 only see padding; the Rust layer skips them too.
                kh, kw = min(kh, 2 * h - 1), min(kw, 2 * w - 1)
                conv = nn.Conv2d(cin, channels(e), (kh, kw), stride(e), padding=((kh - 1) // 2, (kw - 1) // 2))
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                self.convs[str(i)] = conv
            if vertices[i]["activation"] == "batch_norm_relu":
                self.norms[str(i)] = nn.BatchNorm2d(shapes[i][0], momentum=0.1, eps=1e-5)
            skips = []
            for s in dna["edges"]:
                if s["role"] == "skip" and index[s["to"]] == i:
                    src = index[s["from"]]
                    (sc, sh, sw), (tc, th, tw) = shapes[src], shapes[i]
                    rows = torch.tensor([r * sh // th for r in range(th)]) if sh != th else None
                    cols = torch.tensor([c * sw // tw for c in range(tw)]) if sw != tw else None
                    skips.append((src, rows, cols, sc, tc))
            self.plan.append((i, skips))
        features = shapes[-1][0] * shapes[-1][1] * shapes[-1][2]
        self.classifier = nn.Linear(features, classes)
        nn.init.kaiming_normal_(self.classifier.weight, nonlinearity="relu")
        nn.init.zeros_(self.classifier.bias)

    def to(self, device):
        super().to(device)
        self.plan = [
            (i, [(src, None if r is None else r.to(device), None if c is None else c.to(device), sc, tc)
                 for (src, r, c, sc, tc) in skips])
            for (i, skips) in self.plan
        ]
        return self

    def forward(self, x):
        values = [x]
        for i, skips in self.plan:
            key = str(i)
            v = self.convs[key](values[i - 1]) if key in self.convs else values[i - 1]
            for src, rows, cols, sc, tc in skips:
                s = values[src]
                if rows is not None:
                    s = s.index_select(2, rows)
                if cols is not None:
                    s = s.index_select(3, cols)
                if tc < sc:
                    s = s[:, :tc]
                elif tc > sc:
                    s = F.pad(s, (0, 0, 0, 0, 0, tc - sc))
                v = v + s
            if key in self.norms:
                v = F.relu(self.norms[key](v))
            values.append(v)
        return self.classifier(values[-1].flatten(1))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name, dna, args, device):
    torch.manual_seed(0)
    model = Net(dna).to(device)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(args.batch, 3, 32, 32, device=device)
    labels = torch.tensor([(i * 7) % 10 for i in range(args.batch)], device=device)
    fwd = bwd = upd = 0.0
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(images), labels)
        sync(device)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        opt.step()
        sync(device)
        t3 = time.perf_counter()
        if step >= args.warmup:
            fwd += t1 - t0
            bwd += t2 - t1
            upd += t3 - t2
    model.eval()
    eval_images = torch.randn(args.eval_batch, 3, 32, 32, device=device)
    rounds = max(2, -(-args.steps // 4))
    with torch.no_grad():
        model(eval_images)
        sync(device)
        t = time.perf_counter()
        for _ in range(rounds):
            model(eval_images)
        sync(device)
        eval_seconds = time.perf_counter() - t
    steps = args.steps
    return {
        "name": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_images_per_s": steps * args.batch / (fwd + bwd + upd),
        "eval_images_per_s": rounds * args.eval_batch / eval_seconds,
        "forward_ms": 1e3 * fwd / steps,
        "backward_ms": 1e3 * bwd / steps,
        "optimizer_ms": 1e3 * upd / steps,
    }


def time_op(name, args, device, forward):
    f = b = 0.0
    for r in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        y = forward()
        sync(device)
        t1 = time.perf_counter()
        y.backward(torch.ones_like(y))
        sync(device)
        t2 = time.perf_counter()
        if r >= args.warmup:
            f += t1 - t0
            b += t2 - t1
    return {"name": name, "forward_ms": 1e3 * f / args.steps, "backward_ms": 1e3 * b / args.steps}


def bench_ops(args, device):
    out = []
    b = args.batch
    # The same list as OP_CONVOLUTIONS in trainer/src/bench.rs: conv3's layers, then skip's.
    convolutions = [
        (3, 64, 32, (3, 3), 0), (64, 128, 32, (3, 3), 1), (128, 256, 16, (3, 3), 1),
        (32, 32, 32, (3, 3), 0), (32, 64, 32, (3, 3), 1), (64, 64, 16, (3, 5), 0),
        (64, 64, 16, (3, 3), 0), (64, 128, 16, (3, 3), 1),
    ]
    for cin, cout, side, (kh, kw), log2s in convolutions:
        conv = nn.Conv2d(cin, cout, (kh, kw), 1 << log2s, padding=(kh // 2, kw // 2)).to(device)
        x = torch.randn(b, cin, side, side, device=device, requires_grad=True)
        name = f"conv{kh}x{kw} {cin}->{cout} stride {1 << log2s} [{b},{cin},{side},{side}]"
        out.append(time_op(name, args, device, lambda: conv(x)))
    for c, side in [(64, 32), (128, 16), (256, 8)]:
        bn = nn.BatchNorm2d(c).to(device).train()
        x = torch.randn(b, c, side, side, device=device, requires_grad=True)
        out.append(time_op(f"batch norm train [{b},{c},{side},{side}]", args, device, lambda: bn(x)))
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dnas", default=os.path.join(here, "dna"))
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eval-batch", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions on CUDA")
    p.add_argument("--ops", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    device = torch.device(args.device)
    paths = sorted(glob.glob(os.path.join(args.dnas, "*.json")), key=lambda p: (os.path.getsize(p), p))
    models = []
    for path in paths:
        with open(path) as f:
            dna = json.load(f)
        models.append(bench_model(os.path.splitext(os.path.basename(path))[0], dna, args, device))
    report = {
        "implementation": f"pytorch {torch.__version__}" + (" tf32" if args.tf32 else ""),
        "device": str(device) + ("" if device.type != "cpu" else f" ({torch.get_num_threads()} threads)"),
        "config": {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "eval_batch": args.eval_batch},
        "models": models,
        "ops": bench_ops(args, device) if args.ops else [],
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['implementation']} on {report['device']} (batch {args.batch}, {args.steps} timed steps)")
    print(f"{'model':<8} {'params':>10} {'train img/s':>11} {'eval img/s':>11} {'fwd ms':>9} {'bwd ms':>9} {'opt ms':>9}")
    for m in models:
        print(f"{m['name']:<8} {m['parameters']:>10} {m['train_images_per_s']:>11.0f} {m['eval_images_per_s']:>11.0f} "
              f"{m['forward_ms']:>9.2f} {m['backward_ms']:>9.2f} {m['optimizer_ms']:>9.2f}")
    for op in report["ops"]:
        print(f"{op['name']:<44} {op['forward_ms']:>9.2f} {op['backward_ms']:>9.2f}")


if __name__ == "__main__":
    sys.exit(main())
