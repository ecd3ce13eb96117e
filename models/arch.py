"""Architectures as data: block strings, whole-architecture strings, and the scaling rules.

An architecture is a stem width, a list of stages (each a list of block strings) and a head width.
The search samples these strings and MLflow logs them, so every trial can be rebuilt from one line
of text; `models.recognizer.Recognizer` is the one builder that turns them into modules.

Block strings (timm style)
--------------------------
::

    block  := TYPE "_r" INT "_k" KERNEL "_s" STRIDE ["_e" NUM] "_c" INT ["_se" NUM] ["_a" ACT]
    TYPE   := "ir"            inverted residual (1x1 expand, kxk depthwise, [SE], 1x1 project)
            | "ds"            depthwise separable (kxk depthwise, [SE], 1x1 project); takes no "e"
    KERNEL := "3" | "5" | "7"
    STRIDE := "1" | "2"       applies to the first repeat only; later repeats use stride 1
    NUM    := digits ["." digits]
    ACT    := "re" (ReLU) | "r6" (ReLU6, the default) | "hs" (hard-swish)

Tokens:

* ``r`` repeats (>= 1), ``k`` depthwise kernel, ``s`` stride, ``c`` output channels (>= 1): required.
* ``e`` expansion ratio (>= 1): required for ``ir``, forbidden for ``ds``.
* ``se`` squeeze-excitation ratio in (0, 1]: optional; absent means no SE.
* ``a`` activation: optional; absent means ReLU6.

Example: ``ir_r2_k3_s2_e6_c24_se0.25`` is an inverted residual repeated twice, kernel 3, stride 2,
expansion 6, 24 output channels, SE with ratio 0.25, ReLU6.

The decoder accepts the tokens after TYPE in any order; the encoder writes the *canonical* form:
order ``r k s e c se a``, numbers without a trailing ``.0`` (``e6``, ``se0.25``), and no ``a`` token
for the default ReLU6. ``encode_block(decode_block(s)) == s`` holds for every canonical ``s``.

Whole-architecture strings
--------------------------
::

    arch  := stem "|" stage ("|" stage)* "|" head
    stem  := "stem" INT ["_a" ACT]          3x3 stride-2 conv + BN + act (ReLU6 if no "a")
    stage := block ("," block)*             a stage holds at least one block
    head  := "head" INT ["_a" ACT]          1x1 conv + BN + act before pooling (ReLU6 if no "a")

Example: ``stem16|ds_r1_k3_s1_c16|ir_r2_k3_s2_e6_c24,ir_r1_k5_s1_e3_c24_se0.25|head256_ahs``.

Widths in the string are the widths at width multiplier 1.0: the multiplier is a build-time argument
(`scale_arch`, `Recognizer(width_mult=...)`), never baked into the string, so one string names a
family of models and the search can vary width separately.

Every bad string raises `ValueError` with a message naming the bad token and the string it came from.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

BLOCK_TYPES = ("ir", "ds")
KERNELS = (3, 5, 7)
STRIDES = (1, 2)
DEFAULT_ACT = "relu6"

# Activation token suffix (after "a") <-> activation name used by the builder.
ACT_TOKENS = {"re": "relu", "r6": "relu6", "hs": "hswish"}
ACT_NAMES = {name: token for token, name in ACT_TOKENS.items()}

# Canonical token order after the block type. "se" is matched before "s" and "e".
_TOKEN_ORDER = ("r", "k", "s", "e", "c", "se", "a")
_TOKEN_RE = re.compile(r"^(se|[rksec]|a)(.*)$")
_INT_RE = re.compile(r"^\d+$")
_NUM_RE = re.compile(r"^\d+(\.\d+)?$")
_STEM_HEAD_RE = re.compile(r"^(stem|head)(\d+)(?:_a([a-z0-9]+))?$")


# ---------------------------------------------------------------------------------------------
# Rounding
# ---------------------------------------------------------------------------------------------


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of `divisor`, never going down by more than 10%.

    The one rounding function every width multiplier and derived width (expansion, SE) passes
    through; same semantics as torchvision's `_make_divisible` and timm's `make_divisible`.
    Multiples of 8 keep vectorised kernels on phones and GPUs fully used.

    Args:
        v: the unrounded channel count (e.g. ``16 * 0.35``).
        divisor: the multiple to round to.
        min_value: the smallest result allowed; defaults to `divisor`.

    Returns:
        The rounded channel count, an int >= `min_value`.
    """
    if divisor < 1:
        raise ValueError(f"make_divisible: divisor must be >= 1, got {divisor}")
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    # Rounding to the nearest multiple may drop a lot of capacity for small v: undo that.
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


