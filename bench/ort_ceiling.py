#!/usr/bin/env python3
"""Raw ONNX Runtime throughput of a model package: the ceiling for any server around it.

    python3 bench/ort_ceiling.py models/cxr-resnet-small --threads 2 --batches 1 8
    python3 bench/ort_ceiling.py /tmp/bench-models/densenet121 --provider cuda --batches 1 8 32 64

Runs the model's ONNX file on random inputs of the manifest's shape (CPU EP with the given
intra-op threads, or the CUDA EP), reports median ms per run and per image for each batch size,
as one JSON line. With --provider cuda the input is copied to the GPU on every run, as a server
would (no IO binding), and "provider" says which EP ONNX Runtime actually used.
"""
import argparse
import json
import os
import statistics
import time
import tomllib

import numpy as np
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seconds", type=float, default=8.0, help="time per batch size")
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    a = ap.parse_args()
    with open(os.path.join(a.package, "model.toml"), "rb") as fh:
        man = tomllib.load(fh)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if a.provider == "cuda":
        providers.insert(0, "CUDAExecutionProvider")
    sess = ort.InferenceSession(os.path.join(a.package, man.get("file", "model.onnx")), so,
                                providers=providers)
    shape = man["input"]["shape"][1:]
    out = {"model": man["name"], "onnxruntime": ort.__version__, "threads": a.threads,
           "provider": sess.get_providers()[0], "runs": {}}
    rng = np.random.default_rng(0)
    for b in a.batches:
        x = rng.standard_normal([b] + shape).astype(np.float32)
        for _ in range(3):
            sess.run(None, {man["input"]["name"]: x})
        times, t_end = [], time.perf_counter() + a.seconds
        while time.perf_counter() < t_end:
            t = time.perf_counter()
            sess.run(None, {man["input"]["name"]: x})
            times.append((time.perf_counter() - t) * 1e3)
        med = statistics.median(times)
        out["runs"][str(b)] = {"median_ms_per_run": round(med, 2), "ms_per_image": round(med / b, 2),
                               "images_per_s": round(1000 * b / med, 1), "n": len(times)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
