"""Architecture strings: round trips, error messages, make_divisible, scale_arch."""

from __future__ import annotations

import random

import pytest

from models.arch import (
    ACT_NAMES,
    BLOCK_TYPES,
    KERNELS,
    STRIDES,
    ArchSpec,
    BlockArgs,
    decode_arch,
    decode_block,
    encode_arch,
    encode_block,
    make_divisible,
    scale_arch,
)
from models.registry import SAOFU_FU_ARCH, SAOFU_FU_TINY_ARCH

CANONICAL_BLOCKS = [
    "ir_r2_k3_s2_e6_c24",
    "ir_r2_k3_s2_e6_c24_se0.25",
    "ir_r1_k5_s1_e3_c40_se0.25_ahs",
    "ir_r1_k7_s1_e4.5_c48_are",
    "ir_r3_k3_s1_e1_c16",
    "ds_r1_k3_s1_c16",
    "ds_r1_k5_s2_c32_se0.5_ahs",
]

CANONICAL_ARCHS = [
    SAOFU_FU_ARCH,
    SAOFU_FU_TINY_ARCH,
    "stem8|ds_r1_k3_s1_c8|head16",
    "stem16_ahs|ds_r1_k3_s1_c16|ir_r2_k3_s2_e6_c24,ir_r1_k5_s1_e3_c24_se0.25|head256_ahs",
    "stem32_are|ir_r1_k3_s1_e1_c16|ir_r2_k3_s2_e6_c24|ir_r3_k5_s2_e6_c40_se0.25_ahs|head1280",
]


def test_decode_block_fields():
    args = decode_block("ir_r2_k3_s2_e6_c24_se0.25")
    assert args == BlockArgs("ir", repeats=2, kernel=3, stride=2, out_chs=24, expansion=6.0,
                             se_ratio=0.25, act="relu6")
    ds = decode_block("ds_r1_k5_s1_c16_ahs")
    assert (ds.block_type, ds.expansion, ds.se_ratio, ds.act) == ("ds", 1.0, 0.0, "hswish")


@pytest.mark.parametrize("s", CANONICAL_BLOCKS)
def test_block_round_trip(s):
    assert encode_block(decode_block(s)) == s


def test_decoder_accepts_any_token_order_and_encodes_canonically():
    assert encode_block(decode_block("ir_c24_e6_s2_k3_r2")) == "ir_r2_k3_s2_e6_c24"
    # The default activation is left out of the canonical form.
    assert encode_block(decode_block("ir_r1_k3_s1_e6_c24_ar6")) == "ir_r1_k3_s1_e6_c24"


@pytest.mark.parametrize("s", CANONICAL_ARCHS)
def test_arch_round_trip(s):
    spec = decode_arch(s)
    assert encode_arch(spec) == s
    assert decode_arch(encode_arch(spec)) == spec


def test_decode_arch_structure():
    spec = decode_arch("stem16_ahs|ds_r1_k3_s1_c16|ir_r2_k3_s2_e6_c24,ir_r1_k5_s1_e3_c24|head256")
    assert (spec.stem, spec.stem_act, spec.head, spec.head_act) == (16, "hswish", 256, "relu6")
    assert [len(stage) for stage in spec.stages] == [1, 2]
    assert spec.stages[1][1].kernel == 5
    assert len(spec.blocks) == 3


def _random_block(rng: random.Random) -> BlockArgs:
    block_type = rng.choice(BLOCK_TYPES)
    return BlockArgs(
        block_type=block_type,
        repeats=rng.randint(1, 4),
        kernel=rng.choice(KERNELS),
        stride=rng.choice(STRIDES),
        out_chs=rng.randint(1, 320),
        expansion=1.0 if block_type == "ds" else rng.choice([1.0, 2.0, 2.5, 3.0, 4.5, 6.0]),
        se_ratio=rng.choice([0.0, 0.0, 0.125, 0.25, 0.5, 1.0]),
        act=rng.choice(sorted(ACT_NAMES)),
    )


def _random_spec(rng: random.Random) -> ArchSpec:
    stages = [[_random_block(rng) for _ in range(rng.randint(1, 3))]
              for _ in range(rng.randint(1, 5))]
    return ArchSpec(stem=rng.randint(1, 64), stages=stages, head=rng.randint(1, 1280),
                    stem_act=rng.choice(sorted(ACT_NAMES)), head_act=rng.choice(sorted(ACT_NAMES)))


def test_random_specs_round_trip():
    rng = random.Random(20240210)
    for _ in range(300):
        spec = _random_spec(rng)
        s = encode_arch(spec)
        assert decode_arch(s) == spec, s
        assert encode_arch(decode_arch(s)) == s
        for block in spec.blocks:
            assert decode_block(encode_block(block)) == block


def test_archspec_turns_lists_into_tuples():
    block = decode_block("ds_r1_k3_s1_c8")
    assert ArchSpec(stem=8, stages=[[block]], head=16) == ArchSpec(8, ((block,),), 16)


