"""Model tests over every registered factory: shapes, finiteness, rebuild from checkpoint meta."""

from __future__ import annotations

import json
import random

import pytest
import torch

from models import (
    Recognizer,
    build_from_checkpoint_meta,
    count_params,
    create_model,
    decode_arch,
    is_model,
    list_models,
    model_meta,
    register_model,
    registry,
)
from models.arch import ACT_NAMES, KERNELS, ArchSpec, BlockArgs
from models.blocks import DepthwiseSeparable, InvertedResidual
from saofu.errors import SaofuError

# Covers: ds with SE and a residual, an ir with repeats and stride, an ir with e1 (no expand conv).
SMALL_ARCH = ("stem8|ds_r1_k3_s1_c8_se0.5"
              "|ir_r2_k5_s2_e3_c16_se0.25_ahs,ir_r1_k3_s1_e1_c16_are|head32_ahs")
NUM_CLASSES = 7  # unusual on purpose: catches a head hard-wired to 2 or 1000 classes


def _kwargs(name: str) -> dict:
    return {"arch": SMALL_ARCH} if name == "saofu_from_arch" else {}


@pytest.fixture(scope="module")
def models_by_name():
    """One model per factory, built once: construction is most of the cost of these tests."""
    torch.manual_seed(0)
    return {name: create_model(name, NUM_CLASSES, **_kwargs(name)) for name in list_models()}


def test_registry_lists_the_expected_factories():
    expected = {"saofu_fu", "saofu_fu_tiny", "saofu_from_arch", "mobilenet_v3_small_050",
                "mobilenet_v3_small_075", "mobilenet_v3_small_100", "mobilenet_v2_035"}
    assert expected <= set(list_models())
    assert list_models() == sorted(list_models())
    assert is_model("saofu_fu") and not is_model("resnet50")


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("size", [32, 64])
def test_forward_shape_and_finite(models_by_name, name, size):
    model = models_by_name[name]
    x = torch.randn(2, 3, size, size)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = model(x)
        assert out.shape == (2, NUM_CLASSES), (name, size, train)
        assert torch.isfinite(out).all(), (name, size, train)
    model.eval()


