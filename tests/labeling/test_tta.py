"""Test-time augmentation views and their averaged probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.labeling.tta import VIEW_NAMES, augmented_views, tta_probabilities, tta_probabilities_nhwc


def _dot(size: int = 16, at: tuple[int, int] = (5, 5)) -> torch.Tensor:
    x = torch.zeros(1, 3, size, size, dtype=torch.uint8)
    x[..., at[0], at[1]] = 255
    return x


def test_the_views_keep_shape_and_dtype_and_the_first_is_the_image():
    x = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    views = augmented_views(x)
    assert len(views) == len(VIEW_NAMES)
    assert all(v.shape == x.shape and v.dtype == torch.uint8 for v in views)
    assert torch.equal(views[0], x)
    assert not any(torch.equal(v, x) for v in views[1:])


def test_the_shifts_move_content_one_pixel_each_way():
    _, plus, minus, _, _ = augmented_views(_dot())
    assert plus[0, 0].nonzero().tolist() == [[6, 6]]
    assert minus[0, 0].nonzero().tolist() == [[4, 4]]


def test_zoom_in_enlarges_and_zoom_out_shrinks_a_centred_square():
    x = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    x[..., 22:42, 22:42] = 255
    _, _, _, zoom_in, zoom_out = augmented_views(x)
    bright = [int((v[0, 0] > 127).sum()) for v in (x, zoom_in, zoom_out)]
    assert bright[1] > bright[0] > bright[2]


def test_probabilities_are_the_mean_over_the_views():
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    views = augmented_views(x)

    def predict(v: torch.Tensor) -> np.ndarray:  # a "model" whose output depends on the pixels
        p = v.float().mean((1, 2, 3)).numpy() / 255
        return np.stack([p, 1 - p], 1)

    expected = np.mean([predict(v) for v in views], 0)
    assert np.allclose(tta_probabilities(predict, x), expected)
    nhwc = x.permute(0, 2, 3, 1).numpy()
    assert np.allclose(tta_probabilities_nhwc(lambda a: predict(torch.from_numpy(a).permute(0, 3, 1, 2)), nhwc),
                       expected)


def test_a_float_batch_is_refused_by_name():
    with pytest.raises(ValueError, match="uint8"):
        augmented_views(torch.zeros(1, 3, 8, 8))
