"""Two search workers on one study in a real PostgreSQL: exact trial count, and a killed worker's trial retried."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy import text

from services.postgres import running_postgres
from tasks.search.study import _ADVISORY_LOCK_KEY, claim_lock, counting_trials
from tasks.search.worker import SearchJob, launch_workers
from tests.flows.test_search_flow import TINY_SPACE

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    # the URL names no password: workers (child processes) find it through libpq's PGPASSFILE
    with running_postgres(tmp_path_factory.mktemp("pg")) as handle, pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSFILE", str(handle.passfile))
        yield handle


def _job(postgres, shapes_dir, name: str, n_trials: int) -> SearchJob:
    # No pruning and the random sampler: every trial runs its full 3 epochs, so there is time to
    # kill a worker in the middle of one.
    return SearchJob(
        study_name=name, storage=postgres.url, data_dir=str(shapes_dir), space=TINY_SPACE, sampler="random",
        pruner="none", n_trials=n_trials, epochs=3, heartbeat_s=1, grace_s=3,
    )


def _finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in counting_trials(study.get_trials()) if t.state == TrialState.COMPLETE]


# What a worker logs as it claims a trial (tasks.search.study.run_worker), after any prefix.
_STARTED = re.compile(r"\[(w\d+)\] trial (\d+) started(?: \(retry of trial (\d+)\))?$", re.M)


def _started(log: str) -> list[tuple[str, int, int | None]]:
    """(worker, trial number, the trial it retries or None) of every trial start in `log`."""
    return [(w, int(n), int(r) if r else None) for w, n, r in _STARTED.findall(log)]


def _waiting_to_claim(storage: optuna.storages.RDBStorage) -> int:
    """How many sessions are blocked on the workers' claim lock (a PostgreSQL advisory lock)."""
    with storage.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                                 "AND objid = :k"), {"k": _ADVISORY_LOCK_KEY}).scalar_one()


def test_two_workers_share_one_study_and_run_exactly_n_trials(postgres, shapes_dir, saofu_home, tmp_path, capsys):
    job = _job(postgres, shapes_dir, "two-workers", n_trials=6)
    storage = optuna.storages.RDBStorage(postgres.url)
    errors: list[BaseException] = []

    def launch() -> None:
        try:
            launch_workers(job, workers=2, job_file=tmp_path / "job.json", threads_per_worker=1)
        except BaseException as exc:  # noqa: BLE001 - raised again below
            errors.append(exc)

    launcher = threading.Thread(target=launch, daemon=True)
    # The test holds the claim lock until both workers wait on it: then the first to get it claims
    # one trial and the other, already queued, the next. Neither can run away with every trial
    # because it started sooner, however long the other takes to start.
    with claim_lock(storage):
        launcher.start()
        deadline = time.monotonic() + 300
        while _waiting_to_claim(storage) < 2:
            assert launcher.is_alive() and time.monotonic() < deadline, f"workers not both claiming: {errors}"
            time.sleep(0.1)
    launcher.join(timeout=600)
    assert not launcher.is_alive() and not errors, errors
    log = capsys.readouterr().out

    trials = optuna.load_study(study_name=job.study_name, storage=postgres.url).get_trials()
    assert sorted(t.number for t in trials) == list(range(6)) and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {"w0", "w1"}  # both really worked
    # No trial run twice: each started once, by the worker it names, none as a retry.
    started = _started(log)
    assert sorted(n for _, n, _ in started) == list(range(6)), log
    assert {n: w for w, n, _ in started} == {t.number: t.user_attrs["worker"] for t in trials}
    assert all(r is None for _, _, r in started)


def test_a_killed_workers_trial_is_retried_by_the_other(postgres, shapes_dir, saofu_home, tmp_path):
    job = _job(postgres, shapes_dir, "killed-worker", n_trials=5)
    job_file = tmp_path / "job.json"
    job_file.write_text(job.model_dump_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    logs = {name: tmp_path / f"{name}.log" for name in ("w0", "w1")}
    workers = {}
    for name, log in logs.items():
        with log.open("w") as out:
            workers[name] = subprocess.Popen(
                [sys.executable, "-m", "tasks.search.worker", str(job_file), "--worker", name],
                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    storage = optuna.storages.RDBStorage(postgres.url)
    try:
        # Kill whichever worker starts a trial first, in the middle of it: which one that is
        # depends on how fast each started, and does not matter. The trial's `arch` attribute
        # is set once all its parameters are drawn, before training: killed after it, the
        # trial's parameters are whole (a kill amid the drawing leaves a part for the retry).
        deadline = time.monotonic() + 300
        victim = None
        while victim is None and time.monotonic() < deadline:
            try:
                study = optuna.load_study(study_name=job.study_name, storage=storage)
                victim = next((t for t in study.get_trials() if t.state == TrialState.RUNNING
                               and "arch" in t.user_attrs and t.user_attrs.get("worker") in workers), None)
            except KeyError:  # the study does not exist yet
                pass
            time.sleep(0.05)
        assert victim is not None, "no worker ever started a trial"
        killed = victim.user_attrs["worker"]
        (survivor,) = set(workers) - {killed}
        workers[killed].send_signal(signal.SIGKILL)
        assert workers[survivor].wait(timeout=300) == 0
    finally:
        for p in workers.values():
            p.kill()
            p.wait()

    trials = optuna.load_study(study_name=job.study_name, storage=storage).get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[victim.number].state == TrialState.FAIL  # found stale by the survivor
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].user_attrs["worker"] == survivor
    assert retries[0].params == by_number[victim.number].params  # the same trial, run again
    counting = counting_trials(trials)
    assert len(counting) == 5 and all(t.state == TrialState.COMPLETE for t in counting)  # none lost, none extra
    # Every trial started once, by the worker it names; the survivor started the victim's again as its retry.
    started = {name: _started(log.read_text()) for name, log in logs.items()}
    every = sorted(n for mine in started.values() for _, n, _ in mine)
    assert every == sorted(by_number), started
    assert all(w == name == by_number[n].user_attrs["worker"] for name, mine in started.items() for w, n, _ in mine)
    assert [(n, r) for _, n, r in started[survivor] if r is not None] == [(retries[0].number, victim.number)]
    assert (killed, victim.number, None) in started[killed]
