"""Running a search study: samplers, pruners, storage, and the worker loop that several processes share.

The study lives in Optuna's RDB storage: SQLite by default (one machine), PostgreSQL when several
workers share it. Workers are plain processes running `run_worker` on the same study; each claims
trials under a study-wide lock (a PostgreSQL advisory lock, or a file lock next to a SQLite file),
so the study ends with exactly `n_trials` trials that count, none lost and none run twice:

* a trial "counts" unless a later trial retries it;
* a worker that dies leaves its trial RUNNING with a heartbeat that stops; after the grace period
  another worker marks it FAIL and `RetryHeartbeatStaleTrialCallback` queues a copy with the same
  parameters (WAITING), which the next free worker runs;
* a worker stops claiming when the counting trials reach `n_trials` (or the wall-clock budget is
  spent), but waits while trials of others still run, because one of them may turn out dead.

Why not `study.optimize(n_trials=...)` with several workers: its trial count is per process, and
`MaxTrialsCallback` checks the count after a trial, so two workers racing on the last slot both run.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from saofu.errors import SaofuError
from saofu.urls import hide_password
from tasks.search.passwords import find_password, has_password
from tasks.search.space import SearchSpace

Sampler = Literal["tpe", "random", "grid", "cmaes", "qmc", "nsga2"]
Pruner = Literal["hyperband", "median", "none"]
SAMPLERS: tuple[str, ...] = Sampler.__args__
PRUNERS: tuple[str, ...] = Pruner.__args__
# Heartbeats, retries and TPE's grouped multivariate mode are marked experimental; we rely on them.
warnings.filterwarnings("ignore", category=ExperimentalWarning)
# Optuna warns that heartbeats are meant for Study.optimize; `run_worker` beats the same way itself.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
# A lock key shared by every worker of every study on one PostgreSQL database (any constant works).
_ADVISORY_LOCK_KEY = 0x5A0F


def make_sampler(name: str, space: SearchSpace, seed: int | None = 0) -> optuna.samplers.BaseSampler:
    """The Optuna sampler called `name`.

    TPE uses the constant liar so parallel workers do not all sample next to the same running
    trial. CMA-ES and QMC handle continuous and integer dimensions only; the categorical ones
    (kernel, activation, ...) fall back to independent random sampling, as Optuna documents.
    """
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          n_startup_trials=5)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, n_startup_trials=3)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False, scramble=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    raise SaofuError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")


def make_pruner(name: str, max_epochs: int, min_epochs: int = 1) -> optuna.pruners.BasePruner:
    """Hyperband over epochs (the default), the median rule, or no pruning."""
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=max_epochs, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=min_epochs)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise SaofuError(f"unknown pruner {name!r}; choose one of {PRUNERS}")


def grid_size(space: SearchSpace) -> int:
    n = 1
    for values in space.grid().values():
        n *= len(values)
    return n


# ---------------------------------------------------------------------------------------------- storage


def make_storage(url: str, heartbeat_s: int | None = 10, grace_s: int | None = None,
                 max_retry: int = 2) -> RDBStorage:
    """RDB storage with heartbeats and retry of stale trials (`heartbeat_s=None`: no heartbeat).

    A postgresql URL without a password gets the one saofu's passfiles hold for it
    (`tasks.search.passwords`), handed to the driver beside the URL, never inside it.
    """
    if not url.startswith(("sqlite:", "postgresql")):
        raise SaofuError(f"study storage must be a sqlite:/// or postgresql:// URL, got {hide_password(url)!r}")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs: dict = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {"pool_pre_ping": True}
    if url.startswith("postgresql") and not has_password(url):
        found = find_password(url)
        if found is not None:
            engine_kwargs["connect_args"] = {"password": found[0]}
    beat = {}
    if heartbeat_s:
        beat = {"heartbeat_interval": heartbeat_s, "grace_period": grace_s or 3 * heartbeat_s,
                "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=max_retry)}
    for attempt in range(3):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, **beat)
        except Exception as exc:  # SQLAlchemy's errors name the driver problem; add which URL it was
            # Workers starting together on an empty database race to create Optuna's tables; the
            # loser sees a duplicate-key error and finds the tables there on the next try.
            if attempt == 2 or "already exists" not in str(exc):
                raise SaofuError(f"cannot open the study storage {hide_password(url)}: {exc}") from exc
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


@contextmanager
def claim_lock(storage: RDBStorage) -> Iterator[None]:
    """Serialise trial claims across processes: a PostgreSQL advisory lock, or a file lock for SQLite."""
    url = str(storage.url)
    if url.startswith("postgresql"):
        from sqlalchemy import text

        with storage.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _ADVISORY_LOCK_KEY})
    elif url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        from filelock import FileLock

        with FileLock(url.removeprefix("sqlite:///") + ".lock", timeout=600):
            yield
    else:
        with _PROCESS_LOCK:
            yield


_PROCESS_LOCK = threading.Lock()


@contextmanager
def heartbeat(storage: RDBStorage, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every interval while it runs (what `study.optimize` does)."""
    interval = storage.get_heartbeat_interval()
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            storage.record_heartbeat(trial_id)

    storage.record_heartbeat(trial_id)
    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------------------------- workers


