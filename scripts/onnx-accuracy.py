#!/usr/bin/env python3
"""Test accuracy of an exported model (`trainer export`) in ONNX Runtime, on the official
CIFAR-10 (or CIFAR-100) binary test file: an independent check of the number cambrian reports.

    python3 -m venv /tmp/ort && /tmp/ort/bin/pip install onnxruntime numpy
    /tmp/ort/bin/python scripts/onnx-accuracy.py cambrian-export/model.onnx DIR

DIR holds test_batch.bin (CIFAR-10) or test.bin (CIFAR-100, fine labels).
"""
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort


def load(folder):
    for name, label_bytes, label_index in (("test_batch.bin", 1, 0), ("test.bin", 2, 1)):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            raw = np.fromfile(path, dtype=np.uint8)
            record = label_bytes + 3 * 32 * 32
            raw = raw.reshape(-1, record)
            return raw[:, label_bytes:].reshape(-1, 3, 32, 32), raw[:, label_index]
    sys.exit(f"no test_batch.bin or test.bin in {folder}")


def main():
    model, folder = sys.argv[1], sys.argv[2]
    images, labels = load(folder)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    start = time.time()
    predicted = np.concatenate([
        session.run(["logits"], {"images": images[i:i + 500].astype(np.float32) / 255})[0].argmax(1)
        for i in range(0, len(images), 500)
    ])
    correct = int((predicted == labels).sum())
    print(json.dumps({
        "model": model,
        "individual": meta.get("individual"),
        "onnxruntime": ort.__version__,
        "correct": correct,
        "total": len(labels),
        "test_accuracy": correct / len(labels),
        "cambrian_test_accuracy": float(meta["test_accuracy"]) if "test_accuracy" in meta else None,
        "seconds": round(time.time() - start, 2),
    }))


if __name__ == "__main__":
    main()
