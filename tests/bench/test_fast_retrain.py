"""The fast-retrain benchmark's pieces that need no servers: the world's split into base data, campaign
labels and held-out sets, and the paired old-class drop with its interval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import retrain_churn
from bench.fast_retrain import format_table, paired_drop, split_world
from tasks.data.fu_world import WorldConfig, generate_world
from tasks.data.manifest import read_manifest


@pytest.mark.timeout(300)
def test_the_world_splits_into_base_campaign_labels_and_held_out_sets(tmp_path):
    world = tmp_path / "world"
    generate_world(world, WorldConfig(n=150, seed=0, image_size=32, merchant=True), workers=1)
    labels, held_out, regression = split_world(world, tmp_path / "base")
    base = read_manifest(tmp_path / "base")
    assert base and {r["label"] for r in base} == {"fu", "not_fu"}
    assert all((tmp_path / "base" / r["path"]).is_file() for r in base)
    assert not (tmp_path / "base" / "train" / "fu_merchant").exists()
    rows = {str(world / r["path"]): r for r in read_manifest(world)}
    assert labels and all(rows[str(p)]["label"] == "fu_merchant" and rows[str(p)]["split"] != "test" for p in labels)
    assert held_out and all(rows[str(p)]["split"] == "test" for p in held_out)
    assert {c for _, c in regression} == {"fu", "not_fu"}
    assert all(rows[str(p)]["split"] == "test" for p, _ in regression)
    assert len(labels) + len(held_out) == sum(r["label"] == "fu_merchant" for r in rows.values())


def test_the_table_puts_the_three_ways_side_by_side():
    s = {"wall_s": 120.0, "new_class_recall": 0.97, "max_old_class_drop_pts": 0.3, "speedup_vs_full_retrain": 6.1,
         "orchestration_share": 0.02, "steps": {"ingest": 20.0, "fine-tune": 60.0}, "device": "CPU",
         "full_retrain": {"wall_s": 732.0, "new_class_recall": 0.98, "max_old_class_drop_pts": 0.1},
         "no_replay_median": {"new_class_recall": 0.99, "max_old_class_drop_pts": 12.0}}
    table = format_table(s)
    assert "fast retrain" in table and "full retrain (peer)" in table and "no replay (ablation)" in table
    assert "732" in table and "6.1x" in table and "+12.00" in table and "2.0%" in table
    assert "lost/won" not in table  # draws of an older bench run carry no paired counts
    fu = paired_drop(np.r_[np.ones(98), np.zeros(2)], np.r_[np.ones(97), np.zeros(3)])
    s["draws"] = [{"seed": 0, "old_classes": {"fu": fu, "not_fu": {
        "before": 0.98, "after": 0.974, "drop_pts": 0.6, "ci95_pts": [0.12, 1.08], "lost": 6, "won": 0,
        "p_value": 0.03125}}}]
    s["no_replay"] = [{"seed": 3, "old_classes": {"not_fu": {
        "before": 0.98, "after": 0.5, "drop_pts": 48.0, "ci95_pts": [45.0, 51.0], "lost": 480, "won": 0,
        "p_value": 1e-140}}}]
    lines = format_table(s).splitlines()
    assert "  fast retrain seed 0: fu 0.9800 -> 0.9700, +1.00 [-0.96, +2.96], 1/0 p 1; " \
           "not_fu 0.9800 -> 0.9740, +0.60 [+0.12, +1.08], 6/0 p 0.031" in lines
    assert "  no replay seed 3: not_fu 0.9800 -> 0.5000, +48.00 [+45.00, +51.00], 480/0 p 1e-140" in lines


def test_the_table_shows_the_ship_draw_to_the_served_version_beside_the_gated_runs():
    s = {"wall_s": 92.0, "new_class_recall": 0.96, "max_old_class_drop_pts": 1.3, "speedup_vs_full_retrain": 5.1,
         "orchestration_share": 0.029, "steps": {"fine-tune": 61.0}, "device": "CPU", "full_retrain": None,
         "no_replay_median": {"new_class_recall": 0.97, "max_old_class_drop_pts": 60.0},
         "ship_draw": {"wall_s": 97.4, "promoted": True, "served_version": "5",
                       "steps": {"fine-tune": 61.0, "release/promote": 0.4, "wait-for-model": 2.5}}}
    table = format_table(s)
    served = next(line for line in table.splitlines() if "served (ship draw)" in line)
    assert "97" in served and "<= 300" in served
    assert "end of run" in table and "served 5" in table and "wait-for-model 2.5" in table


def test_the_paired_drop_counts_flips_both_ways_and_its_interval_holds_the_drop():
    before = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], dtype=float)
    after = np.array([1, 0, 0, 1, 1, 0, 1, 1, 1, 1], dtype=float)  # two lost, one won back
    d = paired_drop(before, after)
    assert d["before"] == pytest.approx(0.8) and d["after"] == pytest.approx(0.7)
    assert d["drop_pts"] == pytest.approx(10.0) and d["flipped_pts"] == pytest.approx(30.0) and d["n"] == 10
    assert (d["lost"], d["won"]) == (2, 1) and d["p_value"] == pytest.approx(1.0)  # 2 of 3 changes one way: chance
    low, high = d["ci95_pts"]
    assert low < 10.0 < high
    same = paired_drop(before, before.copy())
    assert same["drop_pts"] == 0.0 and same["flipped_pts"] == 0.0 and same["ci95_pts"] == [0.0, 0.0]


def test_the_paired_drop_splits_the_lost_by_what_the_champion_knew_and_what_they_became():
    before = np.array([1, 1, 1, 1, 0, 1], dtype=float)
    after = np.array([0, 0, 0, 1, 1, 0], dtype=float)  # four lost, one won
    sure = np.array([True, True, False, True, False, False])  # the champion knew images 0, 1 (and 3)
    refined = np.array([False, True, False, False, False, True])  # 1 and 5 answered with a refinement
    d = paired_drop(before, after, sure, refined)
    assert (d["lost"], d["won"], d["sure"], d["lost_sure"], d["lost_refined"]) == (4, 1, 3, 2, 2)
    assert d["forgotten"] == 1  # image 0: known, and answered as another class
    assert "forgotten" not in paired_drop(before, after, sure) and "sure" not in paired_drop(before, after)


@pytest.mark.timeout(60)
def test_the_champion_is_sure_only_where_its_own_probability_of_the_class_reaches_the_threshold(tmp_path):
    from PIL import Image

    from bench.fast_retrain import _answers
    from tests.deploy.test_canary_classes import colour_model

    # logits: fu = R/10, not_fu = G/10, fu_merchant = B/10 (refining fu). Red: a sure fu; green: a sure
    # not_fu; blue: a sure fu_merchant; dull orange: fu at p 0.69, under the threshold, so the answer falls
    # back to not_fu: right for a not_fu image, but not known.
    model = colour_model(tmp_path / "m.onnx", ["fu", "not_fu", "fu_merchant"],
                         [[0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.1]], {"fu_merchant": "fu"})
    colours = {"red": (250, 0, 0), "green": (0, 250, 0), "orange": (20, 12, 0), "blue": (0, 0, 250)}
    paths = []
    for name, colour in colours.items():
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{name}.png")
        paths.append(tmp_path / f"{name}.png")
    right, sure, refined = _answers(model, paths + paths, ["fu"] * 4 + ["not_fu"] * 4, 8)
    assert right["fu"].tolist() == [1, 0, 0, 0] and sure["fu"].tolist() == [True, False, False, False]
    assert right["not_fu"].tolist() == [0, 1, 1, 0] and sure["not_fu"].tolist() == [False, True, False, False]
    # A 福 answered as the merchant's 福 is a refinement; a not_fu image answered so is not.
    assert refined["fu"].tolist() == [False, False, False, True] and not refined["not_fu"].any()


def test_the_table_gives_what_the_fast_retrain_forgot_of_what_the_champion_knew():
    def draw(seed: int, forgotten: int) -> dict:
        not_fu = {"before": 0.99, "after": 0.98, "drop_pts": 0.8, "ci95_pts": [0.2, 1.3], "lost": 8, "won": 0,
                  "p_value": 0.008, "sure": 935, "lost_sure": forgotten, "lost_refined": 0, "forgotten": forgotten}
        fu = {**not_fu, "drop_pts": 0.1, "lost": 4, "won": 3, "p_value": 1.0, "sure": 949, "lost_sure": 4,
              "lost_refined": 4, "forgotten": 0}
        return {"seed": seed, "old_classes": {"fu": fu, "not_fu": not_fu}}

    s = {"wall_s": 56.0, "new_class_recall": 0.97, "max_old_class_drop_pts": 0.78, "speedup_vs_full_retrain": 5.6,
         "orchestration_share": 0.014, "steps": {"fine-tune": 27.0}, "device": "CPU", "full_retrain": None,
         "no_replay_median": {"new_class_recall": 1.0, "max_old_class_drop_pts": 92.0},
         "draws": [draw(0, 3), draw(1, 5)], "max_old_class_forgotten_pts": 0.43}
    table = format_table(s)
    assert "8/0 p 0.008 (3 of the lost sure, 0 to a refinement)" in table
    assert "4/3 p 1 (4 of the lost sure, 4 to a refinement)" in table
    line = next(x for x in table.splitlines() if x.startswith("fast retrain, forgotten"))
    assert "0.43 on the median" in line
    assert line.endswith("per draw 0.32 (fu 0/949, not_fu 3/935), 0.53 (fu 0/949, not_fu 5/935)")


def test_the_churn_table_names_each_reference_against_the_champion():
    row = {"after": 0.9824, "drop_pts": 0.69, "ci95_pts": [0.1, 1.3], "flipped_pts": 1.5}
    s = {"champion": {"fu": 0.9206, "not_fu": 0.9892}, "champion_version": "2", "device": "CPU",
         "references": [{"name": "retrained, seed 1", "classes": {"fu": {**row, "drop_pts": -1.47}, "not_fu": row}}]}
    table = retrain_churn.format_table(s)
    assert "champion (version 2)" in table and "retrained, seed 1" in table
    assert "+0.69 [+0.10, +1.30] / 1.5" in table and "-1.47" in table and "0.9892" in table
    # With the paired counts (since 2026-12-05): lost/won and McNemar's p instead of the flipped share.
    for c in ("fu", "not_fu"):
        s["references"][0]["classes"][c] = {**s["references"][0]["classes"][c], "lost": 11, "won": 4, "p_value": 0.12}
    table = retrain_churn.format_table(s)
    assert "lost/won (p)" in table and "+0.69 [+0.10, +1.30] / 11/4 (0.12)" in table and "flipped" not in table


@pytest.mark.timeout(60)
def test_the_churn_bench_refuses_a_folder_without_the_fast_retrain_bench(tmp_path):
    from saofu.errors import SaofuError

    with pytest.raises(SaofuError, match="saofu bench fast-retrain"):
        retrain_churn.run_retrain_churn_bench(home=tmp_path)
    # A bench folder without the results that name its campaign's champion (the `champion` alias
    # names the ship draw's model by the end of that bench): refused, nothing trained.
    (tmp_path / "world").mkdir()
    (tmp_path / "data" / "fu_base").mkdir(parents=True)
    with pytest.raises(SaofuError, match="names the champion"):
        retrain_churn.run_retrain_churn_bench(home=tmp_path, bench_results=tmp_path / "missing.json")


def test_the_selection_table_names_each_config_with_its_medians_and_every_seed():
    from bench.fine_tune_selection import format_table

    draw = [{"new_class_recall": r, "max_old_class_drop_pts": d} for r, d in [(0.95, 0.49), (0.96, 1.08), (0.94, 0.59)]]
    table = format_table({"results": [
        {"config": {}, "draws": draw, "new_class_recall": 0.95, "max_old_class_drop_pts": 0.59},
        {"config": {"expand": False}, "draws": draw[:1], "new_class_recall": 0.95, "max_old_class_drop_pts": 0.49},
        {"config": {}, "settings": {"expand": True, "old_class_weight": 1.0, "hard_replay_share": 0.5},
         "draws": draw, "new_class_recall": 0.95, "max_old_class_drop_pts": 0.59},
        {"config": {"old_class_weight": 3.0}, "settings": {"expand": True, "old_class_weight": 3.0,
                                                           "hard_replay_share": 0.5},
         "draws": draw, "new_class_recall": 0.95, "max_old_class_drop_pts": 0.59},
        {"config": {"shared_stages": 3}, "settings": {"expand": True, "old_class_weight": 1.0,
                                                      "hard_replay_share": 0.5},
         "draws": draw, "new_class_recall": 0.95, "max_old_class_drop_pts": 0.59}]})
    lines = table.splitlines()
    # Results written before the settings were recorded are named by their overrides.
    assert lines[2].startswith("defaults") and "0.950" in lines[2] and "0.59" in lines[2]
    assert "(0.960, 1.08)" in lines[2] and "(0.940, 0.59)" in lines[2]
    assert lines[3].startswith('{"expand": false}') and "(0.960" not in lines[3]
    # Recorded settings name the method and both weightings whatever the defaults were.
    assert lines[4].startswith("expand, old weight 1, hard replay 0.5 (defaults)")
    assert lines[5].startswith("expand, old weight 3, hard replay 0.5 ") and "(defaults)" not in lines[5]
    # Overrides of other fields are named too: the row does not read as the defaults.
    assert lines[6].startswith("expand, old weight 1, hard replay 0.5, shared_stages 3 ")
    assert "(defaults)" not in lines[6]


@pytest.mark.timeout(60)
def test_the_bench_world_probe_refuses_a_folder_without_the_fast_retrain_bench(tmp_path):
    from bench.fine_tune_selection import bench_world
    from saofu.errors import SaofuError

    with pytest.raises(SaofuError, match="saofu bench fast-retrain"):
        bench_world(bench_home=tmp_path, results=tmp_path / "fast_retrain.json", work=tmp_path / "probe")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arg, named", [("{oops", "is not JSON"), ('{"old_weight": 3}', "old_weight"), ("3", "3")])
def test_the_selection_bench_refuses_a_bad_config_before_preparing_anything(arg, named, capsys, monkeypatch):
    import bench.fine_tune_selection as selection

    def must_not_run(*a, **k):
        raise AssertionError("a world was prepared for a bad config")

    monkeypatch.setattr(selection, "selection_world", must_not_run)
    with pytest.raises(SystemExit) as exit_:
        selection.main([arg])
    assert exit_.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_the_selection_bench_writes_where_out_says_and_leaves_the_world_s_file_alone(tmp_path, monkeypatch):
    import bench.fine_tune_selection as selection

    default = tmp_path / "default.json"
    monkeypatch.setitem(selection.OUT, "selection", default)
    monkeypatch.setattr(selection, "selection_world", lambda: "world")
    result = {"config": {"aug_strength": 0.6}, "settings": {"expand": True, "old_class_weight": 1.0,
                                                             "hard_replay_share": 0.5, "aug_strength": 0.6},
              "draws": [], "new_class_recall": 0.9, "max_old_class_drop_pts": 0.4}
    monkeypatch.setattr(selection, "run", lambda configs, world: {"world": world, "results": [result]})
    out = tmp_path / "probe" / "aug.json"
    selection.main(["--out", str(out), '{"aug_strength": 0.6}'])
    assert json.loads(out.read_text())["results"] == [result] and not default.exists()


def test_the_table_lists_the_full_retrain_draws_whose_median_it_compares():
    s = {"wall_s": 90.0, "new_class_recall": 0.97, "max_old_class_drop_pts": 0.9, "speedup_vs_full_retrain": 5.2,
         "orchestration_share": 0.01, "steps": {"fine-tune": 61.0}, "device": "CPU",
         "full_retrain": {"wall_s": 470.0, "new_class_recall": 0.97, "max_old_class_drop_pts": 1.2,
                          "draws": [{"seed": 0, "wall_s": 441.2, "promoted": False},
                                    {"seed": 1, "wall_s": 470.0, "promoted": True},
                                    {"seed": 2, "wall_s": 554.4, "promoted": False}]},
         "no_replay_median": {"new_class_recall": 0.74, "max_old_class_drop_pts": 14.0}}
    table = format_table(s)
    peer_cell = next(line for line in table.splitlines() if line.startswith("labels in LS -> end of run"))
    assert "470" in peer_cell
    draws = next(line for line in table.splitlines() if line.startswith("full retrain draws"))
    assert "seed 0 441 s (gate refused)" in draws and "seed 1 470 s," in draws
    assert "seed 2 554 s (gate refused)" in draws


@pytest.mark.timeout(60)
def test_extra_decoys_go_into_a_copy_as_training_not_fu_and_the_bench_s_dataset_is_untouched(tmp_path, monkeypatch):
    """`--extra-decoys N`: N merchant-framed look-alikes of the decoy world's training fonts, no more."""
    import bench.fine_tune_selection as selection
    import tasks.data.fu_world as fu_world
    from saofu.errors import SaofuError
    from tasks.data.manifest import read_manifest, write_manifest

    def png(path: Path, shade: int) -> None:
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (shade, 0, 0)).save(path)

    original = tmp_path / "bench-dataset"
    png(original / "train" / "fu" / "a.png", 1)
    write_manifest(original, [{"path": "train/fu/a.png", "label": "fu", "split": "train", "source": "generated",
                               "sha256": "x"}])
    before = (original / "manifest.csv").read_text()

    def fake_world(out: Path, cfg) -> None:  # 3 train merchant look-alikes, 1 held-out-font one, 1 unframed
        assert cfg.merchant and cfg.lookalike_share == 1.0 and cfg.seed == selection.DECOY_SEED
        rows = []
        for i, (split, style) in enumerate([("train", "merchant")] * 3 + [("test", "merchant"), ("train", "print")]):
            rel = f"{split}/not_fu/{i}.png"
            png(out / rel, 10 + i)
            rows.append({"path": rel, "label": "not_fu", "split": split, "source": "generated", "sha256": str(i),
                         "style": style})
        write_manifest(out, rows)

    monkeypatch.setattr(fu_world, "generate_world", fake_world)
    world = selection.ProbeWorld("w", tmp_path / "c.pt", original, 0.15, 0, tmp_path / "cache", [], [], tmp_path / "w")
    grown = selection.with_extra_decoys(world, 2, home=tmp_path / "decoys")
    rows = read_manifest(grown.data_dir)
    added = [r for r in rows if r["label"] == "not_fu"]
    assert len(rows) == 3 and len(added) == 2 and all(r["split"] == "train" for r in added)
    assert all((grown.data_dir / r["path"]).is_file() for r in rows)
    assert grown.cache_dir == (tmp_path / "decoys" / "cache").resolve() and "2 more" in grown.description
    assert (original / "manifest.csv").read_text() == before and not (original / "train" / "not_fu").exists()
    with pytest.raises(SaofuError, match="drew 3 merchant-framed look-alikes, fewer than 4"):
        selection.with_extra_decoys(world, 4, home=tmp_path / "decoys4")


