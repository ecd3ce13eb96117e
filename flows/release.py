"""The release flow: compress → evaluate → register → gate → deploy.

A trained float version of the registered model is compressed (static INT8, and channel pruning
with a short fine-tune for saofu recognisers); the fastest artefact within the accuracy bar (FP32
or INT8, pruned or not; only a speed difference beyond timing noise counts) is registered as a new
version with its lineage and set as `challenger`. Challenger and champion are evaluated on the same
three sets (fresh online slice, regression set, open badcases) with plots and a runtime profile;
the gate compares them on the fresh slice. A passing gate moves `champion` (recorded, so `saofu
rollback` undoes it): that is the deployment, since the serving app follows the alias and swaps
models without failing a request; with `serve_url` the flow waits until the app answers with the
new version. A failing gate is recorded on the version and changes nothing. Either way the run's
page in the Prefect UI carries its summary (a markdown artifact keyed `release-MODEL`).

With `canary_share` > 0 a passing challenger goes through the serving app's canary first: the
app (started with the same `--canary-share`) sends that share of traffic to `@challenger` with the
champion in shadow, and the flow promotes only once the canary has been judged on its minimum
number of requests without being rolled back.

The flow holds the registered model's concurrency slot (`flows/locks.py`) from start to end, so a
release and a fast retrain of the same model never move its aliases at the same time.
"""


import json
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field

from flows.locks import model_lock
from flows.release_summary import release_summary, release_verdict
from flows.run_summary import artifact_key, publish
from flows.step_clock import StepClock
from saofu.errors import SaofuError
from saofu.settings import get_settings
from tasks import tracking
from tasks.data.loading import TensorSplit, prepare_dataset
from tasks.release import registry
from tasks.release.changes import changes_table, release_changes
from tasks.release.gate import GateConfig, evaluate_gate
from tasks.release.report import compare_plot, compare_table, flat_metrics, gate_metrics, release_report
from tasks.release.serving_wait import CanaryVerdict, canary_share_of, wait_for_canary, wait_until_served
from tasks.release.sets import FreshSlice, badcase_set, choose_fresh_slice, regression_set
from tasks.release.steps import (
    ARTEFACT_TAG,
    Candidate,
    Variant,
    build_variants,
    choose_artefact,
    format_variants,
    load_candidate,
    measure_variants,
    variants_json,
)
from tasks.train.loop import checkpoint_arch


class ReleaseParams(BaseModel):
    """Parameters of one release."""

    # An infinite canary timeout would wait for ever; NaN passes no bound check it is compared with.
    model_config = ConfigDict(allow_inf_nan=False)

    registered_model: str = Field("fu-recognizer", min_length=1)
    candidate_version: str | None = Field(None, description="trained version to release; empty: the newest")
    labelled_dir: str | None = Field(
        None, description="fresh online slice: an ImageFolder of recent labelled images (a labelled dataset's "
                          "newest human labels when its manifest has some); empty: the training data's held-out "
                          "human labels, else simulated scans (Fu models), else its held-out split"
    )
    pool_dir: str | None = Field(
        None, description="online pool for simulated fresh scans (Fu-world models without human labels)"
    )
    fresh_n: int = Field(400, ge=10, description="images in the fresh online slice")
    regression_dir: str | None = Field(None, description="dataset whose test split is the regression set; "
                                                          "empty: the candidate's training data")
    badcases: str | None = Field(None, description="badcases.json; empty: the candidate's last evaluation")
    prune_amount: float = Field(0.25, ge=0, lt=1, description="share of hidden channels pruned (0: no pruning)")
    fine_tune_epochs: int = Field(3, ge=0)
    accuracy_bar: float = Field(0.01, ge=0, le=1, description="largest accuracy drop vs the float model that ships")
    threshold: float = Field(0.9, ge=0, le=1)
    negative_class: str | None = Field(
        "not_fu", description="class low-confidence predictions fall back to, where the model has it (else abstain)"
    )
    gate: GateConfig = GateConfig()
    reason: str = Field("release flow", min_length=1, description="recorded with the promotion")
    experiment: str = Field("saofu-release", min_length=1)
    serve_url: str | None = Field(None, description="serving app to check the new champion is live on")
    canary_share: float = Field(0.0, ge=0, le=1, description="0: promote at once; else the share of traffic the "
                                                             "serving app (at serve_url, started with this "
                                                             "--canary-share) gives the challenger before promotion")
    canary_timeout_min: float = Field(10.0, gt=0, description="how long to wait for the canary's verdict")
    version_tags: dict[str, str] = Field(default_factory=dict, description="extra tags on the registered version")
    seed: int = 0


