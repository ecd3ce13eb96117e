"""Two search workers on one study in a real PostgreSQL: exact trial count, and a killed worker's trial retried."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from services.postgres import running_postgres
from tasks.search.study import counting_trials
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


def test_two_workers_share_one_study_and_run_exactly_n_trials(postgres, shapes_dir, saofu_home, tmp_path):
    job = _job(postgres, shapes_dir, "two-workers", n_trials=6)
    launch_workers(job, workers=2, job_file=tmp_path / "job.json", threads_per_worker=1)

    study = optuna.load_study(study_name=job.study_name, storage=postgres.url)
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["worker"] for t in trials} == {"w0", "w1"}  # both really worked
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6  # no trial run twice


def test_a_killed_workers_trial_is_retried_by_the_other(postgres, shapes_dir, saofu_home, tmp_path):
    job = _job(postgres, shapes_dir, "killed-worker", n_trials=5)
    job_file = tmp_path / "job.json"
    job_file.write_text(job.model_dump_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    workers = {
        name: subprocess.Popen([sys.executable, "-m", "tasks.search.worker", str(job_file), "--worker", name],
                               env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name in ("w0", "w1")
    }
    storage = optuna.storages.RDBStorage(postgres.url)
    try:
        # Kill w0 in the middle of its first trial.
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline:
            try:
                study = optuna.load_study(study_name=job.study_name, storage=storage)
                victim = next((t for t in study.get_trials() if t.state == TrialState.RUNNING and t.params
                               and t.user_attrs.get("worker") == "w0"), None)
            except KeyError:  # the study does not exist yet
                pass
            time.sleep(0.05)
        assert victim is not None, "w0 never started a trial"
        workers["w0"].send_signal(signal.SIGKILL)
        assert workers["w1"].wait(timeout=300) == 0
    finally:
        for p in workers.values():
            p.kill()
            p.wait()

    trials = optuna.load_study(study_name=job.study_name, storage=storage).get_trials()
    by_number = {t.number: t for t in trials}
    assert by_number[victim.number].state == TrialState.FAIL  # found stale by w1
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == victim.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == by_number[victim.number].params  # the same trial, run again
    counting = counting_trials(trials)
    assert len(counting) == 5 and all(t.state == TrialState.COMPLETE for t in counting)  # none lost, none extra
    assert len({tuple(sorted(t.params.items())) for t in counting}) == 5
