"""Derive the broken-model fixtures the Rust reload tests feed to the loader from the committed
model: one exported with a fixed batch size of 1, one whose output is NaN (a NaN bias), and one
that answers NaN only for series with a bucket of more than 1000 requests (it passes the
loader's trial, whose series are small, and fails in service), and one whose `p_any` is its
probability plus 1 (an export that lost its final sigmoid: finite, but no probability).

Needs only the `onnx` package (pinned in requirements.txt):
    python models/train/bad_models.py
writes models/fixtures/fixed-batch.onnx, models/fixtures/nan-output.onnx,
models/fixtures/nan-on-large-counts.onnx and models/fixtures/p-any-above-one.onnx.
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

    # quantiles + 0 * sqrt(ln(1001) - max(counts)): NaN where a bucket held more than 1000.
    late = onnx.load(MODELS / "lstm.onnx")
    g = late.graph
    for node in g.node:
        node.output[:] = ["quantiles_raw" if o == "quantiles" else o for o in node.output]
        node.input[:] = ["quantiles_raw" if i == "quantiles" else i for i in node.input]
    g.initializer.extend([
        numpy_helper.from_array(np.array(math.log1p(1000.0), dtype=np.float32), "large_limit"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ])
    g.node.extend([
        onnx.helper.make_node("ReduceMax", ["counts"], ["largest"], axes=[1], keepdims=1),
        onnx.helper.make_node("Sub", ["large_limit", "largest"], ["headroom"]),
        onnx.helper.make_node("Sqrt", ["headroom"], ["root"]),
        onnx.helper.make_node("Mul", ["root", "zero"], ["nan_if_large"]),
        onnx.helper.make_node("Add", ["quantiles_raw", "nan_if_large"], ["quantiles"]),
    ])
    onnx.checker.check_model(late)
    onnx.save(late, MODELS / "fixtures" / "nan-on-large-counts.onnx")

    above = onnx.load(MODELS / "lstm.onnx")
    g = above.graph
    for node in g.node:
        node.output[:] = ["p_any_raw" if o == "p_any" else o for o in node.output]
        node.input[:] = ["p_any_raw" if i == "p_any" else i for i in node.input]
    g.initializer.extend([numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")])
    g.node.extend([onnx.helper.make_node("Add", ["p_any_raw", "one"], ["p_any"])])
    onnx.checker.check_model(above)
    onnx.save(above, MODELS / "fixtures" / "p-any-above-one.onnx")


if __name__ == "__main__":
    main()
