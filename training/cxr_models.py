"""CNN definitions + ONNX export shared by make_fixtures.py and train_cxr.py.

Every model exposes:
  model.trunk  : nn.Module whose output is the last 4-D conv activation ("features")
  model.head   : nn.Module mapping features -> logits
  model(x)     : logits (what pytorch-grad-cam needs)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LABELS = [
    # key, display, system, code   (output order)
    ("covid", "COVID-19", "http://snomed.info/sct", "840539006"),
    ("normal", "No abnormality detected", "http://snomed.info/sct", "281900007"),
    ("pneumonia", "Pneumonia", "http://snomed.info/sct", "233604007"),
]
CLASSES = [k for k, *_ in LABELS]


def conv_bn_relu(cin, cout, stride=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=False),
    )


class TinyNet(nn.Module):
    """~10k-parameter CNN for test fixtures (64x64 gray input -> 32 x 8 x 8 features)."""

    def __init__(self, head: str = "gap", width: int = 32, n_classes: int = 3, hidden: int = 16):
        super().__init__()
        self.trunk = nn.Sequential(
            conv_bn_relu(1, 8, 2),  # 32x32
            conv_bn_relu(8, 16, 2),  # 16x16
            conv_bn_relu(16, width, 2),  # 8x8
            conv_bn_relu(width, width, 1),  # 8x8 -> features
        )
        if head == "gap":
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, n_classes))
        elif head == "mlp":
            self.head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=False),
                nn.Dropout(0.2), nn.Linear(hidden, n_classes),
            )
        elif head == "max":
            self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(width, n_classes))
        else:
            raise ValueError(head)

    def forward(self, x):
        return self.head(self.trunk(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + idt)


class ResNetSmall(nn.Module):
    """ResNet-style CNN for 1-channel chest X-rays, trained from scratch.

    stem: conv3x3/2 + conv3x3 + maxpool/2, then 4 stages of BasicBlocks (/1, /2, /2, /2):
    224 -> 112 -> 56 -> 56 -> 28 -> 14 -> 7.  Head: GAP + Dropout + Linear (exact Grad-CAM).
    """

    def __init__(self, widths=(24, 48, 96, 192), blocks=(1, 1, 1, 1), n_classes=3, dropout=0.2):
        super().__init__()
        w0 = widths[0]
        layers = [
            nn.Conv2d(1, w0, 3, 2, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=False),
            nn.Conv2d(w0, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU(inplace=False),
            nn.MaxPool2d(3, 2, 1),
        ]
        cin = w0
        for i, (w, b) in enumerate(zip(widths, blocks)):
            for j in range(b):
                layers.append(BasicBlock(cin, w, (1 if i == 0 else 2) if j == 0 else 1))
                cin = w
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, n_classes))

    def forward(self, x):
        return self.head(self.trunk(x))


class ExportWrapper(nn.Module):
    """forward -> (logits, probs, features); features is the trunk output feeding the pooling."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        f = self.model.trunk(x)
        logits = self.model.head(f)
        return logits, torch.softmax(logits, dim=1), f


def export_onnx(model: nn.Module, path, height: int, width: int, opset: int = 17):
    """Exports with the TorchScript exporter: opset 17, dynamic batch, input 'input',
    outputs 'logits', 'probs', 'features'. Returns the path."""
    import onnx

    model = model.eval()
    wrapper = ExportWrapper(model).eval()
    dummy = torch.zeros(1, 1, height, width)
    torch.onnx.export(
        wrapper, (dummy,), str(path),
        dynamo=False, opset_version=opset, do_constant_folding=True,
        input_names=["input"], output_names=["logits", "probs", "features"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "probs": {0: "batch"}, "features": {0: "batch"}},
    )
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    # Strip the doc strings (they hold local source paths) to keep files reproducible.
    for n in m.graph.node:
        n.doc_string = ""
    m.producer_name = "carina-training"
    onnx.save(m, str(path))
    return path


def graph_summary(path):
    import onnx

    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    pool = [n for n in m.graph.node if n.op_type in ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean")]
    return {
        "ops": ops,
        "outputs": [o.name for o in m.graph.output],
        "pool_inputs": [(n.op_type, list(n.input)) for n in pool],
        "opset": [(o.domain, o.version) for o in m.opset_import],
    }


def raw_gradcam(model, x, c):
    """Un-normalised Grad-CAM before ReLU: sum_k mean_ij(d logit_c / d A_k) * A_k  -> [h, w] float32."""
    import numpy as np

    model.eval()
    xt = torch.from_numpy(x)
    f = model.trunk(xt).detach().requires_grad_(True)
    logit = model.head(f)[0, c]
    (g,) = torch.autograd.grad(logit, f)
    alpha = g.mean(dim=(2, 3), keepdim=True)
    return np.ascontiguousarray((alpha * f).sum(1)[0].detach().numpy(), dtype=np.float32)
