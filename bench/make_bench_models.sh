#!/usr/bin/env bash
# Builds the benchmark model packages that hospitals' model sizes need, without downloading
# weights: ResNet-18 (11 M parameters, RGB 224, random weights) from the peer's
# make_test_model.py (onnx.helper, no torch), with Carina's manifest from
# ../shared/bench/resnet18.model.toml and the peer's JSON manifest beside it; and DenseNet-121
# (7.0 M parameters, the CheXNet shape, RGB 224, random weights) from bench/make_densenet121.py
# (onnx.helper, no torch), with Carina's manifest bench/densenet121.model.toml and the peer's
# JSON manifest. Each package is <OUT>/<name>/{model.onnx,model.toml,peer-manifest.json}.
#   PY=/path/to/venv/bin/python bash bench/make_bench_models.sh [/tmp/bench-models]
# PY needs `onnx` and `numpy` (the peer's requirements.txt has both).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/bench-models}
SHARED=${SHARED:-../shared}
PY=${PY:-python3}
work=$(mktemp -d)
"$PY" "$SHARED/peer/make_test_model.py" --builder onnx --models resnet18_onnx --out "$work" >&2
mkdir -p "$OUT/resnet18"
mv "$work/resnet18_onnx.onnx" "$OUT/resnet18/model.onnx"
install -m 644 "$SHARED/bench/resnet18.model.toml" "$OUT/resnet18/model.toml"
"$PY" - "$work/resnet18_onnx.json" "$OUT/resnet18/peer-manifest.json" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
m["model_path"] = "model.onnx"
json.dump(m, open(sys.argv[2], "w"), indent=2)
PYEOF
rm -rf "$work"
echo "$OUT/resnet18"
"$PY" bench/make_densenet121.py --out "$OUT/densenet121" >&2
echo "$OUT/densenet121"
