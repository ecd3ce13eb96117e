"""The release's paired view: images lost and won against the champion, McNemar's p, the lost images drawn."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest

from saofu.errors import SaofuError
from tasks.release.changes import (
    ClassChange,
    changes_table,
    class_changes,
    lost_rows,
    mcnemar_exact,
    release_changes,
)
from tasks.release.gallery import CELL_IMAGE_PX, PAD_PX, TITLE_PT
from tasks.release.report import evaluate_sets
from tests.deploy.test_canary_classes import BLUE, CHAMPION_W, GREEN, RED, YELLOW, colour_model
from tests.release.test_report import THRESHOLD, colour_split

pytestmark = pytest.mark.timeout(60)

# Logits = mean colour @ W (rows R, G, B). The champion (fu, not_fu) calls red and blue `fu`, green
# `not_fu`, and is unsure of yellow (falls back to not_fu). This challenger calls red and yellow `fu`,
# green `fu_merchant` and blue `not_fu`.
CLASSES = ["fu", "fu_merchant", "not_fu"]
CHALLENGER_W = [[0.1, 0, 0], [0.05, 0.1, 0], [0, 0, 0.1]]
IMAGES = ([(RED, "fu")] * 5 + [(YELLOW, "fu")] * 2  # both right; won (the champion fell back to not_fu)
          + [(GREEN, "not_fu")] * 3 + [(BLUE, "not_fu")]  # lost (now fu_merchant); won (the champion said fu)
          + [(GREEN, "fu_merchant")] * 2)  # a class the champion lacks: not compared


@pytest.fixture
def evaluated(tmp_path):
    champion = colour_model(tmp_path / "champion.onnx", ["fu", "not_fu"], CHAMPION_W)
    challenger = colour_model(tmp_path / "challenger.onnx", CLASSES, CHALLENGER_W, refines={"fu_merchant": "fu"})
    fresh = colour_split(IMAGES, CLASSES)
    reports = {label: {"sets": evaluate_sets(path, {"fresh": fresh}, THRESHOLD, "not_fu", tmp_path / label)}
               for label, path in (("challenger", challenger), ("champion", champion))}
    return reports, fresh


@pytest.mark.parametrize(("lost", "won"), [(6, 0), (0, 6), (10, 2), (3, 3), (1, 0), (40, 25), (0, 0)])
def test_mcnemar_exact_is_the_two_sided_binomial_test_on_the_changed_answers(lost, won):
    expected = 1.0 if lost + won == 0 else binomtest(min(lost, won), lost + won, 0.5).pvalue
    assert mcnemar_exact(lost, won) == pytest.approx(expected, rel=1e-12)
    assert mcnemar_exact(lost, won) == mcnemar_exact(won, lost)


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(SaofuError, match="counts of images"):
        mcnemar_exact(-1, 3)


def test_each_shared_class_gets_its_lost_and_won_images_and_the_gates_recall_difference(evaluated):
    reports, fresh = evaluated
    new, old = reports["challenger"]["sets"]["fresh"], reports["champion"]["sets"]["fresh"]
    changes = class_changes("fresh", fresh, new, old)
    assert changes == [
        ClassChange("fresh", "fu", images=7, champion_right=5, challenger_right=7, lost=0, won=2),
        ClassChange("fresh", "not_fu", images=4, champion_right=3, challenger_right=1, lost=3, won=1),
    ]
    # The paired counts add up to the rates the gate compares (each model's own recall at the threshold).
    for change in changes:
        recall_change = new["per_class"][change.cls]["recall"] - old["per_class"][change.cls]["recall"]
        assert change.change_pts == pytest.approx(100 * recall_change)
    assert changes[1].p_value == pytest.approx(binomtest(1, 4, 0.5).pvalue)
    # The lost images are the green not_fu ones, rows 7-9; the merchant images (the champion lacks the class) are not.
    assert lost_rows(fresh, new, old) == [7, 8, 9]


def test_the_lost_images_are_drawn_with_both_answers_and_the_table_names_every_class(evaluated, tmp_path):
    reports, fresh = evaluated
    changes, plots = release_changes(reports["challenger"], reports["champion"], {"fresh": fresh},
                                     ("challenger v2", "champion v1"), tmp_path / "changes")
    assert [p.name for p in plots] == ["lost_fresh.png"]
    with Image.open(plots[0]) as im:
        canvas = np.asarray(im.convert("RGB")).astype(int)
    # Three green tiles side by side across the middle of the montage's one row: the three lost images.
    middle = canvas[TITLE_PT + 2 * PAD_PX + CELL_IMAGE_PX // 2]
    green = (middle[:, 1] > 200) & (middle[:, 0] < 50) & (middle[:, 2] < 50)
    assert len(np.flatnonzero(np.diff(np.concatenate([[0], green.astype(int), [0]])) == 1)) == 3
    table = changes_table(changes)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:4]]
    assert rows[0] == ["fresh", "fu", "7", "5", "7", "0", "2", "+28.57", "0.5"]
    assert rows[1] == ["fresh", "not_fu", "4", "3", "1", "3", "1", "-50.00", "0.625"]
    assert "McNemar" in table and changes_table([]) == ""


def test_a_set_with_nothing_lost_still_gets_its_card(evaluated, tmp_path):
    reports, fresh = evaluated
    same = release_changes(reports["champion"], reports["champion"], {"fresh": fresh}, ("a", "b"), tmp_path)
    changes, plots = same
    assert all(c.lost == c.won == 0 and c.p_value == 1.0 for c in changes)
    with Image.open(plots[0]) as im:
        im.verify()


def test_evaluations_of_other_images_are_refused_by_name(evaluated):
    reports, fresh = evaluated
    new, old = reports["challenger"]["sets"]["fresh"], dict(reports["champion"]["sets"]["fresh"])
    old["decisions"] = old["decisions"][:-1]
    with pytest.raises(SaofuError, match="champion answered 12 images but the set has 13"):
        class_changes("fresh", fresh, new, old)
    del old["decisions"]
    with pytest.raises(SaofuError, match="champion's evaluation has no per-image decisions"):
        class_changes("fresh", fresh, new, old)
