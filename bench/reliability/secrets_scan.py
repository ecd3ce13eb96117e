"""Recognisable secrets set, the code paths that handle them run, everything they left searched.

Secrets: the search storage's PostgreSQL password (in `saofu search --storage`'s URL), Label Studio's
API token (LABEL_STUDIO_API_KEY, as the ingest flow reads it; the admin's token as `saofu up
labeling` sets it), Label Studio's admin password, and an MLflow tracking URI carrying
user:password (MLflow's HTTP client sends a URL's credentials as basic auth).

Code paths, all real: `saofu search` as a user runs it (the CLI, the search flow as a Prefect flow
run on the configured API or a temporary one, its MLflow run), which fails where the PostgreSQL
server should be, after it stored what it stores; `saofu ingest` (the ingest flow as a Prefect
flow run) against a Label Studio that answers 503; `services.labeling.start` with the admin's
password and token (on a stand-in for Label Studio's own server, as tests/reliability/test_secrets.py
does); the commands that print the tracking store (`mlflow_ui_hint`, `saofu up mlflow`'s command
builder).

Searched: what the process printed (sys.stdout/stderr and file descriptors 1 and 2, so child
processes too); every file under the project folder except the two files whose job is to hold a secret,
private (0600): the search passfile and Label Studio's login file (a private file holding it is
fine, a readable one counts); the MLflow runs' params, tags and artefacts; the Prefect flow runs'
parameters and the logs they sent to the API. Each place holding a secret is one hit.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.reliability.fault_harness import environment, free_port
from bench.reliability.faults_processes import shapes_dataset
from bench.reliability.faults_services import BrokenLabelStudio, labelled_dataset, prefect_api
from bench.reliability.section import Case, Section

DB_SECRET = "Pg-Secret-bench-7f3a9c"
LS_TOKEN = "ls-token-bench-0b6e2f4a9d"
LS_ADMIN_PASSWORD = "Ls-Admin-Pw-bench-52d1e8"
MLFLOW_SECRET = "Mlflow-Pw-bench-91c0d2"
CLOSED_PORT = 9  # discard: nothing listens on loopback, so the connection is refused at once


@contextlib.contextmanager
def captured_fds(path: Path) -> Iterator[Path]:
    """What the block prints goes to `path`: file descriptors 1 and 2 (child processes, C libraries) and
    sys.stdout/sys.stderr (which a test runner may have pointed elsewhere). A logging handler made
    earlier keeps the stream it was given; Prefect's send their lines to the API too, searched there."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    # both append: the descriptors and the text stream write to one file without overwriting each other
    with path.open("ab") as sink, path.open("a", buffering=1, errors="replace") as text, \
            contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield path
        finally:
            text.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def files_holding(root: Path, secret: str, private_ok: set[Path]) -> list[str]:
    """Files under `root` holding `secret`, except those in `private_ok` while only their owner can read them."""
    hits = []
    for p in root.rglob("*"):
        if not p.is_file() or p.is_symlink() or secret.encode() not in p.read_bytes():
            continue
        if p in private_ok and not stat.S_IMODE(p.stat().st_mode) & 0o077:
            continue
        hits.append(str(p.relative_to(root)))
    return sorted(hits)


def mlflow_hits(home: Path, secret: str) -> list[str]:
    """Params, tags and artefacts of every run in `home`'s MLflow store that hold `secret`."""
    from mlflow.tracking import MlflowClient

    db = home / "mlflow" / "mlflow.db"
    if not db.exists():
        return []
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    hits = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            run_id = run.info.run_id
            hits += [f"run {run_id} param {k}" for k, v in run.data.params.items() if secret in f"{k}={v}"]
            hits += [f"run {run_id} tag {k}" for k, v in run.data.tags.items() if secret in f"{k}={v}"]
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(client.download_artifacts(run_id, "", tmp))
                hits += [f"run {run_id} artefact {p.relative_to(local)}" for p in local.rglob("*")
                         if p.is_file() and secret.encode() in p.read_bytes()]
    return hits


