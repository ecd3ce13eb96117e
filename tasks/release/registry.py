"""The MLflow model registry at the edge: lineage tags, the challenger/champion aliases, promotions.

Serving reads `models:/<name>@champion`; the release flow registers each candidate, points
`challenger` at it, runs the gate (`tasks.release.gate`) and then either promotes it or records the
failed gate on the version, leaving `champion` where it was.

Where the promotion history lives, and why there:

* The registered model's tag `saofu.promotions` holds the recent history as a JSON list, oldest
  first: sequence number, action (promote/rollback), new and previous champion, UTC time,
  reason, whether a gate passed, and the champion line (the versions a rollback walks back
  through, current last). It is one read for `promotion_history` and `rollback`, it sits on the
  model's page in the MLflow UI, and it lives in the registry itself, so it survives as long as
  the model does and needs no run. Registered-model tag values are a VARCHAR(5000) column on
  MLflow's SQL stores (SQLite ignores the length, PostgreSQL and MySQL do not), so the list is
  trimmed, oldest first, to fit: each record carries the whole champion line, so trimming old
  records never changes what `rollback` does.
* Gate reports do not fit that budget (one check per class), so each promotion's full record,
  gate report included, is also a tag `saofu.promotion.<seq>` on the promoted version, and the
  version's latest gate decision is `saofu.gate` (passed/failed) and `saofu.gate_report`.
  Model version tag values are TEXT (unbounded) since MLflow's migration bda7b8c39065. These
  are read back only for records that had a gate.

Two promotions of one model at the same moment would race on the history tag (read, append,
write); promotions are a release step run one at a time, so there is no lock.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, Field

from saofu.errors import SaofuError
from tasks import tracking

CHALLENGER = "challenger"
CHAMPION = "champion"

HISTORY_TAG = "saofu.promotions"
PROMOTION_TAG_PREFIX = "saofu.promotion."  # + seq, on the promoted version
GATE_TAG = "saofu.gate"
GATE_REPORT_TAG = "saofu.gate_report"

MAX_HISTORY_CHARS = 5000  # SqlRegisteredModelTag.value is String(5000)
MAX_HISTORY_RECORDS = 50
MAX_CHAMPION_LINE = 20  # how many rollbacks deep the history can go
MAX_REASON_CHARS = 500  # keeps one record well inside the history budget


class PromotionRecord(BaseModel):
    """One change of champion: a promotion, or a rollback to the champion before."""

    seq: int = Field(ge=1, description="position in this model's history, from 1")
    # manual: the champion alias was moved outside saofu (the MLflow UI, another client); recorded
    # when saofu next reads or changes the history (`reconcile`)
    action: Literal["promote", "rollback", "manual"]
    version: str = Field(description="the champion from this change on")
    previous: str | None = Field(description="the champion before it (None: there was none)")
    champions: list[str] = Field(description="the champion line after the change, oldest first, `version` last")
    time: datetime  # UTC
    reason: str
    gate_passed: bool | None = None  # None: promoted without a gate (a manual promotion, a rollback)
    gate_report: dict[str, Any] | None = None  # kept on the version's tag, not in the history tag


def lineage_tags(data_version: str | None, prefect_flow_run_id: str | None, parent_version: str | None,
                 arch: str) -> dict[str, str]:
    """The lineage tags every candidate version carries ("" where there is none, e.g. no parent yet).

    Args:
        data_version: the DVC data version it was trained on.
        prefect_flow_run_id: the Prefect flow run that produced it.
        parent_version: the registered version it was fine-tuned from or is meant to replace.
        arch: its architecture string (enough, with the class map, to rebuild it).
    """
    values = {"data_version": data_version, "prefect_flow_run_id": prefect_flow_run_id,
              "parent_version": parent_version, "arch": arch}
    return {key: "" if value is None else str(value) for key, value in values.items()}


def _client() -> MlflowClient:
    return tracking.client()  # the project's store (or MLFLOW_TRACKING_URI), registry included


def _not_found(error: MlflowException) -> bool:
    return error.error_code == "RESOURCE_DOES_NOT_EXIST"


def _registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if _not_found(error):
            raise SaofuError(f"registered model not found: {name!r}") from error
        raise


def _require_version(client: MlflowClient, name: str, version: str | int) -> str:
    """The version as MLflow's string, or a SaofuError naming what does not exist."""
    _registered_model(client, name)
    try:
        return str(client.get_model_version(name, str(version)).version)
    except MlflowException as error:
        if _not_found(error):
            raise SaofuError(f"model version not found: {name!r} version {version}") from error
        raise


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    version = _registered_model(client, name).aliases.get(alias)
    return None if version is None else str(version)


