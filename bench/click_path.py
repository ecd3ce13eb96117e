"""`saofu bench click-path`: the fast retrain clicked in the Prefect UI beside the same flow called in-process.

`saofu bench fast-retrain` times the flow called in its own, warm process (as `saofu fast-retrain`
runs it, imports done). A person clicks Run in the Prefect UI instead: the run is created on the
server, the executor (`saofu up executor`, `flows/deployments.py`) finds it at its next poll, starts
a process for it, and that process imports the flow's modules before the flow's first line. This
bench measures that path on the fast-retrain bench's world, from the click to the serving app
answering with the new version, beside the same change run in-process against the same server.

It reuses a finished `saofu bench fast-retrain` run's folder (world, base dataset, campaign
champion) and starts the running system there as a user does (`saofu up prefect executor labeling
serving`, stopped at the end). Each draw, for each way (the two alternating which goes first): the
campaign's champion promoted back, a fresh copy of the base dataset prepared as the fast-retrain
bench prepares its draws, the merchant labels answered in a new Label Studio project by the
simulated labeler, then the fast retrain with the ship draw's gate (so it promotes and waits until
the new version is served). The click is what the UI's Run button does: `run_deployment` with the
form's parameters; its wall time runs from that call until the run is Completed (the flow itself
waits for the serving app), split by the run's state history into waiting for the executor's poll
(Scheduled → Pending), starting the run's process (Pending → Running) and the flow (Running →
Completed). Run alone, after the fast-retrain bench; 14 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.fast_retrain import BUDGET_MIN, MODEL, SHIP_GATE, _free_port, _label_in_label_studio, campaign_dataset
from bench.held_out_world import world_image_size

WAYS = ("click", "in-process")
PHASES = ("waiting for the executor", "starting the run's process", "the flow")


def phases(states: list[tuple[str, float]], clicked: float) -> dict[str, float]:
    """Seconds of each phase of a deployment run, from its state history (name, epoch seconds) and the click.

    The first `Pending` ends the wait for the executor, the first `Running` the process's start,
    the last state (the final one) the flow.
    """
    first = {}
    for name, at in sorted(states, key=lambda s: s[1]):
        first.setdefault(name, at)
    if "Pending" not in first or "Running" not in first:
        raise ValueError(f"the run never ran: states {[name for name, _ in states]}")
    end = max(at for _, at in states)
    return {PHASES[0]: first["Pending"] - clicked, PHASES[1]: first["Running"] - first["Pending"],
            PHASES[2]: end - first["Running"]}


def _click(params, timeout_s: float = 600.0) -> dict:
    """Run the `fast-retrain` deployment as the UI's Run button does; wait for its final state."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    clicked_epoch, started = time.time(), time.perf_counter()
    run = run_deployment("fast-retrain/fast-retrain", parameters={"params": params.model_dump(mode="json")},
                         timeout=0)
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + timeout_s
        while True:
            state = client.read_flow_run(run.id).state
            if state is not None and state.is_final():
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the clicked run {run.id} is still {state.name if state else '?'} "
                                   f"after {timeout_s:.0f} s")
            time.sleep(0.2)
        wall = time.perf_counter() - started
        history = [(s.name, s.timestamp.timestamp()) for s in client.read_flow_run_states(run.id)]
    if not state.is_completed():
        raise RuntimeError(f"the clicked run {run.id} ended {state.name}: {state.message}")
    return {"wall_s": wall, "phases": phases(history, clicked_epoch), "flow_run_id": str(run.id)}


def _in_process(params) -> dict:
    from flows.fast_retrain import fast_retrain_flow
    from flows.heartbeat import without_heartbeat

    started = time.perf_counter()
    with without_heartbeat():  # as `saofu fast-retrain` runs it
        result = fast_retrain_flow(params)
    if not result.promoted:
        raise RuntimeError(f"the in-process run was not promoted:\n{result.gate_table}")
    return {"wall_s": time.perf_counter() - started, "flow_wall_s": result.wall_s, "steps": result.steps}


def summarize(draws: list[dict]) -> dict[str, dict]:
    """Per way: the median wall time and its range, and (the click) each phase's median."""
    out = {}
    for way in WAYS:
        mine = [d for d in draws if d["way"] == way]
        walls = [d["wall_s"] for d in mine]
        row = {"draws": len(mine), "wall_s": statistics.median(walls), "wall_range_s": [min(walls), max(walls)]}
        if mine and "phases" in mine[0]:
            row["phases"] = {p: statistics.median(d["phases"][p] for d in mine) for p in PHASES}
        out[way] = row
    return out