def test_a_result_with_look_alike_labels_says_so_in_its_row():
    from bench.fine_tune_selection import format_table

    draw = [{"new_class_recall": 0.94, "max_old_class_drop_pts": 0.39}]
    settings = {"expand": True, "old_class_weight": 1.0, "hard_replay_share": 0.5}
    lines = format_table({"results": [
        {"config": {}, "settings": settings, "draws": draw, "new_class_recall": 0.94, "max_old_class_drop_pts": 0.39},
        {"config": {}, "settings": settings, "draws": draw, "new_class_recall": 0.94, "max_old_class_drop_pts": 0.39,
         "extra_decoys": 1250}]}).splitlines()
    assert "look-alike" not in lines[2]
    assert lines[3].startswith("expand, old weight 1, hard replay 0.5 (defaults), +1250 look-alike labels")


def test_the_table_names_each_draw_s_orchestration_and_the_client_retries_that_stalled_it():
    s = {"wall_s": 56.0, "new_class_recall": 0.97, "max_old_class_drop_pts": 0.78, "speedup_vs_full_retrain": 5.9,
         "orchestration_share": 0.015, "steps": {"ingest": 17.8}, "device": "CPU", "full_retrain": None,
         "no_replay_median": {"new_class_recall": 1.0, "max_old_class_drop_pts": 91.5},
         "draws": [{"seed": 0, "orchestration_share": 0.059, "client_retries": [{"status": 503, "seconds": 2.05}]},
                   {"seed": 1, "orchestration_share": 0.014, "client_retries": []}],
         "ship_draw": {"wall_s": 58.0, "promoted": True, "served_version": "20", "steps": {"ingest": 17.0},
                       "orchestration_share": 0.013, "client_retries": [{"status": None, "seconds": 4.0}]}}
    line = next(x for x in format_table(s).splitlines() if x.startswith("orchestration per draw"))
    assert "seed 0 5.9%, 503 2.0 s; seed 1 1.4%; ship 1.3%, no answer 4.0 s" in line
    # A run recorded before the retries were: no such line, nothing made up.
    for d in s["draws"] + [s["ship_draw"]]:
        del d["client_retries"]
    assert "orchestration per draw" not in format_table(s)


