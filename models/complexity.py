"""Model cost: parameter count and FLOPs, as the search score and release reports use them.

Conventions (the MobileNet papers' and torchvision's model tables'):

* **params** = number of elements of ``model.parameters()`` (trainable or not). Buffers such as
  BatchNorm running statistics are NOT counted: they are not learned and fold into the conv weights
  at export.
* **FLOPs** = multiply-accumulates (MACs, "MAdds") of convolutions and linear layers for ONE image,
  i.e. the number the MobileNet papers and torchvision's docs call FLOPs. Counted by
  `torch.utils.flop_counter.FlopCounterMode`, which reports 2 FLOPs per MAC for conv/matmul; we
  divide by 2. Depthwise and grouped convs are counted per group (k*k*H'*W'*C for depthwise), 1x1
  convs inside SE blocks are counted like any conv. Bias additions, BatchNorm, activations,
  pooling and the SE multiply are not counted: they fold away at export or are negligible.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (buffers excluded; see module docstring).

    Args:
        model: any module.

    Returns:
        The count.
    """
    return sum(p.numel() for p in model.parameters())


def _size_hw(input_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    height, width = input_size
    return int(height), int(width)


def count_flops(model: nn.Module, input_size: int | tuple[int, int] = (64, 64),
                channels: int = 3) -> int:
    """Multiply-accumulates of conv and linear layers for one image (FLOPs-as-MACs).

    Runs one forward pass on a zero batch of 1, in eval mode (so BN uses running stats and dropout
    is off) under no_grad; the model's train/eval mode is restored afterwards.

    Args:
        model: the module to measure.
        input_size: (height, width), or one int for a square input.
        channels: input channels.

    Returns:
        MACs as an int (divide by 1e6 for "MFLOPs" in the MobileNet sense).
    """
    height, width = _size_hw(input_size)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.zeros(1, channels, height, width, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    # FlopCounterMode counts 2 FLOPs (a multiply and an add) per MAC.
    return counter.get_total_flops() // 2


def describe(model: nn.Module, input_size: int | tuple[int, int] = (64, 64),
             channels: int = 3) -> dict[str, float]:
    """Parameters and MFLOPs (millions of MACs) of `model`, ready to log.

    Args:
        model: the module.
        input_size: (height, width) or one int.
        channels: input channels.

    Returns:
        ``{"params": int, "mflops": float}``.
    """
    return {"params": count_params(model),
            "mflops": count_flops(model, input_size, channels) / 1e6}