# (bad string, text the error message must contain: the bad token)
BAD_BLOCKS = [
    ("xx_r1_k3_s1_c16", "'xx'"),                         # unknown block type
    ("ir_r1_k4_s1_e6_c24", "'k4'"),                      # kernel not 3/5/7
    ("ir_r1_kx_s1_e6_c24", "'kx'"),                      # kernel not a number
    ("ir_r1_k3_s3_e6_c24", "'s3'"),                      # stride not 1/2
    ("ir_r1_k3_s1_e0.5_c24", "'e0.5'"),                  # expansion < 1
    ("ir_r1_k3_s1_e6", "'c'"),                           # missing channels
    ("ir_r1_k3_s1_c24", "'e'"),                          # ir without expansion
    ("ir_r1_k3_s1_e6_c24_k5", "'k5'"),                   # duplicate kernel
    ("ds_r1_k3_s1_e6_c16", "'e6'"),                      # ds takes no expansion
    ("ir_r0_k3_s1_e6_c24", "'r0'"),                      # zero repeats
    ("ir_r1_k3_s1_e6_c0", "'c0'"),                       # zero channels
    ("ir_r1_k3_s1_e6_c24_se0", "'se0'"),                 # SE ratio 0: leave the token out
    ("ir_r1_k3_s1_e6_c24_se1.5", "'se1.5'"),             # SE ratio > 1
    ("ir_r1_k3_s1_e6_c24_ax", "'ax'"),                   # unknown activation
    ("ir_r1_k3_s1_e6_c24_q7", "'q7'"),                   # unknown token
    ("ir_r1_k3_s1_e6_c24_", "''"),                       # empty token
]


@pytest.mark.parametrize("s, token", BAD_BLOCKS)
def test_bad_block_names_the_token(s, token):
    with pytest.raises(ValueError) as err:
        decode_block(s)
    assert token in str(err.value)
    assert s in str(err.value)


BAD_ARCHS = [
    ("stem16||head128", "empty stage"),
    ("stem16|ds_r1_k3_s1_c16,|head128", "empty block"),
    ("stemx|ds_r1_k3_s1_c16|head128", "'stemx'"),
    ("stem16|ds_r1_k3_s1_c16|head", "'head'"),
    ("stem16_ax|ds_r1_k3_s1_c16|head128", "'ax'"),
    ("stem16|head128", "at least one stage"),
    ("head128|ds_r1_k3_s1_c16|stem16", "'head128'"),
    ("stem16|ir_r1_k4_s1_e6_c24|head128", "'k4'"),
    ("", "''"),
]


@pytest.mark.parametrize("s, token", BAD_ARCHS)
def test_bad_arch_names_the_part(s, token):
    with pytest.raises(ValueError) as err:
        decode_arch(s)
    assert token in str(err.value)


def test_blockargs_validates_values_built_in_code():
    with pytest.raises(ValueError, match="kernel"):
        BlockArgs("ir", repeats=1, kernel=4, stride=1, out_chs=8, expansion=6.0)
    with pytest.raises(ValueError, match="expansion"):
        BlockArgs("ds", repeats=1, kernel=3, stride=1, out_chs=8, expansion=6.0)
    with pytest.raises(ValueError, match="empty stage"):
        ArchSpec(stem=8, stages=[[]], head=16)


@pytest.mark.parametrize("v, expected", [
    (16 * 0.35, 8),     # 5.6 -> nearest multiple 8
    (32 * 0.35, 16),    # 11.2 -> nearest is 8, but 8 < 0.9 * 11.2, so up to 16
    (24, 24),           # already a multiple
    (20, 24),           # ties round up: int(20 + 4) // 8 * 8
    (19, 24),           # 16 would lose > 10%
    (3, 8),             # never below min_value (= divisor)
    (1280 * 0.35, 448),
])
def test_make_divisible_cases(v, expected):
    assert make_divisible(v) == expected


def test_make_divisible_never_loses_more_than_ten_percent():
    for i in range(1, 2000):
        v = i * 0.37
        out = make_divisible(v)
        assert out % 8 == 0 and out >= 8
        assert out >= 0.9 * v


def test_make_divisible_divisor_and_min_value():
    assert make_divisible(10, divisor=4) == 12
    assert make_divisible(10.4, divisor=1) == 10
    assert make_divisible(3, divisor=8, min_value=16) == 16


def test_scale_arch_width():
    spec = decode_arch(SAOFU_FU_ARCH)  # stem16, c16, c24, c32, c48, head128
    half = scale_arch(spec, width=0.5)
    assert half.stem == 8
    assert [b.out_chs for b in half.blocks] == [8, 16, 16, 24]  # 12 rounds up to 16
    assert half.head == 64
    assert [len(s) for s in half.stages] == [len(s) for s in spec.stages]
    assert [b.repeats for b in half.blocks] == [b.repeats for b in spec.blocks]


def test_scale_arch_width_one_keeps_odd_widths():
    spec = decode_arch("stem12|ds_r1_k3_s1_c12|head100")
    assert scale_arch(spec, width=1.0) == spec


def test_scale_arch_depth_uses_ceil():
    spec = decode_arch("stem8|ds_r1_k3_s1_c8|ir_r2_k3_s2_e6_c16,ir_r3_k3_s1_e6_c16|head16")
    assert [b.repeats for b in scale_arch(spec, depth=1.5).blocks] == [2, 3, 5]   # 1.5, 3, 4.5
    assert [b.repeats for b in scale_arch(spec, depth=0.5).blocks] == [1, 1, 2]   # 0.5, 1, 1.5
    # float noise must not add a block: 10 * 1.1 = 11.000000000000002
    ten = decode_arch("stem8|ds_r10_k3_s1_c8|head16")
    assert scale_arch(ten, depth=1.1).blocks[0].repeats == 11


def test_scale_arch_keeps_the_string_unscaled():
    spec = decode_arch(SAOFU_FU_ARCH)
    scale_arch(spec, width=2.0, depth=2.0)
    assert encode_arch(spec) == SAOFU_FU_ARCH


@pytest.mark.parametrize("kwargs", [{"width": 0}, {"depth": -1.0}])
def test_scale_arch_rejects_bad_multipliers(kwargs):
    with pytest.raises(ValueError, match="multiplier"):
        scale_arch(decode_arch(SAOFU_FU_ARCH), **kwargs)
