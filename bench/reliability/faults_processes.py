"""Faults in saofu's own processes: training and a search worker killed, the serving app restarted
under load, the disk full under the online pool (see `bench.reliability.faults`)."""


from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench.reliability.fault_harness import MODEL, SAOFU, colour_store, environment, free_port, http_ok, png, wait_until
from bench.reliability.section import Case

# ------------------------------------------------------------------------ 3. training killed


def shapes_dataset(root: Path, per_class: int = 24, size: int = 32) -> Path:
    """A flat ImageFolder of coloured squares on noise: learnable in a few epochs of a tiny model."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            x, y = (int(v) for v in rng.integers(0, size // 2, 2))
            pixels[y:y + size // 2, x:x + size // 2] = colour
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def _epochs_printed(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"epoch\s+(\d+)/\d+", text)]


def training_killed(workdir: Path, epochs: int = 20) -> list[Case]:
    """`saofu step train` killed with SIGKILL after its first checkpoint, then run again with --resume.

    Expected: the second run starts at the epoch after the checkpoint's (not at epoch 1), keeps the
    killed run's history, and ends with every epoch trained once.
    """
    import torch

    home = workdir / "train"
    data = shapes_dataset(home / "data" / "shapes")
    out = home / "runs" / "killed"
    cmd = [SAOFU, "step", "train", "--data", str(data), "--out", str(out), "--model", "saofu_fu_tiny",
           "--epochs", str(epochs), "--batch-size", "16", "--image-size", "32"]
    env = {**os.environ, "SAOFU_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    checkpoint = out / "checkpoint.pt"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: checkpoint.exists() or proc.poll() is not None, 240, "no checkpoint", step=0.01)
    finally:  # the fault itself, and no process left behind should the wait fail
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        first_output = proc.communicate(timeout=60)[0].decode(errors="replace")
    killed = proc.returncode == -signal.SIGKILL
    if not checkpoint.exists():
        return [Case("training-killed", "saofu step train", "a checkpoint to resume from",
                     f"exit {proc.returncode}, no checkpoint: {first_output[-500:]}", ok=False)]
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    done = saved["epoch"]
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    printed = _epochs_printed(resumed.stdout + resumed.stderr)
    final = torch.load(checkpoint, map_location="cpu", weights_only=False)
    history = [h["epoch"] for h in final["history"]]
    kept = final["history"][:done] == saved["history"]
    ok = (killed and done < epochs and resumed.returncode == 0 and printed == list(range(done + 1, epochs + 1))
          and history == list(range(1, epochs + 1)) and kept)
    return [Case(
        kind="training-killed", target="saofu step train (SIGKILL after the first checkpoint, then --resume)",
        expected=f"resumes at epoch {done + 1} of {epochs}, keeps the first {done} epochs' history",
        got=f"killed {'by SIGKILL' if killed else f'? exit {proc.returncode}'} with {done} epoch(s) checkpointed; "
            f"resumed run exit {resumed.returncode}, trained epochs {printed[:1]}..{printed[-1:]}; "
            f"final history epochs 1..{history[-1] if history else None} ({len(history)}), "
            f"killed run's history kept: {kept}" + ("" if resumed.returncode == 0 else f"; {resumed.stderr[-400:]}"),
        ok=ok, lost=0 if kept else done)]


# ------------------------------------------------------------------------ 4. search worker killed


def search_worker_killed(workdir: Path) -> list[Case]:
    """A `python -m tasks.search.worker` process killed with SIGKILL while its trial runs (parameters drawn).

    Expected: after the heartbeat's grace period the next worker marks the trial FAIL, runs a retry
    with the same parameters, and the study ends with exactly `n_trials` counting, completed trials.
    """
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from tasks.search.study import counting_trials
    from tasks.search.worker import SearchJob, run_job_worker, write_job

    home = workdir / "search"
    data = shapes_dataset(home / "data" / "shapes", per_class=8, size=32)
    db = home / "study.db"
    # 40 epochs: a trial runs for seconds, so the watcher below (reading the study from SQLite) sees it
    # running; at 2 epochs, on a busy 2-core machine, both trials once ended in 1 s before it looked.
    job = SearchJob(study_name="killed-worker", storage=f"sqlite:///{db}", data_dir=str(data), sampler="random",
                    pruner="none", n_trials=2, epochs=40, heartbeat_s=1, grace_s=2)
    job_file = home / "job.json"
    write_job(job, job_file)
    env = {**os.environ, "SAOFU_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "tasks.search.worker", str(job_file), "--worker", "w0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def running_trial() -> optuna.trial.FrozenTrial | None:
        if not db.exists():
            return None
        try:
            trials = optuna.load_study(study_name=job.study_name, storage=job.storage).get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001 - the worker is still creating the study's tables
            return None
        # with its parameters drawn: the retry must run these again
        return next((t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.params), None)

    dead = None
    try:
        wait_until(lambda: running_trial() is not None or proc.poll() is not None, 240, "no trial started", step=0.05)
        dead = running_trial()
    finally:  # the fault itself, and no process left behind should the wait fail
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    killed = proc.returncode == -signal.SIGKILL
    if dead is None:
        return [Case("search-worker-killed", "tasks.search.worker", "a running trial to kill",
                     f"exit {proc.returncode} before a trial ran: {output[-500:]}", ok=False)]
    time.sleep(job.grace_s + 0.5)  # the dead trial's heartbeat goes stale
    with environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=None), contextlib.redirect_stdout(io.StringIO()):
        ran = run_job_worker(job, "w1")
    trials = optuna.load_study(study_name=job.study_name, storage=job.storage).get_trials()
    by_number = {t.number: t for t in trials}
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == dead.number]
    counting = counting_trials(trials)
    # Killed while drawing, the dead trial holds only some parameters: its retry must keep each of them
    # (and draws the rest itself).
    died_with = by_number[dead.number].params
    same_params = bool(retries) and bool(died_with) and all(retries[0].params.get(k) == v for k, v in died_with.items())
    ok = (killed and by_number[dead.number].state.name == "FAIL" and len(retries) == 1 and same_params
          and len(counting) == job.n_trials
          and all(t.state.name == "COMPLETE" for t in counting))
    return [Case(
        kind="search-worker-killed", target="tasks.search.worker (SIGKILL while trial runs), SQLite storage",
        expected=f"trial {dead.number} FAIL, retried once with the parameters it had drawn; "
                 f"{job.n_trials} counting trials complete",
        got=f"worker {'killed by SIGKILL' if killed else f'exit {proc.returncode}'}; states "
            f"{ {t.number: t.state.name for t in trials} }; retries of {dead.number}: {[t.number for t in retries]} "
            f"(same params: {same_params}); next worker ran {ran}; "
            f"counting {len(counting)}",
        ok=ok, lost=0 if retries else 1)]


# ----------------------------------------------------------------- 5. serving restarted under load


class _Load:
    """Requests to /predict from a thread, one after the other, each recorded as (time, status or error, version)."""

    def __init__(self, url: str):
        self.url = url
        self.results: list[tuple[float, str, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        body = png((250, 0, 0))
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    answer = client.post(f"{self.url}/predict", content=body, headers={"content-type": "image/png"})
                    version = answer.json().get("version") if answer.status_code == 200 else None
                    self.results.append((time.monotonic(), str(answer.status_code), version))
                except httpx.ConnectError:
                    self.results.append((time.monotonic(), "refused", None))
                    time.sleep(0.05)
                except httpx.HTTPError as exc:
                    self.results.append((time.monotonic(), type(exc).__name__, None))

    def answered(self) -> int:
        return sum(1 for r in self.results if r[1] == "200")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _serve(home: Path, port: int, pool: Path) -> subprocess.Popen:
    cmd = [SAOFU, "serve", "--port", str(port), "--model", MODEL, "--pool", str(pool), "--poll-seconds", "0.5",
           "--log-level", "warning"]
    env = {**os.environ, "SAOFU_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (home / f"serve-{time.monotonic_ns()}.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


def serving_restarted(workdir: Path, answers_per_phase: int = 40) -> list[Case]:
    """`saofu serve` under a steady stream of requests, stopped with SIGTERM, champion moved while it is
    down (a release in the gap), started again.

    Expected: it exits cleanly; after the restart every answer comes from the (new) champion; every
    request it answered with 200 is in the online pool, and no other. Requests that fail between the
    SIGTERM and the first answer after the restart (refused while nothing listens, or sent on a
    keep-alive connection the stopping server closed) are the restart's gap, reported, not lost;
    a failure outside it, or a request logged but not answered, would be.
    """
    from mlflow.tracking import MlflowClient

    home = workdir / "serve"
    uri = colour_store(home, champion="1")
    pool = home / "pool"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    load = _Load(url)
    proc = _serve(home, port, pool)
    try:
        wait_until(lambda: http_ok(f"{url}/healthz") or proc.poll() is not None, 180, "saofu serve did not start", 0.2)
        load.start()
        wait_until(lambda: load.answered() >= answers_per_phase, 120, "no answers before the restart")
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        first_exit = proc.wait(timeout=60)
        exited_at = time.monotonic()
        MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(MODEL, "champion", "2")
        before_restart = load.answered()
        proc = _serve(home, port, pool)
        wait_until(lambda: load.answered() >= before_restart + answers_per_phase, 180, "no answers after the restart")
        load.stop()
        restarted_at = next(t for t, status, _ in load.results if t > exited_at and status == "200")
    finally:
        load.stop()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    after = [r for r in load.results if r[0] >= restarted_at]
    wrong = [r for r in after if r[1] != "200" or r[2] != "2"]
    # From SIGTERM to the first answer after the restart, a request is refused (nothing listens) or its
    # keep-alive connection is closed under it by the stopping server: the gap, reported, not lost.
    # Any other failure is a request the app took and did not answer.
    gap = [r for r in load.results if r[1] != "200" and stopped_at <= r[0] < restarted_at]
    failed = [r for r in load.results if r[1] != "200" and not stopped_at <= r[0] < restarted_at]
    answered = load.answered()
    lines = [json.loads(raw) for raw in (pool / "index.jsonl").read_text().splitlines()]
    logged = len(lines)
    lost = len(failed) + max(0, answered - logged)
    return [Case(
        kind="serving-restarted", target="saofu serve (SIGTERM under load, champion 1 -> 2 while down, restart)",
        expected="clean exit; after the restart every answer from champion v2; every 200 in the pool",
        got=f"exit {first_exit}; {answered} answered; in the restart gap {len(gap)} not answered "
            f"({sum(r[1] == 'refused' for r in gap)} refused, others {sorted({r[1] for r in gap} - {'refused'})}); "
            f"{len(failed)} failed outside it {[r[1] for r in failed][:5]}; after restart {len(after)} answers, "
            f"not from v2: {len(wrong)}; pool lines {logged}",
        ok=first_exit == 0 and not wrong and not failed and logged == answered, lost=lost)]


# ------------------------------------------------------------------------- 6. disk full under the pool


class _Disk:
    """Free space of the simulated filesystem the pool lies on; None: plenty."""

    def __init__(self) -> None:
        self.free: int | None = None
        self.enospc = 0  # writes refused


class _QuotaRaw(io.RawIOBase):
    """A file's raw writes as a full filesystem does them: what fits is written, then ENOSPC."""

    def __init__(self, raw: io.FileIO, disk: _Disk):
        self._raw, self._disk = raw, disk

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._raw.seekable()

    def seek(self, *args):
        return self._raw.seek(*args)

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()

    def write(self, b) -> int:
        data = bytes(b)
        if self._disk.free is not None:
            if self._disk.free <= 0:
                self._disk.enospc += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data = data[:self._disk.free]
            self._disk.free -= len(data)
        return self._raw.write(data)

    def close(self) -> None:
        self._raw.close()
        super().close()


