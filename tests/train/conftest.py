"""Fixtures shared by the fine-tune and expansion tests: trained once per session."""

from __future__ import annotations

import pytest

from tasks.data.loading import PreparedData, prepare_dataset
from tasks.train.loop import TrainConfig, fit
from tests.train.two_shapes import OLD, only


@pytest.fixture(scope="session")
def shapes(shapes_dir) -> PreparedData:
    return prepare_dataset(shapes_dir, image_size=32, val_share=0.2)


@pytest.fixture(scope="session")
def base(shapes, tmp_path_factory):
    """A 2-class base (circle, square) trained with loop.fit, as the champion of a fast retrain would be."""
    path = tmp_path_factory.mktemp("base") / "base.pt"
    cfg = TrainConfig(model="saofu_fu_tiny", epochs=12, batch_size=16, lr=1e-2, image_size=32)
    fit(cfg, only(shapes.train, OLD), only(shapes.val, OLD), path)
    return path
