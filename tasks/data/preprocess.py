"""The one preprocessing shared by training, export and evaluation.

The shipped ONNX graph takes raw uint8 pixels (NHWC, as an image decoder hands them over) and does
this normalisation itself, so the phone, the serving app and the evaluation run the same bytes.
Training applies the same function to its uint8 NCHW batches.
"""

from __future__ import annotations

import torch
from torch import nn

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Float [0,1] NCHW -> the model's input range."""
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float [0,1] NCHW."""
    return images_uint8.float().div_(255.0)


class PixelInput(nn.Module):
    """Wraps a recogniser so it takes uint8 NHWC pixels: the interface of the shipped graph."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float() / 255.0
        return self.net(normalize(x))
