"""The building blocks a `Recognizer` is made of (MobileNetV2/V3 style).

Every block is plain conv/BN/activation modules with the shape decided at construction time
(no data-dependent control flow), so models export to ONNX as a static graph. Activations are
`nn.ReLU`, `nn.ReLU6`, `nn.Hardswish` and `nn.Hardsigmoid` modules, which map to single ONNX ops.

Width rules (all through `make_divisible`, divisor 8):

* expanded width of an inverted residual: ``make_divisible(in_chs * expansion)``; no expand conv
  at all when ``expansion == 1``.
* squeeze width of SE: ``make_divisible(in_chs * se_ratio)`` where `in_chs` is the *block input*
  width, not the expanded width (EfficientNet's convention). It keeps the SE cost proportional to
  the block's real width instead of growing with the expansion ratio.
"""

from __future__ import annotations

from torch import Tensor, nn

from .arch import BlockArgs, make_divisible


def make_activation(name: str | None) -> nn.Module:
    """Activation module by name.

    Args:
        name: ``"relu"``, ``"relu6"``, ``"hswish"``, or None for no activation.

    Returns:
        The module (`nn.Identity` for None).
    """
    if name is None:
        return nn.Identity()
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    if name == "hswish":
        return nn.Hardswish(inplace=True)
    raise ValueError(f"unknown activation {name!r}: expected relu, relu6 or hswish")


class ConvBnAct(nn.Sequential):
    """Conv2d (no bias: BN follows) + BatchNorm2d + optional activation, 'same' padding."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, act: str | None = "relu6"):
        """Args:
            in_chs: input channels.
            out_chs: output channels.
            kernel: odd kernel size; padding kernel // 2 keeps the size at stride 1.
            stride: conv stride.
            groups: conv groups (``in_chs`` for a depthwise conv).
            act: activation name, or None for a linear (projection) layer.
        """
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_chs),
            make_activation(act),
        )
        self.out_chs = out_chs


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with a hard-sigmoid gate (MobileNetV3).

    Global average pool -> 1x1 conv to `rd_chs` -> ReLU -> 1x1 conv back -> hard-sigmoid -> scale.
    """

    def __init__(self, chs: int, rd_chs: int):
        """Args:
            chs: channels of the feature map being gated.
            rd_chs: squeeze (reduced) channels.
        """
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_reduce = nn.Conv2d(chs, rd_chs, 1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.conv_expand = nn.Conv2d(rd_chs, chs, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.gate(self.conv_expand(self.act(self.conv_reduce(self.pool(x)))))
        return x * scale


def _make_se(chs: int, in_chs: int, se_ratio: float) -> nn.Module:
    """SE on `chs` channels squeezed to make_divisible(in_chs * se_ratio), or Identity."""
    if se_ratio <= 0:
        return nn.Identity()
    return SqueezeExcite(chs, make_divisible(in_chs * se_ratio))


class DepthwiseSeparable(nn.Module):
    """kxk depthwise conv + BN + act, optional SE, 1x1 projection + BN (linear), residual if shapes match."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 3, stride: int = 1,
                 se_ratio: float = 0.0, act: str = "relu6"):
        """Args:
            in_chs: input channels.
            out_chs: output channels.
            kernel: depthwise kernel size.
            stride: depthwise stride.
            se_ratio: SE ratio relative to `in_chs`; 0 for no SE.
            act: activation after the depthwise conv.
        """
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = ConvBnAct(in_chs, in_chs, kernel, stride, groups=in_chs, act=act)
        self.se = _make_se(in_chs, in_chs, se_ratio)
        self.conv_pw = ConvBnAct(in_chs, out_chs, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_pw(self.se(self.conv_dw(x)))
        return out + x if self.has_skip else out


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, kxk depthwise, optional SE, 1x1 linear project."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 3, stride: int = 1,
                 expansion: float = 6.0, se_ratio: float = 0.0, act: str = "relu6"):
        """Args:
            in_chs: input channels.
            out_chs: output channels.
            kernel: depthwise kernel size.
            stride: depthwise stride.
            expansion: expanded width = make_divisible(in_chs * expansion); 1 skips the expand conv.
            se_ratio: SE ratio relative to `in_chs`; 0 for no SE.
            act: activation after expand and depthwise convs (the projection stays linear).
        """
        super().__init__()
        mid_chs = in_chs if expansion == 1 else make_divisible(in_chs * expansion)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = (nn.Identity() if expansion == 1
                        else ConvBnAct(in_chs, mid_chs, 1, act=act))
        self.conv_dw = ConvBnAct(mid_chs, mid_chs, kernel, stride, groups=mid_chs, act=act)
        self.se = _make_se(mid_chs, in_chs, se_ratio)
        self.conv_pwl = ConvBnAct(mid_chs, out_chs, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return out + x if self.has_skip else out


def make_block(args: BlockArgs, in_chs: int, stride: int) -> nn.Module:
    """Build ONE repeat of a block.

    Args:
        args: the (already width-scaled) block arguments; `args.repeats` is ignored here.
        in_chs: input channels of this repeat.
        stride: stride of this repeat (``args.stride`` for the first repeat, 1 for the others).

    Returns:
        An `InvertedResidual` or `DepthwiseSeparable` module.
    """
    if args.block_type == "ir":
        return InvertedResidual(in_chs, args.out_chs, args.kernel, stride, args.expansion,
                                args.se_ratio, args.act)
    if args.block_type == "ds":
        return DepthwiseSeparable(in_chs, args.out_chs, args.kernel, stride, args.se_ratio,
                                  args.act)
    raise ValueError(f"unknown block type {args.block_type!r}: expected ir or ds")
