"""Writing ONNX graphs: tracing a torch module, and saving a model with its weights beside it past protobuf's 2 GB."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

OPSET = 18
# Protobuf caps one file at 2 GB: larger graphs keep their weights in a side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def save_model(model: onnx.ModelProto, path: Path, external: bool) -> Path:
    """Save `model` to `path`, its weights in one `<name>.data` file beside it when `external`."""
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def export_graph(module: nn.Module, args: tuple, path: Path, *, inputs, outputs, dynamic) -> Path:
    """Trace `module` to `path`; weights go to one `<name>.data` side file when the graph passes 2 GB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    # The exporter scatters one file per tensor beside a >2 GB graph: trace into a scratch folder, then re-save.
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch, torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python branch it freezes; the graphs are checked against torch in tests.
        warnings.simplefilter("ignore")
        traced = Path(scratch) / path.name
        torch.onnx.export(
            module, args, str(traced), input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
        weights = sum(p.numel() * p.element_size() for p in module.parameters())
        if weights <= EXTERNAL_DATA_THRESHOLD and len(list(Path(scratch).iterdir())) == 1:
            traced.replace(path)
        else:
            save_model(onnx.load(str(traced), load_external_data=True), path, external=True)
    return path
