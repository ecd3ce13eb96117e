"""The fast-reaction retrain: one flow run from "labels for a new or changed class are in" to "the
serving app answers with the new version".

    resolve base (champion) → ingest the labels (Label Studio or a folder: GX suite, DVC version)
    → fine-tune (head grown by the new classes, old data replayed, epochs planned to the budget)
    → release (compress → evaluate on held-out images of every class → register with lineage
      → gate → canary → promote → wait until served)

One pydantic parameter model, every field defaulted (the Prefect UI renders it as the run form;
the default is the campaign's change: add `fu_merchant`, refining `fu`). Bad parameters are
refused by the model before the run starts; a change that does not fit the base model (a "new"
class it already has, a parent it lacks) is refused before any data is touched.

Resuming: the fine-tune is cached on its inputs (base version, data version, change, budget,
replay, seed, and the tracking store) with its result persisted by Prefect, so re-running
the same parameters after a failure later on (say, in compression) reuses the registered
fine-tuned version instead of training again. The ingest is idempotent by itself (its cursor, and
a data version per content), and the release starts over from the fine-tuned version.

One change at a time per model: the run holds the registered model's Prefect concurrency slot
(`flows/locks.py`) from start to end, shared with the release flow, so two fast retrains (or a
fast retrain and a release) of the same model run one after the other.

The summary names each step's wall time and the orchestration's own share: the run's wall time
not spent inside a task's or subflow's body (Prefect's bookkeeping, result persistence).
"""


import time
from pathlib import Path
from typing import Literal, Self

from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows.heartbeat import without_heartbeat
from flows.ingest import IngestParams, add_validated, ingest_flow, version_dataset
from flows.locks import model_lock
from flows.release import ReleaseParams, release_flow
from flows.run_summary import artifact_key, key_value_table, promoted_verdict, publish, text_block
from flows.step_clock import StepClock
from saofu.errors import SaofuError
from saofu.settings import get_settings
from tasks import tracking
from tasks.data.dataset_lock import dataset_lock
from tasks.data.manifest import plain_name, read_manifest
from tasks.data.project_dataset import labelled_copy_dir
from tasks.labeling.folder_labels import folder_label_rows
from tasks.release.gate import GateConfig
from tasks.release.sets import held_out_folder
from tasks.train.retrain_steps import (
    CHANGE_TAG,
    BaseModelInfo,
    FineTuneOutcome,
    change_record,
    check_change,
    fine_tune_and_register,
    labelled_dataset,
    resolve_base,
)


def folder_class_name(value: str) -> str:
    """A class name as the dataset needs it: one printable folder name (not `..`, no separator or NUL).

    A class becomes `<split>/<class>/` in the dataset and a choice in Label Studio: `..` or
    `a/b` would put images outside their class folder (or the dataset), a control character a
    name no one can see.
    """
    if not plain_name(value) or not value.isprintable():
        raise ValueError(f"{value!r} is not a class name: use one printable folder name (not '.' or '..', no "
                         "'/', '\\' or control characters)")
    return value


class ClassChange(BaseModel):
    """One class the retrain adds or corrects."""

    name: str = Field("fu_merchant", min_length=1, max_length=100, pattern=r"^[^/\\]+$",
                      description="the class (a folder name in the dataset)")
    kind: Literal["new", "changed"] = Field(
        "new", description="new: a class the base model lacks; changed: corrected labels of a class it has")
    refines: str = Field("", description="new classes only: the class it refines (fu_merchant refines fu); "
                                         "empty: none")

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, value: str) -> str:
        return folder_class_name(value)

    @field_validator("refines")
    @classmethod
    def _refines_a_folder_name(cls, value: str) -> str:
        return folder_class_name(value) if value else value

    @model_validator(mode="after")
    def _refines_only_new(self) -> Self:
        if self.refines and self.kind != "new":
            raise ValueError(f"refines is only for new classes; {self.name!r} is {self.kind}")
        if self.refines == self.name:
            raise ValueError(f"{self.name!r} cannot refine itself")
        return self


