"""Static INT8 quantization: a quantized graph that keeps the interface, metadata and predictions."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit, prepare_dataset
from tasks.release.quantize import (
    QUANTIZATION_TAG,
    calibration_pixels,
    compare_fp32_int8,
    prepare_for_quantization,
    quantize_int8,
)
from tasks.train.export import export_onnx
from tasks.train.loop import TrainConfig, fit
from tasks.train.onnx_interface import INPUT_NAME, OUTPUT_NAME, read_metadata
from tests.release.fake_clock import FakeClock, durations

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def quantized(shapes_dir, tmp_path_factory):
    """saofu's default architecture trained on the shapes until it is accurate, exported, and quantized.

    The default architecture, not saofu_fu_tiny: the tiny one has so few weights that the INT8
    graph's extra nodes outweigh what int8 weights save, and its file comes out larger.
    """
    data = prepare_dataset(shapes_dir, image_size=IMAGE_SIZE, val_share=0.2)
    cfg = TrainConfig(model="saofu_fu", epochs=15, batch_size=32, image_size=IMAGE_SIZE)  # ~6 s to ~100% val
    model = fit(cfg, data.train, data.val).model
    folder = tmp_path_factory.mktemp("quantize")
    fp32 = export_onnx(model, data.classes, folder / "fp32.onnx", image_size=IMAGE_SIZE)
    int8 = quantize_int8(fp32, data.train, folder / "int8.onnx", n_calibration=64)
    return data, fp32, int8


def _all_images(data) -> TensorSplit:
    """Train and val together: a larger sample for agreement than val's 36 images."""
    return TensorSplit(
        torch.cat([data.train.images, data.val.images]), torch.cat([data.train.labels, data.val.labels]),
        data.classes, data.train.paths + data.val.paths,
    )


def test_int8_graph_stores_int8_weights_and_keeps_interface_and_metadata(quantized):
    data, fp32, int8 = quantized
    assert int8.is_file() and int8.stat().st_size < fp32.stat().st_size
    graph = onnx.load(str(int8))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    inits = {t.name: t for t in graph.graph.initializer}
    # Every Conv/Gemm weight is an int8 initializer behind a DequantizeLinear with one scale per
    # output channel; activations are quantized to uint8.
    producers = {o: n for n in graph.graph.node for o in n.output}
    weighted = [n for n in graph.graph.node if n.op_type in ("Conv", "Gemm")]
    assert weighted
    for node in weighted:
        dq = producers[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT8
        if node.op_type == "Conv":
            assert numpy_helper.to_array(inits[dq.input[1]]).size == inits[dq.input[0]].dims[0]
    activation_zero_points = [
        inits[n.input[2]] for n in graph.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits
    ]
    assert activation_zero_points and all(z.data_type == onnx.TensorProto.UINT8 for z in activation_zero_points)
    int8_weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in inits.values())
    fp32_weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(fp32)).graph.initializer)
    assert int8_weight_bytes < 0.5 * fp32_weight_bytes

    inp = graph.graph.input[0]
    assert inp.name == INPUT_NAME and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", 32, 32, 3]
    assert [o.name for o in graph.graph.output] == [OUTPUT_NAME]
    meta = read_metadata(int8)
    assert meta == {**read_metadata(fp32), "quantization": QUANTIZATION_TAG}
    assert meta["classes"] == '["circle", "square", "triangle"]'