def superseded(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of trials that a later trial retries (they no longer count)."""
    return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}


def counting_trials(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards `n_trials`: all but the superseded ones."""
    gone = superseded(trials)
    return [t for t in trials if t.number not in gone]


Log = Callable[[str], None]


def run_worker(
    study: optuna.Study, storage: RDBStorage, objective: Callable[[optuna.Trial], float | tuple[float, ...]],
    n_trials: int, timeout_s: float | None = None, worker: str = "w0", poll_s: float = 1.0, log: Log = print,
    max_consecutive_errors: int = 3,
) -> list[int]:
    """Claim and run trials of `study` until it holds `n_trials` counting trials or time is up.

    Args:
        study: the study, opened on `storage` (several processes may share it).
        storage: the study's RDB storage (`make_storage`): claims lock it, trials beat on it.
        objective: trains one trial; raises `optuna.TrialPruned` to prune.
        n_trials: the study's total, across all workers.
        timeout_s: wall-clock budget of this worker; no trial starts after it (a running one finishes).
        worker: this worker's name, for logs and the trial's `worker` attribute.
        poll_s: how often to look again while other workers' trials run.
        log: progress lines.
        max_consecutive_errors: stop (raising) after this many trials in a row raise errors:
            a broken setup should not burn the whole budget.

    Returns:
        The numbers of the trials this worker ran.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    ran: list[int] = []
    errors = 0
    while True:
        with claim_lock(storage):
            fail_stale_trials(study)  # marks dead workers' trials FAIL and queues their retries
            trials = study.get_trials(deepcopy=False)
            counting = counting_trials(trials)
            waiting = any(t.state == TrialState.WAITING for t in counting)
            running = any(t.state == TrialState.RUNNING for t in counting)
            out_of_time = deadline is not None and time.monotonic() >= deadline
            trial = study.ask() if not out_of_time and (waiting or len(counting) < n_trials) else None
        if trial is None:
            if running and not out_of_time:
                time.sleep(poll_s)  # another worker's trial may still die and come back as a retry
                continue
            return ran
        trial.set_user_attr("worker", worker)
        retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(storage.get_trial(trial._trial_id))
        log(f"[{worker}] trial {trial.number} started" + ("" if retried is None else f" (retry of trial {retried})"))
        with heartbeat(storage, trial._trial_id):
            try:
                value = objective(trial)
            except optuna.TrialPruned as exc:
                study.tell(trial, state=TrialState.PRUNED)
                log(f"[{worker}] trial {trial.number} pruned: {exc}")
                errors = 0
            except Exception as exc:
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
                study.tell(trial, state=TrialState.FAIL)
                log(f"[{worker}] trial {trial.number} FAILED: {type(exc).__name__}: {exc}")
                errors += 1
                if errors >= max_consecutive_errors:
                    raise SaofuError(f"{errors} trials in a row failed; the last: {exc}") from exc
            else:
                study.tell(trial, value)
                shown = value if isinstance(value, float) else tuple(round(v, 4) for v in value)
                log(f"[{worker}] trial {trial.number} finished: {shown}")
                errors = 0
        ran.append(trial.number)