# ---------------------------------------------------------------------------------------------
# Data classes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockArgs:
    """Arguments of one block string (before width/depth scaling).

    Attributes:
        block_type: ``"ir"`` (inverted residual) or ``"ds"`` (depthwise separable).
        repeats: how many times the block is stacked (stride applies to the first only).
        kernel: depthwise kernel size, 3, 5 or 7.
        stride: 1 or 2.
        out_chs: output channels at width multiplier 1.0.
        expansion: expansion ratio of the 1x1 expand conv; always 1.0 for ``ds``.
        se_ratio: squeeze-excitation ratio; 0.0 means no SE.
        act: activation name: ``"relu"``, ``"relu6"`` or ``"hswish"``.
    """

    block_type: str
    repeats: int
    kernel: int
    stride: int
    out_chs: int
    expansion: float = 1.0
    se_ratio: float = 0.0
    act: str = DEFAULT_ACT

    def __post_init__(self) -> None:
        # Specs built in code (e.g. by the search) must obey the same rules as decoded strings.
        for name in ("block_type", "repeats", "kernel", "stride", "out_chs", "expansion",
                     "se_ratio", "act"):
            problem = _field_problem(self, name)
            if problem:
                raise ValueError(f"bad BlockArgs.{name}={getattr(self, name)!r}: {problem}")


@dataclass(frozen=True)
class ArchSpec:
    """A whole architecture: stem width, stages of blocks, head width (at width 1.0).

    Lists given for `stages` are turned into tuples so specs are hashable and compare by value.

    Attributes:
        stem: output channels of the 3x3 stride-2 stem conv.
        stages: tuple of stages, each a non-empty tuple of `BlockArgs`.
        head: channels of the 1x1 head conv before global pooling.
        stem_act: activation of the stem.
        head_act: activation of the head conv.
    """

    stem: int
    stages: tuple[tuple[BlockArgs, ...], ...]
    head: int
    stem_act: str = DEFAULT_ACT
    head_act: str = DEFAULT_ACT

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(tuple(stage) for stage in self.stages))
        for name, width in (("stem", self.stem), ("head", self.head)):
            if not _is_int(width) or width < 1:
                raise ValueError(f"bad ArchSpec.{name}={width!r}: must be an int >= 1")
        for name, act in (("stem_act", self.stem_act), ("head_act", self.head_act)):
            if act not in ACT_NAMES:
                raise ValueError(f"bad ArchSpec.{name}={act!r}: must be one of {sorted(ACT_NAMES)}")
        if not self.stages:
            raise ValueError("bad ArchSpec.stages: an architecture needs at least one stage")
        for i, stage in enumerate(self.stages):
            if not stage:
                raise ValueError(f"bad ArchSpec.stages: empty stage {i}")
            for block in stage:
                if not isinstance(block, BlockArgs):
                    raise TypeError(f"bad ArchSpec.stages: stage {i} holds {block!r}, "
                                     "not a BlockArgs")

    @property
    def blocks(self) -> list[BlockArgs]:
        """All blocks of all stages, in order."""
        return [block for stage in self.stages for block in stage]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field_problem(args: BlockArgs, name: str) -> str | None:
    """Why `args.<name>` is invalid, or None. Shared by `BlockArgs` and `decode_block`."""
    v = getattr(args, name)
    if name == "block_type" and v not in BLOCK_TYPES:
        return f"unknown block type, expected one of {', '.join(BLOCK_TYPES)}"
    if name in ("repeats", "out_chs", "kernel", "stride") and not _is_int(v):
        return "must be an int"
    if name == "repeats" and v < 1:
        return "repeats must be >= 1"
    if name == "out_chs" and v < 1:
        return "channels must be >= 1"
    if name == "kernel" and v not in KERNELS:
        return "kernel must be 3, 5 or 7"
    if name == "stride" and v not in STRIDES:
        return "stride must be 1 or 2"
    if name == "expansion":
        if args.block_type == "ds" and v != 1.0:
            return "depthwise-separable blocks take no expansion"
        if v < 1.0:
            return "expansion must be >= 1"
    if name == "se_ratio" and not 0.0 <= v <= 1.0:
        return "se ratio must be 0 (no SE) or in (0, 1]"
    if name == "act" and v not in ACT_NAMES:
        return f"unknown activation, expected one of {sorted(ACT_NAMES)}"
    return None


# ---------------------------------------------------------------------------------------------
# Block strings
# ---------------------------------------------------------------------------------------------


