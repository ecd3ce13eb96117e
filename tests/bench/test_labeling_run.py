"""`saofu bench labeling` end to end at a tiny size: two draws, the JSON read back, the CLI's options.

The models are near chance after one epoch on a few hundred 32 px images, so the thresholds are
0.5 and 0.6: with two classes every agreed image clears 0.5, and the figures are not all empty.
What is checked is the machinery (draws, calibration, target modes, medians), not the numbers.
"""

from __future__ import annotations

import json
import statistics

import pytest
from typer.testing import CliRunner

import bench.labeling
from bench.labeling import run_labeling_bench
from bench.labeling_strategies import DUAL_RULES, STRATEGIES, TARGET_RULES
from saofu.cli import app

THRESHOLDS = (0.5, 0.6)
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One bench run at the tiny size (module-wide: it trains 2 x 2 models and 2 retrains)."""
    home = tmp_path_factory.mktemp("labeling_home")
    out = home / "labeling.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAOFU_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        result = run_labeling_bench(n_seed=200, n_pool=200, thresholds=THRESHOLDS, epochs=1, seeds=SEEDS, out=out,
                                    model_b="saofu_fu_tiny", retrain=(("dual", 0.5),), image_size=32, workers=1,
                                    n_val=60)
    return home, json.loads(out.read_text()), result["table"]


@pytest.mark.timeout(300)
def test_the_json_holds_the_kept_figures_the_draws_and_the_setup(tiny_run):
    _, summary, table = tiny_run
    for key in ("median_precision", "median_auto_share", "draws", "met", "device", "setup", "strategy"):
        assert key in summary, key
    assert [d["seed"] for d in summary["draws"]] == list(SEEDS) == summary["setup"]["seeds"]
    # two draws can never meet "the median of at least three": the pipeline's default stands in,
    # at the compared threshold nearest its 0.9
    assert summary["met"] is False and summary["strategy"] == "dual_tta_cal @ 0.6"
    assert summary["strategy_is"].startswith("the pipeline's default")
    assert "not met (only 2 draw(s))" in table and "<- default" in table


@pytest.mark.timeout(300)
def test_each_draw_has_its_own_worlds_calibration_strategies_and_target_modes(tiny_run):
    home, summary, _ = tiny_run
    data = home / "data"
    for seed in SEEDS:  # the worlds are cached per seed, under names carrying it
        assert any(p.name.startswith("labeling_seed_") and p.name.endswith(f"_s{seed}") for p in data.iterdir())
        assert any(p.name.startswith("labeling_pool_") and p.name.endswith(f"_s{seed + 1000}") for p in data.iterdir())
        assert any(p.name.startswith("labeling_val_") and p.name.endswith(f"_s{seed + 2000}") for p in data.iterdir())
    for draw in summary["draws"]:
        assert draw["world_seeds"] == {"seed_set": draw["seed"], "pool": draw["seed"] + 1000,
                                       "holdout": draw["seed"] + 2000}
        # the held-out slice: the seed set's val split plus ~60 images of the third world
        assert 50 <= draw["sizes"]["holdout"] - draw["sizes"]["seed_val"] <= 70
        assert set(draw["calibration"]) == {"a", "b", "a_tta", "b_tta"}
        for c in draw["calibration"].values():
            assert c["temperature"] > 0 and c["fit_n"] + c["check_n"] == draw["sizes"]["holdout"]
            assert 0.3 < c["fit_n"] / draw["sizes"]["holdout"] < 0.5  # 40 % fits, the rest checks
            assert all(0 <= c[k] <= 1 for k in ("ece_before", "ece_after", "pool_ece_before", "pool_ece_after"))
        keys = [r["key"] for r in draw["results"]]
        assert keys == [f"{s} @ {t:g}" for t in THRESHOLDS for s in STRATEGIES] + list(TARGET_RULES)
        for r in draw["results"]:
            assert r["auto_labelled"] + r["human_labels"] == draw["sizes"]["pool"]
        for name, mode in draw["target_modes"].items():
            assert mode["rule"] == TARGET_RULES[name] and mode["rule"] in DUAL_RULES
            assert mode["val"]["n"] == draw["calibration"]["a"]["check_n"]
            val = mode["val"]
            assert val["lower"] <= val["precision"] <= val["upper"] or not val["selected"]
            reported = next(r for r in draw["results"] if r["key"] == name)
            assert reported["threshold"] == mode["threshold"] and reported["share"] == mode["pool"]["share"]
    assert summary["draws"][0]["seed_models"]["model B"]["model"] == "saofu_fu_tiny"


@pytest.mark.timeout(300)
def test_medians_and_worst_are_those_of_the_draws(tiny_run):
    _, summary, _ = tiny_run
    for row in summary["summary"]:
        per_draw = [next(r for r in d["results"] if r["key"] == row["key"]) for d in summary["draws"]]
        shares = [r["share"] for r in per_draw]
        precisions = [r["precision"] for r in per_draw if r["precision"] is not None]
        assert row["median_share"] == pytest.approx(statistics.median(shares))
        assert row["worst_share"] == min(shares)
        if precisions:
            assert row["median_precision"] == pytest.approx(statistics.median(precisions))
            assert row["worst_precision"] == min(precisions)
        assert not row["met"]
    kept = next(r for r in summary["summary"] if r["key"] == summary["strategy"])
    assert summary["median_precision"] == kept["median_precision"]
    assert summary["median_auto_share"] == kept["median_share"]
    # something was auto-labelled: the medians are not all trivially empty
    assert any(r["median_share"] > 0 for r in summary["summary"])


@pytest.mark.timeout(300)
def test_the_accuracy_question_runs_on_the_first_draw(tiny_run):
    _, summary, table = tiny_run
    assert summary["setup"]["retrain_draw"] == SEEDS[0]
    assert [r["config"] for r in summary["retrain"]] == ["all human (reference)", "dual @ 0.5"]
    dual = summary["retrain"][1]
    first = next(r for r in summary["draws"][0]["results"] if r["key"] == "dual @ 0.5")
    assert dual["auto_labels"] == first["auto_labelled"] and dual["wrong_auto_labels"] == first["wrong"]
    assert "all human (reference)" in table


@pytest.mark.timeout(60)
def test_the_cli_takes_several_seeds_and_skips_the_retrains(monkeypatch, tmp_path):
    calls = []

    def fake_bench(**kwargs):
        calls.append(kwargs)
        return {"summary": {"strategy": "dual_tta @ 0.9"}, "table": "table"}

    monkeypatch.setattr(bench.labeling, "run_labeling_bench", fake_bench)
    out = tmp_path / "l.json"
    runner = CliRunner()
    done = runner.invoke(app, ["bench", "labeling", "--seed", "3", "--seed", "5", "--no-retrain", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert calls[-1]["seeds"] == [3, 5] and calls[-1]["retrain"] == () and calls[-1]["out"] == out
    assert calls[-1]["n_val"] == 0
    done = runner.invoke(app, ["bench", "labeling", "--json"])
    assert done.exit_code == 0, done.output
    assert calls[-1]["seeds"] == [0, 1, 2] and "retrain" not in calls[-1]  # the default: three draws, retrains
    assert json.loads(done.output)["strategy"] == "dual_tta @ 0.9"