class ReleaseResult(BaseModel):
    run_id: str
    candidate_version: str
    shipped: str | None  # the chosen artefact's label, None when none met the accuracy bar
    challenger_version: str | None
    champion_before: str | None
    champion_after: str | None
    promoted: bool
    gate_passed: bool | None
    gate_table: str
    variants_table: str
    compare_table: str
    fresh_source: str
    changes_table: str = ""  # per set and shared class, the images lost and won against the champion ("" without one)
    fresh_kind: str = ""
    served_version: str | None = None
    canary: str = ""  # the canary's verdict and detail ("" without a canary)
    steps: dict[str, float] = {}  # step -> seconds inside the flow's body
    seconds: float = 0.0  # the flow body's wall time


def _fresh_slice(params: ReleaseParams, candidate: Candidate) -> FreshSlice:
    settings = get_settings()
    return choose_fresh_slice(
        candidate.classes, candidate.image_size, params.fresh_n, labelled_dir=params.labelled_dir,
        data_dir=candidate.data_dir or None, pool_dir=params.pool_dir or str(settings.online_pool_dir),
        seed=params.seed, val_share=candidate.val_share, split_seed=candidate.split_seed, cache_dir=settings.cache_dir,
    )


def _negative_class(params: ReleaseParams, candidate: Candidate) -> str | None:
    # A dataset without the negative class has no fallback: low-confidence predictions abstain.
    return params.negative_class if params.negative_class in candidate.classes else None


@task(name="compress", retries=1, retry_delay_seconds=2)
def compress(candidate: Candidate, params: ReleaseParams, fresh: TensorSplit,
             out_dir: str, negative_class: str | None) -> tuple[list[Variant], Variant | None]:
    data = prepare_dataset(candidate.data_dir, candidate.image_size, 0.15, params.seed, get_settings().cache_dir)
    variants = build_variants(candidate, data.train, data.val, out_dir, params.prune_amount, params.fine_tune_epochs,
                              params.seed)
    measure_variants(variants, fresh, params.threshold, negative_class)
    return variants, choose_artefact(variants, params.accuracy_bar)


@task(name="evaluate-release", retries=1, retry_delay_seconds=2)
def evaluate_release(paths: dict[str, str], sets: dict[str, TensorSplit], params: ReleaseParams,
                     out_dir: str, negative_class: str | None) -> dict[str, dict]:
    """`release_report` of each model (label -> ONNX path) on the same sets."""
    return {label: release_report(path, sets, Path(out_dir) / label, params.threshold, negative_class)
            for label, path in paths.items()}


@flow(name="release", log_prints=True)
def release_flow(params: ReleaseParams = ReleaseParams()) -> ReleaseResult:
    """Compress a trained candidate, judge it against the champion, and promote it if it passes."""
    if params.canary_share > 0 and not params.serve_url:
        raise SaofuError("a canary needs the serving app: give serve_url with canary_share")
    started = time.perf_counter()
    with model_lock(params.registered_model):
        result = _release(params)
    result.seconds = time.perf_counter() - started
    publish(release_summary(result, params), artifact_key("release", params.registered_model),
            f"release of {params.registered_model}: {release_verdict(result)}")
    return result