def _fmt_num(x: float) -> str:
    """Canonical number text: ``6`` for 6.0, ``0.25`` for 0.25."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def _parse_token(key: str, value: str, token: str, block: str) -> object:
    """Turn one token's value text into its field value; raise ValueError naming the token."""

    def bad(why: str) -> ValueError:
        return ValueError(f"bad token {token!r} in block {block!r}: {why}")

    if key == "a":
        if value not in ACT_TOKENS:
            raise bad(f"activation must be one of {', '.join('a' + t for t in ACT_TOKENS)}")
        return ACT_TOKENS[value]
    if key in ("e", "se"):
        if not _NUM_RE.match(value):
            raise bad("expected a number")
        num = float(value)
        if key == "e" and num < 1.0:
            raise bad("expansion must be >= 1")
        if key == "se" and not 0.0 < num <= 1.0:
            raise bad("se ratio must be in (0, 1]; leave the token out for no SE")
        return num
    if not _INT_RE.match(value):
        raise bad("expected an integer")
    num = int(value)
    if key == "k" and num not in KERNELS:
        raise bad("kernel must be 3, 5 or 7")
    if key == "s" and num not in STRIDES:
        raise bad("stride must be 1 or 2")
    if key in ("r", "c") and num < 1:
        raise bad("repeats must be >= 1" if key == "r" else "channels must be >= 1")
    return num


def decode_block(s: str) -> BlockArgs:
    """Parse one block string such as ``ir_r2_k3_s2_e6_c24_se0.25``.

    Args:
        s: the block string (grammar in the module docstring).

    Returns:
        The frozen `BlockArgs`.

    Raises:
        ValueError: naming the bad token: unknown block type or token, bad value, duplicate token,
            missing required token.
    """
    if not isinstance(s, str) or not s:
        raise ValueError(f"bad block {s!r}: expected a non-empty block string")
    block_type, *tokens = s.split("_")
    if block_type not in BLOCK_TYPES:
        raise ValueError(f"unknown block type {block_type!r} in block {s!r}: "
                         f"expected one of {', '.join(BLOCK_TYPES)}")
    values: dict[str, object] = {}
    for token in tokens:
        match = _TOKEN_RE.match(token)
        if not match:
            raise ValueError(f"bad token {token!r} in block {s!r}: unknown token, expected one of "
                             f"{', '.join(_TOKEN_ORDER)} followed by a value")
        key, value = match.groups()
        if key in values:
            raise ValueError(f"duplicate token {token!r} in block {s!r}: {key!r} given twice")
        if key == "e" and block_type == "ds":
            raise ValueError(f"bad token {token!r} in block {s!r}: "
                             "depthwise-separable blocks take no expansion")
        values[key] = _parse_token(key, value, token, s)
    required = ("r", "k", "s", "e", "c") if block_type == "ir" else ("r", "k", "s", "c")
    for key in required:
        if key not in values:
            raise ValueError(f"missing token {key!r} in block {s!r}: "
                             f"{block_type} blocks need {', '.join(required)}")
    return BlockArgs(
        block_type=block_type,
        repeats=values["r"],
        kernel=values["k"],
        stride=values["s"],
        out_chs=values["c"],
        expansion=values.get("e", 1.0),
        se_ratio=values.get("se", 0.0),
        act=values.get("a", DEFAULT_ACT),
    )


def encode_block(args: BlockArgs) -> str:
    """Write `args` as a canonical block string (inverse of `decode_block`).

    Args:
        args: the block arguments.

    Returns:
        e.g. ``"ir_r2_k3_s2_e6_c24_se0.25"``.
    """
    parts = [args.block_type, f"r{args.repeats}", f"k{args.kernel}", f"s{args.stride}"]
    if args.block_type == "ir":
        parts.append(f"e{_fmt_num(args.expansion)}")
    parts.append(f"c{args.out_chs}")
    if args.se_ratio > 0:
        parts.append(f"se{_fmt_num(args.se_ratio)}")
    if args.act != DEFAULT_ACT:
        parts.append(f"a{ACT_NAMES[args.act]}")
    return "_".join(parts)


# ---------------------------------------------------------------------------------------------
# Whole-architecture strings
# ---------------------------------------------------------------------------------------------