@pytest.mark.parametrize("name", list_models())
def test_features_and_head_compose_to_forward(models_by_name, name):
    model = models_by_name[name].eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.dim() == 4 and features.shape[1] == model.num_features
        torch.testing.assert_close(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape[0] == 2


@pytest.mark.parametrize("name", list_models())
def test_model_records_what_rebuilds_it(models_by_name, name):
    model = models_by_name[name]
    assert model.model_name == name
    assert model.num_classes == NUM_CLASSES
    assert model.default_input_size == 64
    assert isinstance(model.arch_string, str) and model.arch_string


@pytest.mark.parametrize("name", list_models())
def test_rebuild_from_checkpoint_meta(models_by_name, name):
    model = models_by_name[name].eval()
    meta = json.loads(json.dumps(model_meta(model)))  # it must survive a JSON checkpoint/MLflow log
    rebuilt = build_from_checkpoint_meta(meta).eval()
    assert rebuilt.arch_string == model.arch_string
    assert rebuilt.model_name == name
    assert count_params(rebuilt) == count_params(model)
    rebuilt.load_state_dict(model.state_dict())  # strict: same keys and shapes
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_meta_carries_width_and_rebuilds_it():
    model = create_model("saofu_fu", 3, width_mult=0.5, dropout=0.1)
    meta = model_meta(model)
    assert meta == {"model_name": "saofu_fu", "num_classes": 3,
                    "arch": registry.SAOFU_FU_ARCH, "kwargs": {"width_mult": 0.5, "dropout": 0.1}}
    assert count_params(build_from_checkpoint_meta(meta)) == count_params(model)
    assert count_params(model) < count_params(create_model("saofu_fu", 3))


def test_checkpoint_arch_wins_over_a_changed_default():
    # A checkpoint saved before saofu_fu's default architecture changed must still load.
    meta = {"model_name": "saofu_fu", "num_classes": 2, "arch": SMALL_ARCH, "kwargs": {}}
    assert build_from_checkpoint_meta(meta).arch_string == SMALL_ARCH


def test_checkpoint_arch_mismatch_for_fixed_factories():
    meta = {"model_name": "mobilenet_v2_035", "num_classes": 2,
            "arch": "torchvision:mobilenet_v2(width_mult=0.5)", "kwargs": {}}
    with pytest.raises(SaofuError, match="does not match"):
        build_from_checkpoint_meta(meta)


def test_checkpoint_meta_missing_key():
    with pytest.raises(SaofuError, match="'arch'"):
        build_from_checkpoint_meta({"model_name": "saofu_fu", "num_classes": 2})


def test_unknown_model_name():
    with pytest.raises(SaofuError) as err:
        create_model("resnet_9000", 2)
    assert "resnet_9000" in str(err.value)
    assert "saofu_fu" in str(err.value)  # lists the known names


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(SaofuError, match="num_classes"):
        create_model("saofu_fu_tiny", num_classes)


def test_bad_factory_argument_is_named():
    with pytest.raises(SaofuError, match="widht_mult"):
        create_model("saofu_fu", 2, widht_mult=0.5)
    with pytest.raises(SaofuError, match="arch"):
        create_model("saofu_from_arch", 2)


def test_register_model_rejects_duplicates(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_model("test_only_model")(lambda num_classes: torch.nn.Linear(1, num_classes))
    with pytest.raises(ValueError, match="test_only_model"):
        register_model("test_only_model")(lambda num_classes: torch.nn.Linear(1, num_classes))


def test_default_recogniser_is_under_a_tenth_of_mobilenet_v3_small_050():
    fu = count_params(create_model("saofu_fu", 2))
    baseline = count_params(create_model("mobilenet_v3_small_050", 2))
    assert fu < baseline / 10, (fu, baseline)
    assert count_params(create_model("saofu_fu_tiny", 2)) < fu


@pytest.mark.parametrize("name", ["saofu_fu_tiny", "mobilenet_v3_small_050"])
@pytest.mark.parametrize("bad", [torch.zeros(3, 32, 32), torch.zeros(1, 1, 32, 32),
                                 torch.zeros(1, 3, 32, 32, dtype=torch.uint8)])
def test_bad_input_raises_value_error(models_by_name, name, bad):
    with pytest.raises(ValueError, match="bad input"):
        models_by_name[name](bad)


def test_recognizer_structure_follows_the_string():
    model = Recognizer(SMALL_ARCH, num_classes=3)
    stage0, stage1 = model.stages
    assert isinstance(stage0[0], DepthwiseSeparable) and stage0[0].has_skip
    assert [type(b) for b in stage1] == [InvertedResidual] * 3   # r2 + r1
    assert not stage1[0].has_skip and stage1[1].has_skip         # stride 2 only on the first
    assert isinstance(stage1[2].conv_pw, torch.nn.Identity)     # e1: no expand conv
    assert [i["reduction"] for i in model.feature_info] == [2, 4]
    assert model.arch_string == SMALL_ARCH
    assert model.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 32, 8, 8)


def test_se_squeeze_width_follows_block_input():
    # ir in=8 -> c16, e3 -> 24 expanded; SE squeeze = make_divisible(8 * 0.25) = 8 channels.
    model = Recognizer("stem8|ir_r1_k3_s1_e3_c16_se0.25|head16", num_classes=2)
    se = model.stages[0][0].se
    assert (se.conv_reduce.in_channels, se.conv_reduce.out_channels) == (24, 8)


def test_initial_logits_are_small():
    # N(0, 0.01) classifier init: the first loss starts near log(num_classes).
    model = create_model("saofu_fu", 5).eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 64, 64))
    assert logits.abs().max() < 1.0


def test_random_small_architectures_build_and_run():
    rng = random.Random(7)
    for _ in range(6):
        stages = []
        for _ in range(rng.randint(1, 4)):
            block_type = rng.choice(["ir", "ds"])
            stages.append([BlockArgs(
                block_type, repeats=rng.randint(1, 2), kernel=rng.choice(KERNELS),
                stride=rng.choice([1, 2]), out_chs=rng.choice([8, 12, 16, 24]),
                expansion=1.0 if block_type == "ds" else rng.choice([1.0, 2.5, 4.0]),
                se_ratio=rng.choice([0.0, 0.25]), act=rng.choice(sorted(ACT_NAMES)))])
        spec = ArchSpec(stem=8, stages=stages, head=rng.choice([16, 32]))
        model = create_model("saofu_from_arch", 3, arch=spec,
                             width_mult=rng.choice([0.5, 1.0, 1.5])).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 32, 32))
        assert out.shape == (1, 3) and torch.isfinite(out).all()
        assert decode_arch(model.arch_string) == spec


def test_exports_to_onnx_and_matches_pytorch(tmp_path):
    import onnx
    import onnxruntime as ort

    model = create_model("saofu_fu_tiny", 3).eval()
    with torch.no_grad():  # non-trivial logits, so the comparison means something
        model.classifier.weight.normal_(0, 1)
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "fu.onnx"
    # The TorchScript exporter, as tasks/train/export.py uses (the dynamo one needs onnxscript).
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["logits"],
                      verbose=False, dynamo=False)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"If", "Loop"}.isdisjoint(ops)  # a static graph: no data-dependent control flow
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)
