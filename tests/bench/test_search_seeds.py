"""The multi-draw summary of the search bench, on hand-made study curves."""

import json

import pytest

from bench.search_seeds import format_seeds, run_search_seeds, summarise_seeds
from saofu.errors import SaofuError


def _study(label, sampler, curve, pruned=0):
    """A study as `bench search` writes it: curve points are (seconds, epochs, best so far)."""
    return {"label": label, "sampler": sampler, "pruner": "none", "trials": len(curve), "pruned": pruned,
            "curve": [list(p) for p in curve], "compute_s": curve[-1][0], "best_score": curve[-1][2]}


def _draw(seed, hyperband, random):
    return {"benchmark": "search", "date": "2026-12-02", "settings": {"seed": seed},
            "studies": [_study("tpe + hyperband", "tpe", hyperband, pruned=3),
                        _study("random, no pruning", "random", random)]}


RANDOM = [(100.0, 9, 0.50), (200.0, 18, 0.70), (400.0, 36, 0.80)]  # random's bar: 0.80, 400 s in all


def test_shares_are_taken_against_each_draws_own_random_study():
    early = _draw(0, [(20.0, 1, float("-inf")), (80.0, 5, 0.81), (390.0, 30, 0.90)], RANDOM)  # 80/400
    late = _draw(1, [(150.0, 9, 0.60), (200.0, 12, 0.85)], [(50.0, 9, 0.85), (500.0, 90, 0.85)])  # 200/500
    result = summarise_seeds([early, late])

    hb = [d["studies"]["tpe + hyperband"]["share"] for d in result["draws"]]
    assert hb == pytest.approx([0.2, 0.4])
    # random reaches its own best where it found it: 400 of 400 s, then 50 of 500 s
    assert [d["studies"]["random, no pruning"]["share"] for d in result["draws"]] == pytest.approx([1.0, 0.1])
    assert result["studies"]["tpe + hyperband"]["median_share"] == pytest.approx(0.3)
    assert result["studies"]["tpe + hyperband"]["within_target"] == 1
    assert result["target"]["met"] is True
    assert "median" in format_seeds(result) and "met" in format_seeds(result)


def test_a_draw_that_never_reaches_the_bar_counts_as_infinitely_late():
    never = _draw(0, [(100.0, 9, 0.60), (400.0, 36, 0.79)], RANDOM)
    slow = _draw(1, [(300.0, 9, 0.90)], RANDOM)  # 300/400 = 0.75
    fast = _draw(2, [(40.0, 3, 0.95)], RANDOM)  # 0.10
    result = summarise_seeds([never, slow, fast])
    assert result["draws"][0]["studies"]["tpe + hyperband"]["share"] is None
    assert result["studies"]["tpe + hyperband"]["median_share"] == pytest.approx(0.75)  # median of inf, .75, .1
    assert result["target"]["met"] is False
    assert "never" in format_seeds(result)

    two_never = summarise_seeds([never, _draw(1, [(400.0, 9, 0.1)], RANDOM)])
    assert two_never["studies"]["tpe + hyperband"]["median_share"] is None
    assert two_never["target"]["met"] is False


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(SaofuError, match="repeat a seed"):
        summarise_seeds([_draw(0, RANDOM, RANDOM), _draw(0, RANDOM, RANDOM)])
    other = tmp_path / "labeling.json"
    other.write_text(json.dumps({"benchmark": "labeling"}))
    with pytest.raises(SaofuError, match="labeling.json is not a `saofu bench search` result"):
        run_search_seeds([other], tmp_path / "out.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(SaofuError, match="cannot read search bench result .*broken.json"):
        run_search_seeds([broken], tmp_path / "out.json")


def test_the_summary_and_its_plot_are_written(tmp_path):
    paths = []
    for seed, hb in ((1, [(50.0, 3, 0.9)]), (0, [(300.0, 9, 0.9)])):
        p = tmp_path / f"s{seed}.json"
        p.write_text(json.dumps(_draw(seed, hb, RANDOM)))
        paths.append(p)
    result = run_search_seeds(paths, tmp_path / "pruning.json")
    written = json.loads((tmp_path / "pruning.json").read_text())
    assert written["seeds"] == [0, 1]  # sorted by seed, whatever the order given
    assert written["studies"]["tpe + hyperband"]["median_share"] == pytest.approx((0.75 + 0.125) / 2)
    assert (tmp_path / "pruning_curves.png").stat().st_size > 1000
    assert "written to" in result["table"]