def _decode_stem_head(part: str, kind: str, arch: str) -> tuple[int, str]:
    """Parse ``stem16`` / ``head128_ahs`` into (channels, activation name)."""
    match = _STEM_HEAD_RE.match(part)
    if not match or match.group(1) != kind:
        raise ValueError(f"bad {kind} {part!r} in arch {arch!r}: expected '{kind}<channels>' "
                         f"optionally followed by '_a<act>', e.g. '{kind}16_ahs'")
    channels = int(match.group(2))
    if channels < 1:
        raise ValueError(f"bad {kind} {part!r} in arch {arch!r}: channels must be >= 1")
    act_token = match.group(3)
    if act_token is None:
        return channels, DEFAULT_ACT
    if act_token not in ACT_TOKENS:
        raise ValueError(f"bad token {'a' + act_token!r} in {kind} {part!r} of arch {arch!r}: "
                         f"activation must be one of {', '.join('a' + t for t in ACT_TOKENS)}")
    return channels, ACT_TOKENS[act_token]


def _encode_stem_head(kind: str, channels: int, act: str) -> str:
    suffix = "" if act == DEFAULT_ACT else f"_a{ACT_NAMES[act]}"
    return f"{kind}{channels}{suffix}"


def decode_arch(s: str) -> ArchSpec:
    """Parse a whole-architecture string such as ``stem16|ds_r1_k3_s1_c16|head128``.

    Args:
        s: the architecture string (grammar in the module docstring).

    Returns:
        The frozen `ArchSpec`.

    Raises:
        ValueError: naming the bad part: stem/head, empty stage or block, or a bad block token.
    """
    if not isinstance(s, str) or not s:
        raise ValueError(f"bad arch {s!r}: expected a non-empty architecture string")
    parts = s.split("|")
    if len(parts) < 3:
        raise ValueError(f"bad arch {s!r}: expected 'stem<c>|<stage>|...|head<c>' "
                         "with at least one stage")
    stem, stem_act = _decode_stem_head(parts[0], "stem", s)
    head, head_act = _decode_stem_head(parts[-1], "head", s)
    stages = []
    for index, stage_text in enumerate(parts[1:-1]):
        if not stage_text:
            raise ValueError(f"empty stage {index} in arch {s!r}: a stage needs at least one block")
        blocks = []
        for block_text in stage_text.split(","):
            if not block_text:
                raise ValueError(f"empty block in stage {index} {stage_text!r} of arch {s!r}")
            blocks.append(decode_block(block_text))
        stages.append(tuple(blocks))
    return ArchSpec(stem=stem, stages=tuple(stages), head=head, stem_act=stem_act,
                    head_act=head_act)


def encode_arch(spec: ArchSpec) -> str:
    """Write `spec` as a canonical whole-architecture string (inverse of `decode_arch`).

    Args:
        spec: the architecture.

    Returns:
        One line, e.g. ``"stem16|ds_r1_k3_s1_c16|ir_r2_k3_s2_e6_c24|head128"``.
    """
    stages = [",".join(encode_block(block) for block in stage) for stage in spec.stages]
    return "|".join([_encode_stem_head("stem", spec.stem, spec.stem_act), *stages,
                     _encode_stem_head("head", spec.head, spec.head_act)])


# ---------------------------------------------------------------------------------------------
# Scaling
# ---------------------------------------------------------------------------------------------


def _scale_width(channels: int, width: float) -> int:
    # Width 1.0 keeps the string's widths exactly (timm's round_channels does the same), so an
    # architecture string means what it says; any other width goes through make_divisible.
    return channels if width == 1.0 else make_divisible(channels * width)


def _scale_depth(repeats: int, depth: float) -> int:
    # round() first so float noise (10 * 1.1 = 11.000000000000002) does not add a whole block.
    return max(1, math.ceil(round(repeats * depth, 6)))


def scale_arch(spec: ArchSpec, width: float = 1.0, depth: float = 1.0) -> ArchSpec:
    """Apply width and depth multipliers (EfficientNet-style compound scaling).

    Width scales every channel count (stem, block outputs, head) through `make_divisible`;
    width 1.0 leaves channels untouched. Depth scales each block's repeats with ``ceil``.

    Args:
        spec: the architecture at width 1.0, depth 1.0.
        width: channel multiplier, > 0.
        depth: repeat multiplier, > 0.

    Returns:
        A new `ArchSpec` with scaled widths and repeats (same stage layout).
    """
    if not width > 0:
        raise ValueError(f"bad width multiplier {width!r}: must be > 0")
    if not depth > 0:
        raise ValueError(f"bad depth multiplier {depth!r}: must be > 0")
    stages = tuple(
        tuple(replace(block, out_chs=_scale_width(block.out_chs, width),
                      repeats=_scale_depth(block.repeats, depth)) for block in stage)
        for stage in spec.stages
    )
    return replace(spec, stem=_scale_width(spec.stem, width), stages=stages,
                   head=_scale_width(spec.head, width))
