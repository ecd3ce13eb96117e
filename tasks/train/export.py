"""ONNX export of a trained recogniser, and the parity check against PyTorch.

The graph takes `pixels`: uint8 [N,H,W,3] and returns `logits` [N,C]; normalisation is inside
(tasks.data.preprocess.PixelInput). Its metadata carries the class map, architecture string and input
size, so the serving app and evaluation need nothing else to use it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from tasks.data.preprocess import PixelInput
from tasks.train.onnx_interface import INPUT_NAME, OUTPUT_NAME

OPSET = 17


def export_onnx(model: nn.Module, classes: list[str], path: str | Path, image_size: int = 64,
                refines: dict[str, str] | None = None) -> Path:
    """Export `model` (float NCHW input) as a uint8-NHWC-input ONNX graph with a dynamic batch.

    Args:
        model: trained recogniser; it is exported in eval mode on the CPU.
        classes: class names in logit order, stored in the graph's metadata.
        path: output .onnx file.
        image_size: input side length.
        refines: class -> the class it refines (`fu_merchant` -> `fu`), written as the `refines`
            metadata entry (JSON) the gate, the release comparison and the canary read; none: no entry.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapped = PixelInput(model).eval().cpu()
    example = torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated in favour of dynamo; the dynamo
        # exporter needs onnxscript's optimiser passes and is ~10x slower for these tiny graphs.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    graph = onnx.load(str(path))
    meta = {
        "classes": json.dumps(classes),
        "image_size": str(image_size),
        "arch": getattr(model, "arch_string", ""),
        "model_name": getattr(model, "model_name", ""),
        "input_format": "uint8 NHWC RGB",
    }
    if refines:
        unknown = sorted(set(refines) - set(classes))
        if unknown:
            raise ValueError(f"refines names classes {unknown} that are not among the model's {classes}")
        meta["refines"] = json.dumps(dict(sorted(refines.items())))
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    return path


def parity_max_abs_diff(model: nn.Module, onnx_path: str | Path, pixels: np.ndarray) -> float:
    """Max |logit difference| between PyTorch and onnxruntime on `pixels` (uint8 NHWC)."""
    with torch.no_grad():
        ref = PixelInput(model).eval().cpu()(torch.from_numpy(pixels)).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
    return float(np.abs(ref - got).max())
