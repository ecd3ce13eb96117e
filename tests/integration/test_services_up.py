"""`saofu up` / `status` / `down` as a user runs them: the installed `saofu`, from a project folder.

Real servers on loopback (the Prefect server, the executor of the deployments, the MLflow server,
the serving app) on free ports, SAOFU_HOME unset so the current folder is the project. Every
test stops what it started, even when it fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SAOFU = str(Path(sys.executable).with_name("saofu"))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SAOFU_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME")}
    env["SAOFU_LABELSTUDIO_VENV"] = os.environ.get("SAOFU_LABELSTUDIO_VENV") or str(
        Path(__file__).resolve().parents[2] / ".saofu" / "labelstudio-venv")
    return env


def saofu(project: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([SAOFU, *args], cwd=project, env=_env(), capture_output=True, text=True, timeout=timeout)


def get(url: str) -> tuple[int, dict | str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            code, body = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read().decode()
    try:
        return code, json.loads(body)
    except ValueError:
        return code, body


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def project(tmp_path) -> Path:
    """An empty project folder; whatever `saofu up` started in it is stopped at the end."""
    folder = tmp_path / "project"
    folder.mkdir()
    yield folder
    saofu(folder, "down", timeout=120)


@pytest.mark.timeout(900)
def test_up_prefect_mlflow_serving_then_status_then_down(project):
    ports = {"prefect": free_port(), "mlflow": free_port(), "serving": free_port()}
    up = saofu(project, "up", "prefect", "mlflow", "serving", "--json", "--prefect-port", str(ports["prefect"]),
               "--mlflow-port", str(ports["mlflow"]), "--serving-port", str(ports["serving"]))
    assert up.returncode == 0, up.stderr[-3000:]
    services = json.loads(up.stdout)["services"]
    assert set(services) == {"prefect", "mlflow", "serving"}
    for name, port in ports.items():
        assert services[name]["url"] == f"http://127.0.0.1:{port}"
        assert Path(services[name]["log"]).parent == project / ".saofu"  # the cwd is the project
        assert pid_alive(services[name]["pid"])

    assert get(f"{services['prefect']['url']}/api/health")[0] == 200
    assert get(f"{services['prefect']['url']}/")[0] == 200  # the UI
    assert get(f"{services['mlflow']['url']}/health")[0] == 200
    assert (project / "mlflow" / "mlflow.db").is_file()  # the project's store, created by the server
    code, health = get(f"{services['serving']['url']}/healthz")
    assert code == 503 and health["status"] == "no-champion", health
    req = urllib.request.Request(f"{services['serving']['url']}/predict", data=b"\x89PNG", method="POST",
                                 headers={"content-type": "image/png"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 503
    assert "no model is promoted yet" in json.loads(refused.value.read())["error"]

    status = saofu(project, "status", "--json", timeout=120)
    assert status.returncode == 0, status.stderr
    listed = json.loads(status.stdout)["services"]
    for name in ports:
        assert listed[name]["running"] and listed[name]["healthy"], listed[name]
        assert listed[name]["pid"] == services[name]["pid"] and listed[name]["since"]
    assert not listed["labeling"]["running"] and not listed["executor"]["running"]

    again = saofu(project, "up", "prefect", "--json")  # its port remembered, not restarted
    assert again.returncode == 0, again.stderr[-2000:]
    prefect = json.loads(again.stdout)["services"]["prefect"]
    assert prefect["already_up"] and prefect["pid"] == services["prefect"]["pid"]

    down = saofu(project, "down", "--json", timeout=120)
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout)["services"] == {
        "serving": True, "labeling": False, "mlflow": True, "executor": False, "prefect": True}
    for name, port in ports.items():
        assert not pid_alive(services[name]["pid"]), name
        assert port_free(port), f"{name}'s port {port} still answers"
    after = json.loads(saofu(project, "status", "--json", timeout=120).stdout)["services"]
    assert not any(s["running"] for s in after.values())


@pytest.mark.timeout(600)
def test_a_busy_mlflow_port_is_one_line_and_prefect_keeps_running(project):
    prefect_port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        mlflow_port = busy.getsockname()[1]
        up = saofu(project, "up", "prefect", "mlflow", "--prefect-port", str(prefect_port),
                   "--mlflow-port", str(mlflow_port))
        assert up.returncode != 0
        errors = [line for line in up.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: mlflow: port {mlflow_port} on 127.0.0.1 is in use (another process); "
                          "pick another with --mlflow-port"], up.stderr[-2000:]
        assert "Traceback" not in up.stderr
    listed = json.loads(saofu(project, "status", "--json", timeout=120).stdout)["services"]
    assert listed["prefect"]["healthy"], listed["prefect"]  # what was up keeps running
    assert not listed["mlflow"]["running"]
    assert get(f"http://127.0.0.1:{prefect_port}/api/health")[0] == 200


@pytest.mark.timeout(600)
@pytest.mark.skipif(importlib.util.find_spec("flows.deployments") is None, reason="flows/deployments.py not there yet")
def test_the_executor_serves_the_deployments_on_the_prefect_server(project):
    prefect_port = free_port()
    missing = saofu(project, "up", "executor")
    assert missing.returncode != 0
    assert "error: executor: the Prefect server is not running" in missing.stderr

    up = saofu(project, "up", "prefect", "executor", "--json", "--prefect-port", str(prefect_port))
    assert up.returncode == 0, up.stderr[-3000:]
    services = json.loads(up.stdout)["services"]
    assert services["executor"]["url"] == services["prefect"]["url"] == f"http://127.0.0.1:{prefect_port}"
    req = urllib.request.Request(f"http://127.0.0.1:{prefect_port}/api/deployments/filter", data=b"{}",
                                 method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        names = {d["name"] for d in json.loads(resp.read())}
    assert {"fast-retrain", "release"} <= names, names

    down = saofu(project, "down", "executor", "--json", timeout=120)
    assert json.loads(down.stdout)["stopped"] is True
    assert not pid_alive(services["executor"]["pid"])
    listed = json.loads(saofu(project, "status", "--json", timeout=120).stdout)["services"]
    assert listed["prefect"]["healthy"] and not listed["executor"]["running"]
    with urllib.request.urlopen(req, timeout=10) as resp:  # stopping the executor paused no schedule
        paused = [d["name"] for d in json.loads(resp.read()) if d.get("paused")]
    assert paused == []


@pytest.mark.timeout(900)
@pytest.mark.skipif(importlib.util.find_spec("flows.deployments") is None, reason="flows/deployments.py not there yet")
def test_up_with_no_name_starts_all_five_with_label_studio_s_login(project):
    ports = {name: free_port() for name in ("prefect", "mlflow", "labeling", "serving")}
    options = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    up = saofu(project, "up", "--json", *options, timeout=800)
    assert up.returncode == 0, up.stderr[-3000:]
    services = json.loads(up.stdout)["services"]
    assert list(services) == ["prefect", "executor", "mlflow", "labeling", "serving"]
    for name, port in ports.items():
        assert services[name]["url"] == f"http://127.0.0.1:{port}"
    assert services["executor"]["url"] == services["prefect"]["url"]
    login = services["labeling"]["login"]  # the password is never printed: the 0600 file holding it is named
    assert login["username"] and "password" not in login and "password" not in services["labeling"]
    assert os.stat(login["file"]).st_mode & 0o777 == 0o600 and json.loads(Path(login["file"]).read_text())["password"]
    assert get(f"{services['labeling']['url']}/health")[0] == 200

    listed = json.loads(saofu(project, "status", "--json", timeout=120).stdout)["services"]
    assert all(s["healthy"] for s in listed.values()), listed

    human = saofu(project, "status", timeout=120)
    for name in services:
        assert name in human.stdout

    down = saofu(project, "down", "--json", timeout=180)
    assert set(json.loads(down.stdout)["services"].items()) == {(name, True) for name in services}
    for name, info in services.items():
        assert not pid_alive(info["pid"]), name
    for name, port in ports.items():
        assert port_free(port), name


@pytest.fixture
def enterable_project(tmp_path) -> Path:
    """A project folder PostgreSQL's OS user can enter (as root the server runs as `postgres`, and
    pytest's folders are 0700 root); stopped and removed at the end."""
    folder = Path(tempfile.mkdtemp(prefix="saofu-project-"))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        saofu(folder, "down", timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


PROBE_FLOW = """
from prefect import flow

@flow(name="saofu-postgres-probe")
def probe(n: int = 1) -> int:
    return n + 1

probe(41)
"""


def _rows(project: Path, port: int, query: str) -> list[tuple]:
    """Rows of `query` on the stack's `prefect` database, as its role (password from its passfile)."""
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user="saofu", dbname="prefect",
                            passfile=str(project / ".saofu" / "postgres" / "pgpass"), connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.mark.timeout(900)
def test_prefect_on_postgres_keeps_runs_there_is_remembered_and_down_stops_both(enterable_project):
    project = enterable_project
    ports = {"prefect": free_port(), "postgres": free_port()}
    up = saofu(project, "up", "prefect", "executor", "--prefect-db", "postgres", "--json",
               "--prefect-port", str(ports["prefect"]), "--postgres-port", str(ports["postgres"]))
    assert up.returncode == 0, up.stderr[-3000:]
    services = json.loads(up.stdout)["services"]
    assert list(services) == ["postgres", "prefect", "executor"]  # its database first
    assert services["prefect"]["database"] == "postgres"
    assert services["postgres"]["port"] == ports["postgres"]

    # the executor's deployments and a flow run of a client are rows in PostgreSQL, no SQLite file
    api = f"{services['prefect']['url']}/api"
    env = {**_env(), "PREFECT_API_URL": api}
    probe = subprocess.run([sys.executable, "-c", PROBE_FLOW], cwd=project, env=env, capture_output=True,
                           text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert sorted(r[0] for r in _rows(project, ports["postgres"], "SELECT name FROM deployment")) == [
        "active-learning", "cycle", "fast-retrain", "ingest", "release", "search"]
    runs = "SELECT r.state_type FROM flow_run r JOIN flow f ON r.flow_id = f.id WHERE f.name = 'saofu-postgres-probe'"
    assert _rows(project, ports["postgres"], runs) == [("COMPLETED",)]
    assert not (project / ".saofu" / "prefect" / "prefect.db").exists()

    status = json.loads(saofu(project, "status", "--json", timeout=120).stdout)["services"]
    assert status["prefect"]["healthy"] and status["prefect"]["database"] == "postgres"
    assert status["postgres"]["running"] and status["postgres"]["pid"] == services["postgres"]["pid"]
    human = saofu(project, "status", timeout=120).stdout
    assert "Prefect database: PostgreSQL (database 'prefect'" in human, human

    # restarted without the option: the choice is remembered and the history is still there
    assert saofu(project, "down", "prefect", "executor", timeout=120).returncode == 0
    again = saofu(project, "up", "prefect", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["services"]["prefect"]["database"] == "postgres"
    code, found = get_json_post(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["saofu-postgres-probe"]}}})
    assert code == 200 and [r["state_type"] for r in found] == ["COMPLETED"], found

    down = saofu(project, "down", "--json", timeout=120)
    assert down.returncode == 0, down.stderr
    stopped = json.loads(down.stdout)["services"]
    assert stopped["prefect"] is True and stopped["postgres"] is True
    assert list(stopped)[-1] == "postgres"  # after the server whose database it holds
    assert not pid_alive(services["postgres"]["pid"])
    assert port_free(ports["postgres"]) and port_free(ports["prefect"])


def get_json_post(url: str, body: dict) -> tuple[int, list | dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, json.loads(resp.read())
