"""The fast-retrain benchmark's pieces that need no servers: the world's split into base data, campaign
labels and held-out sets, and the paired old-class drop with its interval."""

from __future__ import annotations

import pytest

from bench.fast_retrain import format_table, split_world
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