def current_champion(name: str) -> str | None:
    """The version `champion` points at, or None before the first promotion."""
    return _alias(_client(), name, CHAMPION)


def current_challenger(name: str) -> str | None:
    """The version `challenger` points at, or None."""
    return _alias(_client(), name, CHALLENGER)


def set_challenger(name: str, version: str | int) -> None:
    """Point `challenger` at a registered version (the candidate the gate is about to judge)."""
    client = _client()
    client.set_registered_model_alias(name, CHALLENGER, _require_version(client, name, version))


def _read_history(client: MlflowClient, name: str) -> list[PromotionRecord]:
    raw = _registered_model(client, name).tags.get(HISTORY_TAG)
    if not raw:
        return []
    return [PromotionRecord.model_validate(item) for item in json.loads(raw)]


def _write_history(client: MlflowClient, name: str, history: list[PromotionRecord]) -> None:
    """Store the newest records that fit the tag's budget (each carries the whole champion line)."""
    items = [record.model_dump(mode="json", exclude={"gate_report"}) for record in history[-MAX_HISTORY_RECORDS:]]
    text = json.dumps(items, separators=(",", ":"))
    while len(text) > MAX_HISTORY_CHARS and len(items) > 1:
        items.pop(0)
        text = json.dumps(items, separators=(",", ":"))
    client.set_registered_model_tag(name, HISTORY_TAG, text)


def _champion_line(history: list[PromotionRecord], champion: str | None) -> list[str]:
    """The line after a move to `champion`: a version already on the line is a step back to it (the
    line ends there, as after rollbacks); any other version goes on top."""
    line = list(history[-1].champions) if history else []
    if champion is None or (line and line[-1] == champion):
        return line
    if champion in line:
        return line[:line.index(champion) + 1]
    return [*line, champion][-MAX_CHAMPION_LINE:]


def reconcile(name: str) -> PromotionRecord | None:
    """Record a move of `champion` made outside saofu as a manual promotion; None when there was none.

    A person moving the alias in the MLflow UI is a real change of what serves; unrecorded, a
    later `rollback` would walk the line as it was before the move (back to the version the
    person just took out of service). MLflow keeps no time of an alias move, so the record's time
    is when saofu noticed it; `promote`, `rollback` and `promotion_history` all reconcile first.
    """
    client = _client()
    history = _read_history(client, name)
    live = _alias(client, name, CHAMPION)
    recorded = history[-1].version if history else None
    if live is None or live == recorded:
        return None
    record = PromotionRecord(
        seq=history[-1].seq + 1 if history else 1, action="manual", version=live, previous=recorded,
        champions=_champion_line(history, live), time=datetime.now(UTC),
        reason=f"champion moved outside saofu (e.g. in the MLflow UI): version {recorded or 'none'} -> {live}",
    )
    client.set_model_version_tag(name, live, f"{PROMOTION_TAG_PREFIX}{record.seq}", record.model_dump_json())
    _write_history(client, name, [*history, record])
    return record


def _check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise SaofuError("a promotion needs a reason: say why this version should serve")
    if len(reason) > MAX_REASON_CHARS:
        raise SaofuError(f"reason is {len(reason)} characters, over {MAX_REASON_CHARS}; "
                         "put the details in the gate report")
    return reason


def _record(client: MlflowClient, name: str, history: list[PromotionRecord], record: PromotionRecord) -> None:
    """Move `champion`, then write the record on the version and append it to the model's history.

    The alias moves first because it is what serving reads; should a write after it fail, the
    next promotion or rollback finds the live champion above the recorded line and takes it in.
    """
    client.set_registered_model_alias(name, CHAMPION, record.version)
    client.set_model_version_tag(name, record.version, f"{PROMOTION_TAG_PREFIX}{record.seq}",
                                 record.model_dump_json())
    _write_history(client, name, [*history, record])


