"""One search worker process, and the launcher that starts N of them on one study.

A `SearchJob` is everything a worker needs, as JSON: the study (name, storage), the space, sampler,
pruner, budget, score targets, the data, and where to track trials. `saofu search --workers N`
writes the job once and starts N `python -m tasks.search.worker JOB.json --worker wI` processes;
one worker runs in-process. The study's storage is the only thing they share.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import optuna
from pydantic import BaseModel, ConfigDict, Field, field_validator

from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit, prepare_dataset
from tasks.search.objective import Objective, ScoreTargets, TrialHooks, directions
from tasks.search.passwords import refuse_password
from tasks.search.space import SearchSpace
from tasks.search.study import Pruner, Sampler, make_pruner, make_sampler, make_storage, run_worker


class SearchJob(BaseModel):
    """A study and how to run its trials; what every worker process reads."""

    model_config = ConfigDict(hide_input_in_errors=True)  # a refused storage URL must not be echoed

    study_name: str = Field(min_length=1)
    storage: str = Field(description="sqlite:///PATH or postgresql://... (several workers)")
    data_dir: str
    space: SearchSpace = SearchSpace()
    sampler: Sampler = "tpe"
    pruner: Pruner = "hyperband"
    n_trials: int = Field(20, ge=1)
    timeout_s: float | None = Field(None, gt=0, description="wall-clock budget; no trial starts after it")
    epochs: int = Field(8, ge=1, description="epochs of a trial that is not pruned (Hyperband's max resource)")
    min_epochs: int = Field(1, ge=1, description="Hyperband's min resource / median pruner's warm-up")
    targets: ScoreTargets = ScoreTargets()
    measure_latency: bool = Field(False, description="add the INT8 onnxruntime latency as a third cost term")
    val_share: float = Field(0.15, gt=0, lt=1)
    seed: int = 0
    sampler_seed: int | None = Field(
        None, description="the sampler's seed when it must differ from `seed` (which also fixes the data "
        "split and weight init); None: `seed`")
    device: str = "cpu"
    heartbeat_s: int = Field(10, ge=1)
    grace_s: int | None = Field(None, ge=1, description="seconds without heartbeat before a trial is retried")
    max_retry: int = Field(2, ge=0)
    experiment: str | None = Field(None, description="MLflow experiment of the trial runs (None: no tracking)")
    parent_run_id: str | None = Field(None, description="the study's MLflow run: trials nest under it")

    _no_password = field_validator("storage")(refuse_password)

    @property
    def multi_objective(self) -> bool:
        return self.sampler == "nsga2"


def open_study(job: SearchJob, worker: str = "w0") -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """Create the study, or load it when it exists (every worker calls this).

    Each worker seeds its sampler differently (from the job's seed and its name): workers with one
    seed would all propose the same parameters.
    """
    if job.multi_objective and job.pruner != "none":
        raise SaofuError("NSGA-II runs multi-objective trials, which Optuna cannot prune: use pruner 'none'")
    storage = make_storage(job.storage, job.heartbeat_s, job.grace_s, job.max_retry)
    base = job.seed if job.sampler_seed is None else job.sampler_seed
    seed = base if worker == "w0" else base + zlib.crc32(worker.encode())
    study = optuna.create_study(
        storage=storage, study_name=job.study_name, load_if_exists=True,
        sampler=make_sampler(job.sampler, job.space, seed),
        pruner=make_pruner(job.pruner, job.epochs, job.min_epochs),
        directions=directions(job.multi_objective, job.measure_latency),
    )
    return study, storage


def data_loader(job: SearchJob):
    """resolution -> (train, val), decoded once per resolution (the tensor cache serves the rest)."""
    from saofu.settings import get_settings

    cache_dir = get_settings().cache_dir

    @cache
    def data_for(resolution: int) -> tuple[TensorSplit, TensorSplit]:
        prepared = prepare_dataset(job.data_dir, resolution, job.val_share, job.seed, cache_dir)
        return prepared.train, prepared.val

    return data_for


def build_objective(job: SearchJob, hooks: TrialHooks | None = None) -> Objective:
    return Objective(
        space=job.space, data_for=data_loader(job), epochs=job.epochs, targets=job.targets,
        multi_objective=job.multi_objective, measure_latency=job.measure_latency,
        only=set(job.space.grid_dims) if job.sampler == "grid" else None, seed=job.seed, device=job.device,
        hooks=hooks or TrialHooks(),
    )


def run_job_worker(job: SearchJob, worker: str = "w0") -> list[int]:
    """Run one worker of `job` in this process; returns the trial numbers it ran."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    study, storage = open_study(job, worker)
    hooks = None
    if job.experiment:
        from tasks.search.tracking import mlflow_trial_hooks

        hooks = mlflow_trial_hooks(job.experiment, job.parent_run_id, job.study_name)
    return run_worker(study, storage, build_objective(job, hooks), job.n_trials, job.timeout_s, worker,
                      log=lambda line: print(line, flush=True))


def write_job(job: SearchJob, path: Path) -> None:
    """Write the job file for the workers, readable by its owner only from its first byte.

    It names the storage (never with a password: `SearchJob` refuses one), the data and the MLflow
    run; a new file replaces the old, so an earlier copy's looser mode does not carry over.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(job.model_dump_json(indent=2))
    os.replace(tmp, path)


def launch_workers(job: SearchJob, workers: int, job_file: Path, threads_per_worker: int | None = None) -> None:
    """Start `workers` processes on `job` and wait for all; their output is prefixed and streamed.

    Raises:
        SaofuError: a worker exited with an error (the others are left to finish first).
    """
    write_job(job, job_file)
    open_study(job)  # create tables and study once, here, rather than in N racing workers
    # Split the cores between workers: N torch processes each using every core slow each other down
    # many times over (OpenMP threads spin while they wait).
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "tasks.search.worker", str(job_file), "--worker", f"w{i}"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for i in range(workers)
    ]

    def pump(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            print(f"w{i}| {line}", end="", flush=True)

    pumps = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in pumps:
        t.start()
    codes = [p.wait() for p in procs]
    for t in pumps:
        t.join(timeout=5)
    failed = [f"w{i} (exit {c})" for i, c in enumerate(codes) if c != 0]
    if failed:
        raise SaofuError(f"search workers failed: {', '.join(failed)}; their output is above")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run one worker of a saofu search study.")
    p.add_argument("job", type=Path, help="the SearchJob JSON written by `saofu search`")
    p.add_argument("--worker", default="w0", help="this worker's name in logs and trial attributes")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    job = SearchJob.model_validate_json(a.job.read_text())
    started = time.perf_counter()
    ran = run_job_worker(job, a.worker)
    print(f"[{a.worker}] done: ran {len(ran)} trials in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
