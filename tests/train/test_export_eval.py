"""ONNX export parity with PyTorch, threshold metrics on constructed cases, latency."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from saofu.errors import SaofuError
from tasks.data.loading import prepare_dataset
from tasks.release.evaluation import evaluate_onnx, measure_latency, threshold_report
from tasks.train.export import export_onnx, parity_max_abs_diff
from tasks.train.loop import TrainConfig, fit
from tasks.train.onnx_interface import read_metadata


@pytest.fixture(scope="module")
def trained(shapes_dir):
    data = prepare_dataset(shapes_dir, image_size=32, val_share=0.2)
    cfg = TrainConfig(model="saofu_fu_tiny", epochs=3, batch_size=32, image_size=32)
    return data, fit(cfg, data.train, data.val).model


@pytest.mark.parametrize("model_name", ["saofu_fu_tiny", "mobilenet_v3_small_050"])
def test_onnx_logits_match_pytorch(tmp_path, shapes_dir, model_name):
    data = prepare_dataset(shapes_dir, image_size=32, val_share=0.2)
    cfg = TrainConfig(model=model_name, epochs=1, batch_size=32, image_size=32)
    model = fit(cfg, data.train, data.val).model
    path = export_onnx(model, data.classes, tmp_path / "m.onnx", image_size=32)
    pixels = data.val.images.permute(0, 2, 3, 1).contiguous().numpy()
    diff = parity_max_abs_diff(model, path, pixels)
    print(f"{model_name}: max |logit diff| = {diff:.3e}")
    assert diff < 1e-4


def test_graph_takes_uint8_nhwc_and_carries_its_class_map(tmp_path, trained):
    data, model = trained
    path = export_onnx(model, data.classes, tmp_path / "m.onnx", image_size=32)
    graph = onnx.load(str(path))
    inp = graph.graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 32, 32, 3]
    meta = read_metadata(path)
    assert meta["classes"] == '["circle", "square", "triangle"]'
    assert meta["arch"] == model.arch_string


def test_threshold_report_on_constructed_probabilities():
    classes = ["fu", "not_fu"]
    probs = np.array([[0.95, 0.05], [0.8, 0.2], [0.3, 0.7], [0.05, 0.95], [0.92, 0.08]])
    labels = np.array([0, 0, 1, 1, 1])
    # Without a fallback class, under-threshold rows abstain (and count as wrong).
    r = threshold_report(probs, labels, classes, threshold=0.9)
    assert r.accuracy == pytest.approx(4 / 5)  # argmax is wrong only on row 4
    assert r.accuracy_at_threshold == pytest.approx(2 / 5)  # rows 0 and 3
    assert r.abstained == pytest.approx(2 / 5)
    assert r.confusion == [[1, 0, 1], [1, 1, 1]]
    # With not_fu as the fallback, the unsure rows become not_fu, as the app treats them.
    r = threshold_report(probs, labels, classes, threshold=0.9, negative_class="not_fu")
    assert r.accuracy_at_threshold == pytest.approx(3 / 5)
    assert r.per_class["fu"].precision == pytest.approx(1 / 2)  # row 4 is a confident false fu
    assert r.per_class["fu"].recall == pytest.approx(1 / 2)
    assert r.per_class["not_fu"].recall == pytest.approx(2 / 3)
    with pytest.raises(SaofuError, match="negative class 'bg'"):
        threshold_report(probs, labels, classes, negative_class="bg")


def test_evaluate_onnx_agrees_with_the_report_and_checks_classes(tmp_path, trained):
    data, model = trained
    path = export_onnx(model, data.classes, tmp_path / "m.onnx", image_size=32)
    report = evaluate_onnx(path, data.val, threshold=0.0)
    assert report.n == len(data.val)
    assert report.accuracy_at_threshold == pytest.approx(report.accuracy)
    data.val.classes = ["a", "b", "c"]
    with pytest.raises(SaofuError, match="differ"):
        evaluate_onnx(path, data.val)
    data.val.classes = data.classes


def test_latency_is_measured_at_batch_one(tmp_path, trained):
    data, model = trained
    path = export_onnx(model, data.classes, tmp_path / "m.onnx", image_size=32)
    lat = measure_latency(path, image_size=32, runs=30, warmup=5)
    assert 0 < lat["latency_p50_ms"] <= lat["latency_p95_ms"]
    assert lat["threads"] == 1
    with pytest.raises(SaofuError, match="ONNX model not found"):
        measure_latency(tmp_path / "missing.onnx")