def record_gate_decision(name: str, version: str | int, report: Mapping[str, Any]) -> None:
    """Record a gate's report on the version it judged (`GateReport.to_dict()`); aliases stay as they are.

    The release flow calls this for a failing gate; `promote` calls it for the passing one.
    """
    client = _client()
    _tag_gate(client, name, _require_version(client, name, version), report)


def _tag_gate(client: MlflowClient, name: str, version: str, report: Mapping[str, Any]) -> None:
    if "passed" not in report:
        raise SaofuError("a gate report must say whether it passed (pass GateReport.to_dict())")
    client.set_model_version_tag(name, version, GATE_TAG, "passed" if report["passed"] else "failed")
    client.set_model_version_tag(name, version, GATE_REPORT_TAG, json.dumps(dict(report)))


def promote(name: str, version: str | int, reason: str, gate_report: Mapping[str, Any] | None = None
            ) -> PromotionRecord:
    """Make `version` the champion and record why (with the gate's report when a gate judged it).

    Args:
        gate_report: `GateReport.to_dict()` of the passing gate; None for a manual promotion.

    Raises:
        SaofuError: unknown model or version, a blank reason, a failing gate report, or the
            version is the champion already.
    """
    reason = _check_reason(reason)
    client = _client()
    version = _require_version(client, name, version)
    reconcile(name)
    if gate_report is not None and not gate_report.get("passed", False):
        raise SaofuError(f"{name!r} version {version} failed its gate; record it with record_gate_decision, "
                         "the champion stays")
    previous = _alias(client, name, CHAMPION)
    if previous == version:
        raise SaofuError(f"{name!r} version {version} is the champion already")
    history = _read_history(client, name)
    line = [*_champion_line(history, previous), version][-MAX_CHAMPION_LINE:]
    record = PromotionRecord(
        seq=history[-1].seq + 1 if history else 1, action="promote", version=version, previous=previous,
        champions=line, time=datetime.now(UTC), reason=reason,
        gate_passed=None if gate_report is None else True,
        gate_report=None if gate_report is None else dict(gate_report),
    )
    if gate_report is not None:
        _tag_gate(client, name, version, gate_report)
    _record(client, name, history, record)
    # `challenger` names a candidate still to be judged; once it serves, it is the champion.
    if _alias(client, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    return record


def rollback(name: str, reason: str = "rollback") -> PromotionRecord:
    """Put back the champion before the current one, in one step, and record it.

    Rolling back again goes one further back (v1 -> v2 -> v3, rollback: v2, rollback: v1).

    Raises:
        SaofuError: there is no champion, or no earlier champion to go back to (aliases untouched).
    """
    reason = _check_reason(reason)
    client = _client()
    current = _alias(client, name, CHAMPION)
    if current is None:
        raise SaofuError(f"{name!r} has no champion to roll back from; promote a version instead")
    reconcile(name)
    history = _read_history(client, name)
    line = _champion_line(history, current)
    if len(line) < 2:
        raise SaofuError(f"{name!r} has no earlier champion to roll back to (champion: version {current})")
    target = line[-2]
    try:
        client.get_model_version(name, target)
    except MlflowException as error:
        if _not_found(error):
            raise SaofuError(f"{name!r} version {target}, the champion before {current}, no longer exists; "
                             "promote a version instead") from error
        raise
    record = PromotionRecord(
        seq=history[-1].seq + 1 if history else 1, action="rollback", version=target, previous=current,
        champions=line[:-1], time=datetime.now(UTC), reason=reason,
    )
    _record(client, name, history, record)
    return record


def promotion_history(name: str) -> list[PromotionRecord]:
    """The recorded changes of champion, oldest first (the most recent ones: see the module docstring)."""
    client = _client()
    reconcile(name)
    history = _read_history(client, name)
    for record in history:
        if record.gate_passed is None:
            continue
        try:
            tags = client.get_model_version(name, record.version).tags
        except MlflowException as error:
            if _not_found(error):
                continue  # the version was deleted since; its record stays without the report
            raise
        full = tags.get(f"{PROMOTION_TAG_PREFIX}{record.seq}")
        if full:
            record.gate_report = PromotionRecord.model_validate_json(full).gate_report
    return history