@contextlib.contextmanager
def _full_disk_under(root: Path, disk: _Disk) -> Iterator[None]:
    """Files opened for writing under `root` (through pathlib, as the pool writer opens them) write
    through `_QuotaRaw`; everything else is untouched."""
    real_open = pathlib.Path.open

    def open_(self, mode="r", buffering=-1, encoding=None, errors=None, newline=None):
        if not any(c in mode for c in "wax+") or not str(Path(self).absolute()).startswith(str(root)):
            return real_open(self, mode, buffering, encoding, errors, newline)
        raw = _QuotaRaw(io.FileIO(self, mode.replace("b", "").replace("t", "")), disk)
        buffered = io.BufferedWriter(raw)
        return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding=encoding, errors=errors,
                                                               newline=newline)

    pathlib.Path.open = open_
    try:
        yield
    finally:
        pathlib.Path.open = real_open


def pool_disk_full(workdir: Path, per_phase: int = 12) -> list[Case]:
    """The serving app (in-process, the real app and pool writer) while the pool's disk fills up and frees.

    Simulated, not mounted: the pool writer's files are opened through a stand-in for write(2) that
    writes what fits and then raises OSError(ENOSPC). Phases: disk fine; full (a few hundred bytes
    left: images cut short); nearly full (the images fit, the index's flush is cut short); fine again.
    Expected: every request answered; the index parses line by line; no temporary or half-written
    file left; every index line's image complete; the requests from before the fault still logged,
    and the ones after it logged again (the writer recovered).
    """
    from starlette.testclient import TestClient

    from deploy.app import ServeConfig, create_app

    home = workdir / "pool"
    uri = colour_store(home)
    pool = (home / "pool").absolute()
    disk = _Disk()
    statuses: list[int] = []
    shas: dict[str, list[str]] = {"before": [], "full": [], "index-cut": [], "after": []}
    with _full_disk_under(pool, disk):
        app = create_app(ServeConfig(model_name=MODEL, tracking_uri=uri, pool_dir=pool, poll_seconds=60))
        with TestClient(app) as client:
            writer = app.state.serving.pool
            colour = iter(range(1, 256))
            # "full": the images themselves find no room; "index-cut": they do, the index's flush is cut short
            for phase, free in (("before", None), ("full", 300), ("index-cut", 1500), ("after", None)):
                disk.free = free
                for _ in range(per_phase):
                    body = png((next(colour), 0, 0))
                    shas[phase].append(hashlib.sha256(body).hexdigest())
                    statuses.append(client.post("/predict", content=body,
                                                headers={"content-type": "image/png"}).status_code)
                writer.drain()
            failed_writes = writer.failed
    raw_lines = (pool / "index.jsonl").read_bytes().split(b"\n")
    unreadable = []
    logged: set[str] = set()
    for raw in raw_lines[:-1] if raw_lines and raw_lines[-1] == b"" else raw_lines:
        try:
            line = json.loads(raw)
            logged.add(line["sha256"])
            image = (pool / line["path"]).read_bytes()
            if hashlib.sha256(image).hexdigest() != line["sha256"]:
                unreadable.append(f"image {line['path']} cut short ({len(image)} bytes)")
        except (ValueError, KeyError, OSError) as exc:
            unreadable.append(f"{raw[:60]!r}: {type(exc).__name__}")
    leftovers = sorted(str(p.relative_to(pool)) for p in pool.rglob("*.tmp"))
    lost_before = [s for s in shas["before"] if s not in logged]
    missing_after = [s for s in shas["after"] if s not in logged]
    ok = (all(s == 200 for s in statuses) and disk.enospc > 0 and not unreadable and not leftovers
          and not lost_before and not missing_after)
    return [Case(
        kind="pool-disk-full", target="serving app's online pool (ENOSPC simulated in the writer's write(2))",
        expected="every request answered; index parses; no .tmp or half-written file; logging resumes after",
        got=f"{sum(s == 200 for s in statuses)}/{len(statuses)} answered 200; {disk.enospc} writes refused "
            f"(ENOSPC), {failed_writes} entries not logged while full; unreadable lines/images: "
            f"{unreadable[:3] or 'none'}; leftovers: {leftovers[:3] or 'none'}; before-fault entries lost: "
            f"{len(lost_before)}; after-fault entries logged: {len(shas['after']) - len(missing_after)}/{per_phase}",
        ok=ok, lost=len(lost_before) + len(unreadable) + len(leftovers))]


