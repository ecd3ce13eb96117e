"""`make demo` / `saofu demo`: the whole loop on embedded defaults, left running for the user to click.

    generate the Fu world (with the merchant campaign's class held back)
    → `saofu up`: the Prefect server, the executor of the deployments, MLflow, Label Studio, serving
    → a seed set labelled in Label Studio by the simulated labeler → ingest (GX, a DVC version)
    → train the champion and a second model (active learning's other vote) → release: served
    → simulated scans sent to the serving app (the online pool fills)
    → active learning (auto-labels where both models agree, the rest to Label Studio)
    → the merchant campaign: `fu_merchant` labels in Label Studio, then the fast retrain as a
      run of the `fast-retrain` deployment (what the one click in the Prefect UI starts)

Every flow runs against the Prefect server it started, so all of it shows in the UI. The sizes
are the demo's, not the benchmarks': a few minutes of work on 2 cores. The services stay up at
the end; the summary names each step's wall time, the versions, and says `saofu down` stops
everything. `saofu demo --train-only` is the earlier demo (the training flow alone).

SIMULATION: the labels come from the simulated labeler (the world's ground truth) and the scans
from the stream simulator; in a team's project people label and phones scan.
"""

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from saofu.settings import get_settings

MODEL = "fu-recognizer"
SEED_PROJECT = "fu-recognizer"  # the project active learning and the scheduled ingest use
CAMPAIGN_PROJECT = "fu-merchant-campaign"


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes: small enough for minutes on 2 cores, large enough to ship something real."""

    world_n: int = 2400
    # Gentler degradations than the benchmarks' world (0.3): a 1,000-image seed set and a minute of
    # training then make models worth shipping, which is what the demo shows.
    difficulty: float = 0.15
    seed_per_class: int = 500  # fu and not_fu images labelled through Label Studio
    merchant_labels: int = 300
    epochs: int = 12
    # Active learning's second vote: another architecture that learns well from a small seed set
    # (mobilenet_v3_small_050 stays near chance on 1,000 images in a few epochs).
    second_model: str = "saofu_fu_tiny"
    second_epochs: int = 8
    scans: int = 200
    budget_min: float = 1.5
    # The demo's gate for the fast retrain: a 2,400-image world trains no 95 % model in a minute;
    # the defaults (0.95, 0.5 pt) stay what a real campaign is judged on.
    new_class_recall: float = 0.8
    max_old_class_drop_pts: float = 3.0
    # No parent gate (the flow's default is 0.99): the gate keeps the champion's answer where it is
    # sure of another class, and the demo's champion (12 epochs on 1,000 labels) is sure that most
    # merchant 福 are `not_fu` (it answers `fu` on 6 % of them), so the gate held the new class's
    # recall at 0.78, under the demo's 0.8 (2026-12-07). On the bench's world the champion reads
    # them (83 %) and the gate pays.
    parent_gate: float = 0.0
    seed: int = 0


@dataclass
class DemoSummary:
    steps: list[tuple[str, float, str]] = field(default_factory=list)  # (step, seconds, outcome)
    services: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"steps": [{"step": s, "seconds": round(t, 1), "outcome": o} for s, t, o in self.steps],
                "services": self.services, "versions": self.versions, "seconds": round(self.seconds, 1)}


class _Clock:
    def __init__(self, summary: DemoSummary):
        self.summary, self.last = summary, time.perf_counter()

    def lap(self, step: str, outcome: str) -> None:
        now = time.perf_counter()
        self.summary.steps.append((step, now - self.last, outcome))
        print(f"[demo] {step}: {outcome} ({now - self.last:.0f} s)", flush=True)
        self.last = now


def _seed_and_campaign(world: Path, cfg: DemoConfig) -> tuple[list[tuple[Path, str]], list[Path]]:
    """(seed images with their class, merchant images) from the world's train/val splits."""
    from tasks.data.manifest import read_manifest

    rows = [r for r in read_manifest(world) if r["split"] != "test"]
    seed: list[tuple[Path, str]] = []
    for label in ("fu", "not_fu"):
        seed += [(world / r["path"], label) for r in rows if r["label"] == label][:cfg.seed_per_class]
    merchant = [world / r["path"] for r in rows if r["label"] == "fu_merchant"][:cfg.merchant_labels]
    return seed, merchant


