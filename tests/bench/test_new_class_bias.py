"""`python -m bench.new_class_bias`: the re-decision under a lowered new-class logit (no world built)."""

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(60)


def test_shifting_the_probabilities_is_subtracting_from_the_new_logits():
    from bench.new_class_bias import shift_new_classes

    logits = np.random.default_rng(0).normal(0, 3, (50, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    shifted = logits - np.array([0.0, 0.0, 1.25])
    assert np.allclose(shift_new_classes(probs, [2], 1.25), np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True))
    assert np.allclose(shift_new_classes(probs, [2], 0.0), probs)


def test_a_lower_new_logit_only_wins_old_images_and_only_loses_new_ones():
    from bench.fine_tune_selection import decided_right
    from bench.new_class_bias import shift_new_classes

    classes = ["fu", "not_fu", "fu_merchant"]  # fu_merchant refines fu; not_fu is the fallback
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 4, (400, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 3, 400)
    right = [decided_right(shift_new_classes(probs, [2], b), labels, classes) for b in (0.0, 1.0, 3.0)]
    old_not_fu, new = labels == 1, labels == 2
    for before, after in zip(right, right[1:]):
        assert not (before & ~after)[old_not_fu].any()  # a not_fu image right stays right
        assert not (~before & after)[new].any()  # a merchant image wrong stays wrong
    assert right[2][old_not_fu].sum() > right[0][old_not_fu].sum()  # and the shift did move answers
    assert right[2][new].sum() < right[0][new].sum()


def test_the_table_has_a_row_per_bias():
    from bench.new_class_bias import format_table

    table = format_table({"median": [
        {"bias": 0.0, "new_class_recall": 0.969, "max_old_class_drop_pts": 0.78, "val_merchant_recall": 0.973},
        {"bias": 0.75, "new_class_recall": 0.951, "max_old_class_drop_pts": 0.69, "val_merchant_recall": 0.948}]})
    rows = table.splitlines()[1:]
    assert rows[0].split() == ["0.00", "-", "0.969", "0.78", "0.973"] and rows[1].split()[:4] == ["0.75", "-", "0.951",
                                                                                               "0.69"]
    gated = format_table({"median": [{"bias": 0.0, "parent_gate": 0.99, "new_class_recall": 0.945,
                                      "max_old_class_drop_pts": 0.69, "val_merchant_recall": 0.948}]})
    assert gated.splitlines()[1].split() == ["0.00", "0.99", "0.945", "0.69", "0.948"]


def test_the_parent_gate_answers_as_the_base_where_it_is_sure_of_another_class():
    from bench.new_class_bias import gate_to_parent

    classes = ["fu", "not_fu", "fu_merchant"]  # fu_merchant (column 2) refines fu (column 0)
    logits = np.random.default_rng(2).normal(0, 4, (300, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    base = np.exp(logits[:, :2]) / np.exp(logits[:, :2]).sum(1, keepdims=True)  # the champion's own softmax
    gated = gate_to_parent(probs, 2, [2], [classes.index("fu")], 0.9)
    sure_not_fu = base[:, 1] >= 0.9
    assert sure_not_fu.any() and (~sure_not_fu).any()
    assert np.allclose(gated[sure_not_fu], np.c_[base[sure_not_fu], np.zeros(sure_not_fu.sum())])
    assert np.allclose(gated[~sure_not_fu], probs[~sure_not_fu])  # elsewhere untouched
    assert np.allclose(gated.sum(1), 1.0)


def test_bad_seeds_are_refused_before_a_world_is_prepared(capsys, monkeypatch):
    import bench.new_class_bias as probe

    def must_not_run(*a, **k):
        raise AssertionError("a world was prepared for bad seeds")

    monkeypatch.setattr(probe, "bench_world", must_not_run)
    with pytest.raises(SystemExit) as exit_:
        probe.main(["--seeds", "0,x"])
    assert exit_.value.code == 2 and "--seeds" in capsys.readouterr().err


def test_a_redecision_lowers_the_logit_first_and_then_gates():
    from bench.new_class_bias import gate_to_parent, redecided, shift_new_classes

    logits = np.random.default_rng(3).normal(0, 4, (200, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.allclose(redecided(probs, [2], 1.0, None, 2, [0]), shift_new_classes(probs, [2], 1.0))
    gated = redecided(probs, [2], 1.0, 0.9, 2, [0])
    assert np.allclose(gated, gate_to_parent(shift_new_classes(probs, [2], 1.0), 2, [2], [0], 0.9))
    assert not np.allclose(gated, shift_new_classes(probs, [2], 1.0))  # the gate closed somewhere