@pytest.mark.timeout(60)
def test_the_bench_command_passes_the_image_size_and_its_folder_to_the_bench(tmp_path, monkeypatch):
    """`--image-size` sizes the world and the models; `--home` keeps a second run out of the default folder."""
    from typer.testing import CliRunner

    import bench.fast_retrain
    from saofu.cli import app

    seen = {}

    def fake_bench(**kwargs):
        seen.update(kwargs)
        return {"table": "the table", "wall_s": 1.0}

    monkeypatch.setattr(bench.fast_retrain, "run_fast_retrain_bench", fake_bench)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["bench", "fast-retrain", "--image-size", "96", "--home", str(tmp_path / "h"),
                                      "--full-retrain-draws", "0", "--out", str(out), "--parent-gate", "0.99"])
    assert result.exit_code == 0, result.output
    assert seen["image_size"] == 96 and seen["home"] == tmp_path / "h" and seen["full_retrain_draws"] == 0
    assert seen["out"] == out and seen["parent_gate"] == 0.99

    refused = CliRunner().invoke(app, ["bench", "fast-retrain", "--image-size", "8"])
    assert refused.exit_code == 2 and "image-size" in refused.output
    refused = CliRunner().invoke(app, ["bench", "fast-retrain", "--parent-gate", "2"])
    assert refused.exit_code == 2 and "parent-gate" in refused.output


