"""Test-time augmentation: a model's probabilities averaged over a few slightly moved copies.

Used for the champion's vote in active learning. A model that is confidently wrong on an image
is often so only at that exact framing; averaged over one-pixel shifts and a 6% zoom in and out,
its confidence on those images drops under the threshold while it stays high on the images it
really knows (bench/results/labeling_tta.json: wrong auto-labels halved for ~3 points of share).
The views are mild on purpose: larger shifts cost the second, less robust model several points
of accuracy (3 px shifts took mobilenet_v3_small_075 from 91.6% to 88.9% on the pool).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

VIEW_NAMES = ("original", "shift +1,+1", "shift -1,-1", "zoom in 6%", "zoom out 6%")


def _shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move the content by (dx, dy) pixels, repeating the border into the uncovered strip."""
    p = max(abs(dx), abs(dy))
    h, w = x.shape[-2:]
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def _zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom about the centre: crop and enlarge (factor > 1) or pad with the border and shrink."""
    h, w = x.shape[-2:]
    if factor > 1:
        ch, cw = round(h / factor), round(w / factor)
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
    else:
        p = round(h * (1 / factor - 1) / 2)
        x = F.pad(x, (p, p, p, p), mode="replicate")
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def augmented_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The views of a uint8 [N,3,H,W] batch, in VIEW_NAMES order, each uint8 [N,3,H,W]."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"augmented_views wants uint8 [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
    x = images.float()
    views = [x, _shift(x, 1, 1), _shift(x, -1, -1), _zoom(x, 1.06), _zoom(x, 0.94)]
    return [v.round().clamp(0, 255).to(torch.uint8) for v in views]


def tta_probabilities(predict: Callable[[torch.Tensor], np.ndarray], images: torch.Tensor) -> np.ndarray:
    """Mean of `predict` (uint8 [N,3,H,W] -> [N,C] probabilities) over the augmented views."""
    return np.mean([np.asarray(predict(view)) for view in augmented_views(images)], axis=0)


def tta_probabilities_nhwc(predict: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray) -> np.ndarray:
    """The same for graphs that take uint8 NHWC arrays (the exported ONNX models)."""
    images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
    return tta_probabilities(lambda v: predict(v.permute(0, 2, 3, 1).contiguous().numpy()), images)
