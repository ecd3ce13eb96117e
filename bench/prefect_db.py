"""`saofu bench prefect-db`: the Prefect server on SQLite beside the same server on PostgreSQL.

Why: a run's orchestration (creating flow and task runs, setting their states) is writes to the
server's database. On SQLite, Prefect's default, some of those writes are answered "database is
locked" (a WAL snapshot conflict its busy timeout does not wait out); the API turns that into a
503 and Prefect's client retries 2 s later (PrefectHQ/prefect#18934): a run stalls 2 s for
nothing. The fast-retrain bench saw it as a 2-s gap before a subflow in two of nine draws.
`saofu up --prefect-db postgres` keeps the server's database on PostgreSQL instead.

What is measured, per database, on a fresh server each draw (alternating SQLite and PostgreSQL):
`clients` processes at once (1, then 3: a scheduled run beside a clicked one), each a flow run
calling `subflows` subflows of one task each, as the fast retrain calls its steps; each subflow's
wall time from the call to its return. Its body does nothing, so anything over a second is the
orchestration stalling. Reported: median, 99th percentile and largest wall time, and how many
subflows took over a second, over all draws; plus each server's start (database created and
migrated). PostgreSQL runs as `saofu up` runs it (fsync on, loopback, password from its passfile).

Run it alone (it measures latency; other work on 2 cores shows up as stalls):
    saofu bench prefect-db [--draws 3] [--subflows 150]
Writes bench/results/prefect_db.json. About 12 minutes with the defaults on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from bench.fast_retrain import aligned
from saofu.errors import SaofuError
from services.prefect_server import server_command, server_healthy
from services.process import kill_group

DATABASES = ("sqlite", "postgres")
STALL_S = 1.0  # a subflow whose body does nothing and takes longer than this has stalled


def client_main(subflows: int, start_at: float) -> None:
    """One client (`python -m bench.prefect_db --client N T0`): N subflows; prints their wall times as JSON."""
    from prefect import flow, task

    from flows.heartbeat import without_heartbeat

    @task
    def step(i: int) -> int:
        return i

    @flow(name="bench-step")
    def child(i: int) -> int:
        return step(i)

    @flow(name="bench-run")
    def parent(n: int) -> list[float]:
        walls = []
        for i in range(n):
            t = time.perf_counter()
            child(i)
            walls.append(time.perf_counter() - t)
        return walls

    time.sleep(max(0.0, start_at - time.time()))  # the clients of a draw start together
    with without_heartbeat():  # as `saofu fast-retrain` runs its flows (flows/heartbeat.py)
        walls = parent(subflows)
    print(json.dumps(walls), flush=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(home: Path, database_url: str | None, passfile: Path | None) -> tuple[subprocess.Popen, str, float]:
    """`prefect server start` as `saofu up prefect` builds it, on a fresh PREFECT_HOME; (process, URL, start s)."""
    with mock.patch.dict(os.environ, {"SAOFU_HOME": str(home)}):  # server_command puts PREFECT_HOME under it
        cmd, env, url = server_command(_free_port(), database_url=database_url, passfile=passfile)
    env["PREFECT_UI_ENABLED"] = "false"
    started = time.perf_counter()
    with open(home / "prefect.log", "wb") as log:  # the server keeps its own descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while not server_healthy(url):
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'prefect.log').read_text()[-2000:]}")
        if time.perf_counter() - started > 300:
            raise RuntimeError("prefect server not healthy after 300 s")
        time.sleep(0.2)
    return proc, url, time.perf_counter() - started


def _stop(proc: subprocess.Popen) -> None:
    kill_group(proc.pid, timeout=30)  # SIGTERM to the server's group, SIGKILL after 30 s
    proc.wait(timeout=10)


def _run_clients(url: str, clients: int, subflows: int) -> list[float]:
    """`clients` processes started together against the server at `url`; every subflow's wall time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_API_URL": f"{url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    start_at = time.time() + 15  # after every client has imported Prefect (2 cores: a few seconds each)
    procs = [subprocess.Popen([sys.executable, "-m", "bench.prefect_db", "--client", str(subflows), str(start_at)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(clients)]
    walls: list[float] = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            lines = [line for line in out.splitlines() if line.startswith("[")]
            if p.returncode != 0 or not lines:
                raise RuntimeError(f"bench client failed ({p.returncode}): {err[-2000:]}")
            walls += json.loads(lines[-1])
    finally:
        for p in procs:  # a failed or hung client leaves no other behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return walls


def _draw(database: str, work: Path, client_counts: tuple[int, ...], subflows: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"prefect-{database}-", dir=work))
    pg_dir = None
    try:
        url = passfile = None
        if database == "postgres":
            from services import postgres

            # the server's OS user must enter its folder (as root it runs as `postgres`)
            pg_dir = Path(tempfile.mkdtemp(prefix="saofu-bench-postgres-"))
            pg_dir.chmod(0o711)
            postgres.start_postgres(pg_dir, port=_free_port())
            url, passfile = postgres.ensure_database("prefect", pg_dir), postgres.passfile(pg_dir)
        proc, api, start_s = _start_server(home, url, passfile)
        try:
            by_clients = {str(k): _run_clients(api, k, subflows) for k in client_counts}
        finally:
            _stop(proc)
        return {"server_start_s": start_s, "walls": by_clients}
    finally:
        if pg_dir is not None:
            from services import postgres

            postgres.stop_postgres(pg_dir)
            shutil.rmtree(pg_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def _stats(walls: list[float]) -> dict:
    ordered = sorted(walls)
    return {"subflows": len(ordered), "median_s": statistics.median(ordered),
            "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "max_s": ordered[-1],
            "over_1s": sum(w > STALL_S for w in ordered)}


def summarize(draws: list[dict], client_counts: tuple[int, ...]) -> dict:
    """Per database and client count: statistics over every draw's subflows; server starts."""
    out: dict = {}
    for db in DATABASES:
        mine = [d for d in draws if d["database"] == db]
        out[db] = {"server_start_s": [d["server_start_s"] for d in mine],
                   **{f"clients_{k}": _stats([w for d in mine for w in d["walls"][str(k)]]) for k in client_counts},
                   "over_1s_per_draw": {str(k): [sum(w > STALL_S for w in d["walls"][str(k)]) for d in mine]
                                        for k in client_counts}}
    return out


def format_table(summary: dict, client_counts: tuple[int, ...]) -> str:
    rows = [("database", "clients", "subflows", "median s", "p99 s", "max s", "over 1 s (per draw)", "server start s")]
    for db, label in (("sqlite", "SQLite (default)"), ("postgres", "PostgreSQL (--prefect-db postgres)")):
        s = summary[db]
        for k in client_counts:
            c = s[f"clients_{k}"]
            rows.append((label, str(k), str(c["subflows"]), f"{c['median_s']:.3f}", f"{c['p99_s']:.3f}",
                         f"{c['max_s']:.2f}", f"{c['over_1s']} ({', '.join(map(str, s['over_1s_per_draw'][str(k)]))})",
                         f"{statistics.median(s['server_start_s']):.1f}"))
    return aligned(rows)


def run_prefect_db_bench(draws: int = 3, subflows: int = 150, client_counts: tuple[int, ...] = (1, 3),
                         out: Path = Path("bench/results/prefect_db.json"), work: Path = Path("bench/work/prefect_db"),
                         ) -> dict:
    from bench.models import _device_name

    if draws < 1 or subflows < 1 or not client_counts or min(client_counts) < 1:
        raise SaofuError(f"draws, subflows and every client count must be at least 1, got draws {draws}, "
                         f"subflows {subflows}, clients {list(client_counts)}")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    for i in range(draws):
        for db in DATABASES:
            print(f"draw {i + 1}/{draws}: {db}: {len(client_counts)} loads of {subflows} subflows per client",
                  flush=True)
            results.append({"draw": i, "database": db, **_draw(db, work.resolve(), client_counts, subflows)})
    summary = summarize(results, client_counts)
    table = format_table(summary, client_counts)
    record = {"device": _device_name(), "draws": draws, "subflows_per_client": subflows,
              "client_counts": list(client_counts), "stall_s": STALL_S, "summary": summary, "runs": results,
              "seconds": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return {**record, "table": table}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]), float(sys.argv[3]))
    else:
        sys.exit("use `saofu bench prefect-db` (this module's own entry is the client: --client N START_EPOCH)")
