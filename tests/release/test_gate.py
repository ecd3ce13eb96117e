"""Gate decisions on constructed metric sets: each check can fail alone, and a clean challenger passes."""

from __future__ import annotations

import pytest

from tasks.release.gate import CandidateMetrics, GateConfig, GateReport, evaluate_gate

CONFIG = GateConfig(overall_margin=0.0, class_margin=0.02, new_class="fu_new", new_class_recall=0.9,
                    max_latency_ms=1.0, max_size_bytes=100_000)


def champion() -> CandidateMetrics:
    return CandidateMetrics(accuracy=0.95, per_class_recall={"fu": 0.96, "not_fu": 0.94}, latency_p50_ms=0.3,
                            latency_p95_ms=0.5, size_bytes=60_000, n_images=400, version="1")


def challenger(**changes) -> CandidateMetrics:
    """A challenger that passes every check against `champion()` under CONFIG, with `changes` applied."""
    metrics = CandidateMetrics(accuracy=0.96, per_class_recall={"fu": 0.95, "not_fu": 0.95, "fu_new": 0.92},
                               latency_p50_ms=0.35, latency_p95_ms=0.6, size_bytes=62_000, n_images=400,
                               version="2")
    return metrics.model_copy(update=changes)


def failed_names(report: GateReport) -> list[str]:
    return [check.name for check in report.failed]


def test_a_challenger_meeting_every_check_passes():
    report = evaluate_gate(challenger(), champion(), CONFIG)
    assert report.passed
    assert failed_names(report) == []
    names = [check.name for check in report.checks]
    assert names == ["accuracy", "recall[fu]", "recall[not_fu]", "new_class_recall[fu_new]", "latency_p95_ms",
                     "size_bytes"]
    assert report.summary == "gate passed: all 6 checks"


@pytest.mark.parametrize(
    ("changes", "failing"),
    [
        ({"accuracy": 0.94}, "accuracy"),  # worse than the champion overall, every class within its margin
        ({"per_class_recall": {"fu": 0.93, "not_fu": 0.95, "fu_new": 0.92}}, "recall[fu]"),  # 0.03 > 0.02
        ({"per_class_recall": {"fu": 0.95, "not_fu": 0.95, "fu_new": 0.85}}, "new_class_recall[fu_new]"),
        ({"latency_p95_ms": 1.2}, "latency_p95_ms"),
        ({"size_bytes": 120_000}, "size_bytes"),
        ({"per_class_recall": {"fu": 0.95, "fu_new": 0.92}}, "recall[not_fu]"),  # a champion class is gone
    ],
    ids=["overall-drop", "class-drop", "new-class-under-target", "latency", "size", "class-missing"],
)
def test_each_check_fails_alone(changes, failing):
    report = evaluate_gate(challenger(**changes), champion(), CONFIG)
    assert not report.passed
    assert failed_names(report) == [failing]
    assert failing in report.summary and report.summary.startswith("gate failed: 1 of")


def test_drops_within_the_margins_pass_and_the_edge_itself_passes():
    # Exactly at the limits: accuracy equal to the champion's, recall exactly 0.02 under, p95 at budget.
    edge = challenger(accuracy=0.95, per_class_recall={"fu": 0.94, "not_fu": 0.92, "fu_new": 0.9},
                      latency_p95_ms=1.0, size_bytes=100_000)
    assert evaluate_gate(edge, champion(), CONFIG).passed
    lenient = CONFIG.model_copy(update={"overall_margin": 0.02})
    assert evaluate_gate(challenger(accuracy=0.935), champion(), lenient).passed


def test_the_named_new_class_must_be_there():
    report = evaluate_gate(challenger(per_class_recall={"fu": 0.95, "not_fu": 0.95}), champion(), CONFIG)
    assert failed_names(report) == ["new_class_recall[fu_new]"]
    assert "not among the challenger's classes" in report.failed[0].detail


def test_an_unnamed_class_the_champion_lacks_is_judged_by_the_recall_target_only():
    config = CONFIG.model_copy(update={"new_class": None})
    metrics = challenger(per_class_recall={"fu": 0.95, "not_fu": 0.95, "fu_new": 0.5})
    report = evaluate_gate(metrics, champion(), config)
    assert failed_names(report) == ["new_class_recall[fu_new]"]
    assert "recall[fu_new]" not in [check.name for check in report.checks]  # no champion number to compare


def test_first_deployment_passes_the_comparisons_with_a_note_but_not_the_budgets():
    report = evaluate_gate(challenger(accuracy=0.5), None, CONFIG)
    assert report.passed
    assert [c.name for c in report.checks[:2]] == ["accuracy", "recall[*]"]
    assert all("first deployment" in check.detail for check in report.checks[:2])
    assert [c.name for c in report.checks[2:]] == ["new_class_recall[fu_new]", "latency_p95_ms", "size_bytes"]

    over = evaluate_gate(challenger(size_bytes=200_000, per_class_recall={"fu": 0.95, "fu_new": 0.5}), None, CONFIG)
    assert failed_names(over) == ["new_class_recall[fu_new]", "size_bytes"]


