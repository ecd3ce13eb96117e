"""Shared fixtures: small generated datasets and an isolated project folder per test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def make_shapes_dataset(root: Path, n_per_class: int = 60, size: int = 32, seed: int = 0) -> Path:
    """A flat ImageFolder of filled shapes on noisy backgrounds: not the Fu world, on purpose.

    Easy enough that a few epochs learn it, so tests of the machinery run in seconds.
    """
    rng = np.random.default_rng(seed)
    for cls in SHAPES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            bg = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            im = Image.fromarray(bg)
            d = ImageDraw.Draw(im)
            s = int(rng.integers(size // 2, size - 6))
            x, y = (int(v) for v in rng.integers(2, size - s - 2, 2))
            colour = tuple(int(v) for v in rng.integers(150, 256, 3))
            if cls == "circle":
                d.ellipse([x, y, x + s, y + s], fill=colour)
            elif cls == "square":
                d.rectangle([x, y, x + s, y + s], fill=colour)
            else:
                d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=colour)
            im.save(root / cls / f"{i:04d}.png")
    return root


@pytest.fixture
def saofu_home(tmp_path, monkeypatch) -> Path:
    """An empty project folder: MLflow store, caches and runs land here, not in the checkout."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SAOFU_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"))