def _label(project: str, classes: list[str], images: list[tuple[Path, str]], seed: int) -> int:
    """SIMULATION: import `images` into a Label Studio project and let the simulated labeler answer."""
    from tasks.labeling.client import LabelingItem, connect, ensure_project, import_tasks
    from tasks.labeling.simulated_labeler import simulate_labeling

    truth = {str(p.resolve()): label for p, label in images}
    client = connect()
    pid = ensure_project(client, project, classes)
    import_tasks(client, pid, [LabelingItem(image=p.resolve(), source="demo") for p, _ in images])
    simulate_labeling(client, pid, truth=lambda task: truth[str(Path(task["data"]["path"]).resolve())], seed=seed)
    return pid


def _send_scans(url: str, n: int, seed: int) -> int:
    """SIMULATION: `n` scans from the stream simulator, each POSTed to the serving app as a phone would."""
    import io

    import httpx

    from tasks.data.stream import simulate_scans

    answered = 0
    with httpx.Client(timeout=10) as client:
        for scan in simulate_scans(n, seed, datetime.now(UTC), rate_per_hour=600.0):
            buf = io.BytesIO()
            scan.image.save(buf, "PNG")
            r = client.post(f"{url}/predict", content=buf.getvalue(), headers={"content-type": "image/png"})
            answered += r.status_code == 200
    return answered


def _served_version(url: str) -> str | None:
    """The champion version the serving app answers with now (the fast retrain's run waited for it)."""
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=5).json().get("versions", {}).get("champion")
    except (httpx.HTTPError, ValueError):
        return None


