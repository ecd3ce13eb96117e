"""Deployments on a real Prefect server: schedules fire and complete, failures reach a webhook.

A real `prefect server start` subprocess (tests/integration/prefect_server.py, scheduler loop 2 s)
and an executor subprocess that serves two tiny flows of this module with
`serve(..., pause_on_shutdown=False)`, as `python -m flows.deployments` serves the real ones.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect import flow, task

from tests.integration.prefect_server import (  # noqa: F401 - fixtures
    REPO_ROOT,
    PrefectServer,
    free_port,
    prefect_api,
    prefect_server,
    prefect_server_on_postgres,
    stop_process_group,
)

pytestmark = pytest.mark.slow

TICK = "saofu-test-tick/tick"
BOOM = "saofu-test-boom/boom"
FLAKY = "saofu-test-flaky/flaky"


@flow(name="saofu-test-tick")
def tick(n: int = 1) -> int:
    return n + 1


@flow(name="saofu-test-boom")
def boom(reason: str = "on purpose") -> None:
    raise RuntimeError(f"boom: {reason}")


@task(persist_result=True)
def finished_step(log_file: str) -> str:
    with open(log_file, "a") as f:
        f.write("finished-step ran\n")
    return "done"


@flow(name="saofu-test-flaky")
def flaky(log_file: str = "", fail_once_marker: str = "") -> str:
    """A finished task, then a failure the first time: the retry must not run the task again."""
    result = finished_step(log_file)
    marker = Path(fail_once_marker)
    if not marker.exists():
        marker.write_text("failed once")
        raise RuntimeError("first attempt fails after its first task finished")
    return result


def serve_test_flows(interval_s: float) -> None:
    """The executor, built as flows/deployments.py serve_all builds it (Runner.add_flow, no pause on shutdown)."""
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    from flows.deployments import POLL_S

    runner = Runner(name="saofu-test", pause_on_shutdown=False, query_seconds=POLL_S)
    runner.add_flow(tick, name="tick", interval=timedelta(seconds=interval_s))
    runner.add_flow(boom, name="boom")
    runner.add_flow(flaky.with_options(retries=1, retry_delay_seconds=1), name="flaky")
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass


@contextmanager
def executor(server: PrefectServer, interval_s: float = 5) -> Iterator[subprocess.Popen]:
    log = server.home / f"executor-{time.time_ns()}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c",
             f"from tests.integration.test_deployments import serve_test_flows; serve_test_flows({interval_s})"],
            cwd=REPO_ROOT, env=server.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop_process_group(proc)
        print(log.read_text()[-4000:])


def _deployment(name: str, timeout_s: float = 90):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


def _wait_until_completed(run_id, timeout_s: float):
    """The flow run once it is Completed, or as it stands after `timeout_s` (the assertions say which)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state.is_completed() or time.monotonic() > deadline:
                return run
            time.sleep(1)


