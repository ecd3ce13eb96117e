"""Which registered versions a fast-retrain bench run left, read from their lineage tags."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.held_out_rescore import bench_models


def version(number: int, **tags: str) -> SimpleNamespace:
    return SimpleNamespace(version=number, tags=tags)


@pytest.mark.timeout(10)
def test_the_champion_draws_ship_and_peers_are_told_apart_by_lineage():
    change = '{"new": ["fu_merchant"]}'
    versions = [version(1), version(2, parent_version="1", **{"saofu.artefact": "pruned fp32"}),
                version(3, parent_version="2", **{"saofu.change": change}),
                version(4, parent_version="3", **{"saofu.change": change, "saofu.artefact": "fp32"}),
                version(5, parent_version="2", **{"saofu.change": change}),  # its release failed: no artefact
                version(6), version(7, parent_version="6", **{"saofu.artefact": "pruned fp32"}),
                version(8, parent_version="2", **{"saofu.change": change}),
                version(9, parent_version="8", **{"saofu.change": change, "saofu.artefact": "fp32"})]
    assert bench_models(list(reversed(versions))) == {
        "champion": "2", "fast retrain 1": "4", "ship": "9", "full retrain 1": "7"}


@pytest.mark.timeout(10)
def test_a_registry_without_a_fine_tune_says_to_run_the_bench():
    with pytest.raises(SystemExit, match="saofu bench fast-retrain"):
        bench_models([version(1), version(2, parent_version="1", **{"saofu.artefact": "fp32"})])


@pytest.mark.timeout(10)
def test_a_lowered_logit_scales_that_class_s_odds_and_nothing_else():
    import numpy as np

    from bench.held_out_rescore import shifted

    probs = np.array([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]])
    assert np.allclose(shifted(probs, 2, 0.0), probs)
    out = shifted(probs, 2, 1.0)
    assert np.allclose(out.sum(1), 1.0)
    assert np.allclose(out[:, 2] / out[:, 0], probs[:, 2] / probs[:, 0] / np.e)  # odds against class 0: 1/e
    assert np.allclose(out[:, 1] / out[:, 0], probs[:, 1] / probs[:, 0])  # the other classes' odds kept


@pytest.mark.timeout(10)
def test_the_parent_gate_gives_the_champion_s_answer_where_it_is_sure_of_another_class():
    import numpy as np

    from bench.held_out_rescore import parent_gated

    # classes fu, not_fu, fu_merchant; the champion's own probabilities are the old columns renormalised
    probs = np.array([[0.05, 0.45, 0.50],    # champion: not_fu 0.9 -> gated at 0.9
                      [0.30, 0.20, 0.50],    # champion: fu 0.6 -> its parent: never gated
                      [0.03, 0.37, 0.60]])   # champion: not_fu 0.925
    out = parent_gated(probs, 2, [1], 0.9)
    assert np.allclose(out.sum(1), 1.0)
    assert out[0, 2] == 0 and np.allclose(out[0, :2], [0.1, 0.9])  # the champion's answer, whole
    assert np.allclose(out[1], probs[1])
    assert out[2, 2] == 0
    assert np.allclose(parent_gated(probs, 2, [1], 0.95), probs)  # nowhere that sure: unchanged
    assert parent_gated(probs, 2, [1], None) is probs


@pytest.mark.timeout(10)
def test_the_rescore_reads_images_at_the_bench_world_s_size(tmp_path):
    import json

    from bench.held_out_world import world_image_size

    (tmp_path / "world.json").write_text(json.dumps({"config": {"image_size": 96, "n": 10}}))
    assert world_image_size(tmp_path) == 96


@pytest.mark.timeout(10)
def test_lost_images_are_tallied_by_what_they_show_and_whether_the_champion_knew_them(tmp_path, monkeypatch):
    import numpy as np

    import bench.fast_retrain
    from bench.held_out_rescore import lost_by_look_alike

    regression = [(tmp_path / f"{i}.png", c) for i, c in enumerate(["not_fu", "not_fu", "fu", "not_fu"])]
    records = {str(p.resolve()): {"style": "merchant", "char": ch} for (p, _), ch in
               zip(regression, ["褔", "幅", "福", ""])}
    # the draws' answers, right (1) or not, per class in the order of the regression set's images
    answers = {"a.onnx": {"not_fu": np.array([0.0, 0.0, 1.0]), "fu": np.array([1.0])},
               "b.onnx": {"not_fu": np.array([0.0, 1.0, 1.0]), "fu": np.array([0.0])}}
    monkeypatch.setattr(bench.fast_retrain, "_answers", lambda path, *a: (answers[str(path)], None, None))
    champion_right = {"not_fu": np.array([1.0, 1.0, 0.0]), "fu": np.array([1.0])}
    champion_sure = {"not_fu": np.array([True, False, False]), "fu": np.array([True])}
    out = lost_by_look_alike({"d1": Path("a.onnx"), "d2": Path("b.onnx")}, champion_right, champion_sure,
                             regression, 64, records)
    assert out["not_fu"] == {"images": 2, "lost_by_every_draw": 1, "champion_sure": 1,
                             "image_draws_by_kind": {"merchant 褔": 2, "merchant 幅": 1}}
    assert out["fu"]["images"] == 1 and out["fu"]["image_draws_by_kind"] == {"merchant 福": 1}
    # the third not_fu image was wrong before: not lost, whatever the draws answer
