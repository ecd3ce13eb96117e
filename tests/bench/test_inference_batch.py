"""`saofu bench inference-batch`: every case runs each batch size on the same images, and the table's arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import inference_batch

pytestmark = pytest.mark.timeout(300)


def test_every_case_runs_each_batch_size_on_a_whole_split_and_the_ratio_is_to_512(monkeypatch, tmp_path):
    calls = []

    def fake_predictor(case, seed, tmp):
        def predict(split, batch):
            calls.append((case, seed, batch, len(split)))
            # a fake clock: a pass takes (batch / 64) virtual seconds, so images/s = IMAGES * 64 / batch
            clock[0] += batch / 64
        return predict

    clock = [0.0]
    monkeypatch.setattr(inference_batch, "_predictor", fake_predictor)
    monkeypatch.setattr(inference_batch.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(inference_batch, "IMAGES", 8)
    result = inference_batch.run(seeds=(0, 1), out=tmp_path / "batch.json")
    sizes = list(inference_batch.BATCHES)
    per_seed = sizes + sizes * inference_batch.ROUNDS  # a warm-up pass of each, then the rounds
    assert [(c, s, b) for c, s, b, _ in calls] == [
        (case, seed, b) for case in inference_batch.CASES for seed in (0, 1) for b in per_seed]
    assert {n for *_, n in calls} == {8}
    for row in result["cases"]:
        assert row["images_per_s"]["64"] == pytest.approx(8.0) and row["images_per_s"]["512"] == pytest.approx(1.0)
        assert row["ratio_to_512"]["32"] == pytest.approx(16.0) and len(row["draws"]) == 2
    stored = json.loads((tmp_path / "batch.json").read_text())
    assert "table" not in stored and stored["cases"][0]["ratio_to_512"]["128"] == pytest.approx(4.0)
    lines = result["table"].splitlines()
    assert len(lines) == 2 + len(inference_batch.CASES) and all("(4.00x)" in line for line in lines[2:])


@pytest.mark.parametrize("case", inference_batch.CASES)
def test_each_case_gives_the_same_probabilities_at_every_batch_size(case, tmp_path):
    predict, split = inference_batch._predictor(case, 0, tmp_path), inference_batch._split(0)
    large, small = np.asarray(predict(split, 512)), np.asarray(predict(split, 64))
    assert large.shape == (inference_batch.IMAGES, 3 if case.startswith("expanded") else 2)
    np.testing.assert_allclose(large.sum(1), 1.0, atol=1e-4)
    np.testing.assert_allclose(small, large, atol=1e-4)  # only the time differs, not the answers
