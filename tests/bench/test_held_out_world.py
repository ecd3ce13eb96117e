"""The fast-retrain bench's second held-out world: the bench world's config, another seed, the held-out fonts."""

from __future__ import annotations

import json

import pytest

from bench.held_out_world import generate_held_out, held_out_sets
from saofu.errors import SaofuError
from tasks.data.fu_world import WorldConfig, generate_world
from tasks.data.manifest import read_manifest


@pytest.mark.timeout(300)
def test_the_extra_world_is_new_images_in_the_bench_worlds_held_out_fonts(tmp_path):
    like = tmp_path / "world"  # a bench folder: its world, and the second world beside it
    generate_world(like, WorldConfig(n=150, seed=0, image_size=32, merchant=True), workers=1)
    merchant, regression = generate_held_out(tmp_path / "held_out_world", 300, like)

    extra = {str(tmp_path / "held_out_world" / r["path"]): r for r in read_manifest(tmp_path / "held_out_world")}
    assert len(merchant) + len(regression) == sum(r["split"] == "test" for r in extra.values()) >= 280
    assert all(extra[str(p)]["label"] == "fu_merchant" and extra[str(p)]["split"] == "test" for p in merchant)
    assert {c for _, c in regression} == {"fu", "not_fu"}
    assert all(extra[str(p)]["label"] == c and extra[str(p)]["split"] == "test" for p, c in regression)
    held_out_fonts = set(json.loads((like / "world.json").read_text())["fonts"]["test_groups"])
    drawn_in = {extra[str(p)]["font_group"] for p, _ in regression} - {""}  # "": a texture, no character
    assert drawn_in == held_out_fonts
    assert {r["sha256"] for r in read_manifest(like)}.isdisjoint(r["sha256"] for r in extra.values())
    config = json.loads((tmp_path / "held_out_world" / "world.json").read_text())["config"]
    assert (config["seed"], config["image_size"], config["merchant"]) == (1, 32, True)

    sets = held_out_sets(tmp_path)  # what the rescore probe and the churn bench judge on
    own = [r for r in read_manifest(like) if r["split"] == "test"]
    assert len(sets["test split"][1]) == sum(r["label"] != "fu_merchant" for r in own)
    assert sets["second world"] == (merchant, regression)
    assert sets["both"] == (sets["test split"][0] + merchant, sets["test split"][1] + regression)


@pytest.mark.timeout(300)
def test_an_extra_world_in_other_fonts_than_the_bench_worlds_held_out_ones_is_refused(tmp_path):
    like = tmp_path / "world"
    generate_world(like, WorldConfig(n=150, seed=0, image_size=32, merchant=True), workers=1)
    record = json.loads((like / "world.json").read_text())
    record["fonts"]["test_groups"] = ["some-other-font"]
    (like / "world.json").write_text(json.dumps(record))
    with pytest.raises(SaofuError, match="test fonts"):
        generate_held_out(tmp_path / "extra", 300, like)