def prefect_hits(flow_run_ids: set, secrets: list[str]) -> list[tuple[str, str]]:
    """(place, secret) for the parameters and API logs of the given Prefect flow runs holding one of `secrets`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs go to the API in batches: send what is waiting
    hits = []
    with get_client(sync_client=True) as client:
        for run_id in flow_run_ids:
            run = client.read_flow_run(run_id)
            hits += [(f"flow run {run.name} parameters", s) for s in secrets if s in str(run.parameters)]
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            hits += [(f"flow run {run.name} log: {log.message[:80]!r}", s) for log in logs for s in secrets
                     if s in log.message]
    return hits


def _flow_runs() -> set:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {run.id for run in client.read_flow_runs()}


FAKE_LABEL_STUDIO = '''#!{python}
"""Stands in for `label-studio start`: answers every GET 200 and makes a database in its data folder."""
import http.server, sys
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
open("label_studio.sqlite3", "w").write("tokens in plain text")
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{{}}")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def _start_label_studio(home: Path) -> None:
    """`services.labeling.start` with an admin password and token, on a stand-in for Label Studio's server
    (installing the real one takes minutes; what handles the secrets is saofu's side), then `stop`."""
    import hashlib
    import sys

    from services import labeling

    venv = home.parent / "ls-venv"
    exe = venv / "bin" / "label-studio"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text(FAKE_LABEL_STUDIO.format(python=sys.executable))
    exe.chmod(0o755)
    # what `ensure_installed` checks to take the venv as installed
    digest = hashlib.sha256(labeling._requirements_text().encode()).hexdigest()
    (venv / ".saofu-requirements.sha256").write_text(digest + "\n")
    with environment(LABEL_STUDIO_URL=None, LABEL_STUDIO_API_KEY=None, LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=None):
        labeling.start(port=free_port(), password=LS_ADMIN_PASSWORD, token=LS_TOKEN, venv_dir=venv, timeout=120)
        labeling.stop()


def _invoke(args: list[str]) -> int:
    """Run `saofu ARGS` in this process as its entry point (`saofu.cli.main`) does, printing what it prints;
    the exit code. In-process, not a child: the flow runs must go to this process's Prefect API."""
    import sys

    from saofu.cli import main

    argv = sys.argv
    sys.argv = ["saofu", *args]
    try:
        main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except Exception:  # noqa: BLE001 - what escapes the entry point: Python prints its traceback, exit 1
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.argv = argv
    return 0


def run_secrets_scan(workdir: str | Path) -> Section:
    """Set the secrets, run what handles them, count every place they turn up (`secrets_found`)."""
    from services import labeling
    from tasks.search.passwords import search_passfile

    started = time.perf_counter()
    workdir = Path(workdir)
    home = workdir / "secrets-home"
    home.mkdir(parents=True, exist_ok=True)
    out = workdir / "secrets-printed.txt"
    cases: list[Case] = []
    storage = f"postgresql+psycopg2://saofu:{DB_SECRET}@127.0.0.1:{CLOSED_PORT}/saofu"
    data = shapes_dataset(home / "data" / "shapes", per_class=4)
    dataset = labelled_dataset(home / "data" / "labelled")
    label_studio = BrokenLabelStudio("503")
    with prefect_api(), environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=None, LABEL_STUDIO_URL=label_studio.url,
                              LABEL_STUDIO_API_KEY=LS_TOKEN, PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.5"):
        runs_before = _flow_runs()
        with captured_fds(out):
            search_exit = _invoke(["search", "--data", str(data), "--storage", storage, "--trials", "1",
                                   "--workers", "1", "--epochs", "1", "--final-epochs", "0"])
            ingest_exit = _invoke(["ingest", "--dataset", str(dataset), "--classes", "fu,not_fu"])
            _start_label_studio(home)
        label_studio.close()
        new_runs = _flow_runs() - runs_before
        printed = out.read_text(errors="replace")
        with environment(SAOFU_HOME=str(home)):
            private_ok = {search_passfile(), labeling.login_file()}

        def places_of(needle: str) -> list[str]:
            return ([f"printed output ({printed.count(needle)}x)"] if needle in printed else []) \
                + [f"file {f}" for f in files_holding(home, needle, private_ok)] \
                + mlflow_hits(home, needle) + [place for place, _ in prefect_hits(new_runs, [needle])]

        found = 0
        # A control beside each secret: something that must turn up in the places searched (the storage
        # URL without its password, the dataset's path), so a blind search cannot pass for a clean one.
        # The search flow logs its MLflow run before it opens the storage; the ingest fails before its run.
        for name, secret, control, must_see, ran in (
            ("search storage password", DB_SECRET, f"saofu@127.0.0.1:{CLOSED_PORT}", ("parameters", " param "),
             f"saofu search exit {search_exit}"),
            ("Label Studio API token", LS_TOKEN, str(dataset), ("parameters",),
             f"saofu ingest exit {ingest_exit}, Label Studio started and stopped"),
            ("Label Studio admin password", LS_ADMIN_PASSWORD, "password in ", ("printed",),
             "Label Studio started and stopped"),
        ):
            places, seen = places_of(secret), places_of(control)
            blind = not all(any(kind in p for p in seen) for kind in must_see)
            found += len(places)
            cases.append(Case(
                kind="secret", target=name, expected="in no output, file others can read, MLflow run or flow run",
                got=f"{ran}; {len(new_runs)} flow run(s) searched; found in: {places or 'nowhere'}; "
                    f"control {control!r} found in {len(seen)} places: {seen[:6]}",
                ok=not places and not blind))
    uri_cases = _tracking_uri_cases(home)
    found += sum(not c.ok for c in uri_cases)
    section = Section("secrets_scan", cases + uri_cases)
    section.counts = {"secrets_found": found}
    section.seconds = time.perf_counter() - started
    return section


def _tracking_uri_cases(home: Path) -> list[Case]:
    """An MLflow tracking URI with user:password: the lines saofu prints about the store."""
    from saofu.errors import SaofuError
    from services.mlflow_server import server_command
    from tasks.tracking import mlflow_ui_hint

    uri = f"http://saofu:{MLFLOW_SECRET}@127.0.0.1:{CLOSED_PORT}"
    cases = []
    with environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=uri):
        try:
            server_command(5000)
            refused = "no error"
        except SaofuError as exc:
            refused = str(exc)
        for target, text in (("saofu up mlflow's refusal (services/mlflow_server.py)", refused),
                             ("the MLflow UI hint printed after training (tasks/tracking.py mlflow_ui_hint)",
                              mlflow_ui_hint())):
            cases.append(Case(kind="secret", target=f"MLflow tracking URI password: {target}",
                              expected="the URI shown without its password", got=text[:200],
                              ok=MLFLOW_SECRET not in text))
    return cases
