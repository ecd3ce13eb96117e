"""Static INT8 quantization of an exported recogniser, and its comparison with the FP32 graph.

onnxruntime's `quantize_static`, calibrated (MinMax) on a seeded sample of training images:
uint8 activations, int8 weights with one scale per output channel. The INT8 graph keeps the FP32
graph's interface (uint8 NHWC pixels in, float logits out) and metadata, plus
`quantization=int8-static-u8s8-per-channel`, so the serving app and evaluation use it unchanged.

Why these settings, measured on the x86 CPU we run on (AVX-512 VNNI; bench/quantize_speed.py):
s8 activations (onnxruntime's default) run 2-3x slower than u8 ones, and dynamic quantization
(ConvInteger, activations quantized at run time) 6-11x slower than FP32: only static u8
activations with s8 weights reach onnxruntime's fast u8s8 kernels. Even
so, at batch 1 on one thread our 64x64 recognisers are not faster in INT8 than in FP32 (about
0.75-0.9x its speed): pointwise and head convolutions run ~2x faster, but depthwise and stem
convolutions ~1.7x slower, residual Adds stop being fused into the convolutions, and every
HardSwish/HardSigmoid runs in float between a Dequantize and a Quantize. The latency cost term
therefore rewards architectures made of ReLU-family, pointwise-heavy blocks.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit
from tasks.release.evaluation import measure_latency, onnx_classes, onnx_predict_proba, session

# Importing onnxruntime.quantization imports onnxruntime.transformers, which appends its own folder
# to sys.path. That folder holds a plain `models/` directory, which a spawned worker process (the Fu
# world renderer's pool) then imports as a namespace package in place of ours, failing with
# "cannot import name ... from 'models' (unknown location)". Its modules are imported by now.
sys.path[:] = [p for p in sys.path if Path(p).parts[-2:] != ("onnxruntime", "transformers")]

QUANTIZATION_TAG = "int8-static-u8s8-per-channel"
# QDQ, not QOperator. Measured with onnxruntime 1.32 at batch 1 on one thread (two runs of
# bench/quantize_speed.py, p50), they are as fast as each other within noise: saofu_fu QDQ
# 0.228-0.236 ms vs QOperator 0.228-0.240 ms, mobilenet_v3_small_050 0.307-0.349 vs 0.297-0.341 ms.
# onnxruntime fuses DQ->Conv->Q into the same QLinearConv kernels QOperator names directly. QOperator
# files are 20-30% smaller, but they need com.microsoft contrib ops (QLinearAdd, QLinearMul,
# QGemm, ...) that only onnxruntime's CPU kernels run, whereas QDQ is plain ONNX that a phone's
# NNAPI/XNNPACK/CoreML execution provider can take, and the format onnxruntime recommends.
QUANT_FORMAT = QuantFormat.QDQ
CALIBRATION_BATCH = 32  # images per calibration run; MinMax ranges do not depend on it
# Nodes left in float: an expanded model's parent gate (`models.expand.ParentGate`) compares the
# base's softmax with a certainty such as 0.99, which a u8 softmax (1/255 steps) would move.
FLOAT_SCOPES = ("/parent_gate/",)


class PixelCalibrationReader(CalibrationDataReader):
    """Feeds uint8 NHWC pixels to the graph input in batches, as the shipped model takes them."""

    def __init__(self, pixels: np.ndarray, input_name: str, batch_size: int = CALIBRATION_BATCH):
        self.pixels = pixels
        self.input_name = input_name
        self.batch_size = batch_size
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self.pixels):
            return None
        batch = self.pixels[self._start : self._start + self.batch_size]
        self._start += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._start = 0


def _input_spec(graph: onnx.ModelProto, path: Path) -> tuple[str, tuple[int, int, int]]:
    """The graph input's name and its fixed (H, W, C); it must be uint8 [batch,H,W,C]."""
    inp = graph.graph.input[0]
    tensor = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.elem_type != onnx.TensorProto.UINT8 or len(dims) != 4 or None in dims[1:]:
        raise SaofuError(
            f"{path} does not take uint8 [batch,H,W,C] pixels (input {inp.name!r}: "
            f"{onnx.TensorProto.DataType.Name(tensor.elem_type)} {dims}); export it with tasks.train.export.export_onnx"
        )
    return inp.name, (dims[1], dims[2], dims[3])


ELEMENTWISE_BINARY = {"Add", "Sub", "Mul", "Div"}


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Tensor name -> inferred dims (int or symbolic name) from the graph's inputs, outputs and value_info."""
    infos = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    shapes = {}
    for info in infos:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
    return shapes