@pytest.mark.timeout(60)
def test_the_plain_bench_command_measures_what_a_click_runs_on_the_default_world(tmp_path, monkeypatch):
    """No options: the world at its default size, the fast retrain with the flow's budget and parent gate."""
    from typer.testing import CliRunner

    import bench.fast_retrain
    from flows.fast_retrain import FastRetrainParams
    from saofu.cli import app
    from saofu.pixels import DEFAULT_IMAGE_SIZE
    from tasks.train.config import TrainConfig

    seen = {}
    monkeypatch.setattr(bench.fast_retrain, "run_fast_retrain_bench",
                        lambda **kw: seen.update(kw) or {"table": "the table", "wall_s": 1.0})
    result = CliRunner().invoke(app, ["bench", "fast-retrain", "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    click = FastRetrainParams()
    assert seen["budget_min"] == click.budget_min and seen["parent_gate"] == click.parent_gate > 0
    assert seen["image_size"] == WorldConfig().image_size == TrainConfig().image_size == DEFAULT_IMAGE_SIZE


@pytest.mark.timeout(60)
def test_the_bench_refuses_to_empty_a_folder_no_bench_run_left(tmp_path):
    """`--home` is emptied first: a folder holding anything but an earlier run is refused, untouched."""
    from bench.fast_retrain import run_fast_retrain_bench
    from saofu.errors import SaofuError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SaofuError, match="is not empty and holds no earlier fast-retrain bench run"):
        run_fast_retrain_bench(home=tmp_path, out=tmp_path / "r.json")
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "r.json").exists()
