"""The fast retrain's units on files and the registry: find the base model, make its data a labelled
dataset, fine-tune it on the change and register the result as a trained version.

Plain functions (`flows/fast_retrain.py` gives them their Prefect faces, retries and caching). They
pass paths, versions and small results, never tensors.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from saofu.errors import SaofuError
from saofu.settings import get_settings
from tasks import tracking
from tasks.data.dataset_lock import dataset_lock
from tasks.data.loading import prepare_dataset
from tasks.data.manifest import MANIFEST_NAME, add_images
from tasks.release import registry
from tasks.release.steps import ARTEFACT_TAG, load_candidate, shipped_checkpoint
from tasks.train.loop import checkpoint_arch

# Training keeps at least this share of the budget when preparing the data took more than the rest.
MIN_TRAINING_SHARE = 0.25
CHANGE_TAG = "saofu.change"  # JSON of the class change a fast retrain made, on its versions


def change_record(new: list[str], changed: list[str], refines: dict[str, str]) -> str:
    """A class change as recorded on runs and versions (tag `saofu.change`)."""
    return json.dumps({"new": new, "changed": changed, "refines": refines})


@dataclass
class BaseModelInfo:
    """The model a fast retrain starts from: the serving version and the trained version behind it."""

    name: str
    version: str  # the version named as base (the champion by default): what the change replaces
    trained_version: str  # the trained (float) version it was released from: its data, split and lineage
    classes: list[str]
    image_size: int
    arch: str
    data_dir: str  # the dataset the trained version was trained on
    val_share: float
    split_seed: int
    refines: dict[str, str] = field(default_factory=dict)
    # True: the fine-tune starts from the weights the release shipped (`version`'s own, pruned when
    # the pruned graph won); False: from the trained version's checkpoint (a version released before
    # the release kept its weights, or a trained version named as base).
    shipped_weights: bool = False


def resolve_base(name: str, version: str | None, dst_dir: str | Path) -> BaseModelInfo:
    """The base of a fast retrain: `version` of `name`, or its champion.

    A release artefact is followed to the trained version it came from (tag `parent_version`) for
    the data and split it was trained on; its weights are the ones the release shipped when the
    release kept them (a pruned champion is fine-tuned pruned: the classes it must keep are judged
    against what it answers, not against the unpruned model it was cut from).

    Raises:
        SaofuError: no champion and no version named, or a version without a trained origin.
    """
    version = version or registry.current_champion(name)
    if not version:
        raise SaofuError(f"registered model {name!r} has no champion to fast-retrain: release one first "
                         "(saofu release) or name the base version")
    try:
        tags = tracking.client().get_model_version(name, version).tags or {}
    except Exception as exc:
        raise SaofuError(f"registered model {name!r} has no version {version!r}") from exc
    trained = tags.get("parent_version") if ARTEFACT_TAG in tags else version
    if not trained:
        raise SaofuError(f"{name} version {version} is a release artefact without a parent_version tag: "
                         "its trained model cannot be found")
    candidate = load_candidate(name, trained, dst_dir)
    shipped = shipped_checkpoint(name, str(version), Path(dst_dir) / "shipped")
    arch = (checkpoint_arch(shipped) if shipped else "") or candidate.arch
    return BaseModelInfo(name=name, version=str(version), trained_version=candidate.version,
                         classes=candidate.classes, image_size=candidate.image_size, arch=arch,
                         data_dir=candidate.data_dir, val_share=candidate.val_share, split_seed=candidate.split_seed,
                         refines=candidate.refines, shipped_weights=shipped is not None)


def base_checkpoint(base: BaseModelInfo, dst_dir: str | Path) -> str:
    """The checkpoint the fine-tune starts from (see `BaseModelInfo.shipped_weights`), downloaded into `dst_dir`."""
    if base.shipped_weights:
        shipped = shipped_checkpoint(base.name, base.version, dst_dir)
        if shipped is None:
            raise SaofuError(f"{base.name} version {base.version}: its shipped weights are gone from its release run")
        return shipped
    return load_candidate(base.name, base.trained_version, dst_dir).checkpoint


def check_change(base_classes: list[str], new: list[str], changed: list[str], refines: dict[str, str]) -> None:
    """Refuse a change that does not fit the base model, before any data is touched (names the classes)."""
    from models.head import check_new_classes

    already = [c for c in new if c in base_classes]
    if already:
        raise SaofuError(f"new classes {already} are already classes of the base model {base_classes}: "
                         "mark them `changed` to correct their labels")
    unknown = [c for c in changed if c not in base_classes]
    if unknown:
        raise SaofuError(f"changed classes {unknown} are not classes of the base model {base_classes}: "
                         "mark them `new` to add them")
    check_new_classes(base_classes, new, refines)


def labelled_dataset(data_dir: str | Path, out_dir: str | Path, image_size: int, val_share: float,
                     seed: int) -> str:
    """`data_dir` when it is a labelled dataset (has a manifest), else a labelled copy of it in `out_dir`.

    New labels go into a labelled dataset (ImageFolder tree with train/val/test folders +
    `manifest.csv`), which validation and data versions need. A plain ImageFolder is copied into
    one once, each image keeping the split its training run gave it (the carved-out validation
    split stays validation, so the base model's numbers before the change are on the same
    images), labelled `human`. The copy is reused by later fast retrains of the same data.
    """
    src = Path(data_dir)
    if not src.is_dir():
        raise SaofuError(f"the base model's training data {src} is not there: name the dataset to add the labels to")
    if (src / MANIFEST_NAME).is_file():
        return str(src)
    out = Path(out_dir)
    if (out / MANIFEST_NAME).is_file():
        return str(out)
    # Two fast retrains of one model would share the `.importing` folder (one deleting the other's
    # half-made copy): the copy is made under the copy's dataset lock, by the first to take it.
    with dataset_lock(out):
        if (out / MANIFEST_NAME).is_file():
            return str(out)  # made by the run this one waited for
        _import_labelled_copy(src, out, image_size, val_share, seed)
    return str(out)


def _import_labelled_copy(src: Path, out: Path, image_size: int, val_share: float, seed: int) -> None:
    """Make `out` a labelled copy of the plain ImageFolder `src` (the caller holds the lock of `out`)."""
    data = prepare_dataset(src, image_size, val_share, seed, get_settings().cache_dir)
    rows = []
    for split_name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        if split is None:
            continue
        rows += [{"image": p, "label": split.classes[y], "source": "human", "split": split_name,
                  "annotator": f"imported:{src.resolve()}"} for p, y in zip(split.paths, split.labels.tolist())]
    staging = out.with_name(f".{out.name}.importing")
    if staging.exists():
        shutil.rmtree(staging)  # left by a crashed import; the source is untouched
    add_images(staging, rows)
    staging.rename(out)
    print(f"made a labelled copy of {src} in {out} ({len(rows)} images)", flush=True)


@dataclass
class FineTuneOutcome:
    """A fine-tuned model, registered as a trained version (what the release takes as candidate)."""

    version: str
    run_id: str
    classes: list[str]
    summary: dict  # FineTuneResult.summary(): epochs, budget, recall before/after, throughput
    seconds: float  # wall time of the step's body


def fine_tune_and_register(base: BaseModelInfo, data_dir: str, data_version: str, new: list[str],
                           changed: list[str], refines: dict[str, str], budget_s: float, replay_share: float,
                           seed: int, experiment: str, run_dir: str | Path, tags: dict[str, str],
                           threshold: float = 0.9, max_old_class_drop: float = 0.005,
                           parent_gate: float = 0.0) -> FineTuneOutcome:
    """Fine-tune the base's checkpoint on the change within `budget_s`, export, register as a trained version.

    The version carries its lineage: the parent (base) version, the data version, the change,
    and the flow run (in `tags`); its run holds `checkpoint/checkpoint.pt` like a training run's,
    so `saofu release` (and the fast retrain's release step) can take it as candidate.
    """
    from tasks.train.export import export_onnx, parity_max_abs_diff
    from tasks.train.fine_tune import FineTuneConfig, fine_tune
    from tasks.train.loop import epoch_printer

    started = time.perf_counter()
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_ckpt = base_checkpoint(base, out / "base")
    read_base = time.perf_counter()
    data = prepare_dataset(data_dir, base.image_size, base.val_share, base.split_seed, get_settings().cache_dir)
    read_data = time.perf_counter()
    cfg = FineTuneConfig(new_classes=new, changed_classes=changed, refines=refines, replay_share=replay_share,
                         budget_s=budget_s, seed=seed, threshold=threshold, max_old_class_drop=max_old_class_drop,
                         parent_gate=parent_gate)
    change = change_record(new, changed, refines)
    run_id = tracking.start_run(experiment, f"fast-retrain-{base.name}", {
        **{k: v for k, v in asdict(cfg).items() if k not in ("new_classes", "changed_classes", "refines")},
        "base_version": base.version, "trained_base_version": base.trained_version,
        "base_weights": "shipped" if base.shipped_weights else "trained",
        "data_dir": str(Path(data_dir).resolve()), "change": change,
    }, {**tags, "data_version": data_version, "classes": json.dumps(base.classes + new),
        CHANGE_TAG: change})
    try:
        show = epoch_printer(cfg.max_epochs, prefix="  fine-tune ")

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            show(epoch, metrics)
            tracking.log_metrics(run_id, metrics, step=epoch)

        # The budget is the step's: reading the base and the data (2.0-3.5 s of the bench's 27-33 s, on
        # its 17,000 images) comes out of the training's share, so the step takes the minutes the
        # user gave it, plus the export and registration after it (under a second on the bench).
        spent = time.perf_counter() - started
        # Where the time before training went (the step's summary line names it).
        before = (f"{read_base - started:.1f} s reading the base, {read_data - read_base:.1f} s the data, "
                  f"{spent - (read_data - started):.1f} s starting the run")
        training_s = max(budget_s - spent, MIN_TRAINING_SHARE * budget_s)
        if training_s > budget_s - spent:
            print(f"fine-tune: reading the base and the data took {spent:.0f} s of the {budget_s:.0f}-s budget; "
                  f"training gets {training_s:.0f} s all the same", flush=True)
        result = fine_tune(base_ckpt, data, replace(cfg, budget_s=training_s), out / "checkpoint.pt",
                           on_epoch=on_epoch)
        summary = result.summary()
        print(f"fine-tune: {result.epochs_run} of {result.epochs_planned} planned epochs in {result.seconds:.1f} s "
              f"(budget {budget_s:.0f} s: {before}, {training_s:.1f} s "
              f"training{', stopped by it' if result.stopped_by_budget else ''}); best epoch "
              f"{result.best_epoch}, val recall {json.dumps({k: round(v, 3) for k, v in result.recall_after.items()})}",
              flush=True)
        tracking.log_metrics(run_id, {"best_val_accuracy": result.best_val_accuracy,
                                      "best_val_balanced_accuracy": result.best_val_balanced_accuracy,
                                      "images_per_s": result.images_per_s, "training_budget_s": training_s,
                                      **{f"val_recall_before_{c}": v for c, v in result.recall_before.items()},
                                      **{f"val_recall_after_{c}": v for c, v in result.recall_after.items()}})
        tracking.log_dict(run_id, {k: v for k, v in summary.items()}, "fine_tune.json")
        tracking.log_file(run_id, out / "checkpoint.pt", "checkpoint")
        all_refines = {**base.refines, **refines}
        onnx_path = export_onnx(result.model, result.classes, out / "model.onnx", base.image_size, all_refines)
        pixels = data.val.images[:64].permute(0, 2, 3, 1).contiguous().numpy()
        diff = parity_max_abs_diff(result.model, onnx_path, pixels)
        if diff > 1e-3:
            raise SaofuError(f"ONNX export of the fine-tuned model disagrees with PyTorch: max |diff| {diff:.2e}")
        version = tracking.register_onnx(run_id, onnx_path, base.name, base.image_size, result.classes, {
            **tags, **registry.lineage_tags(data_version, tags.get("prefect_flow_run_id"), base.version, base.arch),
            "data_dir": str(Path(data_dir).resolve()), "run_id": run_id, CHANGE_TAG: change,
            "model": "fast-retrain", "val_accuracy": f"{result.best_val_accuracy:.4f}",
        })
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    tracking.finish_run(run_id)
    print(f"registered {base.name} version {version} (fine-tuned from version {base.version})", flush=True)
    return FineTuneOutcome(version=version, run_id=run_id, classes=result.classes, summary=summary,
                           seconds=time.perf_counter() - started)