def scalarize_uniform_constants(model: onnx.ModelProto) -> int:
    """Replace constant operands of Add/Sub/Mul/Div holding one repeated value by a scalar; returns how many.

    Why: in the INT8 graph onnxruntime runs the convolutions channels-last and moves the input
    Transpose past the pixel normalisation, which then broadcasts a [1,1,1,3] constant (MEAN and
    STD are the same in every channel) along the innermost axis. Its elementwise kernels do that
    one 3-value span at a time: ~0.1 ms per image, a third of the INT8 latency of saofu_fu. A
    scalar gives the same values through the fast path. Only where the other operand already has
    the output's shape, so broadcasting, and therefore the result, is unchanged.
    """
    inits = {t.name: t for t in model.graph.initializer}
    shapes = _shapes(model)
    scalars: dict[str, str] = {}
    rewired = 0
    for node in model.graph.node:
        if node.op_type not in ELEMENTWISE_BINARY or len(node.input) != 2:
            continue
        for i, name in enumerate(node.input):
            other = node.input[1 - i]
            if name not in inits or other in inits or shapes.get(other) is None:
                continue
            value = numpy_helper.to_array(inits[name])
            if value.size < 2 or not np.all(value == value.flat[0]) or shapes[other] != shapes.get(node.output[0]):
                continue
            if name not in scalars:
                scalars[name] = f"{name}_scalar"
                model.graph.initializer.append(
                    numpy_helper.from_array(np.array(value.flat[0], dtype=value.dtype), scalars[name])
                )
            node.input[i] = scalars[name]
            rewired += 1
    # Drop the replaced constants nothing reads any more, and their now-stale shape entries.
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    dropped = {name for name in scalars if name not in used}
    for tensor in [t for t in model.graph.initializer if t.name in dropped]:
        model.graph.initializer.remove(tensor)
    for info in [v for v in model.graph.value_info if v.name in dropped]:
        model.graph.value_info.remove(info)
    return rewired


def prepare_for_quantization(fp32_path: str | Path, out_path: str | Path) -> Path:
    """quant_pre_process (shape inference, graph optimisation) and `scalarize_uniform_constants`.

    The quantizer needs every tensor's shape to pick per-channel axes. The optimisation matters
    too: quantizing the exported graph as it is (Identity/Constant nodes, HardSwish as one float
    op between Q/DQ pairs) gave an INT8 saofu_fu at 0.58 ms against 0.25 ms after optimisation.
    """
    quant_pre_process(str(fp32_path), str(out_path))
    graph = onnx.load(str(out_path))
    scalarize_uniform_constants(graph)
    onnx.save(graph, str(out_path))
    return Path(out_path)


