"""`python -m bench.fine_tune_epochs`: the rules it compares and how it refuses a bad config (no world built)."""

import pytest

pytestmark = pytest.mark.timeout(60)


def _epoch(n: int, val_drop: float, val_recall: float) -> dict:
    return {"epoch": n, "val_drop": val_drop, "val_recall": val_recall}


def test_the_strict_rule_is_the_rule_before_the_tolerance():
    from bench.fine_tune_epochs import strict_rule

    # An epoch passing the check: the most recall among those that pass, however sure a failing one is.
    epochs = [_epoch(1, 0.004, 0.93), _epoch(2, 0.012, 0.99), _epoch(3, 0.005, 0.95)]
    assert strict_rule(epochs, 0.005)["epoch"] == 3
    # None passing: the first that lost least, whatever the later ones' recall (what the tolerance mends).
    epochs = [_epoch(1, 0.0176, 0.953), _epoch(2, 0.0069, 0.938), _epoch(6, 0.0069 + 1e-12, 0.964)]
    assert strict_rule(epochs, 0.005)["epoch"] == 2


def test_the_table_gives_each_rule_its_medians_and_every_seed():
    from bench.fine_tune_epochs import format_table

    table = format_table({"rules": {
        "kept": {"new_class_recall": 0.965, "max_old_class_drop_pts": 0.59,
                 "draws": [(6, 0.957, 0.59), (9, 0.963, 0.69), (12, 0.965, 0.49)]},
        "strict": {"new_class_recall": 0.941, "max_old_class_drop_pts": 0.59,
                   "draws": [(2, 0.941, 0.78), (2, 0.925, 0.49), (8, 0.973, 0.59)]}}})
    kept, strict = table.splitlines()[1:]
    assert kept.startswith("kept") and "(0.965, 0.59)" in kept and "e9 (0.963, 0.69)" in kept
    assert strict.startswith("strict") and "e2 (0.925, 0.49)" in strict


@pytest.mark.parametrize("args, named", [(["{oops"], "Expecting"), (['{"old_weight": 3}'], "old_weight"),
                                         (["[1]"], "JSON object"), (["--seeds", "0,x"], "comma-separated integers")])
def test_a_bad_config_is_refused_before_a_world_is_prepared(args, named, capsys, monkeypatch):
    import bench.fine_tune_epochs as epochs

    def must_not_run(*a, **k):
        raise AssertionError("a world was prepared for a bad config")

    monkeypatch.setattr(epochs, "selection_world", must_not_run)
    with pytest.raises(SystemExit) as exit_:
        epochs.main(args)
    assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_the_recall_rule_is_the_grown_classifiers_keeper():
    from bench.fine_tune_epochs import recall_rule

    # Two images of 1,020 of tolerance: epoch 3 lost two more than epoch 2 and is more sure, so it is
    # kept; epoch 4 is surer still but three images over the fewest.
    n = 1020
    epochs = [_epoch(1, 12 / n, 0.95), _epoch(2, 6 / n, 0.94), _epoch(3, 8 / n, 0.96), _epoch(4, 9 / n, 0.97)]
    assert recall_rule(epochs, 0.005, 2 / n)["epoch"] == 3
    assert recall_rule(epochs, 0.01, 2 / n)["epoch"] == 4  # within a looser limit, recall alone decides