def _campaign_change() -> list[ClassChange]:
    return [ClassChange(name="fu_merchant", kind="new", refines="fu")]


class FastRetrainParams(BaseModel):
    """Parameters of one fast retrain (the Prefect UI's form: every field has a default)."""

    # An infinite timeout never ends a wait; NaN passes no bound check it is compared with.
    model_config = ConfigDict(allow_inf_nan=False)

    registered_model: str = Field("fu-recognizer", min_length=1, description="the MLflow registered model")
    changes: list[ClassChange] = Field(_campaign_change(), min_length=1,
                                       description="the classes added or corrected")
    labels: str = Field("fu-recognizer", min_length=1,
                        description="where the labels are: a Label Studio project title, or an ImageFolder "
                                    "folder (<class>/<image>)")
    labels_kind: Literal["auto", "label-studio", "folder"] = Field(
        "auto", description="auto: a folder when `labels` is an existing directory, else a Label Studio project")
    dataset_dir: str = Field("", description="the labelled dataset the labels join; empty: the base model's "
                                             "training data (a plain ImageFolder gets a labelled copy)")
    dataset_name: str = Field("", description="name of its DVC data versions; empty: the dataset folder's name")
    base_version: str = Field("", description="the version to start from; empty: the champion")
    budget_min: float = Field(1.0, gt=0, le=240, description="wall-clock minutes for the fine-tune "
                                                             "(epochs are planned from measured throughput)")
    replay_share: float = Field(0.5, ge=0, lt=1, description="share of each epoch drawn from the other classes")
    new_class_recall: float = Field(0.95, ge=0, le=1, description="gate: recall target of each new class at the "
                                                                  "serving threshold")
    max_old_class_drop_pts: float = Field(0.5, ge=0, le=100, description="gate: largest recall drop allowed on "
                                                                         "any old class, in points")
    max_latency_ms: float = Field(1.0, gt=0, description="gate: p95 latency budget (batch 1, 1 thread)")
    threshold: float = Field(0.9, ge=0, le=1, description="the serving threshold")
    parent_gate: float = Field(0.99, ge=0, le=1, description="answer a new class only where the base model is "
                                                             "not this sure of a class other than the one it "
                                                             "refines (0: off); the whole model's: a base gated "
                                                             "before takes this value too")
    prune_amount: float = Field(0.0, ge=0, lt=1, description="release: share of channels pruned (0: none; "
                                                             "pruning adds a fine-tune of its own)")
    fresh_n: int = Field(5000, ge=10, description="most held-out images the release judges on")
    canary_share: float = Field(0.0, ge=0, le=1, description="0: promote at once; else the serving app's canary "
                                                             "share (saofu serve --canary-share)")
    canary_timeout_min: float = Field(10.0, gt=0)
    serve_url: str = Field("", description="the serving app to wait for; empty: do not wait")
    seed: int = 0
    experiment: str = Field("saofu-fast-retrain", min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        names = [c.name for c in self.changes]
        doubled = sorted({n for n in names if names.count(n) > 1})
        if doubled:
            raise ValueError(f"changes name {doubled} more than once")
        if 0 < self.parent_gate < 0.5:
            raise ValueError(f"parent_gate must be 0 (off) or at least 0.5, got {self.parent_gate}: below "
                             "one half the base can be 'sure' of two classes at once")
        if self.canary_share > 0 and not self.serve_url:
            raise ValueError("canary_share needs serve_url (the serving app that runs the canary)")
        return self

    @property
    def new(self) -> list[str]:
        return [c.name for c in self.changes if c.kind == "new"]

    @property
    def changed(self) -> list[str]:
        return [c.name for c in self.changes if c.kind == "changed"]

    @property
    def refines(self) -> dict[str, str]:
        return {c.name: c.refines for c in self.changes if c.refines}

    def change_record(self) -> str:
        """The change as recorded on versions (`saofu.change`): JSON of new, changed and refines."""
        return change_record(self.new, self.changed, self.refines)

    def labels_folder(self) -> Path | None:
        """The labels' folder, or None for a Label Studio project."""
        path = Path(self.labels).expanduser()
        if self.labels_kind == "label-studio":
            return None
        looks_like_path = "/" in self.labels or self.labels.startswith((".", "~"))
        if self.labels_kind == "folder" or path.is_dir() or looks_like_path:
            if not path.is_dir():
                raise SaofuError(f"labels folder not found: {path} (a Label Studio project title has no '/'; "
                                 "use labels_kind 'label-studio' for one that does)")
            return path
        return None


class FastRetrainResult(BaseModel):
    registered_model: str
    base_version: str
    fine_tuned_version: str
    challenger_version: str | None
    champion_before: str | None
    champion_after: str | None
    promoted: bool
    gate_passed: bool | None
    served_version: str | None
    data_version: str
    labels_added: int
    fine_tune_reused: bool  # the fine-tune came from a finished earlier run (resume)
    fine_tune: dict
    gate_table: str
    canary: str
    steps: dict[str, float]  # step -> wall seconds, in order
    wall_s: float
    orchestration_s: float  # wall time outside every task's and subflow's body
    orchestration_share: float
    orchestration_steps: dict[str, float] = {}  # step -> its part of orchestration_s (the release's as one)
    changes_table: str = ""  # the release's images lost and won against the champion, per set and class


# ---------------------------------------------------------------------------------------------
# Steps: each returns its body's own wall time, so the flow can tell work from orchestration
# ---------------------------------------------------------------------------------------------


@task(name="resolve-base", retries=2, retry_delay_seconds=2)
def resolve_base_step(name: str, version: str, dst_dir: str) -> tuple[BaseModelInfo, float]:
    started = time.perf_counter()
    return resolve_base(name, version or None, dst_dir), time.perf_counter() - started


@task(name="labelled-dataset", retries=1, retry_delay_seconds=2)
def labelled_dataset_step(base: BaseModelInfo, dataset_dir: str) -> tuple[str, float]:
    started = time.perf_counter()
    src = dataset_dir or base.data_dir
    return (labelled_dataset(src, labelled_copy_dir(src), base.image_size, base.val_share, base.split_seed),
            time.perf_counter() - started)


@task(name="ingest-folder", retries=1, retry_delay_seconds=2)
def ingest_folder_step(folder: str, dataset_dir: str, dataset_name: str, classes: list[str],
                       experiment: str) -> tuple[str, int, float]:
    """Labels from an ImageFolder through the ingest's staged copy, validation suite and data version."""
    started = time.perf_counter()
    rows = folder_label_rows(folder, classes)
    run_id = tracking.start_run(experiment, "ingest-folder", {"folder": folder, "dataset_dir": dataset_dir},
                                {"prefect_flow_run_id": str(flow_run.get_id() or "")})
    try:
        # one hold for the write and its data version: another writer between them would slip
        # its rows into this version under this run's message
        with dataset_lock(Path(dataset_dir)):
            added, _ = add_validated(Path(dataset_dir), rows, classes, run_id)
            data_version = version_dataset.fn(dataset_dir, dataset_name,
                                              f"fast retrain: {len(added)} labels from {folder}")
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    tracking.set_tags(run_id, {"data_version": data_version})
    tracking.log_metrics(run_id, {"added": len(added), "already_present": len(rows) - len(added)})
    tracking.finish_run(run_id)
    print(f"ingest: {len(added)} of {len(rows)} labelled images from {folder} added; data version {data_version}",
          flush=True)
    return data_version, len(added), time.perf_counter() - started


# Cached on its inputs: a re-run of the same change on the same data after a later failure takes the
# registered fine-tuned version from the persisted result instead of training again. `run_dir` and
# `tags` (flow-run specific) are not part of the key; `store` (the tracking URI) is, so two projects
# never share an entry.
@task(name="fine-tune", retries=1, retry_delay_seconds=5, cache_policy=INPUTS - "run_dir" - "tags",
      persist_result=True)
def fine_tune_step(base: BaseModelInfo, data_dir: str, data_version: str, new: list[str], changed: list[str],
                   refines: dict[str, str], budget_s: float, replay_share: float, seed: int, experiment: str,
                   store: str, run_dir: str, tags: dict[str, str], threshold: float = 0.9,
                   max_old_class_drop: float = 0.005, parent_gate: float = 0.0) -> FineTuneOutcome:
    return fine_tune_and_register(base, data_dir, data_version, new, changed, refines, budget_s, replay_share,
                                  seed, experiment, run_dir, tags, threshold=threshold,
                                  max_old_class_drop=max_old_class_drop, parent_gate=parent_gate)


@task(name="held-out-set", retries=1)
def held_out_step(dataset_dir: str, base: BaseModelInfo, out_dir: str) -> tuple[str, dict[str, int], float]:
    started = time.perf_counter()
    folder, counts = held_out_folder(dataset_dir, base.image_size, out_dir, base.val_share, base.split_seed,
                                     get_settings().cache_dir)
    return str(folder), counts, time.perf_counter() - started


def _check_labels(dataset_dir: str, focus: list[str], source: str) -> None:
    """Every new or changed class has training labels in the dataset (named where it has none)."""
    labels = {r["label"] for r in read_manifest(dataset_dir) if r.get("split") == "train"}
    missing = [c for c in focus if c not in labels]
    if missing:
        raise SaofuError(f"no training labels for {missing} in {dataset_dir} after ingesting {source}: label "
                         "some images of each first")


# ---------------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------------


@flow(name="fast-retrain", log_prints=True)
def fast_retrain_flow(params: FastRetrainParams = FastRetrainParams()) -> FastRetrainResult:
    """Add or correct classes of the serving model and ship the result, in one run."""
    started = time.perf_counter()
    with model_lock(params.registered_model):
        waited = time.perf_counter() - started
        return _fast_retrain(params, started, waited)


def _fast_retrain(params: FastRetrainParams, started: float, waited: float) -> FastRetrainResult:
    log = get_run_logger()
    settings = get_settings()
    tracking.configure_mlflow(params.experiment)
    clock = StepClock()
    clock.steps["wait-for-model"] = waited
    lap = clock.lap

    run_id = str(flow_run.get_id() or "local")
    run_dir = settings.runs_dir / f"fast-retrain-{time.strftime('%Y%m%d-%H%M%S')}-{run_id[:8]}"
    base, body = resolve_base_step(params.registered_model, params.base_version, str(run_dir / "base"))
    check_change(base.classes, params.new, params.changed, params.refines)
    classes = base.classes + params.new
    log.info("base: %s v%s (trained v%s), classes %s; change: new %s, changed %s, refines %s", base.name,
             base.version, base.trained_version, base.classes, params.new, params.changed, params.refines)
    lap("resolve-base", body)

    dataset, body = labelled_dataset_step(base, params.dataset_dir)
    dataset_name = params.dataset_name or Path(dataset).name
    lap("labelled-dataset", body)

    folder = params.labels_folder()
    if folder is not None:
        data_version, added, body = ingest_folder_step(str(folder), dataset, dataset_name, classes,
                                                       params.experiment)
        source = f"the folder {folder}"
    else:
        with without_heartbeat():  # a subflow: this run's own heartbeat covers the process
            ingested = ingest_flow(IngestParams(project=params.labels, dataset_dir=dataset,
                                                dataset_name=dataset_name, classes=classes,
                                                experiment=params.experiment))
        if ingested.skipped:  # a project nobody created: the labels the run was started for are not there
            raise SaofuError(f"fast retrain: no labels to ingest: {ingested.skipped}")
        data_version, added, body = ingested.data_version or "", ingested.added, ingested.seconds
        source = f"Label Studio project {params.labels!r}"
    _check_labels(dataset, params.changed + params.new, source)
    lap("ingest", body)

    tags = {"prefect_flow_run_id": run_id, "flow": "fast-retrain"}
    fine_tune_args = (base, dataset, data_version, params.new, params.changed, params.refines,
                      params.budget_min * 60, params.replay_share, params.seed, params.experiment,
                      settings.tracking_uri, str(run_dir / "fine-tune"), tags)
    # The fine-tune keeps an epoch that passes the gate's old-class check on its val split, and builds
    # the parent gate into the model it registers.
    keep = {"threshold": params.threshold, "max_old_class_drop": params.max_old_class_drop_pts / 100,
            "parent_gate": params.parent_gate}
    fine_tune_state = fine_tune_step(*fine_tune_args, **keep, return_state=True)
    tuned: FineTuneOutcome = fine_tune_state.result()
    reused = fine_tune_state.name == "Cached"
    if reused and not registered_from(params.registered_model, tuned.version, tuned.run_id):
        # The store was reset since: the cached version is gone (or its number now names another
        # model, registered after the reset), so train after all.
        tuned = fine_tune_step.with_options(refresh_cache=True)(*fine_tune_args, **keep)
        reused = False
    if reused:
        print(f"fine-tune: reusing version {tuned.version} from an earlier run of the same change and data "
              "(resume)", flush=True)
    lap("fine-tune", 0.0 if reused else tuned.seconds)

    judge_dir, counts, body = held_out_step(dataset, base, str(run_dir / "held-out"))
    print(f"judged on held-out images: {counts}", flush=True)
    lap("held-out-set", body)

    drop = params.max_old_class_drop_pts / 100
    release = ReleaseParams(
        registered_model=params.registered_model, candidate_version=tuned.version, labelled_dir=judge_dir,
        fresh_n=params.fresh_n, prune_amount=params.prune_amount, fine_tune_epochs=1 if params.prune_amount else 0,
        threshold=params.threshold,
        gate=GateConfig(overall_margin=drop, class_margin=drop, new_class_recall=params.new_class_recall,
                        max_latency_ms=params.max_latency_ms, refines=params.refines),
        reason=f"fast retrain: {', '.join(f'{c.kind} {c.name}' for c in params.changes)}",
        experiment=params.experiment, serve_url=params.serve_url or None, canary_share=params.canary_share,
        canary_timeout_min=params.canary_timeout_min, seed=params.seed,
        version_tags={CHANGE_TAG: params.change_record(), "fast_retrain_flow_run_id": run_id,
                      "base_version": base.version},
    )
    with without_heartbeat():
        released = release_flow(release)
    clock.lap("release", released.seconds)
    release_wall = clock.steps.pop("release")
    clock.steps.update({f"release/{name}": seconds for name, seconds in released.steps.items()})
    clock.steps["release/orchestration"] = max(release_wall - released.seconds, 0.0)
    steps = clock.steps

    wall = time.perf_counter() - started
    orchestration = max(wall - clock.bodies - waited, 0.0)
    result = FastRetrainResult(
        registered_model=params.registered_model, base_version=base.version, fine_tuned_version=tuned.version,
        challenger_version=released.challenger_version, champion_before=released.champion_before,
        champion_after=released.champion_after, promoted=released.promoted, gate_passed=released.gate_passed,
        served_version=released.served_version, data_version=data_version, labels_added=added,
        fine_tune_reused=reused, fine_tune=tuned.summary, gate_table=released.gate_table, canary=released.canary,
        changes_table=released.changes_table,
        steps=steps, wall_s=wall, orchestration_s=orchestration, orchestration_share=orchestration / wall,
        orchestration_steps={name: s for name, s in clock.outside.items() if name != "wait-for-model"},
    )
    print(step_table(result), flush=True)
    publish(summary_markdown(result, params, source), artifact_key("fast-retrain", params.registered_model),
            f"fast retrain of {params.registered_model}: {verdict(result)}")
    return result


def registered_from(name: str, version: str, run_id: str) -> bool:
    """Whether version `version` of `name` is in the registry and was registered by the run `run_id`.

    A cached fine-tune names its version by number, and Prefect's result cache outlives a reset
    tracking store (each `saofu bench fast-retrain` starts a fresh store and finds the previous
    bench's fine-tunes cached): there the same number can name a different model, registered since.
    """
    try:
        registered = tracking.client().get_model_version(name, version)
    except Exception:  # noqa: BLE001 - any failure to read it means it cannot be reused
        return False
    return (registered.tags or {}).get("run_id") == run_id


def step_table(result: FastRetrainResult) -> str:
    """The run's steps with their wall times, and the orchestration's share, as a text table."""
    width = max(len(name) for name in result.steps)
    lines = [f"{'step'.ljust(width)}  seconds"]
    lines += [f"{name.ljust(width)}  {seconds:7.2f}" for name, seconds in result.steps.items()]
    lines.append(f"{'total'.ljust(width)}  {result.wall_s:7.2f}   orchestration {result.orchestration_s:.2f} s "
                 f"({result.orchestration_share:.1%})")
    if result.orchestration_steps:
        lines.append("orchestration by step: " + ", ".join(
            f"{name} {seconds:.2f}" for name, seconds in result.orchestration_steps.items() if seconds >= 0.005))
    return "\n".join(lines) + "\n" + verdict(result)


def verdict(result: FastRetrainResult) -> str:
    """Promoted or not, in one line."""
    if not result.promoted:
        return f"not promoted: the champion stays {result.champion_after}"
    return promoted_verdict(result.challenger_version, result.served_version)


def summary_markdown(result: FastRetrainResult, params: FastRetrainParams, source: str) -> str:
    """The run's outcome for its page in the Prefect UI: what changed, the gate, the steps.

    `source` names where the labels came from, as the run's log does."""
    change = ", ".join(f"{c.kind} `{c.name}`" + (f" (refines `{c.refines}`)" if c.refines else "")
                       for c in params.changes)
    tuned = result.fine_tune
    fine_tune = (f"version {result.fine_tuned_version}: "
                 + ("reused from an earlier run of the same change and data" if result.fine_tune_reused else
                    f"{tuned.get('method', '?')}, {tuned.get('epochs_run', '?')} epochs in "
                    f"{tuned.get('seconds', 0):.0f} s, epoch {tuned.get('best_epoch', '?')} kept"))
    rows = [("change", change), ("base", f"version {result.base_version}"), ("fine-tuned", fine_tune),
            ("challenger", f"version {result.challenger_version or '-'}"),
            ("labels", f"{result.labels_added} added from {source}, data version `{result.data_version or '-'}`"),
            ("wall time", f"{result.wall_s:.0f} s, orchestration {result.orchestration_share:.1%}")]
    if params.parent_gate:
        rows.append(("parent gate", f"{params.parent_gate:g}: " + (
            "a refining class is not answered where the base is at least this sure of a class other than its parent"
            if params.refines else "nothing to gate (no new class refines a class of the base)")))
    if result.canary:
        rows.append(("canary", result.canary))
    table = key_value_table(rows)
    changed = (f"## What changed, image by image\n\n{text_block(result.changes_table)}\n\n"
               if result.changes_table else "")
    return (f"# Fast retrain of `{result.registered_model}`: {verdict(result)}\n\n{table}\n\n"
            f"## Gate\n\n{text_block(result.gate_table)}\n\n{changed}"
            f"## Steps (seconds)\n\n{text_block(step_table(result))}\n")


if __name__ == "__main__":
    fast_retrain_flow()