def _release(params: ReleaseParams) -> ReleaseResult:
    settings = get_settings()
    clock = StepClock()
    log = get_run_logger()
    tracking.configure_mlflow(params.experiment)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = settings.runs_dir / f"release-{stamp}"
    candidate = load_candidate(params.registered_model, params.candidate_version, run_dir / "candidate")
    chosen_slice = _fresh_slice(params, candidate)
    clock.lap("load")
    fresh, fresh_source = chosen_slice.split, chosen_slice.source
    negative_class = _negative_class(params, candidate)
    log.info("candidate %s v%s (%s), classes %s", candidate.name, candidate.version, candidate.arch,
             candidate.classes)
    log.info("fresh slice: %d images, %s (why: %s)", len(fresh), fresh_source, chosen_slice.reason)
    log.info("under the threshold %s: %s", params.threshold,
             f"fall back to {negative_class!r}" if negative_class else
             f"abstain (the model has no negative class {params.negative_class!r})")
    flow_run_id = str(flow_run.get_id() or "")
    lineage = registry.lineage_tags(candidate.data_version, flow_run_id, candidate.version, candidate.arch)
    run_id = tracking.start_run(params.experiment, f"release-{candidate.name}-v{candidate.version}", {
        "candidate_version": candidate.version, "prune_amount": params.prune_amount,
        "fine_tune_epochs": params.fine_tune_epochs, "accuracy_bar": params.accuracy_bar,
        "threshold": params.threshold, "fresh_source": fresh_source, "fresh_n": len(fresh),
        "fresh_kind": chosen_slice.kind, "negative_class": negative_class or "",
        **{f"gate_{k}": v for k, v in params.gate.model_dump().items()},
    }, {**lineage, "flow": "release", "fresh_reason": chosen_slice.reason})
    champion_before = registry.current_champion(candidate.name)
    try:
        variants, chosen = compress(candidate, params, fresh, str(run_dir / "artefacts"), negative_class)
        clock.lap("compress")
        variants_table = format_variants(variants, chosen)
        print(variants_table, flush=True)
        tracking.log_dict(run_id, json.loads(variants_json(variants)), "compression/variants.json")
        if chosen is None:
            tracking.set_tags(run_id, {"outcome": "no artefact met the accuracy bar"})
            tracking.finish_run(run_id)
            return ReleaseResult(
                run_id=run_id, candidate_version=candidate.version, shipped=None, challenger_version=None,
                champion_before=champion_before, champion_after=champion_before, promoted=False, gate_passed=None,
                gate_table="", variants_table=variants_table, compare_table="", fresh_source=fresh_source,
                fresh_kind=chosen_slice.kind, steps=clock.steps,
            )

        reference = next(v for v in variants if v.label == "fp32")
        version = tracking.register_onnx(run_id, chosen.path, candidate.name, candidate.image_size,
                                         candidate.classes, {
                                             **lineage, "arch": checkpoint_arch(chosen.checkpoint),
                                             ARTEFACT_TAG: chosen.label, "parent_run_id": candidate.run_id,
                                             "data_dir": candidate.data_dir, "run_id": run_id,
                                             "fresh_accuracy_at_threshold": f"{chosen.accuracy_at_threshold:.4f}",
                                             "float_accuracy_at_threshold": f"{reference.accuracy_at_threshold:.4f}",
                                             **params.version_tags,
                                         })
        # The float weights behind the shipped graph stay with it: a fast retrain starts from them.
        tracking.log_file(run_id, chosen.checkpoint, "checkpoint")
        registry.set_challenger(candidate.name, version)
        clock.lap("register")
        print(f"registered {candidate.name} version {version} ({chosen.label}) as challenger", flush=True)

        sets = {"fresh": fresh, "regression": regression_set(params.regression_dir or candidate.data_dir,
                                                             candidate.image_size, settings.cache_dir)}
        badcases = badcase_set(params.badcases or _candidate_badcases(candidate, run_dir), candidate.classes,
                               candidate.image_size)
        if badcases is not None:
            sets["badcases"] = badcases
        paths = {f"challenger v{version}": chosen.path}
        if champion_before:
            paths[f"champion v{champion_before}"] = _download_onnx(candidate.name, champion_before, run_dir)
        reports = evaluate_release(paths, sets, params, str(run_dir / "evaluation"), negative_class)
        clock.lap("evaluate")
        table = compare_table(reports)
        print(table, flush=True)
        plot = compare_plot(reports, run_dir / "evaluation" / "compare.png")
        tracking.log_file(run_id, plot, "evaluation")
        for label, report in reports.items():
            prefix = "challenger" if label.startswith("challenger") else "champion"
            tracking.log_metrics(run_id, {f"{prefix}/{k}": v for k, v in flat_metrics(report["sets"]).items()})
            for set_result in report["sets"].values():
                for png in set_result["files"].values():
                    tracking.log_file(run_id, png, f"evaluation/{prefix}")

        changes = ""
        if champion_before:
            changes = _changes(reports, sets, version, champion_before, run_dir / "evaluation" / "changes", run_id)
            print(changes, flush=True)
        champion_metrics = gate_metrics(reports[f"champion v{champion_before}"], "fresh", champion_before) \
            if champion_before else None
        report = evaluate_gate(gate_metrics(reports[f"challenger v{version}"], "fresh", version), champion_metrics,
                               params.gate)
        print(report.table(), flush=True)
        tracking.log_dict(run_id, report.to_dict(), "gate_report.json")
        tracking.set_tags(run_id, {"gate": "passed" if report.passed else "failed", "challenger_version": version})
        clock.lap("gate")
        served, verdict = None, None
        if report.passed and params.canary_share > 0:
            verdict = _canary(params, version)
            clock.lap("canary")
            tracking.set_tags(run_id, {"canary": verdict.status, "canary_detail": verdict.detail[:500]})
        if report.passed and (verdict is None or verdict.passed):
            registry.promote(candidate.name, version, params.reason, report.to_dict())
            log.info("gate passed: %s version %s is the champion (was %s)", candidate.name, version, champion_before)
            clock.lap("promote")
            if params.serve_url:
                served = wait_until_served(params.serve_url, version)
                print(f"serving app at {params.serve_url} answers with version {served}", flush=True)
                clock.lap("wait-served")
        elif report.passed:
            registry.record_gate_decision(candidate.name, version, report.to_dict())
            log.warning("gate passed but the canary did not (%s): champion stays %s", verdict.detail, champion_before)
        else:
            registry.record_gate_decision(candidate.name, version, report.to_dict())
            log.warning("gate failed: champion stays %s; failed checks: %s", champion_before,
                        ", ".join(c.name for c in report.failed))
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    tracking.finish_run(run_id)
    return ReleaseResult(
        run_id=run_id, candidate_version=candidate.version, shipped=chosen.label, challenger_version=version,
        champion_before=champion_before, champion_after=registry.current_champion(candidate.name),
        promoted=report.passed, gate_passed=report.passed, gate_table=report.table(), variants_table=variants_table,
        compare_table=table, changes_table=changes, fresh_source=fresh_source, fresh_kind=chosen_slice.kind,
        served_version=served,
        canary=f"{verdict.status}: {verdict.detail}" if verdict else "", steps=clock.steps,
    )


