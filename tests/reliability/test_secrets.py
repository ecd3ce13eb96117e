"""Secrets do not leak into output, parameters or files others can read (issue 15, hole 7).

Recognisable secrets are set, the code paths that handle them run, and everything they printed
or wrote is searched for them: the search storage URL's password (the CLI, the flow's
parameters, the workers' job file, the dashboard hint), and Label Studio's admin password and
token (`start` and `saofu up labeling` output, its state file, log, data folder and database).
Label Studio itself is replaced by a tiny stand-in server: what is checked is saofu's side.

Then the whole path as a user runs it (bench/reliability/secrets_scan.py): `saofu search` with a
password in its storage URL and `saofu ingest` with a Label Studio token, both real Prefect flow
runs, searched afterwards in what they printed, the project's files, the MLflow runs' params, tags
and artefacts and the flow runs' parameters and API logs; and an MLflow tracking URI with
user:password in the lines that name the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from bench.reliability.secrets_scan import FAKE_LABEL_STUDIO
from saofu.cli import app
from saofu.errors import SaofuError
from services import labeling
from tasks.search import study as study_module
from tasks.search import worker
from tasks.search.passwords import dashboard_command, remember_password, search_passfile
from tasks.search.worker import SearchJob
from tests.integration.conftest import free_port

DB_SECRET = "Pg-Secret-7f3a9c"
ADMIN_PASSWORD = "Ls-Admin-Pw-52d1e8"
ADMIN_TOKEN = "ls-token-0b6e2f4a9d"
URL = f"postgresql+psycopg2://saofu:{DB_SECRET}@127.0.0.1:5433/saofu"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.fixture
def no_chmod(monkeypatch):
    """Files must be private from creation: a chmod after writing leaves a moment others may read them."""
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    monkeypatch.setattr(Path, "chmod", lambda *a, **k: None)


# ------------------------------------------------------------------------------------ search storage


@pytest.mark.timeout(60)
def test_a_storage_password_moves_to_a_private_passfile(saofu_home, no_chmod):
    bare = remember_password(URL)
    assert DB_SECRET not in bare and bare == "postgresql+psycopg2://saofu@127.0.0.1:5433/saofu"
    passfile = search_passfile()
    assert _mode(passfile) == 0o600 and _mode(passfile.parent) == 0o700
    assert passfile.read_text() == f"127.0.0.1:5433:saofu:saofu:{DB_SECRET}\n"  # libpq's format: psql reads it
    hint = dashboard_command(bare)
    assert DB_SECRET not in hint and str(passfile) in hint


@pytest.mark.timeout(60)
def test_the_study_storage_gets_the_password_beside_the_url(saofu_home, monkeypatch):
    seen = {}
    monkeypatch.setattr(study_module, "RDBStorage", lambda url, **kw: seen.update(url=url, **kw))
    study_module.make_storage(remember_password(URL))
    assert DB_SECRET not in seen["url"]
    assert seen["engine_kwargs"]["connect_args"]["password"] == DB_SECRET


@pytest.mark.timeout(60)
def test_parameters_and_job_files_refuse_a_password_without_echoing_it(saofu_home):
    from flows.search import SearchFlowParams

    for build in (lambda: SearchFlowParams(storage=URL), lambda: SearchJob(study_name="s", storage=URL, data_dir="")):
        with pytest.raises(ValidationError) as caught:
            build()
        assert DB_SECRET not in str(caught.value) and "password" in str(caught.value)


@pytest.mark.timeout(60)
def test_the_job_file_is_private_from_creation(saofu_home, no_chmod):
    job_file = saofu_home / "runs" / "s" / "job.json"
    job_file.parent.mkdir(parents=True)
    fd = os.open(job_file, os.O_WRONLY | os.O_CREAT, 0o644)  # an earlier run's copy, as old code left it
    os.close(fd)
    worker.write_job(SearchJob(study_name="s", storage=remember_password(URL), data_dir=""), job_file)
    assert _mode(job_file) == 0o600
    assert DB_SECRET not in job_file.read_text()


@pytest.mark.timeout(120)
def test_saofu_search_keeps_the_password_out_of_output_and_flow_parameters(saofu_home, monkeypatch):
    import flows.search

    captured = {}

    def fake_flow(params):  # stands in for the flow run: what Prefect would store as its parameters
        captured["parameters"] = params.model_dump_json()
        raise SaofuError(f"stopped after the parameters (storage {params.storage})")

    monkeypatch.setattr(flows.search, "search_flow", fake_flow)
    result = CliRunner().invoke(app, ["search", "--storage", URL, "--workers", "2", "--trials", "2"])
    shown = result.output + str(result.exception)  # the CLI's entry point prints a SaofuError's message
    assert "stopped after the parameters" in shown, shown
    assert DB_SECRET not in shown
    assert DB_SECRET not in captured["parameters"] and "saofu@127.0.0.1:5433" in captured["parameters"]
    assert DB_SECRET in search_passfile().read_text()


# ------------------------------------------------------------------------------------- Label Studio



@pytest.fixture
def fake_label_studio(tmp_path) -> Path:
    """A venv folder `ensure_installed` takes as installed, whose `label-studio` is the stand-in."""
    venv = tmp_path / "ls-venv"
    exe = venv / "bin" / "label-studio"
    exe.parent.mkdir(parents=True)
    exe.write_text(FAKE_LABEL_STUDIO.format(python=sys.executable))
    exe.chmod(0o755)
    digest = hashlib.sha256(labeling._requirements_text().encode()).hexdigest()
    (venv / ".saofu-requirements.sha256").write_text(digest + "\n")
    return venv


@pytest.mark.timeout(120)
def test_label_studio_start_prints_no_password_and_keeps_its_files_private(
    saofu_home, fake_label_studio, capfd, monkeypatch
):
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    with monkeypatch.context() as mp:  # private from creation, not by a chmod afterwards
        mp.setattr(os, "chmod", lambda *a, **k: None)
        mp.setattr(Path, "chmod", lambda *a, **k: None)
        handle = labeling.start(port=free_port(), password=ADMIN_PASSWORD, token=ADMIN_TOKEN,
                                venv_dir=fake_label_studio, timeout=60)
    try:
        printed = capfd.readouterr()
        assert ADMIN_PASSWORD not in printed.out + printed.err and ADMIN_TOKEN not in printed.out + printed.err
        assert str(labeling.login_file()) in printed.err  # where the login is, instead
        state = labeling.login_file()
        assert _mode(state) == 0o600 and json.loads(state.read_text())["password"] == ADMIN_PASSWORD
        assert _mode(handle.data_dir) == 0o700
        database = handle.data_dir / "label_studio.sqlite3"
        assert database.exists() and _mode(database) == 0o600  # the server's own files: umask 077
        assert _mode(handle.log_path) == 0o600
        leaking = [p for p in _files_holding(saofu_home, ADMIN_PASSWORD) if _mode(p) & 0o077]
        assert leaking == []

        # `saofu up labeling` and `saofu status`: the table and --json name the file, not the password
        from services import stack

        monkeypatch.setattr(stack, "up", lambda *a, **k: {"labeling": stack._labeling_info(handle, True)})
        runner = CliRunner()
        table = runner.invoke(app, ["up", "labeling"])
        as_json = runner.invoke(app, ["up", "labeling", "--json"])
        status = runner.invoke(app, ["status", "labeling", "--json"])
        for result in (table, as_json, status):
            assert result.exit_code == 0, result.output
            assert ADMIN_PASSWORD not in result.output
        assert ADMIN_TOKEN not in table.output and str(state) in table.output
        summary = json.loads(as_json.output)
        assert summary["token"] == ADMIN_TOKEN  # what programs need to call the API stays
        assert summary["services"]["labeling"]["login"] == {"username": handle.username, "file": str(state)}
    finally:
        labeling.stop()


# ------------------------------------------------------------------ MLflow runs and Prefect flow runs


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """bench/reliability/secrets_scan.py at its size: `saofu search` with a password in its storage URL and
    `saofu ingest` with a Label Studio token, both as Prefect flow runs, then everything searched."""
    from bench.reliability.secrets_scan import run_secrets_scan

    workdir = tmp_path_factory.mktemp("secrets-scan")
    return workdir, run_secrets_scan(workdir)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_search_and_ingest_leave_no_secret_in_mlflow_runs_flow_runs_output_or_files(scan):
    from bench.reliability.secrets_scan import DB_SECRET, LS_TOKEN

    workdir, section = scan
    by_target = {c.target: c for c in section.cases}
    search, ingest = by_target["search storage password"], by_target["Label Studio API token"]
    admin = by_target["Label Studio admin password"]
    # Both really ran as Prefect flow runs and failed where they had to, with a clear error (exit 2, no
    # traceback): no PostgreSQL, Label Studio 503.
    assert search.got.startswith("saofu search exit 2; 2 flow run(s) searched"), search.got
    assert ingest.got.startswith("saofu ingest exit 2, Label Studio started and stopped; 2 flow run(s)"), ingest.got
    assert "control 'password in ' found in 1 places: ['printed output (1x)']" in admin.got, admin.got
    assert admin.ok, admin.got
    # The search is not blind: the password-less URL is found in the search flow run's parameters and
    # in its MLflow run's params, where the password would have been.
    assert "flow run" in search.got and "parameters" in search.got and "param storage" in search.got, search.got
    assert "found in: nowhere" in search.got and "found in: nowhere" in ingest.got, (search.got, ingest.got)
    assert search.ok and ingest.ok
    printed = (workdir / "secrets-printed.txt").read_text()
    assert "cannot open the study storage" in printed  # what the user saw, searched above
    assert DB_SECRET not in printed and LS_TOKEN not in printed
    # every leak would be counted, and none is left
    leaks = [c for c in section.cases if not c.ok]
    assert section.counts == {"secrets_found": len(leaks)}
    assert leaks == [], [c.got for c in leaks]


@pytest.mark.timeout(60)
def test_saofu_up_mlflow_names_a_server_uri_without_its_password(saofu_home, monkeypatch):
    from services.mlflow_server import server_command

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://saofu:{DB_SECRET}@127.0.0.1:5000")
    with pytest.raises(SaofuError) as caught:
        server_command(5001)
    assert DB_SECRET not in str(caught.value) and "http://saofu:***@127.0.0.1:5000" in str(caught.value)


@pytest.mark.timeout(60)
def test_the_mlflow_ui_hint_shows_no_password(saofu_home, monkeypatch):
    from tasks.tracking import mlflow_ui_hint

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://saofu:{DB_SECRET}@127.0.0.1:5000")
    assert mlflow_ui_hint() == "open http://saofu:***@127.0.0.1:5000"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("url", "shown"), [
    (f"postgresql+psycopg2://saofu:{DB_SECRET}@127.0.0.1:5433/saofu", "postgresql+psycopg2://saofu:***@127.0.0.1:5433/saofu"),
    (f"http://u:{DB_SECRET}@[::1]:5000/api?x=1", "http://u:***@[::1]:5000/api?x=1"),
    ("sqlite:///mlflow/mlflow.db", "sqlite:///mlflow/mlflow.db"),
    ("postgresql://saofu@127.0.0.1/saofu", "postgresql://saofu@127.0.0.1/saofu"),
    (f"http://u:{DB_SECRET}@host:notaport/", "host:notaport/"),
])
def test_every_printed_url_masks_its_password_and_keeps_the_rest(url, shown):
    from saofu.urls import hide_password

    assert hide_password(url) == shown
