"""Faults in the services saofu talks to: Label Studio unreachable during ingest, MLflow unreachable
during a registration (see `bench.reliability.faults`)."""


from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.reliability.fault_harness import (
    CLASSES,
    MODEL,
    SIZE,
    WEIGHTS,
    aliases_of,
    changed_files,
    colour_graph,
    environment,
    file_hashes,
    free_port,
    http_ok,
    kill_group,
    png,
    register_version,
    version_problem,
    wait_until,
)
from bench.reliability.section import Case

# ------------------------------------------------------------------- 1. Label Studio unreachable


class BrokenLabelStudio:
    """A loopback server in Label Studio's place: `drop` reads each request and closes the connection
    without an answer (the process died mid-request), `503` answers every request 503. Counts requests."""

    def __init__(self, mode: str):
        self.mode = mode
        self.requests = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(32)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                self.requests += 1
                if self.mode == "503":
                    with contextlib.suppress(OSError):
                        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")

    def close(self) -> None:
        self._sock.close()


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """The configured Prefect API, or a temporary one: task retries are Prefect's, so they need its engine."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.testing.utilities import prefect_test_harness

    with environment(PREFECT_SERVER_ANALYTICS_ENABLED="false"), prefect_test_harness(server_startup_timeout=180):
        yield


def labelled_dataset(root: Path) -> Path:
    """A labelled dataset with two images, its manifest and a cursor from an earlier ingest of project 1."""
    for i, (label, colour) in enumerate([("fu", (250, 0, 0)), ("not_fu", (0, 250, 0))]):
        (root / "train" / label).mkdir(parents=True, exist_ok=True)
        (root / "train" / label / f"{i}.png").write_bytes(png(colour, 16))
    rows = [f"train/{label}/{i}.png,{label},train,generated,"
            + hashlib.sha256((root / "train" / label / f"{i}.png").read_bytes()).hexdigest()
            for i, label in enumerate(["fu", "not_fu"])]
    (root / "manifest.csv").write_text("path,label,split,source,sha256\n" + "\n".join(rows) + "\n")
    (root / ".ingest").mkdir()
    cursor = {"project_id": 1, "cursor": "2026-01-01T00:00:00+00:00"}
    (root / ".ingest" / "project-1.json").write_text(json.dumps(cursor))
    return root


def label_studio_unreachable(workdir: Path, modes: tuple[str, ...] = ("drop", "503")) -> list[Case]:
    """The ingest flow against a Label Studio that drops every connection (`drop`), then one that
    answers 503 (`503`).

    Expected: the flow's Prefect task retries (3 tries; the SDK tries each request 3 times), then
    fails with a SaofuError naming Label Studio's URL; no data version, no MLflow run, the dataset
    and its cursor byte for byte as they were.
    """
    from flows.ingest import IngestParams, find_project, ingest_flow
    from saofu.cli.common import run_flow
    from saofu.errors import SaofuError

    cases = []
    with prefect_api():
        for mode in modes:
            home = workdir / f"ingest-{mode}"
            dataset = labelled_dataset(home / "data" / "labelled")
            before = file_hashes(home)
            server = BrokenLabelStudio(mode)
            started = time.perf_counter()
            try:
                with environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=None, LABEL_STUDIO_URL=server.url,
                          LABEL_STUDIO_API_KEY="bench-token"):
                    run_flow(ingest_flow, IngestParams(dataset_dir=str(dataset), classes=CLASSES))
                error: BaseException | None = None
            except Exception as exc:  # noqa: BLE001 - the failure is what is measured
                error = exc
            finally:
                server.close()
            seconds = time.perf_counter() - started
            changed = changed_files(before, file_hashes(home))
            clear = isinstance(error, SaofuError) and server.url in str(error)
            # the Prefect task's tries x the SDK's tries of a request (label_studio_sdk retries 2 times)
            expected_requests = (find_project.retries + 1) * 3
            got = (f"{server.requests} requests in {seconds:.1f} s, then "
                   f"{type(error).__name__ if error else 'no error'}: {str(error)[:300]}; "
                   f"files changed under the project: {changed or 'none'}")
            cases.append(Case(
                kind="label-studio-unreachable", target=f"ingest flow, Label Studio {mode}",
                expected=f"{expected_requests} requests (retried), then a SaofuError naming {server.url}; "
                         "no data version, dataset and cursor unchanged",
                got=got, ok=clear and server.requests == expected_requests and not changed, lost=len(changed)))
    return cases


# ------------------------------------------------------------------------- 2. MLflow unreachable


class _Proxy:
    """A TCP proxy on loopback in front of the tracking server; `cut()` makes the server unreachable
    (open connections reset, new ones closed at once) until `restore()`."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.up = True
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._conns.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self._sock.close()


