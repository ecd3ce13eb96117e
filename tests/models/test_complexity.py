"""FLOPs (as MACs) and parameter counts, checked against arithmetic written out by hand."""

from __future__ import annotations

import pytest
from torch import nn

from models import Recognizer, count_flops, count_params, create_model, describe
from models.blocks import SqueezeExcite


def _small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=1, padding=1),             # 8x8 -> 8x8
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=1, padding=1, groups=8),   # depthwise
        nn.Conv2d(8, 16, 1),                                 # pointwise
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(16, 5),
    )


def test_flops_of_a_small_net_by_hand():
    # MACs = output pixels x output channels x (inputs per output: k*k*in_channels/groups)
    conv3x3 = 8 * 8 * 8 * (3 * 3 * 3)     # 13824
    depthwise = 8 * 8 * 8 * (3 * 3 * 1)   # 4608: each channel sees only itself
    pointwise = 8 * 8 * 16 * (1 * 1 * 8)  # 8192
    linear = 16 * 5                       # 80
    assert conv3x3 == 13824
    # BN, ReLU, pooling and biases are not counted.
    assert count_flops(_small_net(), input_size=(8, 8)) == conv3x3 + depthwise + pointwise + linear


def test_params_of_a_small_net_by_hand():
    conv3x3 = 8 * 3 * 3 * 3 + 8    # weights + bias = 224
    bn = 8 + 8                     # gamma, beta (running mean/var are buffers, not counted)
    depthwise = 8 * 1 * 3 * 3 + 8  # 80
    pointwise = 16 * 8 + 16        # 144
    linear = 16 * 5 + 5            # 85
    assert count_params(_small_net()) == conv3x3 + bn + depthwise + pointwise + linear


def test_stride_and_rectangular_input():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)  # 16x12 -> 8x6
    assert count_flops(conv, input_size=(16, 12)) == 8 * 6 * 4 * (3 * 3 * 3)
    assert count_flops(conv, input_size=10) == 5 * 5 * 4 * (3 * 3 * 3)  # int = square


def test_squeeze_excite_convs_are_counted():
    se = SqueezeExcite(16, 8)
    # pooled to 1x1: reduce 16 -> 8 and expand 8 -> 16; the gate multiply is not counted
    assert count_flops(se, input_size=(4, 4), channels=16) == 16 * 8 + 8 * 16


def test_recognizer_flops_by_hand():
    model = Recognizer("stem8|ds_r1_k3_s1_c8_se0.5|head16", num_classes=3)
    # 16x16 input; the stem has stride 2, so everything after runs on 8x8
    stem = 8 * 8 * 8 * (3 * 3 * 3)        # 13824
    dw = 8 * 8 * 8 * (3 * 3)              # 4608
    se = 8 * 8 + 8 * 8                    # squeeze = make_divisible(8 * 0.5) = 8 channels, 1x1
    pw = 8 * 8 * 8 * 8                    # 4096
    head = 8 * 8 * 16 * 8                 # 8192
    classifier = 16 * 3                   # 48
    assert count_flops(model, input_size=(16, 16)) == stem + dw + se + pw + head + classifier


def test_flops_grow_about_four_times_from_32_to_64():
    model = create_model("saofu_fu", 2)
    small, large = count_flops(model, 32), count_flops(model, 64)
    # Not exactly 4: the SE convs and the classifier run on pooled vectors, whatever the size.
    assert 3.8 < large / small <= 4.0


def test_count_flops_restores_training_mode():
    model = create_model("saofu_fu_tiny", 2).train()
    count_flops(model)
    assert model.training
    model.eval()
    count_flops(model)
    assert not model.training


def test_describe():
    model = create_model("saofu_fu", 2)
    info = describe(model, (64, 64))
    assert info["params"] == count_params(model)
    assert info["mflops"] == pytest.approx(count_flops(model, (64, 64)) / 1e6)
    assert 0.5 < info["mflops"] < 20  # "a few MFLOPs" at 64x64