def test_several_failures_are_all_reported():
    report = evaluate_gate(challenger(accuracy=0.9, latency_p95_ms=2.0), champion(), CONFIG)
    assert failed_names(report) == ["accuracy", "latency_p95_ms"]
    assert report.summary == "gate failed: 2 of 6 checks (accuracy, latency_p95_ms)"


def test_the_report_round_trips_and_reads_as_a_table():
    report = evaluate_gate(challenger(latency_p95_ms=1.5), champion(), CONFIG)
    data = report.to_dict()
    assert data["passed"] is False
    assert data["checks"][0] == {"name": "accuracy", "value": 0.96, "op": ">=", "limit": 0.95, "passed": True,
                                 "detail": "champion 0.9500, margin 0.0"}
    assert data["champion"]["version"] == "1" and data["config"]["class_margin"] == 0.02
    assert GateReport.model_validate(data) == report

    table = report.table().splitlines()
    assert table[0].split() == ["check", "value", "limit", "result", "detail"]
    latency = next(line for line in table if line.startswith("latency_p95_ms"))
    assert latency.split()[:5] == ["latency_p95_ms", "1.5000", "<=", "1.0000", "FAIL"]
    assert table[-1] == report.summary


def test_metrics_become_version_tags():
    tags = challenger().to_tags()
    assert tags["metric.accuracy"] == "0.96" and tags["metric.recall.fu_new"] == "0.92"
    assert tags["metric.size_bytes"] == "62000" and tags["metric.n_images"] == "400"


def test_any_class_set_is_gated_without_a_negative_class():
    """A dataset outside the Fu world: checks are named after its own classes, nothing assumes not_fu."""
    shapes = {"circle": 0.9, "square": 0.88, "triangle": 0.93}
    held = CandidateMetrics(accuracy=0.9, per_class_recall=shapes, latency_p50_ms=0.3, latency_p95_ms=0.4,
                            size_bytes=40_000, version="1")
    worse = held.model_copy(update={"per_class_recall": {**shapes, "square": 0.8}, "version": "2"})
    report = evaluate_gate(worse, held, GateConfig(max_latency_ms=1.0, max_size_bytes=100_000))
    assert [c.name for c in report.checks][:4] == ["accuracy", "recall[circle]", "recall[square]", "recall[triangle]"]
    assert failed_names(report) == ["recall[square]"] and "not_fu" not in report.table()


# ------------------------------------------------------------------------- a class change (issue 13)
# A fast retrain adds `fu_merchant`, which refines `fu`. One fresh slice: 100 fu, 100 not_fu and
# 50 fu_merchant images; each model's decisions on it as a confusion (true class -> decision -> n).

SLICE = {"fu": 100, "not_fu": 100, "fu_merchant": 50}
MERCHANT = {"fu_merchant": "fu"}


def _metrics(confusion: dict[str, dict[str, int]], version: str, accuracy: float | None = None,
             **changes) -> CandidateMetrics:
    """Metrics of a model whose classes are the decisions it makes, from its confusion on SLICE."""
    for truth, row in confusion.items():
        assert sum(row.values()) == SLICE[truth], truth
    classes = changes.pop("classes", None) or sorted({d for row in confusion.values() for d in row if d})
    right = sum(row.get(truth, 0) for truth, row in confusion.items())
    return CandidateMetrics(
        accuracy=right / sum(SLICE.values()) if accuracy is None else accuracy,
        per_class_recall={c: confusion.get(c, {}).get(c, 0) / SLICE[c] for c in classes},
        latency_p50_ms=0.3, latency_p95_ms=0.5, size_bytes=60_000, n_images=sum(SLICE.values()), version=version,
        confusion=confusion, **changes,
    )


def two_class_champion(**changes) -> CandidateMetrics:
    """96 % on fu and not_fu; a merchant's 福 it calls `fu` (48 of 50): the answer it was built for."""
    return _metrics({"fu": {"fu": 96, "not_fu": 4}, "not_fu": {"not_fu": 96, "fu": 4},
                     "fu_merchant": {"fu": 48, "not_fu": 2}}, "1", classes=["fu", "not_fu"], **changes)


def three_class_challenger(shared_right: int = 96, merchant: dict[str, int] | None = None,
                           **changes) -> CandidateMetrics:
    wrong = 100 - shared_right
    return _metrics({"fu": {"fu": shared_right, "not_fu": wrong}, "not_fu": {"not_fu": shared_right, "fu": wrong},
                     "fu_merchant": merchant or {"fu_merchant": 46, "fu": 3, "not_fu": 1}}, "2",
                    classes=["fu", "fu_merchant", "not_fu"], **changes)


MERCHANT_CONFIG = CONFIG.model_copy(update={"new_class": "fu_merchant"})


