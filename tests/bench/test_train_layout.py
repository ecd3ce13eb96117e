"""`saofu bench train-layout`: each side trains in the layout it is named for, and the table's arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from bench import train_layout

pytestmark = pytest.mark.timeout(120)


def test_each_side_trains_in_its_layout_and_the_ratio_is_channels_last_over_nchw(monkeypatch, tmp_path):
    seen = []

    def fake_epoch(case, model, split, cfg, seed):
        convs = [p for p in model.parameters() if p.dim() == 4]
        last = all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        seen.append((case, seed, last, len(split), split.classes))
        return 2.0 if last else 3.0  # seconds per epoch: channels-last 1.5x the images/s

    monkeypatch.setattr(train_layout, "_epoch", fake_epoch)
    monkeypatch.setattr(train_layout, "IMAGES", 12)
    result = train_layout.run(seeds=(0, 1), out=tmp_path / "layout.json")
    # per case and seed: NCHW (warm-up, timed), then channels-last (warm-up, timed)
    assert [(c, s, last) for c, s, last, _, _ in seen] == [
        (case, seed, last) for case in train_layout.CASES for seed in (0, 1) for last in (False, False, True, True)]
    assert all(n == 12 for *_, n, _ in seen)
    assert {tuple(classes) for c, *_, classes in seen if c.startswith("expanded")} == {("fu", "not_fu", "fu_merchant")}
    for row in result["cases"]:
        assert row["nchw_images_per_s"] == pytest.approx(4.0)
        assert row["channels_last_images_per_s"] == pytest.approx(6.0)
        assert row["ratio"] == pytest.approx(1.5) and len(row["draws"]) == 2
    stored = json.loads((tmp_path / "layout.json").read_text())
    assert "table" not in stored and stored["cases"][0]["ratio"] == pytest.approx(1.5)
    lines = result["table"].splitlines()
    assert len(lines) == 2 + len(train_layout.CASES) and all("1.50x" in line for line in lines[2:])
