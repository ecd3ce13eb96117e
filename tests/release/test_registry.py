"""The registry against a real local MLflow store: promotions are recorded, rollback restores the champion before.

Each test builds its own store (about 7 s of MLflow's schema migrations), so the scenarios are few and long.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from saofu.cli import app as cli
from saofu.errors import SaofuError
from saofu.settings import get_settings
from tasks.release import registry
from tasks.release.gate import CandidateMetrics, GateConfig, evaluate_gate
from tasks.tracking import finish_run, log_dict, start_run

MODEL = "shapes-recognizer"


def store() -> MlflowClient:
    uri = get_settings().tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_versions(n: int) -> list[str]:
    """`n` versions of MODEL, each a tiny artefact logged to its own run, tagged with its lineage."""
    client = store()
    versions = []
    for i in range(n):
        run_id = start_run("test-registry", f"candidate-{i}", params={}, tags={})
        log_dict(run_id, {"candidate": i}, "model/candidate.json")
        finish_run(run_id)
        if i == 0:
            client.create_registered_model(MODEL)
        tags = registry.lineage_tags(data_version=f"data-v{i}", prefect_flow_run_id=f"flow-{i}",
                                     parent_version=versions[-1] if versions else None, arch=f"stem8|ir{i}")
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        versions.append(str(client.create_model_version(MODEL, source, run_id=run_id, tags=tags).version))
    return versions


def gate_report(version: str, latency_p95_ms: float = 0.5) -> dict:
    metrics = CandidateMetrics(accuracy=0.9, per_class_recall={"circle": 0.9, "square": 0.9},
                               latency_p50_ms=0.3, latency_p95_ms=latency_p95_ms, size_bytes=50_000, version=version)
    return evaluate_gate(metrics, None, GateConfig()).to_dict()


def test_promotions_are_recorded_and_rollback_walks_back_one_champion_at_a_time(saofu_home):
    v1, v2, v3 = register_versions(3)
    tags = store().get_model_version(MODEL, v2).tags
    assert {k: tags[k] for k in ("data_version", "prefect_flow_run_id", "parent_version", "arch")} == {
        "data_version": "data-v1", "prefect_flow_run_id": "flow-1", "parent_version": v1, "arch": "stem8|ir1"}
    assert store().get_model_version(MODEL, v1).tags["parent_version"] == ""
    assert registry.current_champion(MODEL) is None

    started = datetime.now(UTC) - timedelta(seconds=1)
    registry.set_challenger(MODEL, v1)
    registry.promote(MODEL, v1, "first deployment", gate_report(v1))
    assert registry.current_challenger(MODEL) is None  # the challenger now serves: it is the champion
    registry.promote(MODEL, v2, "gate passed on slice 2", gate_report(v2))
    record = registry.promote(MODEL, v3, "hotfix, promoted by hand")
    assert (record.seq, record.version, record.previous, record.champions) == (3, v3, v2, [v1, v2, v3])
    assert registry.current_champion(MODEL) == v3
    assert store().get_model_version_by_alias(MODEL, registry.CHAMPION).version in (v3, int(v3))

    history = registry.promotion_history(MODEL)
    assert [(r.action, r.version, r.previous, r.reason) for r in history] == [
        ("promote", v1, None, "first deployment"),
        ("promote", v2, v1, "gate passed on slice 2"),
        ("promote", v3, v2, "hotfix, promoted by hand"),
    ]
    assert all(started <= r.time <= datetime.now(UTC) for r in history)
    assert [r.time for r in history] == sorted(r.time for r in history)
    assert [r.gate_passed for r in history] == [True, True, None]
    assert history[1].gate_report == gate_report(v2) and history[2].gate_report is None
    v2_tags = store().get_model_version(MODEL, v2).tags
    assert v2_tags["saofu.gate"] == "passed" and json.loads(v2_tags["saofu.gate_report"]) == gate_report(v2)
    # The model's page in the MLflow UI shows the history; it stays within the SQL stores' 5000 characters.
    assert len(store().get_registered_model(MODEL).tags["saofu.promotions"]) <= 5000

    back = registry.rollback(MODEL, reason="v3 crashes on old phones")
    assert (back.action, back.version, back.previous, back.champions) == ("rollback", v2, v3, [v1, v2])
    assert registry.current_champion(MODEL) == v2
    assert registry.promotion_history(MODEL)[-1].reason == "v3 crashes on old phones"

    assert registry.rollback(MODEL).version == v1  # one further back, not back to v3
    assert registry.current_champion(MODEL) == v1

    with pytest.raises(SaofuError, match="no earlier champion"):
        registry.rollback(MODEL)
    assert registry.current_champion(MODEL) == v1
    assert [(r.seq, r.action, r.version) for r in registry.promotion_history(MODEL)] == [
        (1, "promote", v1), (2, "promote", v2), (3, "promote", v3), (4, "rollback", v2), (5, "rollback", v1)]

    # After rolling back, a new promotion builds on the restored line.
    registry.promote(MODEL, v3, "fixed build of v3")
    assert registry.rollback(MODEL).version == v1


def test_a_failed_gate_leaves_the_champion_untouched(saofu_home):
    v1, v2 = register_versions(2)
    registry.promote(MODEL, v1, "first deployment", gate_report(v1))
    registry.set_challenger(MODEL, v2)

    failing = gate_report(v2, latency_p95_ms=3.0)
    assert failing["passed"] is False
    registry.record_gate_decision(MODEL, v2, failing)
    tags = store().get_model_version(MODEL, v2).tags
    assert tags["saofu.gate"] == "failed"
    assert json.loads(tags["saofu.gate_report"])["summary"] == "gate failed: 1 of 4 checks (latency_p95_ms)"
    assert registry.current_champion(MODEL) == v1
    assert registry.current_challenger(MODEL) == v2
    assert len(registry.promotion_history(MODEL)) == 1

    with pytest.raises(SaofuError, match="failed its gate"):  # a failing report cannot promote
        registry.promote(MODEL, v2, "try anyway", failing)
    assert registry.current_champion(MODEL) == v1
    assert len(registry.promotion_history(MODEL)) == 1

    # Mistakes a user can fix are named, and change nothing.
    with pytest.raises(SaofuError, match="is the champion already"):
        registry.promote(MODEL, v1, "again")
    with pytest.raises(SaofuError, match="needs a reason"):
        registry.promote(MODEL, v2, "  ")
    with pytest.raises(SaofuError, match="model version not found: 'shapes-recognizer' version 9"):
        registry.promote(MODEL, "9", "typo")
    with pytest.raises(SaofuError, match="registered model not found: 'nope'"):
        registry.current_champion("nope")
    assert registry.current_champion(MODEL) == v1

    # The champion moved by hand in the MLflow UI is taken in: rollback returns to the recorded one.
    store().set_registered_model_alias(MODEL, registry.CHAMPION, v2)
    back = registry.rollback(MODEL, reason="v2 was set by hand")
    assert (back.version, back.previous) == (v1, v2)
    assert registry.current_champion(MODEL) == v1

    store().delete_registered_model_alias(MODEL, registry.CHAMPION)
    with pytest.raises(SaofuError, match="no champion to roll back from"):
        registry.rollback(MODEL)
    assert registry.current_champion(MODEL) is None


@pytest.mark.timeout(120)
def test_a_champion_moved_back_by_hand_is_recorded_and_rollback_does_not_undo_it(saofu_home):
    v1, v2, v3 = register_versions(3)
    registry.promote(MODEL, v1, "first", gate_report(v1))
    registry.promote(MODEL, v2, "second", gate_report(v2))
    # A person moves `champion` back to v1 in the MLflow UI (an alias change, nothing else).
    store().set_registered_model_alias(MODEL, registry.CHAMPION, v1)

    history = registry.promotion_history(MODEL)
    manual = history[-1]
    assert (manual.seq, manual.action, manual.version, manual.previous) == (3, "manual", v1, v2)
    assert manual.champions == [v1] and "outside saofu" in manual.reason
    assert len(registry.promotion_history(MODEL)) == 3, "the same move was recorded twice"
    # Rolling back from v1 must not walk "back" to v2, the version the person took out of service.
    with pytest.raises(SaofuError, match="no earlier champion"):
        registry.rollback(MODEL)
    assert registry.current_champion(MODEL) == v1

    # A move by hand to a version never served goes on top of the line; rollback returns from it.
    store().set_registered_model_alias(MODEL, registry.CHAMPION, v3)
    assert registry.rollback(MODEL, reason="v3 by hand was wrong").version == v1
    assert [r.action for r in registry.promotion_history(MODEL)] == ["promote", "promote", "manual", "manual",
                                                                     "rollback"]
    shown = CliRunner().invoke(cli, ["history", MODEL])
    assert shown.exit_code == 0 and shown.output.count("manual") == 2 and "outside saofu" in shown.output


def test_the_history_tag_keeps_the_newest_records_that_fit():
    class Tags:
        def set_registered_model_tag(self, name, key, value):
            self.value = value

    line = [str(v) for v in range(1, registry.MAX_CHAMPION_LINE + 1)]
    records = [
        registry.PromotionRecord(seq=i, action="promote", version=line[-1], previous=line[-2], champions=line,
                                 time=datetime.now(UTC), reason="r" * registry.MAX_REASON_CHARS, gate_passed=True,
                                 gate_report={"checks": ["x" * 10_000]})
        for i in range(1, 31)
    ]
    tags = Tags()
    registry._write_history(tags, MODEL, records)
    kept = json.loads(tags.value)
    assert len(tags.value) <= registry.MAX_HISTORY_CHARS
    assert 1 <= len(kept) < 30 and kept[-1]["seq"] == 30  # oldest dropped first
    assert "gate_report" not in kept[-1] and kept[-1]["champions"] == line  # each keeps the whole line
