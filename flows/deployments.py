"""The deployments, declared in code, and the executor that serves them.

| deployment | flow | schedule |
|---|---|---|
| fast-retrain | flows/fast_retrain.py | on demand (its form: FastRetrainParams, every field has a default) |
| active-learning | flows/active_learning.py | every hour |
| ingest | flows/ingest.py | every 10 minutes |
| release | flows/release.py | on demand |
| search | flows/search.py | on demand |
| cycle | flows/cycle.py | nightly, 02:00 UTC (active learning → ingest → short search → train → release) |

The scheduled three name no dataset or pool (unless `deployment_specs` is given them): each run
resolves them when it starts, not when the executor starts (a champion may appear later): the
pool `saofu serve` logs into, `<SAOFU_HOME>/data/online_pool`, and the labelled dataset
`<SAOFU_HOME>/data/labelled`, else the champion's training data, else its labelled copy (made by
the first fast retrain; tasks/data/project_dataset.py). Until there is something to work on (no
dataset, pool, champion, second model or Label Studio project yet) a run completes as skipped,
with one warning saying what to run, instead of failing every 10 minutes.

`python -m flows.deployments` (what `saofu up` starts, with PREFECT_API_URL pointing at the
server) registers them on the server and executes their runs in this process's children until
it is stopped. Stopping it does not pause the schedules (`pause_on_shutdown=False`): runs due
while it is down wait as Scheduled/Late and start when it is back.

One change at a time per registered model: the release, the fast retrain and the cycle (which
releases through `release_flow`) all hold the model's Prefect global concurrency limit
`saofu-model:<name>` (flows/locks.py) while they may move its aliases.

Retries: every deployed flow retries once after a failure. What a retry does not redo:
the fast retrain's fine-tune (cached on its inputs, result persisted); ingest's finished
annotations (its cursor only moves after a data version exists); active learning's images
already sent (the pool state); the cycle's search (one study per model and night, resumed by
name). A release retried compresses and evaluates again (its tasks' results are not persisted).

`SAOFU_FAILURE_WEBHOOK` set: `serve_all()` first makes the server post every failed or crashed
flow run to it (flows/notifications.py).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

HOURLY = timedelta(hours=1)
TEN_MINUTES = timedelta(minutes=10)
NIGHTLY_CRON = "0 2 * * *"
NAMES = ("fast-retrain", "active-learning", "ingest", "release", "search", "cycle")
# How often the executor asks the server for runs to start. Prefect's default, 10 s, is the wait a
# click in the UI adds before anything runs: 3-10 s of the clicked fast retrain's 61-74 s in
# `saofu bench click-path` (README). Every ask is one request (the server marks the deployments
# polled); at 2 s that is one every two seconds on loopback.
POLL_S = 2


def deployment_specs(
    *,
    dataset_dir: str = "",
    pool_dir: str = "",
    project: str = "fu-recognizer",
    registered_model: str = "fu-recognizer",
    active_learning_interval: timedelta | float = HOURLY,
    ingest_interval: timedelta | float = TEN_MINUTES,
    cycle_cron: str = NIGHTLY_CRON,
    retries: int = 1,
    retry_delay_seconds: float = 60,
) -> list[tuple[Any, dict[str, Any]]]:
    """(flow with retries, to_deployment keyword arguments) for each of the six deployments.

    `dataset_dir` and `pool_dir` empty (the default) are passed on empty: the flows resolve them per run.
    """
    from flows.active_learning import active_learning_flow
    from flows.cycle import CycleParams, cycle_flow
    from flows.fast_retrain import FastRetrainParams, fast_retrain_flow
    from flows.ingest import ingest_flow
    from flows.release import ReleaseParams, release_flow
    from flows.search import search_flow

    def retrying(f):
        return f.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)

    fast = FastRetrainParams(registered_model=registered_model, labels=project)
    return [
        (retrying(fast_retrain_flow), dict(
            name="fast-retrain", parameters={"params": fast.model_dump(mode="json")},
            description="Add or correct classes of the serving model and ship the result (on demand).",
            tags=["saofu", "alias-mover"])),
        (retrying(active_learning_flow), dict(
            name="active-learning", interval=active_learning_interval,
            parameters={"params": {"pool_dir": pool_dir, "dataset_dir": dataset_dir, "project": project,
                                   "registered_model": registered_model}},
            description="Auto-label the online pool where two models agree; the rest to Label Studio.",
            tags=["saofu"])),
        (retrying(ingest_flow), dict(
            name="ingest", interval=ingest_interval,
            parameters={"params": {"project": project, "dataset_dir": dataset_dir,
                                   "registered_model": registered_model}},
            description="Finished annotations → validated → a new DVC data version.", tags=["saofu"])),
        (retrying(release_flow), dict(
            name="release",
            parameters={"params": ReleaseParams(registered_model=registered_model).model_dump(mode="json")},
            description="Compress → evaluate → gate → promote the newest trained version (on demand).",
            tags=["saofu", "alias-mover"])),
        (retrying(search_flow), dict(
            name="search", description="Architecture + hyper-parameter search (on demand).", tags=["saofu"])),
        (retrying(cycle_flow), dict(
            name="cycle", cron=cycle_cron,
            parameters={"params": CycleParams(registered_model=registered_model, dataset_dir=dataset_dir,
                                              pool_dir=pool_dir, project=project).model_dump(mode="json")},
            description="The whole loop, nightly: active learning → ingest → short search → train → release.",
            tags=["saofu", "alias-mover"])),
    ]


def deployments(**kwargs: Any) -> list[Any]:
    """The six deployments (RunnerDeployment objects, not yet registered); see deployment_specs for options."""
    return [f.to_deployment(**kw) for f, kw in deployment_specs(**kwargs)]


def serve_all(webhook_url: str = "", **kwargs: Any) -> None:
    """Register the deployments on the server (PREFECT_API_URL) and execute their runs until stopped.

    What `prefect.serve(*deployments(), pause_on_shutdown=False)` does, except that each flow object
    is handed to the runner (`Runner.add_flow`, as `Flow.serve` does): `serve()` with deployments
    loads each flow again from its entrypoint, the module's undecorated-options flow, and would
    drop the retries set here.
    """
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner

    from flows.notifications import ensure_failure_webhook, webhook_url_from_env

    url = webhook_url or webhook_url_from_env()
    if url:
        ensure_failure_webhook(url)
    runner = Runner(name="saofu", pause_on_shutdown=False, query_seconds=POLL_S)
    for f, kw in deployment_specs(**kwargs):
        runner.add_flow(f, **kw)
    # every deployment is registered now: `saofu up` waits for this line (services.prefect_server.SERVING_LINE)
    print(f"saofu executor: serving {', '.join(NAMES)}", flush=True)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal):
        pass


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=serve_all.__doc__)
    parser.add_argument("--model", default="fu-recognizer",
                        help="the registered model the deployments default to (also the Label Studio project)")
    args = parser.parse_args(argv)
    serve_all(registered_model=args.model, project=args.model)


if __name__ == "__main__":
    main()