def table(summary: dict[str, dict]) -> str:
    lines = ["way | to served, s (median, range) | " + " | ".join(PHASES)]
    for way, row in summary.items():
        lo, hi = row["wall_range_s"]
        cells = [f"{row['phases'][p]:.1f}" for p in PHASES] if "phases" in row else ["-", "-", "-"]
        lines.append(f"{way} | {row['wall_s']:.1f} ({lo:.1f}-{hi:.1f}) | " + " | ".join(cells))
    return "\n".join(lines)


def run(draws: int = 3, home: Path = Path("bench/work/fast_retrain"),
        out: Path = Path("bench/results/click_path.json")) -> dict:
    from services import labeling as labeling_service

    home = home.resolve()
    if not (home / "world" / "manifest.csv").is_file():
        raise SystemExit(f"no fast-retrain bench run in {home}: run `saofu bench fast-retrain` first")
    os.environ.setdefault("SAOFU_LABELSTUDIO_VENV", str(labeling_service.default_venv_dir()))
    os.environ["SAOFU_HOME"] = str(home)
    for name in ("MLFLOW_TRACKING_URI", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "PREFECT_API_URL"):
        os.environ.pop(name, None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    ports = {"prefect": _free_port(), "labeling": _free_port(), "serving": _free_port()}
    saofu = str(Path(sys.executable).with_name("saofu"))
    names = ["prefect", "executor", "labeling", "serving"]
    print(f"saofu up {' '.join(names)} in {home}", flush=True)
    subprocess.run([saofu, "up", *names, "--model", MODEL, *(a for k, p in ports.items()
                                                             for a in (f"--{k}-port", str(p)))], check=True)
    # This process's flows and clicks go to the same server the executor serves.
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{ports['prefect']}/api"
    serve_url = f"http://127.0.0.1:{ports['serving']}"

    from bench.held_out_rescore import bench_models
    from bench.models import _device_name
    from flows.fast_retrain import ClassChange, FastRetrainParams
    from tasks.data.manifest import read_manifest
    from tasks.release.registry import current_champion, promote

    world, base = home / "world", home / "data" / "fu_base"
    size = world_image_size(world)  # the models' input: the bench may have run at another size than 64
    labels = [world / r["path"] for r in read_manifest(world) if r["label"] == "fu_merchant" and r["split"] != "test"]
    champion = bench_models()["champion"]
    stamp = time.strftime("%H%M%S")
    results = []
    try:
        for draw in range(draws):
            for way in (WAYS if draw % 2 == 0 else WAYS[::-1]):
                if current_champion(MODEL) != champion:
                    promote(MODEL, champion, "bench click-path: the campaign's champion again")
                name = f"{way.replace('-', '')}{draw}_{stamp}"
                dataset = campaign_dataset(base, home / "data" / f"fu_{name}", size)
                project = f"fu-merchant-{name}"
                _label_in_label_studio(project, labels, home, seed=draw)
                params = FastRetrainParams(
                    registered_model=MODEL, changes=[ClassChange(name="fu_merchant", kind="new", refines="fu")],
                    labels=project, labels_kind="label-studio", dataset_dir=str(dataset), base_version=champion,
                    budget_min=BUDGET_MIN, serve_url=serve_url, seed=draw, experiment="bench-click-path", **SHIP_GATE)
                d = _click(params) if way == "click" else _in_process(params)
                print(f"draw {draw + 1}/{draws}, {way}: {d['wall_s']:.1f} s to served"
                      + ("".join(f", {p} {s:.1f}" for p, s in d["phases"].items()) if "phases" in d else ""),
                      flush=True)
                results.append({"draw": draw, "way": way, **d})
    finally:
        subprocess.run([saofu, "down", *names], check=False)
    summary = summarize(results)
    from flows.deployments import POLL_S

    result = {"summary": summary, "draws": results, "device": _device_name(), "budget_min": BUDGET_MIN,
              "executor_poll_s": POLL_S,
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return {**result, "table": table(summary)}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/click_path.json"))
    args = parser.parse_args()
    print(run(args.draws, out=args.out)["table"])
