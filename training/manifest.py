"""model.toml writers (the manifest schema the Rust service reads)."""
from __future__ import annotations

import json
import tomllib

from cxr_models import LABELS


def q(s: str) -> str:
    """TOML basic string."""
    return json.dumps(s, ensure_ascii=False)


def num(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def metrics_table(metrics: dict) -> str:
    return "".join(f"{k} = {num(v)}\n" for k, v in metrics.items())


def image_manifest(*, name, version, description, pre, gradcam_target, training_data, trained_by, metrics,
                   card="MODEL_CARD.md", labels=LABELS) -> str:
    s = f"""name = {q(name)}
version = {q(version)}
task = "image-classification"
description = {q(description)}
file = "model.onnx"

[input]
name = "input"
shape = [1, 1, {pre.height}, {pre.width}]
layout = "NCHW"
colour = "grayscale"
resize = {q(pre.resize)}
pad_value = {int(pre.pad_value)}

[input.normalise]
scale = {num(pre.scale)}
mean = [{", ".join(num(m) for m in pre.mean)}]
std = [{", ".join(num(m) for m in pre.std)}]

[output]
logits = "logits"
probabilities = "probs"
"""
    for key, display, system, code in labels:
        s += f"""
[[labels]]
key = {q(key)}
display = {q(display)}
system = {q(system)}
code = {q(code)}
"""
    s += """
[decision]
rule = "argmax"

[gradcam]
"""
    if gradcam_target:
        s += f"target = {q(gradcam_target)}\n"
    s += f"""
[provenance]
training_data = {q(training_data)}
card = {q(card)}
trained_by = {q(trained_by)}

[provenance.metrics]
{metrics_table(metrics)}"""
    tomllib.loads(s)  # validate
    return s
