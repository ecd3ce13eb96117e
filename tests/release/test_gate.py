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