def run_demo(cfg: DemoConfig = DemoConfig()) -> DemoSummary:
    """The whole loop (see the module's docstring); returns the summary. The services stay up."""
    from services import stack

    summary = DemoSummary()
    started = time.perf_counter()
    clock = _Clock(summary)
    settings = get_settings()

    # 1. The services, on their default ports (one line naming a busy port or a missing dependency).
    services = stack.up(None, {}, model=MODEL)
    summary.services = {name: {k: v for k, v in info.items() if k in ("url", "login", "pid")}
                        for name, info in services.items()}
    clock.lap("services up", ", ".join(f"{n} {i['url']}" for n, i in services.items() if n != "executor"))
    # This process's flows report to that server (the UI shows every run), its Label Studio and store.
    os.environ["PREFECT_API_URL"] = f"{services['prefect']['url']}/api"
    from services import labeling

    handle = labeling.status()
    os.environ.update({"LABEL_STUDIO_URL": handle.url, "LABEL_STUDIO_API_KEY": handle.token,
                       "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(handle.files_root)})
    serving_url = services["serving"]["url"]

    from flows.active_learning import ActiveLearningParams, active_learning_flow
    from flows.ingest import IngestParams, ingest_flow
    from flows.release import ReleaseParams, release_flow
    from flows.train import TrainFlowParams, train_flow
    from tasks import tracking
    from tasks.data.fu_world import WorldConfig, generate_world, is_same_world
    from tasks.release import registry

    # 2. The world: fu / not_fu now, fu_merchant for the campaign later.
    world_cfg = WorldConfig(n=cfg.world_n, seed=cfg.seed, merchant=True, difficulty=cfg.difficulty)
    world = settings.data_dir / f"fu_world_demo_n{cfg.world_n}_s{cfg.seed}_d{cfg.difficulty:g}_{world_cfg.image_size}px"
    if not is_same_world(world, world_cfg):
        generate_world(world, world_cfg)
    seed_images, merchant = _seed_and_campaign(world, cfg)
    clock.lap("world", f"{world.name}: {len(seed_images)} seed images, {len(merchant)} merchant labels to come")

    # 3. Seed labels through Label Studio, ingested into the labelled dataset (GX suite, DVC version).
    _label(SEED_PROJECT, ["fu", "not_fu"], seed_images, cfg.seed)
    dataset = settings.labelled_dir  # where the scheduled flows look first
    ingested = ingest_flow(IngestParams(project=SEED_PROJECT, dataset_dir=str(dataset), dataset_name="fu",
                                        classes=["fu", "not_fu"], registered_model=MODEL))
    clock.lap("seed labels → ingest", f"{ingested.added} labels in {dataset}, data version {ingested.data_version}")

    # 4. The champion and the second model active learning votes with.
    champion = train_flow(TrainFlowParams(data_dir=str(dataset), epochs=cfg.epochs, registered_model=MODEL,
                                          seed=cfg.seed, experiment="saofu-demo"))
    clock.lap("train", f"{MODEL} v{champion.version}: val accuracy {champion.val_accuracy:.3f}")
    second = train_flow(TrainFlowParams(data_dir=str(dataset), model=cfg.second_model, epochs=cfg.second_epochs,
                                        registered_model=MODEL, seed=cfg.seed + 1, experiment="saofu-demo"))
    tracking.client().set_registered_model_alias(MODEL, "second", second.version)
    clock.lap("train second model", f"{cfg.second_model} v{second.version} (@second), "
                                    f"val accuracy {second.val_accuracy:.3f}")

    # 5. Release: compress → evaluate → gate → promote; the serving app picks the champion up.
    released = release_flow(ReleaseParams(registered_model=MODEL, candidate_version=champion.version,
                                          serve_url=serving_url, reason="demo: first release"))
    now_serving = registry.current_champion(MODEL)
    if not now_serving:
        raise RuntimeError(f"the demo's first release did not pass its gate:\n{released.gate_table}")
    summary.versions.update(trained=champion.version, second=second.version, champion=now_serving)
    clock.lap("release", f"v{now_serving} ({released.shipped}) is the champion, served" if released.promoted
              else f"the gate kept v{now_serving} (a demo run before this one promoted it)")

    # 6. Phones scan: the serving app answers and logs each image into the online pool.
    answered = _send_scans(serving_url, cfg.scans, cfg.seed)
    clock.lap("scans", f"{answered} of {cfg.scans} simulated scans answered by the serving app")

    # 7. Active learning on the pool: auto-labels where both models agree, the rest to Label Studio.
    al = active_learning_flow(ActiveLearningParams(pool_dir=str(settings.online_pool_dir),
                                                   dataset_dir=str(dataset), registered_model=MODEL,
                                                   project=SEED_PROJECT))
    clock.lap("active learning", f"{al.new_images} new images: {al.auto} auto-labelled, {al.human} to labelers")

    # 8. The merchant campaign: labels in Label Studio, then the one click (a deployment run).
    _label(CAMPAIGN_PROJECT, ["fu", "not_fu", "fu_merchant"], [(p, "fu_merchant") for p in merchant], cfg.seed)
    clock.lap("campaign labels", f"{len(merchant)} fu_merchant images labelled in {CAMPAIGN_PROJECT!r}")
    run = _fast_retrain_deployment_run(cfg, str(dataset), serving_url)
    after = registry.current_champion(MODEL)
    shipped = after != now_serving
    summary.versions["champion_after_fast_retrain"] = after or ""
    served = bool(after) and _served_version(serving_url) == after
    clock.lap("fast retrain (deployment run)",
              f"run {run.name!r} {run.state.type.value.lower()}: " + (
                  f"v{after} adds fu_merchant, {'served' if served else 'NOT served yet'}" if shipped
                  else f"the gate kept v{after} (see the run's log in the Prefect UI)"))
    summary.seconds = time.perf_counter() - started
    return summary


def _fast_retrain_deployment_run(cfg: DemoConfig, dataset: str, serving_url: str):
    """Start the `fast-retrain` deployment as the UI's Custom run does, and wait for it to finish."""
    from prefect.deployments import run_deployment

    from flows.fast_retrain import ClassChange, FastRetrainParams

    params = FastRetrainParams(
        registered_model=MODEL, changes=[ClassChange(name="fu_merchant", kind="new", refines="fu")],
        labels=CAMPAIGN_PROJECT, labels_kind="label-studio", dataset_dir=dataset, dataset_name="fu",
        budget_min=cfg.budget_min, parent_gate=cfg.parent_gate,
        new_class_recall=cfg.new_class_recall, max_old_class_drop_pts=cfg.max_old_class_drop_pts,
        serve_url=serving_url, seed=cfg.seed)
    return run_deployment("fast-retrain/fast-retrain", parameters={"params": params.model_dump(mode="json")},
                          timeout=1200, poll_interval=3)


def format_summary(summary: DemoSummary) -> str:
    rows = [f"{'step':<30} {'seconds':>8}  outcome"]
    rows += [f"{step:<30} {seconds:>8.0f}  {outcome}" for step, seconds, outcome in summary.steps]
    rows.append(f"{'total':<30} {summary.seconds:>8.0f}")
    urls = [f"  {name:<9} {info['url']}" + (f"   login: {info['login']['username']} (password in "
                                             f"{info['login']['file']})" if info.get("login") else "")
            for name, info in summary.services.items() if name != "executor"]
    return "\n".join([*rows, "", "running (open the Prefect UI → Deployments → fast-retrain → Run → Custom run):",
                      *urls, "", "stop everything with: saofu down"])