def _runs_of(deployment_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_short_interval_schedule_creates_runs_the_executor_completes_and_stopping_it_does_not_pause(
        database, request):
    """On both databases `saofu up --prefect-db` offers: the scheduler's queries differ by dialect
    (Prefect 3.8's created no runs on SQLAlchemy 2.1 without an error)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = request.getfixturevalue("prefect_server" if database == "sqlite" else "prefect_server_on_postgres")
    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        with executor(server, interval_s=5) as proc:
            dep = _deployment(TICK)
            assert not dep.paused
            assert [s.schedule.interval for s in dep.schedules] == [timedelta(seconds=5)]
            deadline = time.monotonic() + 180
            completed = []
            while time.monotonic() < deadline:
                assert proc.poll() is None, "the executor died"
                runs = _runs_of(dep.id)
                completed = [r for r in runs if r.state and r.state.is_completed()]
                if len(completed) >= 2:
                    break
                time.sleep(2)
            assert len(completed) >= 2, f"runs: {[(r.name, r.state_name) for r in runs]}"
            # created by the scheduler, not by hand, and executed by the executor with the default parameter
            assert all(r.auto_scheduled for r in completed)
            proc.send_signal(signal.SIGTERM)  # as `saofu down` stops it
            proc.wait(timeout=60)

        with get_client(sync_client=True) as client:
            after = client.read_deployment(dep.id)
            assert after.paused is False
            assert all(s.active for s in client.read_deployment_schedules(dep.id))
            # the scheduler keeps scheduling while no executor runs: runs wait instead of being lost
            time.sleep(4)
            waiting = [r for r in _runs_of(dep.id) if r.state and r.state.is_scheduled()]
            assert waiting


class _Listener:
    """An HTTP listener on a free loopback port that records every POST body."""

    def __init__(self) -> None:
        self.posts: list[str] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                posts.append(body.decode("utf-8", "replace"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.timeout(400)
def test_a_failed_flow_run_posts_to_the_webhook_through_a_server_automation(prefect_server, prefect_api):  # noqa: F811 - fixtures
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.notifications import AUTOMATION_NAME, FAILURE_EVENTS, ensure_failure_webhook

    with _Listener() as listener, executor(prefect_server, interval_s=3600):
        ensure_failure_webhook("http://127.0.0.1:9/not-this-one")
        _, automation_id = ensure_failure_webhook(listener.url)  # again, another URL: updated in place
        with get_client(sync_client=True) as client:
            assert len(client.read_automations_by_name(AUTOMATION_NAME)) == 1
        automation = Automation.read(id=automation_id)
        assert automation.enabled and set(automation.trigger.expect) == set(FAILURE_EVENTS)

        _deployment(BOOM)
        run = run_deployment(BOOM, parameters={"reason": "webhook test"}, timeout=0)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not any(str(run.name) in p for p in listener.posts):
            time.sleep(1)
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
        assert state is not None and state.is_failed(), state
        hits = [p for p in listener.posts if run.name in p]
        assert hits, f"no POST naming {run.name} within 150 s; got {listener.posts}"
        payload = json.loads(hits[0])
        assert payload["source"] == "saofu"
        assert str(run.id) in payload["text"] and "saofu-test-boom" in payload["text"]
        assert "Failed" in payload["subject"]


@pytest.mark.timeout(300)
def test_the_real_deployments_register_with_their_schedules_and_a_form_with_defaults(prefect_api, tmp_path):  # noqa: F811 - fixture
    from prefect.client.orchestration import get_client

    from flows.deployments import NAMES, NIGHTLY_CRON, deployments

    deps = deployments(dataset_dir=str(tmp_path / "labelled"), pool_dir=str(tmp_path / "pool"),
                       active_learning_interval=7, ingest_interval=timedelta(minutes=10))
    assert [d.name for d in deps] == list(NAMES)
    by_name = {d.name: d for d in deps}

    def schedules(d):
        return [getattr(s.schedule, "interval", None) or getattr(s.schedule, "cron", None) for s in d.schedules]

    assert schedules(by_name["active-learning"]) == [timedelta(seconds=7)]
    assert schedules(by_name["ingest"]) == [timedelta(minutes=10)]
    assert schedules(by_name["cycle"]) == [NIGHTLY_CRON]
    for on_demand in ("fast-retrain", "release", "search"):
        assert schedules(by_name[on_demand]) == []
    assert by_name["active-learning"].parameters["params"]["pool_dir"] == str(tmp_path / "pool")

    # the fast-retrain form: no required field anywhere, every field of its models has a default
    schema = by_name["fast-retrain"]._parameter_openapi_schema.model_dump()
    assert not schema.get("required")
    assert "default" in schema["properties"]["params"]  # the flow parameter itself defaults to FastRetrainParams()
    defs = schema.get("definitions") or schema.get("$defs") or {}
    prefilled = by_name["fast-retrain"].parameters["params"]  # what the UI's Custom run form starts from
    props = defs["FastRetrainParams"]["properties"]
    missing = [k for k, v in props.items() if "default" not in v and k not in prefilled]
    assert not missing, f"FastRetrainParams fields the form would leave empty: {missing}"
    assert prefilled["changes"] == [{"name": "fu_merchant", "kind": "new", "refines": "fu"}]
    assert all("default" in v for v in defs["ClassChange"]["properties"].values())
    assert not defs["FastRetrainParams"].get("required") and not defs["ClassChange"].get("required")
    cycle_defs = by_name["cycle"]._parameter_openapi_schema.model_dump()
    cycle_props = (cycle_defs.get("definitions") or cycle_defs.get("$defs"))["CycleParams"]["properties"]
    assert all("default" in v and "anyOf" not in v for v in cycle_props.values())

    # registered on the real server: six deployments, schedules active, none paused
    ids = [d.apply() for d in deps]
    with get_client(sync_client=True) as client:
        for dep_id, d in zip(ids, deps, strict=True):
            read = client.read_deployment(dep_id)
            assert read.name == d.name and read.paused is False
            assert len(read.schedules) == len(d.schedules)
            assert all(s.active for s in read.schedules)


@pytest.mark.timeout(60)
def test_every_fast_retrain_field_has_a_default_in_the_schema_itself():
    from flows.fast_retrain import FastRetrainParams

    props = FastRetrainParams.model_json_schema()["properties"]
    assert all("default" in v for v in props.values()), [k for k, v in props.items() if "default" not in v]


@pytest.mark.timeout(400)
def test_the_executor_entry_point_registers_all_six_and_the_failure_automation(
        prefect_server, prefect_api, tmp_path):  # noqa: F811 - fixtures
    """`python -m flows.deployments`, as `saofu up` starts it: SIGTERM leaves every schedule active."""
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.deployments import NAMES
    from flows.notifications import AUTOMATION_NAME

    with get_client(sync_client=True) as client:  # the server is shared: forget what earlier tests registered
        for name in NAMES:
            try:
                client.delete_deployment(client.read_deployment_by_name(f"{name}/{name}").id)
            except ObjectNotFound:
                pass
        for automation in client.read_automations_by_name(AUTOMATION_NAME):
            client.delete_automation(automation.id)
    env = prefect_server.env | {"SAOFU_HOME": str(tmp_path), "SAOFU_FAILURE_WEBHOOK": "http://127.0.0.1:9/hook"}
    log = tmp_path / "executor.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.deployments"], cwd=REPO_ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # each flow is named like its deployment: FLOW/DEPLOYMENT is NAME/NAME
        deps = {name: _deployment(f"{name}/{name}", timeout_s=180) for name in NAMES}
        assert Automation.read(name=AUTOMATION_NAME).enabled
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        stop_process_group(proc)
    with get_client(sync_client=True) as client:
        for name, dep in deps.items():
            read = client.read_deployment(dep.id)
            assert read.paused is False, name
            assert all(s.active for s in read.schedules), name
        assert [s.schedule.cron for s in client.read_deployment(deps["cycle"].id).schedules] == ["0 2 * * *"]


@pytest.mark.timeout(400)
def test_a_failed_run_resumes_through_its_retry_without_redoing_a_finished_task(
        prefect_server, prefect_api, tmp_path):  # noqa: F811 - fixtures
    from prefect.deployments import run_deployment

    log_file, marker = tmp_path / "steps.log", tmp_path / "failed-once"
    with executor(prefect_server, interval_s=3600):
        _deployment(FLAKY)
        run = run_deployment(FLAKY, parameters={"log_file": str(log_file), "fail_once_marker": str(marker)},
                             timeout=240)
        # run_deployment polls every few seconds and may return on a state it saw between the failed
        # attempt and its retry: the executor stays up until the run itself says it is over.
        run = _wait_until_completed(run.id, timeout_s=240)
    assert marker.exists(), "the first attempt never ran"
    assert run.state.is_completed(), run.state
    assert run.run_count == 2  # failed once, retried once
    assert log_file.read_text().count("finished-step ran") == 1  # the retry reused the persisted result
