#!/usr/bin/env python3
"""Build a DenseNet-121-shaped (CheXNet-shaped) ONNX test model with random weights.

No torch and no downloads: the graph is written node by node with onnx.helper and the
weights are drawn from numpy with a fixed seed.  The topology is torchvision's
densenet121 (growth 32, bn_size 4, blocks of 6/12/24/16 layers, 64 initial features)
with a 3-class head, so it costs what CheXNet-style hospital models cost; the weights are
meaningless (cost benchmarks only).

  input     "input"    [N,3,224,224] float32 (N is a dynamic batch axis)
  features  "features" [N,1024,7,7]  relu(norm5(...)), the Grad-CAM target
  logits    "logits"   [N,3]         Gemm(GlobalAveragePool(features))
  output    "probs"    [N,3]         Softmax(logits)

"features" and "probs" are graph outputs, as in the peer's make_test_model.py models.
BatchNormalization stays as graph nodes (eval statistics: mean 0, var 1, scale 1,
bias 0); convolutions have no bias and He-normal weights.

Writes a model package:
  <out>/model.onnx           the model (opset 17 by default, like the peer)
  <out>/model.toml           Carina's manifest, copied from bench/densenet121.model.toml
  <out>/peer-manifest.json   the peer service's JSON manifest (make_test_model.py format)

  python3 bench/make_densenet121.py --out /tmp/bench-models/densenet121

Needs `onnx` and `numpy`; with `onnxruntime` importable it also runs the model once on a
random input and checks that the outputs are finite and the probabilities not one-hot.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST_TEMPLATE = os.path.join(HERE, "densenet121.model.toml")
SIZE = 224
NUM_CLASSES = 3
GROWTH, BN_SIZE, INIT_FEATURES, BLOCKS = 32, 4, 64, (6, 12, 24, 16)
# Same labels / normalisation as the peer's make_test_model.py manifest_for().
PEER_LABELS = ["Covid19", "Normal_Lung", "Pneumonia_Bacterial_Lung"]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class GraphBuilder:
    """Collects nodes and initialisers; parameter names follow torchvision's densenet121."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.trainable = 0  # elements torch would count as parameters (not BN running stats)

    def _init(self, name, arr, trainable):
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        if trainable:
            self.trainable += arr.size
        return name

    def conv(self, x, name, cin, cout, k, stride=1, pad=0, out=None):
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        y = out or name
        self.nodes.append(helper.make_node(
            "Conv", [x, self._init(f"{name}.weight", w, True)], [y], name=name,
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        return y

    def bn_relu(self, x, name, c, out=None):
        ins = [x,
               self._init(f"{name}.weight", np.ones(c), True),
               self._init(f"{name}.bias", np.zeros(c), True),
               self._init(f"{name}.running_mean", np.zeros(c), False),
               self._init(f"{name}.running_var", np.ones(c), False)]
        self.nodes.append(helper.make_node("BatchNormalization", ins, [f"{name}.out"], name=name,
                                           epsilon=1e-5))
        y = out or f"{name}.relu"
        self.nodes.append(helper.make_node("Relu", [f"{name}.out"], [y], name=f"{name}.relu"))
        return y

    def node(self, op, ins, out, **attrs):
        self.nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out


def build(seed, opset):
    g = GraphBuilder(seed)
    # stem: conv0 7x7/2 -> norm0 -> relu0 -> pool0 3x3/2
    x = g.conv("input", "features.conv0", 3, INIT_FEATURES, 7, stride=2, pad=3)
    x = g.bn_relu(x, "features.norm0", INIT_FEATURES)
    x = g.node("MaxPool", [x], "features.pool0", kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1])
    c = INIT_FEATURES
    for b, n_layers in enumerate(BLOCKS, start=1):
        for i in range(1, n_layers + 1):
            p = f"features.denseblock{b}.denselayer{i}"
            h = g.bn_relu(x, f"{p}.norm1", c)
            h = g.conv(h, f"{p}.conv1", c, BN_SIZE * GROWTH, 1)
            h = g.bn_relu(h, f"{p}.norm2", BN_SIZE * GROWTH)
            h = g.conv(h, f"{p}.conv2", BN_SIZE * GROWTH, GROWTH, 3, pad=1)
            x = g.node("Concat", [x, h], f"{p}.concat", axis=1)
            c += GROWTH
        if b < len(BLOCKS):
            p = f"features.transition{b}"
            h = g.bn_relu(x, f"{p}.norm", c)
            h = g.conv(h, f"{p}.conv", c, c // 2, 1)
            c //= 2
            x = g.node("AveragePool", [h], f"{p}.pool", kernel_shape=[2, 2], strides=[2, 2])
    assert c == 1024, c
    # torchvision's DenseNet.forward: relu(features(x)) -> adaptive_avg_pool2d -> classifier
    feats = g.bn_relu(x, "features.norm5", c, out="features")
    gap = g.node("GlobalAveragePool", [feats], "gap")
    flat = g.node("Flatten", [gap], "flat", axis=1)
    fc_w = g._init("classifier.weight", g.rng.standard_normal((NUM_CLASSES, c)) * 0.05, True)
    fc_b = g._init("classifier.bias", np.zeros(NUM_CLASSES), True)
    logits = g.node("Gemm", [flat, fc_w, fc_b], "logits", transB=1)
    g.node("Softmax", [logits], "probs", axis=1)

    graph = helper.make_graph(
        g.nodes, "densenet121_onnx_helper",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", NUM_CLASSES]),
         helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", c, 7, 7])],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="make_densenet121.py")
    model.ir_version = 8  # as the peer's builder: loadable by older ONNX Runtime releases
    onnx.checker.check_model(model, full_check=True)  # full_check also runs shape inference
    total = sum(int(np.prod(t.dims)) for t in g.inits)
    return model, g.trainable, total


def peer_manifest(note):
    """The peer's JSON manifest, as make_test_model.py's manifest_for() writes it."""
    return {
        "model_name": "densenet121 (random init, test model)",
        "model_path": "model.onnx",  # relative to the manifest's folder
        "input_name": "input",
        "input_shape": [1, 3, SIZE, SIZE],  # NCHW; batch axis is dynamic
        "input_layout": "NCHW",
        "color": "RGB",
        "scale": 1.0 / 255.0,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "labels": PEER_LABELS,
        "probs_output": "probs",
        "output_is_logits": False,
        "feature_output": "features",
        "feature_layout": "NCHW",
        "gradcam": {"weights": "auto", "target": "logit"},
        "note": note,
    }


def smoke_test(path, seed):
    """One ORT run on a random normalised-image-like batch; raises if outputs are unusable."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime not importable: skipping the smoke test", file=sys.stderr)
        return None
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed + 1).standard_normal((4, 3, SIZE, SIZE)).astype(np.float32)
    probs, feats = sess.run(["probs", "features"], {"input": x})
    if feats.shape != (4, 1024, 7, 7) or probs.shape != (4, NUM_CLASSES):
        raise SystemExit(f"unexpected output shapes {feats.shape} {probs.shape}")
    if not (np.isfinite(probs).all() and np.isfinite(feats).all()):
        raise SystemExit("non-finite outputs")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-4):
        raise SystemExit("probabilities do not sum to 1")
    rounded = probs.astype(np.float64).round(4).tolist()
    if (probs.max(axis=1) > 0.999).all():
        raise SystemExit(f"degenerate (one-hot) probabilities: {rounded}")
    return {"features_mean": round(float(feats.mean()), 4),
            "features_max": round(float(feats.max()), 4), "probs": rounded}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/bench-models/densenet121",
                    help="package folder to write (created if missing)")
    ap.add_argument("--opset", type=int, default=17, help="ONNX opset (the peer's default is 17)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime smoke test")
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "model.onnx")
    model, trainable, total = build(args.seed, args.opset)
    onnx.save(model, path)
    shutil.copyfile(MANIFEST_TEMPLATE, os.path.join(args.out, "model.toml"))
    note = ("DenseNet-121-shaped CNN (torchvision densenet121 topology, 3 classes) built with "
            "onnx.helper, BN as nodes, random He weights")
    with open(os.path.join(args.out, "peer-manifest.json"), "w") as fh:
        json.dump(peer_manifest(note), fh, indent=2)
    info = {"exporter": "onnx.helper", "opset": args.opset, "seed": args.seed,
            "params": int(trainable), "initialiser_elements": int(total),
            "nodes": len(model.graph.node),
            "file_mb": round(os.path.getsize(path) / 2**20, 1)}
    if not args.no_check:
        info["smoke_test"] = smoke_test(path, args.seed)
    print(json.dumps({"densenet121": info}), flush=True)


if __name__ == "__main__":
    main()
