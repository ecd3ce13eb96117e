"""The second-round probe: which images go to the labelers, and the dataset they join."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.fine_tune_selection import ProbeWorld
from tasks.data.manifest import add_images, read_manifest
from tests.reliability.test_dataset_lock import png

CLASSES = ["fu", "not_fu", "fu_merchant"]


def world_of(tmp_path: Path, held_out: list[Path], regression: list[tuple[Path, str]], data_dir: Path) -> ProbeWorld:
    return ProbeWorld("test world", tmp_path / "champion.pt", data_dir, 0.15, 0, tmp_path / "cache", held_out,
                      regression, tmp_path / "work")


@pytest.mark.timeout(30)
def test_the_badcases_are_the_test_images_decided_wrong_at_the_threshold_with_their_true_class(tmp_path, monkeypatch):
    import bench.second_round as second_round

    merchant_sure, merchant_unsure, lookalike, plain = (tmp_path / f"{n}.png" for n in range(4))
    world = world_of(tmp_path, [merchant_sure, merchant_unsure], [(lookalike, "not_fu"), (plain, "not_fu")],
                     tmp_path / "ds")
    probs = np.array([
        [0.02, 0.03, 0.95],  # a merchant 福 answered as one, sure: right
        [0.30, 0.20, 0.50],  # a merchant 福 the model is unsure of: falls back to not_fu, wrong
        [0.01, 0.04, 0.95],  # a framed look-alike answered fu_merchant, sure: wrong
        [0.01, 0.97, 0.02],  # a plain not_fu: right
    ])
    seen = {}

    def fake_probabilities(model, classes, paths, labels, image_size):
        seen["paths"], seen["labels"], seen["size"] = paths, labels, image_size
        return probs, np.array([classes.index(c) for c in labels])

    monkeypatch.setattr(second_round, "probabilities", fake_probabilities)

    rows = second_round.badcases(world, model=None, classes=CLASSES)

    assert seen["labels"] == ["fu_merchant", "fu_merchant", "not_fu", "not_fu"] and seen["size"] == world.image_size
    assert [(Path(r["image"]), r["label"]) for r in rows] == [(merchant_unsure, "fu_merchant"), (lookalike, "not_fu")]
    assert all(r["source"] == "human" and r["split"] == "train" for r in rows)


@pytest.mark.timeout(30)
def test_the_labelled_badcases_join_a_linked_copy_and_the_worlds_dataset_is_untouched(tmp_path):
    from bench.second_round import with_labelled

    ds = tmp_path / "ds"
    add_images(ds, [{"image": str(png(tmp_path / "src" / f"{n}.png", n)), "label": "fu", "source": "generated",
                     "split": "train"} for n in range(3)])
    before = (ds / "manifest.csv").read_text()
    case = png(tmp_path / "case.png", 7)
    world = world_of(tmp_path, [], [], ds)

    grown = with_labelled(world, [{"image": str(case), "label": "not_fu", "source": "human", "split": "train"}],
                          tmp_path / "round2")

    assert (ds / "manifest.csv").read_text() == before  # the original dataset gained nothing
    rows = read_manifest(grown.data_dir)
    assert sorted(r["label"] for r in rows) == ["fu", "fu", "fu", "not_fu"]
    kept = [r for r in rows if r["label"] == "fu"][0]["path"]
    assert (grown.data_dir / kept).stat().st_ino == (ds / kept).stat().st_ino  # hard links, not copies
    assert grown.work == tmp_path / "round2" / "fine-tune" and grown.champion == world.champion

    again = with_labelled(world, [], tmp_path / "round2")  # the next seed starts from the world's dataset again
    assert len(read_manifest(again.data_dir)) == 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize("world, budget", [("selection", 60.0), ("bench", 60.0)])
def test_each_world_runs_at_its_own_budget_unless_told(world, budget, tmp_path, monkeypatch):
    """The selection world at the flow's default minute; the bench's world at the bench's budget."""
    import bench.second_round as second_round

    calls = []

    def fake_run(world_name, seeds, budget_s, held_out_n, bench_results, badcase_copies):
        calls.append((world_name, seeds, budget_s, bench_results, badcase_copies))
        median = {r: {"new_class_recall": 0.0, "max_old_class_drop_pts": 0.0} for r in ("round1", "round2")}
        return {"world": world_name, "clean_set": "c", "held_out_merchant": 0, "regression_images": 0,
                "budget_s": budget_s, "draws": [], "median": median}

    monkeypatch.setattr(second_round, "run", fake_run)
    out = tmp_path / "out.json"
    second_round.main(["--world", world, "--seeds", "3,4", "--bench-results", str(tmp_path / "b.json"),
                       "--out", str(out)])
    second_round.main(["--world", world, "--budget-s", "10", "--out", str(out)])

    assert calls[0] == (world, [3, 4], pytest.approx(budget), tmp_path / "b.json", 1)
    assert calls[1][2] == 10.0
    assert out.is_file()


@pytest.mark.timeout(30)
def test_repeated_badcases_are_appended_copies_and_nothing_else_changes():
    import torch

    from bench.second_round import repeated
    from tasks.data.loading import TensorSplit

    images = torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    split = TensorSplit(images, torch.tensor([0, 1, 1, 0]), ["fu", "not_fu"],
                        ["/d/train/fu/a.png", "/d/train/not_fu/b.png", "/d/train/not_fu/c.png", "/d/train/fu/d.png"])

    grown = repeated(split, {"train/not_fu/c.png"}, 3)

    assert len(grown) == 6 and grown.paths[4:] == ["/d/train/not_fu/c.png"] * 2
    assert grown.labels.tolist() == [0, 1, 1, 0, 1, 1]
    assert torch.equal(grown.images[4], images[2]) and torch.equal(grown.images[:4], images)
    assert repeated(split, {"train/not_fu/c.png"}, 1) is split
    assert repeated(split, {"train/not_fu/zz.png"}, 5) is split  # names no image of the split
    assert len(repeated(split, {"not_fu/b.png"}, 2)) == 5  # matched on whole path components
    assert repeated(split, {"u/b.png"}, 2) is split
