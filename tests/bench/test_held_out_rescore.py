"""Which registered versions a fast-retrain bench run left, read from their lineage tags."""

from __future__ import annotations

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