@contextlib.contextmanager
def _mlflow_server(home: Path) -> Iterator[subprocess.Popen]:
    """`mlflow server` on `home`'s store, started as `saofu up mlflow` starts it, in its own process group."""
    from services.mlflow_server import server_command

    port = free_port()
    with environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=None):
        cmd, env, url = server_command(port)
    log = (home / "mlflow-server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.port = port  # type: ignore[attr-defined]
    try:
        wait_until(lambda: proc.poll() is None and http_ok(f"{url}/health") or proc.poll() is not None, 180,
              "mlflow server did not answer /health", step=0.2)
        if proc.poll() is not None:
            tail = (home / "mlflow-server.log").read_text()[-2000:]
            raise RuntimeError(f"mlflow server exited {proc.returncode}: {tail}")
        yield proc
    finally:
        kill_group(proc)
        log.close()


def _release_steps(home: Path) -> None:
    """What the release flow does to the registry for one candidate: register, challenger, promote."""
    from tasks import tracking
    from tasks.release import registry

    run_id = tracking.start_run("faults", "candidate", {}, {})
    graph = colour_graph(home / "candidate.onnx", WEIGHTS["2"])
    version = tracking.register_onnx(run_id, graph, MODEL, SIZE, CLASSES, {})
    tracking.log_file(run_id, graph, "checkpoint")
    registry.set_challenger(MODEL, version)
    registry.promote(MODEL, version, "faults bench", {"passed": True})
    tracking.finish_run(run_id)


# (MlflowClient method, alias argument it must carry or None, what the cut interrupts)
_MLFLOW_CUTS = (
    ("finalize_logged_model", None, "the model's files logged, not yet marked READY"),
    ("create_model_version", None, "the logged model READY, the version not yet created"),
    ("set_registered_model_alias", "challenger", "the version created, challenger not yet set"),
    ("set_registered_model_alias", "champion", "challenger set and the gate passed, champion not yet moved"),
)


def mlflow_unreachable(workdir: Path, cuts: tuple[int, ...] = (0, 1, 2, 3)) -> list[Case]:
    """Registration against a real `mlflow server` that becomes unreachable between two of its calls.

    The points of `_MLFLOW_CUTS` named by `cuts` are cut through a loopback proxy (the server keeps
    running, the client cannot reach it); then the server itself is killed with SIGKILL just before
    the version is created. After each: the champion is still version 1, and every alias names a
    version whose graph loads (never a half-registered one). Last, a release on the same store completes.
    """
    from mlflow.tracking import MlflowClient

    home = workdir / "mlflow"
    home.mkdir(parents=True, exist_ok=True)
    sqlite_uri = f"sqlite:///{home}/mlflow/mlflow.db"
    cases = []
    with _mlflow_server(home) as server:
        proxy = _Proxy(server.port)  # type: ignore[attr-defined]
        # No HTTP retries: MLflow's default (7, exponential backoff) spends minutes per call on a dead server.
        with environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=proxy.url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
                  MLFLOW_HTTP_REQUEST_TIMEOUT="20"):
            from tasks.release import registry

            register_version(home, "1")
            registry.promote(MODEL, "1", "faults bench: the champion before the faults")
            points = [(*_MLFLOW_CUTS[i], "proxy") for i in cuts] + [(*_MLFLOW_CUTS[1], "SIGKILL")]
            for method, alias, moment, how in points:
                original = getattr(MlflowClient, method)
                fired = []

                def cut_then_call(self, *args, _original=original, _alias=alias, _fired=fired, _how=how, **kwargs):
                    if not _fired and (_alias is None or _alias in args or _alias in kwargs.values()):
                        _fired.append(True)
                        if _how == "SIGKILL":
                            kill_group(server)
                        else:
                            proxy.cut()
                    return _original(self, *args, **kwargs)

                setattr(MlflowClient, method, cut_then_call)
                error = None
                began = time.perf_counter()
                try:
                    _release_steps(home)
                except Exception as exc:  # noqa: BLE001 - the failure is what is measured
                    error = exc
                finally:
                    took = time.perf_counter() - began
                    setattr(MlflowClient, method, original)
                    proxy.restore()
                # Read back through the store itself: after a SIGKILL there is no server to ask.
                aliases = aliases_of(sqlite_uri)
                broken = [why for v in set(aliases.values()) if (why := version_problem(sqlite_uri, v))]
                ok = bool(fired) and error is not None and aliases.get("champion") == "1" and not broken
                cases.append(Case(
                    kind="mlflow-unreachable", target=f"registration, MLflow {how} while {moment}",
                    expected="the registration fails; champion stays version 1; every alias names a complete version",
                    got=f"fault {'injected' if fired else 'NOT reached'}; failed after {took:.1f} s; "
                        f"{type(error).__name__ if error else 'no error'}: {str(error)[:160]}; aliases {aliases}; "
                        f"incomplete: {broken or 'none'}",
                    ok=ok, lost=int(aliases.get("champion") is None) + len(broken)))
        proxy.close()
    # The store the server was killed on still takes a release (the next run is not stuck).
    with environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=None):
        error = None
        try:
            _release_steps(home)
        except Exception as exc:  # noqa: BLE001
            error = exc
        aliases = aliases_of(sqlite_uri)
        broken = [why for v in set(aliases.values()) if (why := version_problem(sqlite_uri, v))]
        versions = len(MlflowClient(tracking_uri=sqlite_uri, registry_uri=sqlite_uri).search_model_versions(
            f"name='{MODEL}'"))
    cases.append(Case(
        kind="mlflow-unreachable", target="registration after the faults, on the same store",
        expected="a release completes: champion moves to the new version, which is complete",
        got=f"{type(error).__name__ + ': ' + str(error)[:160] if error else 'completed'}; aliases {aliases}; "
            f"{versions} versions; incomplete: {broken or 'none'}",
        ok=error is None and aliases.get("champion") not in (None, "1") and not broken, lost=len(broken)))
    return cases


