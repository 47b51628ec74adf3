"""An MLServer runtime that serves an ONNX file with onnxruntime over the Open Inference Protocol
(KServe V2), as a hospital's inference pool would (MLServer has no ONNX runtime of its own).

model-settings.json:
    {"name": "tiny-gap", "implementation": "ort_runtime.OnnxRuntimeModel",
     "parameters": {"uri": "./model.onnx", "extra": {"delay_ms": 0}}}

The ONNX file is the one `carina export-serving <package> --out model.onnx` writes, so every
tensor Carina asks for (probabilities, the Grad-CAM feature map) is a graph output.
`extra.delay_ms` makes every answer late (for Carina's timeout tests).
"""
import asyncio

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self._session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        extra = (self._settings.parameters.extra or {}) if self._settings.parameters else {}
        self._delay = float(extra.get("delay_ms", 0)) / 1000.0
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        if self._delay:
            await asyncio.sleep(self._delay)
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        names = [o.name for o in payload.outputs] if payload.outputs else [
            o.name for o in self._session.get_outputs()]
        values = self._session.run(names, feeds)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(names, values)],
        )
