"""Refinement groups decide at the threshold: a sure group with an unsure member answers its root."""

from __future__ import annotations

import numpy as np
import pytest

from saofu.refines import refined_decision, refinement_roots
from tasks.release.evaluation import ABSTAIN, decide, threshold_report

CLASSES = ["fu", "not_fu", "fu_merchant"]
REFINES = {"fu_merchant": "fu"}


def test_roots_follow_the_chain_to_the_highest_known_class():
    assert refinement_roots(CLASSES, REFINES) == [0, 1, 0]
    assert refinement_roots(CLASSES, {}) == [0, 1, 2]
    # a chain through a class the model lacks stops at the last known one; a loop does not hang
    assert refinement_roots(["a", "b", "c"], {"c": "b", "b": "x"}) == [0, 1, 1]
    assert refinement_roots(["a", "b"], {"a": "b", "b": "a"}) in ([1, 1], [0, 0], [1, 0])


@pytest.mark.timeout(10)
def test_a_sure_group_with_an_unsure_member_answers_the_root():
    roots = refinement_roots(CLASSES, REFINES)
    assert refined_decision([0.95, 0.03, 0.02], 0.9, roots) == (0, 0.95)  # sure on its own
    assert refined_decision([0.30, 0.05, 0.65], 0.9, roots) == (0, pytest.approx(0.95))  # a 福, which one unsure
    assert refined_decision([0.30, 0.15, 0.55], 0.9, roots) is None  # not even sure it is a 福
    assert refined_decision([0.05, 0.50, 0.45], 0.9, roots) is None  # not_fu has no group


def test_evaluation_decides_as_the_serving_app():
    probs = np.array([[0.95, 0.03, 0.02], [0.30, 0.05, 0.65], [0.30, 0.15, 0.55], [0.02, 0.96, 0.02]])
    roots = refinement_roots(CLASSES, REFINES)
    assert decide(probs, 0.9, None, roots).tolist() == [0, 0, ABSTAIN, 1]
    assert decide(probs, 0.9, 1, roots).tolist() == [0, 0, 1, 1]
    assert decide(probs, 0.9, 1).tolist() == [0, 1, 1, 1]  # without refinements: the old rule
    for i, p in enumerate(probs):
        sure = refined_decision(p.tolist(), 0.9, roots)
        assert (sure[0] if sure else 1) == decide(probs, 0.9, 1, roots)[i]
    labels = np.array([0, 2, 0, 1])
    report = threshold_report(probs, labels, CLASSES, 0.9, "not_fu", REFINES)
    assert report.per_class["fu"].recall == 0.5 and report.per_class["fu_merchant"].recall == 0.0
