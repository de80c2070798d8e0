"""The step graph of the engine's device step (engine/step_graph.py): guidance and the sampler update as one small
ONNX graph. Built here, where the onnx package is, and committed as engine/step_graph.onnx, which the engine loads
with ONNX Runtime alone; a test checks that the committed file is what this builds.

    python -m export.graphs.step     # writes engine/step_graph.onnx
"""

from __future__ import annotations

import sys

import onnx
from onnx import TensorProto, helper

from engine.schedulers.base import SLOTS, SOURCES
from engine.step_graph import GRAPH_FILE, OUTPUTS


def build_step_graph() -> onnx.ModelProto:
    """The step graph (engine/step_graph.py says what it computes), for any number of transformer rows (T), image
    rows (R), latent channels (C) and latent size (h, w)."""
    f32, f64, i64 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("noise_pred", f32, ["T", "P", "h", "w"]),
        helper.make_tensor_value_info("cond_rows", i64, ["R"]),
        helper.make_tensor_value_info("uncond_rows", i64, ["R"]),
        helper.make_tensor_value_info("guidance", f32, ["R"]),
        helper.make_tensor_value_info("guided", TensorProto.BOOL, ["R"]),
        helper.make_tensor_value_info("x", f32, ["R", "C", "h", "w"]),
        helper.make_tensor_value_info("noise", f32, ["R", "C", "h", "w"]),
        helper.make_tensor_value_info("state", f64, [len(SLOTS), "R", "C", "h", "w"]),
        helper.make_tensor_value_info("weights", f64, ["R", len(OUTPUTS), len(SOURCES)]),
        helper.make_tensor_value_info("input_rows", i64, ["T"]),
    ]
    outputs = [
        helper.make_tensor_value_info("next", f32, ["R", "C", "h", "w"]),
        helper.make_tensor_value_info("next_state", f64, [len(SLOTS), "R", "C", "h", "w"]),
        helper.make_tensor_value_info("next_input", f32, ["T", "C", "h", "w"]),
    ]

    def const(name: str, values: list[int]) -> onnx.TensorProto:
        return helper.make_tensor(name, i64, [len(values)], values)

    initializers = [const("per_row", [-1, 1, 1, 1]), const("zero", [0]), const("one", [1]), const("two", [2]),
                    const("first", [0]), const("rest", [1]), const("end", [len(OUTPUTS)]), const("flat_rest", [-1]),
                    const("end_shape", [4])]
    n = helper.make_node
    nodes = [
        # guidance, in float32 as numpy mixes it, on the prediction half of the learned-sigma output
        n("Gather", ["noise_pred", "cond_rows"], ["cond"], axis=0),
        n("Gather", ["noise_pred", "uncond_rows"], ["uncond"], axis=0),
        n("Sub", ["cond", "uncond"], ["difference"]),
        n("Reshape", ["guidance", "per_row"], ["scale"]),
        n("Mul", ["scale", "difference"], ["scaled"]),
        n("Add", ["uncond", "scaled"], ["mixed"]),
        n("Reshape", ["guided", "per_row"], ["is_guided"]),
        n("Where", ["is_guided", "mixed", "cond"], ["both_halves"]),
        n("Shape", ["x"], ["row_shape"]),
        n("Slice", ["row_shape", "one", "two"], ["channels"]),  # the learned-sigma output's first C channels
        n("Slice", ["both_halves", "zero", "channels", "one"], ["model"]),
        # the sources, stacked, and every output as its weighted sum of them, in float64
        *[n("Cast", [name], [f"{name}64"], to=f64) for name in ("x", "model", "noise")],
        *[n("Unsqueeze", [f"{name}64", "zero"], [f"{name}_stacked"]) for name in ("x", "model", "noise")],
        n("Concat", ["x_stacked", "model_stacked", "noise_stacked", "state"], ["sources"], axis=0),
        n("Shape", ["sources"], ["sources_shape"]),
        n("Transpose", ["sources"], ["by_row"], perm=[1, 0, 2, 3, 4]),  # (R, N, C, h, w)
        n("Slice", ["sources_shape", "first", "rest"], ["n_sources"]),
        n("Slice", ["row_shape", "zero", "one"], ["rows"]),
        n("Concat", ["rows", "n_sources", "flat_rest"], ["flat_shape"], axis=0),
        n("Reshape", ["by_row", "flat_shape"], ["flat_sources"]),  # (R, N, C*h*w)
        n("MatMul", ["weights", "flat_sources"], ["flat_outputs"]),  # (R, O, C*h*w)
        n("Slice", ["row_shape", "one", "end_shape"], ["latent_shape"]),  # (C, h, w)
        n("Concat", ["rows", "end", "latent_shape"], ["outputs_shape"], axis=0),
        n("Reshape", ["flat_outputs", "outputs_shape"], ["by_output"]),  # (R, O, C, h, w)
        n("Transpose", ["by_output"], ["outputs"], perm=[1, 0, 2, 3, 4]),  # (O, R, C, h, w)
        n("Slice", ["outputs", "first", "rest"], ["next_stacked"]),
        n("Squeeze", ["next_stacked", "zero"], ["next64"]),
        n("Cast", ["next64"], ["next"], to=f32),
        n("Slice", ["outputs", "rest", "end"], ["next_state"]),
        n("Gather", ["next", "input_rows"], ["next_input"], axis=0),
    ]
    graph = helper.make_graph(nodes, "pixart_step", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def main() -> int:
    GRAPH_FILE.write_bytes(build_step_graph().SerializeToString())
    print(f"wrote {GRAPH_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
