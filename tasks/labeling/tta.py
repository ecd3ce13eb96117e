"""Test-time augmentation: a model's probabilities averaged over a few slightly moved copies.

Used for the champion's vote in active learning. A model that is confidently wrong on an image
is often so only at that exact framing; averaged over one-pixel shifts and a 6% zoom in and out,
its confidence on those images drops under the threshold while it stays high on the images it
really knows (bench/results/labeling_tta.json: wrong auto-labels halved for ~3 points of share).
The views are mild on purpose: larger shifts cost the second, less robust model several points
of accuracy (3 px shifts took mobilenet_v3_small_075 from 91.6% to 88.9% on the pool).

The views are computed with numpy on uint8 NHWC arrays (what the exported graphs take), so active
learning, which only runs ONNX graphs, needs no torch; `augmented_views`/`tta_probabilities` are
the same views for torch NCHW batches (the labeling bench's in-memory models).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

VIEW_NAMES = ("original", "shift +1,+1", "shift -1,-1", "zoom in 6%", "zoom out 6%")


def _pad_edge(x: np.ndarray, p: int) -> np.ndarray:
    """Pad the H and W axes of an [N,H,W,C] array by `p`, repeating the border."""
    return np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")


def _shift(x: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Move the content by (dx, dy) pixels, repeating the border into the uncovered strip."""
    p = max(abs(dx), abs(dy))
    h, w = x.shape[1:3]
    padded = _pad_edge(x, p)
    return padded[:, p - dy : p - dy + h, p - dx : p - dx + w]


def _source_index(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps along one axis, as torch's `interpolate(mode="bilinear", align_corners=False)`.

    Returns:
        (lower index, upper index, weight of the upper one) for every output position.
    """
    src = (np.arange(out_size, dtype=np.float32) + 0.5) * np.float32(in_size / out_size) - 0.5
    src = np.maximum(src, 0)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _resize_bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize an [N,H,W,C] float32 array to [N,h,w,C] (half-pixel centres, no antialiasing)."""
    y0, y1, wy = _source_index(h, x.shape[1])
    x0, x1, wx = _source_index(w, x.shape[2])
    wy, wx = wy[None, :, None, None], wx[None, None, :, None]
    top = x[:, y0][:, :, x0] * (1 - wx) + x[:, y0][:, :, x1] * wx
    bottom = x[:, y1][:, :, x0] * (1 - wx) + x[:, y1][:, :, x1] * wx
    return top * (1 - wy) + bottom * wy


def _zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom about the centre: crop and enlarge (factor > 1) or pad with the border and shrink."""
    h, w = x.shape[1:3]
    if factor > 1:
        ch, cw = round(h / factor), round(w / factor)
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[:, top : top + ch, left : left + cw]
    else:
        x = _pad_edge(x, round(h * (1 / factor - 1) / 2))
    return _resize_bilinear(x, h, w)


def augmented_views_nhwc(pixels: np.ndarray) -> list[np.ndarray]:
    """The views of a uint8 [N,H,W,3] batch, in VIEW_NAMES order, each uint8 [N,H,W,3]."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise ValueError(f"augmented views want uint8 [N,H,W,C], got {pixels.dtype} {tuple(pixels.shape)}")
    x = pixels.astype(np.float32)
    views = [x, _shift(x, 1, 1), _shift(x, -1, -1), _zoom(x, 1.06), _zoom(x, 0.94)]
    return [np.clip(np.round(v), 0, 255).astype(np.uint8) for v in views]


def tta_probabilities_nhwc(predict: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray) -> np.ndarray:
    """Mean of `predict` (uint8 [N,H,W,3] -> [N,C] probabilities) over the augmented views."""
    return np.mean([np.asarray(predict(np.ascontiguousarray(v))) for v in augmented_views_nhwc(pixels)], axis=0)


def augmented_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The same views of a uint8 torch [N,3,H,W] batch, each uint8 [N,3,H,W]."""
    import torch

    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"augmented_views wants uint8 [N,3,H,W], got {images.dtype} {tuple(images.shape)}")
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    return [torch.from_numpy(v).permute(0, 3, 1, 2).contiguous() for v in augmented_views_nhwc(nhwc)]


def tta_probabilities(predict: Callable[[torch.Tensor], np.ndarray], images: torch.Tensor) -> np.ndarray:
    """Mean of `predict` (uint8 [N,3,H,W] -> [N,C] probabilities) over the augmented views."""
    return np.mean([np.asarray(predict(view)) for view in augmented_views(images)], axis=0)