def test_images_of_a_new_class_do_not_penalise_the_champion_into_a_pass():
    # 95 % on the shared classes against the champion's 96 %; over all 250 images the challenger
    # has 0.944 and the champion 0.768 (it cannot answer `fu_merchant`): an overall comparison passes.
    champion, challenger = two_class_champion(), three_class_challenger(shared_right=95)
    assert challenger.accuracy > champion.accuracy
    report = evaluate_gate(challenger, champion, MERCHANT_CONFIG)
    assert failed_names(report) == ["accuracy"]
    accuracy = report.checks[0]
    assert (accuracy.value, accuracy.limit) == (pytest.approx(0.95), pytest.approx(0.96))
    assert "on the 200 of 250 images of the classes both know (fu, not_fu)" in accuracy.detail
    # The same challenger on a par with the champion there passes.
    assert evaluate_gate(three_class_challenger(), champion, MERCHANT_CONFIG).passed


def test_images_of_a_new_class_do_not_fail_a_challenger_as_good_as_the_champion_on_the_rest():
    # The champion's reported accuracy counts its `fu` on merchant images right (0.968); the
    # challenger's counts the 10 % of them it misses (0.948). On the classes both know they tie.
    champion = two_class_champion(accuracy=(192 + 50) / 250)
    champion.confusion["fu_merchant"] = {"fu": 50}
    challenger = three_class_challenger(merchant={"fu_merchant": 45, "fu": 5})
    assert challenger.accuracy < champion.accuracy
    report = evaluate_gate(challenger, champion, MERCHANT_CONFIG.model_copy(update={"refines": MERCHANT}))
    assert report.passed, report.table()
    names = [check.name for check in report.checks]
    assert names == ["accuracy", "recall[fu]", "recall[not_fu]", "new_class_recall[fu_merchant]",
                     "parent_recall[fu_merchant->fu]", "latency_p95_ms", "size_bytes"]
    assert report.checks[0].value == pytest.approx(0.96) == report.checks[0].limit
    parent = report.checks[4]
    assert (parent.value, parent.limit) == (pytest.approx(1.0), pytest.approx(0.98))


@pytest.mark.parametrize("where", ["config", "challenger metadata"])
def test_a_refined_class_the_challenger_now_rejects_fails_the_parent_check(where):
    # 90 % fu_merchant meets its target, but the other 10 % are now `not_fu`, where the champion
    # accepted 48 of 50 as `fu`: merchants' 福 that used to scan are refused.
    merchant = {"fu_merchant": 45, "not_fu": 5}
    config = MERCHANT_CONFIG.model_copy(update={"refines": MERCHANT if where == "config" else {}})
    challenger = three_class_challenger(merchant=merchant, refines=MERCHANT if where != "config" else {})
    report = evaluate_gate(challenger, two_class_champion(), config)
    assert failed_names(report) == ["parent_recall[fu_merchant->fu]"]
    check = report.failed[0]
    assert (check.value, check.limit) == (pytest.approx(0.9), pytest.approx(0.96 - 0.02))
    assert "champion answered 'fu' on 0.9600" in check.detail
    # Without a refinement map the new class has no parent: only its target judges it.
    plain = evaluate_gate(three_class_challenger(merchant=merchant), two_class_champion(), MERCHANT_CONFIG)
    assert plain.passed and not any(c.name.startswith("parent_recall") for c in plain.checks)


def test_a_plain_fu_called_fu_merchant_is_still_an_error_of_the_challenger():
    # Strict on the classes both know: 4 more `fu` images answered `fu_merchant` cost recall[fu].
    challenger = three_class_challenger(refines=MERCHANT)
    challenger.confusion["fu"] = {"fu": 92, "fu_merchant": 4, "not_fu": 4}
    challenger.per_class_recall["fu"] = 0.92
    report = evaluate_gate(challenger, two_class_champion(), MERCHANT_CONFIG)
    assert failed_names(report) == ["accuracy", "recall[fu]"]


def test_refinement_chains_reach_the_class_the_champion_knows():
    from saofu.refines import known_ancestor

    refines = {"fu_merchant_gold": "fu_merchant", "fu_merchant": "fu", "loop_a": "loop_b", "loop_b": "loop_a"}
    known = {"fu", "not_fu"}
    assert known_ancestor("fu_merchant_gold", known, refines) == "fu"
    assert known_ancestor("not_fu", known, refines) == "not_fu"
    assert known_ancestor("fu_other", known, refines) is None
    assert known_ancestor("loop_a", known, refines) is None  # a loop ends, unanswered


def test_a_slice_without_images_of_the_new_class_says_so():
    challenger = three_class_challenger()
    del challenger.confusion["fu_merchant"]
    challenger.per_class_recall["fu_merchant"] = 0.0
    champion = two_class_champion()
    del champion.confusion["fu_merchant"]
    report = evaluate_gate(challenger, champion, MERCHANT_CONFIG.model_copy(update={"refines": MERCHANT}))
    assert failed_names(report) == ["new_class_recall[fu_merchant]"]
    assert "the slice has no images of 'fu_merchant'" in report.failed[0].detail
    assert report.checks[0].value == pytest.approx(0.96)  # all images are of shared classes
    assert "images of the classes both know" not in report.checks[0].detail