def _changes(reports: dict[str, dict], sets: dict[str, TensorSplit], version: str, champion: str, out_dir: Path,
             run_id: str) -> str:
    """The challenger's answers paired with the champion's, image by image (`tasks.release.changes`),
    logged with the lost images' montages; returns the table."""
    names = (f"challenger v{version}", f"champion v{champion}")
    changes, plots = release_changes(reports[names[0]], reports[names[1]], sets, names, out_dir)
    tracking.log_dict(run_id, [c.to_dict() for c in changes], "evaluation/changes.json")
    for png in plots:
        tracking.log_file(run_id, png, "evaluation/changes")
    return changes_table(changes)


def _canary(params: ReleaseParams, version: str) -> CanaryVerdict:
    """Let the serving app's canary judge challenger `version` before it is promoted."""
    share = canary_share_of(params.serve_url)
    if abs(share - params.canary_share) > 1e-9:
        raise SaofuError(f"the release asks for a canary share of {params.canary_share} but the serving app at "
                         f"{params.serve_url} runs {share or 'no canary'}; start it with "
                         f"`saofu serve --canary-share {params.canary_share}`")
    print(f"canary: {share:.0%} of traffic to challenger v{version}; waiting for its verdict", flush=True)
    verdict = wait_for_canary(params.serve_url, version, params.canary_timeout_min * 60)
    print(f"canary {verdict.status}: {verdict.detail}", flush=True)
    return verdict


def _download_onnx(name: str, version: str, run_dir: Path) -> str:
    from tasks.labeling.active_learning import _download

    return str(_download(name, version, None, run_dir / "registry").onnx_path)


def _candidate_badcases(candidate: Candidate, run_dir: Path) -> str:
    """The candidate training run's badcases.json (written by its evaluation), or "" if it has none."""
    try:
        return tracking.download_run_artifact(candidate.run_id, "evaluation/badcases.json", run_dir)
    except Exception:
        return ""


if __name__ == "__main__":
    release_flow()