def test_int8_agrees_with_fp32_and_the_change_is_reported(quantized, monkeypatch):
    data, fp32, int8 = quantized
    # Each graph's 20 timed runs take made-up durations (the graphs still run): the reported
    # latency must be their percentiles, each graph's own, and the speed-up their ratio.
    ms = {fp32: durations(20, 1.0, 3.0, seed=1), int8: durations(20, 0.2, 1.0, seed=2)}
    clock = FakeClock(ms).install(monkeypatch)
    report = compare_fp32_int8(fp32, int8, _all_images(data), latency_runs=20)
    clock.assert_all_taken()  # exactly 20 timed runs of each, no warm-up timed
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()})
    assert report["n"] == len(data.train) + len(data.val)
    assert report["top1_agreement"] >= 0.95
    assert report["fp32_accuracy"] > 0.8
    assert report["accuracy_delta"] == pytest.approx(report["int8_accuracy"] - report["fp32_accuracy"])
    assert 0 <= report["max_abs_prob_diff"] < 0.5
    assert report["int8_bytes"] < report["fp32_bytes"]
    for name, path in (("fp32", fp32), ("int8", int8)):
        p50, p95 = np.percentile(ms[path], [50, 95])
        assert report[f"{name}_latency_p50_ms"] == pytest.approx(p50)
        assert report[f"{name}_latency_p95_ms"] == pytest.approx(p95)
    assert report["speedup_p50"] == pytest.approx(np.median(ms[fp32]) / np.median(ms[int8]))


def test_preparation_is_exact(quantized, tmp_path):
    """The pre-quantization rewrite (optimisation, scalar normalisation constants) changes no logit."""
    data, fp32, _ = quantized
    prepared = prepare_for_quantization(fp32, tmp_path / "prepared.onnx")
    pixels = data.val.images.permute(0, 2, 3, 1).contiguous().numpy()
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32, prepared)]
    ref, got = (s.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0] for s in run)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    shapes = [tuple(t.dims) for t in onnx.load(str(prepared)).graph.initializer]
    assert (1, 3, 1, 1) not in shapes  # MEAN/STD (0.5 in every channel) became scalars


def test_calibration_sample_is_seeded_and_nhwc(quantized):
    data, _, _ = quantized
    a = calibration_pixels(data.train, (32, 32, 3), n=16, seed=0)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, calibration_pixels(data.train, (32, 32, 3), n=16, seed=0))
    assert not np.array_equal(a, calibration_pixels(data.train, (32, 32, 3), n=16, seed=1))
    assert len(calibration_pixels(data.train, (32, 32, 3), n=10_000, seed=0)) == len(data.train)


def test_bad_inputs_are_named(quantized, tmp_path):
    data, fp32, _ = quantized
    out = tmp_path / "int8.onnx"
    with pytest.raises(SaofuError, match="ONNX model not found"):
        quantize_int8(tmp_path / "missing.onnx", data.train, out)
    with pytest.raises(SaofuError, match="calibration set is empty"):
        quantize_int8(fp32, np.zeros((0, 32, 32, 3), dtype=np.uint8), out)
    with pytest.raises(SaofuError, match=r"calibration images are \[64, 64, 3\].*model takes \[32, 32, 3\]"):
        quantize_int8(fp32, np.zeros((4, 64, 64, 3), dtype=np.uint8), out)
    with pytest.raises(SaofuError, match="looks like NCHW"):
        quantize_int8(fp32, np.zeros((4, 3, 32, 32), dtype=np.uint8), out)
    with pytest.raises(SaofuError, match="must be uint8"):
        quantize_int8(fp32, np.zeros((4, 32, 32, 3), dtype=np.float32), out)
    with pytest.raises(SaofuError, match="overwrite the FP32 model"):
        quantize_int8(fp32, data.train, fp32)
    assert not out.exists()


def _import_in_spawned_child(name: str) -> bool:
    import importlib

    return hasattr(importlib.import_module(name), "build_from_checkpoint_meta")


def test_a_spawned_worker_still_imports_our_models_package_after_quantization_is_imported():
    """onnxruntime.quantization puts onnxruntime/transformers (which has a `models/` folder) on sys.path;
    a spawned worker (the Fu world renderer's pool) must still find saofu's `models`, not that folder."""
    import multiprocessing
    import sys

    import tasks.release.quantize  # noqa: F401 - the import under test

    assert not [p for p in sys.path if p.rstrip("/").endswith("onnxruntime/transformers")]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_import_in_spawned_child, ("models",))
