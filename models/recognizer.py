"""Recognisers: the saofu `Recognizer` built from an architecture string, and torchvision baselines
behind the same interface.

Both classes expose:

* ``forward_features(x)`` -> the last feature map, shape (N, num_features, H', W');
* ``forward_head(x, pre_logits=False)`` -> logits (N, num_classes), or the pooled features;
* ``arch_string``, ``num_classes``, ``num_features`` attributes, so a checkpoint can carry what is
  needed to rebuild the module (see `models.registry.model_meta`).

Inputs are float NCHW, already normalised: normalisation lives in the preprocessing module that
the training and export code own, so the shipped ONNX graph carries it once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .arch import ArchSpec, decode_arch, encode_arch, scale_arch
from .blocks import ConvBnAct, make_block


def check_input(x: Tensor, in_chans: int) -> None:
    """Raise ValueError unless `x` is an (N, in_chans, H, W) floating tensor.

    Only static properties (rank, channel count, dtype) are checked, so the check leaves no trace
    in an exported graph. Skipped under the TorchScript tracer, where shapes are traced tensors
    and comparing them would only raise TracerWarnings.
    """
    if torch.jit.is_tracing():
        return
    if x.dim() != 4:
        raise ValueError(f"bad input shape {tuple(x.shape)}: expected (N, {in_chans}, H, W)")
    if x.shape[1] != in_chans:
        raise ValueError(f"bad input shape {tuple(x.shape)}: expected {in_chans} channels "
                         f"in dim 1 (NCHW), got {x.shape[1]}")
    if not x.is_floating_point():
        raise ValueError(f"bad input dtype {x.dtype}: expected a normalised float tensor "
                         "(convert and normalise uint8 pixels first)")


def init_weights(model: nn.Module) -> None:
    """Initialise conv, BN and linear layers the way torchvision's MobileNets do.

    Convs: Kaiming normal, fan_out (keeps activations' variance through the thin depthwise convs).
    BN: weight 1, bias 0. Linear: N(0, 0.01), bias 0, so initial logits are near zero and the
    first loss is close to log(num_classes).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class Recognizer(nn.Module):
    """MobileNetV2-style classifier built from an `ArchSpec` (or its string).

    Layout: stem (3x3 conv stride 2 + BN + act) -> stages of blocks -> head (1x1 conv + BN + act)
    -> global average pool -> dropout -> linear classifier.

    Attributes:
        arch_string: canonical architecture string at width 1.0 (the width is `width_mult`).
        num_classes, width_mult, in_chans: the build arguments.
        num_features: channels of the feature map `forward_features` returns (the head width).
        feature_info: per stage, ``{"stage", "num_chs", "reduction"}``; for detector backbones.
    """

    def __init__(self, spec: ArchSpec | str, num_classes: int, width_mult: float = 1.0,
                 dropout: float = 0.2, in_chans: int = 3):
        """Args:
            spec: the architecture, as an `ArchSpec` or a whole-architecture string.
            num_classes: size of the classifier output, >= 1.
            width_mult: channel multiplier applied at build time (`scale_arch`).
            dropout: dropout probability before the classifier.
            in_chans: input channels.
        """
        super().__init__()
        if isinstance(spec, str):
            spec = decode_arch(spec)
        self.arch_string = encode_arch(spec)
        self.num_classes = num_classes
        self.width_mult = width_mult
        self.in_chans = in_chans
        scaled = scale_arch(spec, width=width_mult)

        self.stem = ConvBnAct(in_chans, scaled.stem, 3, 2, act=scaled.stem_act)
        self.stages, self.feature_info = self._build_stages(scaled)
        self.conv_head = ConvBnAct(self.feature_info[-1]["num_chs"], scaled.head, 1,
                                   act=scaled.head_act)
        self.num_features = scaled.head
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(scaled.head, num_classes)
        init_weights(self)

    @staticmethod
    def _build_stages(spec: ArchSpec) -> tuple[nn.Sequential, list[dict]]:
        """One nn.Sequential per stage; the first repeat of a block takes its stride."""
        in_chs, reduction = spec.stem, 2
        stages, info = [], []
        for index, stage in enumerate(spec.stages):
            layers = []
            for args in stage:
                for repeat in range(args.repeats):
                    stride = args.stride if repeat == 0 else 1
                    layers.append(make_block(args, in_chs, stride))
                    in_chs = args.out_chs
                    reduction *= stride
            stages.append(nn.Sequential(*layers))
            info.append({"stage": index, "num_chs": in_chs, "reduction": reduction})
        return nn.Sequential(*stages), info

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem, stages and head conv.

        Args:
            x: float (N, in_chans, H, W), normalised.

        Returns:
            Feature map (N, num_features, H', W').
        """
        check_input(x, self.in_chans)
        return self.conv_head(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, dropout and classify a feature map.

        Args:
            x: output of `forward_features`.
            pre_logits: return the pooled (N, num_features) vector instead of logits.

        Returns:
            Logits (N, num_classes), or pooled features when `pre_logits`.
        """
        x = self.dropout(self.flatten(self.global_pool(x)))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) for a float (N, in_chans, H, W) batch."""
        return self.forward_head(self.forward_features(x))


class TorchvisionRecognizer(nn.Module):
    """A torchvision MobileNet (`features` + `classifier`) behind the `Recognizer` interface.

    Submodule names match torchvision's (``features.*``, ``classifier.*``), so state dicts are
    interchangeable with the plain torchvision model.
    """

    def __init__(self, net: nn.Module, arch_string: str, num_classes: int, in_chans: int = 3):
        """Args:
            net: a torchvision MobileNetV2/V3 (anything with `features` and a Sequential
                `classifier` whose last layer is the Linear to `num_classes`).
            arch_string: how it was built, e.g. ``"torchvision:mobilenet_v3_small(width_mult=0.5)"``.
            num_classes: classifier output size.
            in_chans: input channels.
        """
        super().__init__()
        self.features = net.features
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = net.classifier
        self.arch_string = arch_string
        self.num_classes = num_classes
        self.in_chans = in_chans
        # The feature map's width is what the classifier's first Linear layer takes in.
        self.num_features = next(m for m in self.classifier if isinstance(m, nn.Linear)).in_features

    def forward_features(self, x: Tensor) -> Tensor:
        """The torchvision `features` trunk: (N, C, H, W) -> (N, num_features, H', W')."""
        check_input(x, self.in_chans)
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool and classify; `pre_logits` stops before the last Linear layer."""
        x = self.flatten(self.global_pool(x))
        layers = list(self.classifier)
        for layer in layers[:-1]:
            x = layer(x)
        return x if pre_logits else layers[-1](x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes)."""
        return self.forward_head(self.forward_features(x))
