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


def _torch_reference_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The views as first written with torch ops (replicate padding, bilinear interpolate)."""
    import torch.nn.functional as F

    def shift(x, dx, dy):
        p, (h, w) = max(abs(dx), abs(dy)), x.shape[-2:]
        return F.pad(x, (p, p, p, p), mode="replicate")[..., p - dy : p - dy + h, p - dx : p - dx + w]

    def zoom(x, factor):
        h, w = x.shape[-2:]
        if factor > 1:
            ch, cw = round(h / factor), round(w / factor)
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        else:
            p = round(h * (1 / factor - 1) / 2)
            x = F.pad(x, (p, p, p, p), mode="replicate")
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)

    x = images.float()
    views = [x, shift(x, 1, 1), shift(x, -1, -1), zoom(x, 1.06), zoom(x, 0.94)]
    return [v.round().clamp(0, 255).to(torch.uint8) for v in views]


@pytest.mark.parametrize("size", [32, 48, 64])
def test_the_numpy_views_are_the_torch_views(size):
    """Active learning computes the views without torch; they must be the ones the bench measured."""
    x = torch.randint(0, 256, (6, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    for ours, reference in zip(augmented_views(x), _torch_reference_views(x)):
        diff = (ours.int() - reference.int()).abs()
        assert int(diff.max()) <= 1  # float rounding at .5 may differ by one grey level
        assert float((diff > 0).float().mean()) < 1e-3


def test_the_pool_path_of_tta_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from tasks.labeling.tta import tta_probabilities_nhwc; "
            "p = tta_probabilities_nhwc(lambda a: a.mean((1, 2)), np.zeros((2, 8, 8, 3), np.uint8)); "
            "print('torch' in sys.modules, p.shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "False"