def calibration_pixels(
    calibration: TensorSplit | np.ndarray, hwc: tuple[int, int, int], n: int, seed: int
) -> np.ndarray:
    """A seeded sample of `n` calibration images as uint8 NHWC, checked against the input size.

    Args:
        calibration: a decoded split (uint8 NCHW tensors) or a uint8 NHWC array.
        hwc: the model input's (H, W, C).
        n: images to sample (all of them when there are fewer).
        seed: seed of the sample.
    """
    if isinstance(calibration, TensorSplit):
        pixels = calibration.images.permute(0, 2, 3, 1).numpy()
    else:
        pixels = np.asarray(calibration)
    if pixels.ndim != 4 or len(pixels) == 0:
        raise SaofuError(f"calibration set is empty or not a batch of images (shape {pixels.shape})")
    if pixels.dtype != np.uint8:
        raise SaofuError(f"calibration images must be uint8 pixels as the model takes them, got {pixels.dtype}")
    if pixels.shape[1:] != hwc:
        hint = " (looks like NCHW; pass NHWC)" if pixels.shape[1:] == (hwc[2], hwc[0], hwc[1]) else ""
        raise SaofuError(
            f"calibration images are {list(pixels.shape[1:])} (H,W,C) but the model takes {list(hwc)}{hint}"
        )
    if n < 1:
        raise SaofuError(f"n_calibration must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(pixels), size=min(n, len(pixels)), replace=False))
    return np.ascontiguousarray(pixels[idx])


def quantize_int8(
    fp32_path: str | Path,
    calibration: TensorSplit | np.ndarray,
    out_path: str | Path,
    n_calibration: int = 256,
    seed: int = 0,
) -> Path:
    """Statically quantize an exported FP32 recogniser to INT8 (u8 activations, per-channel s8 weights).

    Args:
        fp32_path: graph written by tasks.train.export.export_onnx.
        calibration: training images: a decoded split, or uint8 NHWC [N,H,W,3] pixels.
        out_path: the INT8 .onnx file to write.
        n_calibration: images sampled for calibrating activation ranges.
        seed: seed of that sample.

    Returns:
        The written path.

    Raises:
        SaofuError: the FP32 file is missing or not a pixel-input export, the calibration set is
            empty, or its images do not match the model input's size and channels.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise SaofuError(f"ONNX model not found: {fp32_path}")
    if out_path.resolve() == fp32_path.resolve():
        raise SaofuError(f"INT8 output would overwrite the FP32 model: {out_path}")
    fp32 = onnx.load(str(fp32_path))
    input_name, hwc = _input_spec(fp32, fp32_path)
    pixels = calibration_pixels(calibration, hwc, n_calibration, seed)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="saofu-quant-") as tmp:
        prepared = prepare_for_quantization(fp32_path, Path(tmp) / "prepared.onnx")
        quantized = Path(tmp) / "int8.onnx"
        in_float = [n.name for n in onnx.load(str(prepared)).graph.node if any(s in n.name for s in FLOAT_SCOPES)]
        quantize_static(
            str(prepared),
            str(quantized),
            PixelCalibrationReader(pixels, input_name),
            quant_format=QUANT_FORMAT,
            per_channel=True,
            # The CPU has VNNI, which accumulates u8*s8 products without saturating, so full
            # 8-bit weights are safe (reduce_range is for pre-VNNI x86).
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=in_float,
        )
        int8 = onnx.load(str(quantized))
    meta = {p.key: p.value for p in fp32.metadata_props}
    meta["quantization"] = QUANTIZATION_TAG
    del int8.metadata_props[:]
    for key, value in meta.items():
        entry = int8.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(int8)
    # Written under a private name, then renamed: no reader ever sees an INT8 file without its tag.
    partial = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    onnx.save(int8, str(partial))
    partial.replace(out_path)
    return out_path


def compare_fp32_int8(
    fp32_path: str | Path, int8_path: str | Path, split: TensorSplit, latency_runs: int = 200
) -> dict[str, float | int]:
    """What quantization changed on `split`: agreement, accuracy, probabilities, size and latency.

    Latency is onnxruntime at batch 1 on one thread (tasks.release.evaluation.measure_latency), the
    phone-like setting the search's cost term and the release notes use.

    Returns:
        A flat dict (ready for MLflow): n, top1_agreement, fp32_accuracy, int8_accuracy,
        accuracy_delta, max_abs_prob_diff, fp32_bytes, int8_bytes, size_ratio,
        fp32_/int8_latency_p50_ms and _p95_ms, and speedup_p50 (FP32 p50 / INT8 p50).
    """
    if len(split) == 0:
        raise SaofuError("comparison split is empty")
    sessions = {"fp32": session(fp32_path), "int8": session(int8_path)}
    for name, sess in sessions.items():
        if onnx_classes(sess) != split.classes:
            raise SaofuError(f"{name} model classes {onnx_classes(sess)} differ from the data's {split.classes}")
    probs = {name: onnx_predict_proba(sess, split) for name, sess in sessions.items()}
    top = {name: p.argmax(1) for name, p in probs.items()}
    labels = split.labels.numpy()
    meta = sessions["fp32"].get_modelmeta().custom_metadata_map
    image_size = int(meta.get("image_size", split.images.shape[-1]))
    result: dict[str, float | int] = {
        "n": len(split),
        "top1_agreement": float((top["fp32"] == top["int8"]).mean()),
        "fp32_accuracy": float((top["fp32"] == labels).mean()),
        "int8_accuracy": float((top["int8"] == labels).mean()),
        "max_abs_prob_diff": float(np.abs(probs["fp32"] - probs["int8"]).max()),
        "fp32_bytes": Path(fp32_path).stat().st_size,
        "int8_bytes": Path(int8_path).stat().st_size,
    }
    result["accuracy_delta"] = result["int8_accuracy"] - result["fp32_accuracy"]
    result["size_ratio"] = result["int8_bytes"] / result["fp32_bytes"]
    for name, path in (("fp32", fp32_path), ("int8", int8_path)):
        lat = measure_latency(path, image_size=image_size, threads=1, runs=latency_runs,
                              warmup=max(5, latency_runs // 10))
        result[f"{name}_latency_p50_ms"] = lat["latency_p50_ms"]
        result[f"{name}_latency_p95_ms"] = lat["latency_p95_ms"]
    result["speedup_p50"] = result["fp32_latency_p50_ms"] / result["int8_latency_p50_ms"]
    return result

