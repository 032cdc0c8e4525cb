"""Derive the broken-model fixtures the Rust reload tests feed to the loader from the committed
model: one exported with a fixed batch size of 1, one whose output is NaN (a NaN bias).

Needs only the `onnx` package (pinned in requirements.txt):
    python models/train/bad_models.py
writes models/fixtures/fixed-batch.onnx and models/fixtures/nan-output.onnx.
"""

import math
import pathlib

import numpy as np
import onnx
from onnx import numpy_helper

MODELS = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    fixed = onnx.load(MODELS / "lstm.onnx")
    for graph_input in fixed.graph.input:
        dim = graph_input.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = 1
    onnx.save(fixed, MODELS / "fixtures" / "fixed-batch.onnx")

    nan = onnx.load(MODELS / "lstm.onnx")
    for init in nan.graph.initializer:
        if init.name == "b2":
            values = numpy_helper.to_array(init).copy()
            values[:] = math.nan
            init.CopyFrom(numpy_helper.from_array(values.astype(np.float32), "b2"))
    onnx.save(nan, MODELS / "fixtures" / "nan-output.onnx")


if __name__ == "__main__":
    main()
