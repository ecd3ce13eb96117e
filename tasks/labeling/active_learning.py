"""Dual-model active learning: what the models can label themselves, and what goes to labelers.

Two models of different architecture (by default the registry's `champion` and a `second`
model) predict on the new images of the online pool. An image is auto-labelled ONLY when both
agree on its class AND both confidences reach the threshold (global, or per class); everything
else becomes a Label Studio task carrying both predictions as pre-annotations (champion first,
so labelers confirm the champion's answer rather than draw from scratch). Different
architectures make different mistakes, so their agreement is worth more than one model's
confidence (the campaign's "dual ASR engine" selection strategy). Each model's probabilities may be
temperature-scaled first (`route(temperatures=...)`, fitted by `tasks.labeling.vote_calibration`).

Two models with different classes (after a fast retrain the champion knows `fu_merchant`, the
second model not yet): an image that either model puts in a class the other lacks goes to
labelers, with the reason "class unknown to the other model"; everything else follows the rule
above, over the union of both class lists (`label_classes`, also the labeling project's choices).
An auto-label then never rests on one model's word, and the images sent are the new class's
examples, the ones the next retrain (of either model) needs most; once the second model learns
the class, its images are auto-labelled again with no change here. Bringing the second model
along in the fast retrain instead would double the retrain's minutes for a model no gate judges,
and the rule is needed anyway whenever the two lists differ. A limit: where the second model
lacks a refinement (`fu_merchant` of `fu`), its `fu` vote cannot tell a merchant's 福 from
another, so an agreed `fu` rests on the champion for that distinction; a stricter per-class
threshold on the parent class covers the time until the second model catches up.

Evaluation badcases (the images the latest model got wrong) go to Label Studio as well, tagged
`badcase`, so a later evaluation can tell which of them were fixed (`compare_badcases`).

The auto-labels are written under the dataset's lock (`tasks.data.dataset_lock`), which every
writer of the dataset holds: an ingest swapping in its staged copy meanwhile would otherwise drop
them while the pool's state records them as done. The pool's lock is taken first, then the dataset's.

State. Which pool images were already handled is kept beside the pool (`tasks.labeling.pool`).
An image is recorded only after its auto-label was written or its task imported, so a run that
fails half-way is retried; images held back by `max_tasks` stay unrecorded and come back next run.

The badcase file's format is `tasks.release.badcases`'s.

Plain functions are what tests and benchmarks call; the `*_task` objects are their Prefect faces
for `flows/active_learning.py`.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from saofu.errors import SaofuError
from tasks.data.dataset_lock import dataset_lock
from tasks.data.manifest import add_images
from tasks.labeling.calibration import apply_temperature
from tasks.labeling.client import LabelingItem, PredictionSpec
from tasks.labeling.pool import PoolImage, load_state, pool_images, pool_lock, save_state
from tasks.labeling.pool_predict import predict_pool
from tasks.release.badcases import read_badcases
from tasks.release.evaluation import align_probs
from tasks.train.onnx_interface import read_metadata

POOL_SOURCE = "online_pool"
BADCASE_SOURCE = "evaluation"
CHAMPION_ALIAS = "champion"
SECOND_ALIAS = "second"

# Reasons an image goes to a human; "agree" is the one reason for an auto-label.
AGREE = "agree"
DISAGREE = "disagree"
A_LOW = "a below threshold"
B_LOW = "b below threshold"
BOTH_LOW = "both below threshold"
UNKNOWN_TO_OTHER = "class unknown to the other model"

# Receives the images for labelers and returns the created task ids (e.g. `label_studio_sink`).
Sink = Callable[[list[LabelingItem]], Sequence[int]]


# ------------------------------------------------------------------------------------ selection


@dataclass(frozen=True)
class Prediction:
    """One model's answer for one image: its top class and that class's probability."""

    label: str
    score: float
    model_version: str = ""


@dataclass(frozen=True)
class Decision:
    """Where one image goes: `auto` (with the agreed label) or `human` (with the reason)."""

    route: Literal["auto", "human"]
    reason: str
    label: str | None = None

    @property
    def auto(self) -> bool:
        return self.route == "auto"


def _check_thresholds(threshold: float, per_class: Mapping[str, float] | None) -> None:
    if not 0.0 < threshold <= 1.0:
        raise SaofuError(f"auto-label threshold must be in (0, 1], got {threshold}")
    for name, value in (per_class or {}).items():
        if not 0.0 < value <= 1.0:
            raise SaofuError(f"per-class threshold for {name!r} must be in (0, 1], got {value}")


def select(
    pred_a: Prediction, pred_b: Prediction, threshold: float,
    per_class_threshold: Mapping[str, float] | None = None,
    classes_a: Sequence[str] | None = None, classes_b: Sequence[str] | None = None,
) -> Decision:
    """The selection strategy for one image.

    Args:
        pred_a: the first model's (the champion's) top class and confidence.
        pred_b: the second model's.
        threshold: confidence both models must reach (>=) for an auto-label.
        per_class_threshold: class -> threshold replacing `threshold` for that agreed class.
        classes_a, classes_b: each model's classes, when they may differ (None: the same).

    Returns:
        `auto` with the agreed label when both agree and both are confident enough, else `human`
        with the reason: "class unknown to the other model" (either answer is a class the other
        model lacks), disagree, "a below threshold", "b below threshold" or "both below threshold".
    """
    _check_thresholds(threshold, per_class_threshold)
    if (classes_b is not None and pred_a.label not in classes_b) or (classes_a is not None
                                                                     and pred_b.label not in classes_a):
        return Decision("human", UNKNOWN_TO_OTHER)
    if pred_a.label != pred_b.label:
        return Decision("human", DISAGREE)
    needed = (per_class_threshold or {}).get(pred_a.label, threshold)
    a_ok, b_ok = pred_a.score >= needed, pred_b.score >= needed
    if a_ok and b_ok:
        return Decision("auto", AGREE, pred_a.label)
    return Decision("human", A_LOW if b_ok else B_LOW if a_ok else BOTH_LOW)


def select_batch(
    probs_a: np.ndarray, probs_b: np.ndarray, classes: Sequence[str], threshold: float,
    per_class: Mapping[str, float] | None = None,
    classes_a: Sequence[str] | None = None, classes_b: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`select` over a batch of probability rows (for the pool and for benchmarks).

    Args:
        probs_a: [N,C] probabilities of model A (the champion), columns in `classes` order (0 in
            the column of a class it lacks, `align_probs`).
        probs_b: [N,C] probabilities of model B, same columns.
        classes: class names of the columns (both models' classes when they differ).
        threshold: global confidence threshold (>=).
        per_class: class -> threshold for images both models put in that class.
        classes_a, classes_b: each model's own classes (None: all of `classes`).

    Returns:
        (auto_mask bool [N], labels [N] model A's top class, which is the agreed class where
        auto_mask is set, reasons [N] as in `select`: "agree" or why a human must look).
    """
    _check_thresholds(threshold, per_class)
    probs_a, probs_b = np.asarray(probs_a), np.asarray(probs_b)
    if probs_a.shape != probs_b.shape or probs_a.ndim != 2 or probs_a.shape[1] != len(classes):
        raise SaofuError(
            f"probabilities must both be [N, {len(classes)}], got {probs_a.shape} and {probs_b.shape}"
        )
    unknown = sorted(set(per_class or {}) - set(classes))
    if unknown:
        raise SaofuError(f"per-class thresholds for unknown classes {unknown}; classes are {list(classes)}")
    top_a, top_b = probs_a.argmax(1), probs_b.argmax(1)
    conf_a, conf_b = probs_a.max(1), probs_b.max(1)
    class_threshold = np.array([(per_class or {}).get(c, threshold) for c in classes], dtype=np.float64)
    needed = class_threshold[top_a]
    in_a, in_b = (np.isin(classes, list(classes if known is None else known)) for known in (classes_a, classes_b))
    unknown = ~in_b[top_a] | ~in_a[top_b]
    agree = (top_a == top_b) & ~unknown
    a_ok, b_ok = conf_a >= needed, conf_b >= needed
    auto = agree & a_ok & b_ok
    reasons = np.select(
        [unknown, ~agree, auto, a_ok, b_ok], [UNKNOWN_TO_OTHER, DISAGREE, AGREE, B_LOW, A_LOW], default=BOTH_LOW
    ).astype(object)
    labels = np.asarray(classes, dtype=object)[top_a]
    return auto, labels, reasons


# ------------------------------------------------------------------------------------ the models


@dataclass(frozen=True)
class ModelRef:
    """A registered model version, downloaded: where its graph is and what its metadata says."""

    name: str
    version: str
    onnx_path: Path
    arch: str
    classes: tuple[str, ...]
    image_size: int
    alias: str | None = None

    @property
    def model_version(self) -> str:
        """The version string in manifests and Label Studio predictions, e.g. `fu-recognizer:3`."""
        return f"{self.name}:{self.version}"


def model_ref(onnx_path: str | Path, name: str, version: str, alias: str | None = None) -> ModelRef:
    """A ModelRef for a local ONNX graph, from the metadata `export_onnx` put in it."""
    path = Path(onnx_path)
    if not path.is_file():
        raise SaofuError(f"ONNX model not found: {path}")
    meta = read_metadata(path)
    if "classes" not in meta:
        raise SaofuError(f"{path} has no class map in its metadata: export it with tasks.train.export.export_onnx")
    return ModelRef(
        name=name, version=str(version), onnx_path=path, arch=meta.get("arch", ""),
        classes=tuple(json.loads(meta["classes"])), image_size=int(meta.get("image_size", 64)), alias=alias,
    )


def parse_model_spec(spec: str | None, default_name: str) -> tuple[str, str | None, str | None]:
    """Read a second-model spec: None -> `<default>@second`; "@alias"; "name@alias"; "name/3"; "name".

    Returns:
        (registered name, alias or None, version or None); both None means the latest version.
    """
    if spec is None or spec == "":
        return default_name, SECOND_ALIAS, None
    match = re.fullmatch(r"(?P<name>[^@/]*)(?:@(?P<alias>[^@/]+)|/(?P<version>\d+))?", spec.strip())
    if match is None:
        raise SaofuError(
            f"bad model spec {spec!r}: use NAME, NAME@ALIAS, @ALIAS (an alias of {default_name!r}) or NAME/VERSION"
        )
    return match["name"] or default_name, match["alias"], match["version"]


def _registry_version(name: str, alias: str | None, version: str | None) -> str:
    """The version number an alias (or "latest") points at now, with a fixable error if none."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import client as mlflow_client

    client = mlflow_client()
    if version is not None:
        return version
    if alias is not None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            raise SaofuError(
                f"registered model {name!r} has no alias {alias!r} (or no such model): set it with "
                f"`mlflow.MlflowClient({client.tracking_uri!r}, registry_uri={client.tracking_uri!r})"
                f".set_registered_model_alias({name!r}, {alias!r}, VERSION)` "
                "or promote a version through the release flow"
            ) from None
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise SaofuError(f"registered model {name!r} has no versions: train and register one first")
    return str(max(int(v.version) for v in versions))


def _download(name: str, version: str, alias: str | None, dst: Path | None) -> ModelRef:
    from tasks.tracking import download_model_version

    local = download_model_version(name, version, dst / f"{name}-v{version}" if dst else None)
    onnx_file = local / "model.onnx" if local.is_dir() else local
    if not onnx_file.is_file():
        raise SaofuError(f"registered model {name} version {version} holds no model.onnx (got {local})")
    return model_ref(onnx_file, name, version, alias)


def check_different_arch(a: ModelRef, b: ModelRef, strict: bool = False) -> None:
    """Two models of one architecture tend to make the same mistakes, so their agreement proves less.

    Args:
        a, b: the two models.
        strict: raise instead of warning when the architectures are equal or unknown.
    """
    if a.model_version == b.model_version:
        raise SaofuError(f"both active-learning models are {a.model_version}: the second model must be another one")
    if a.arch and b.arch and a.arch != b.arch:
        return
    problem = (
        f"{a.model_version} and {b.model_version} have the same architecture ({a.arch})" if a.arch
        else f"cannot tell the architectures of {a.model_version} and {b.model_version} apart (no `arch` metadata)"
    )
    advice = "; register a second model of another architecture for the dual-model check"
    if strict:
        raise SaofuError(problem + advice)
    warnings.warn(problem + advice, stacklevel=2)


def resolve_models(
    name: str, second: str | None = None, *, champion_alias: str = CHAMPION_ALIAS,
    require_different_arch: bool = False, dst_dir: str | Path | None = None,
) -> tuple[ModelRef, ModelRef]:
    """Find and download the two models: `name@champion` and a second registered model.

    The alias is resolved to a version number first and that version downloaded, so a promotion
    happening meanwhile cannot hand us a graph other than the one we name in the labels.

    Args:
        name: the registered model whose champion labels (e.g. `fu-recognizer`).
        second: the second model (see `parse_model_spec`); default `<name>@second`.
        champion_alias: the alias of the first model.
        require_different_arch: raise (not warn) when both have the same architecture.
        dst_dir: download folder (default: MLflow's temporary folder).

    Returns:
        (champion, second) with local ONNX paths.

    Raises:
        SaofuError: an alias or model is missing, both are the same version, they share no class,
            or (strict) the architectures are the same. Class lists that differ otherwise are
            fine: `route` sends images of a class one model lacks to labelers.
    """
    dst = Path(dst_dir) if dst_dir else None
    a_version = _registry_version(name, champion_alias, None)
    b_name, b_alias, b_version = parse_model_spec(second, name)
    b_version = _registry_version(b_name, b_alias, b_version)
    a = _download(name, a_version, champion_alias, dst)
    b = _download(b_name, b_version, b_alias, dst)
    check_different_arch(a, b, strict=require_different_arch)
    if not set(a.classes) & set(b.classes):
        raise SaofuError(f"{a.model_version} predicts {list(a.classes)} but {b.model_version} predicts "
                         f"{list(b.classes)}: the two models share no class to agree on")
    if set(a.classes) != set(b.classes):
        print(f"active learning: {a.model_version} has classes {list(a.classes)}, {b.model_version} "
              f"{list(b.classes)}: images either puts in a class the other lacks go to labelers", flush=True)
    return a, b


def label_classes(a: ModelRef, b: ModelRef) -> list[str]:
    """The classes labelers choose from: the champion's, then the second model's others."""
    return list(a.classes) + [c for c in b.classes if c not in a.classes]


# ---------------------------------------------------------------------------------------- route


@dataclass
class RouteResult:
    """What one active-learning pass did with the pool's new images."""

    new_images: int = 0
    auto: int = 0  # selected for an auto-label
    auto_added: int = 0  # of those, new to the manifest
    human: int = 0  # sent to labelers
    deferred: int = 0  # would go to labelers but over max_tasks: they come back next run
    reasons: dict[str, int] = field(default_factory=dict)
    task_ids: list[int] = field(default_factory=list)
    auto_rows: list[dict] = field(default_factory=list)  # this pass's auto-labels (the spot checks' sample)

    def metrics(self) -> dict[str, float]:
        counts = {k: v for k, v in asdict(self).items() if isinstance(v, int)}
        auto_share = self.auto / self.new_images if self.new_images else 0.0
        return {**counts, "auto_share": auto_share,
                **{f"reason_{k.replace(' ', '_')}": v for k, v in self.reasons.items()}}


def _human_order(reasons: np.ndarray, conf_a: np.ndarray, conf_b: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Most informative first: disagreements and classes unknown to one model, then the least confident."""
    disagree = np.isin(reasons[idx], [DISAGREE, UNKNOWN_TO_OTHER]).astype(int)
    return idx[np.lexsort((np.minimum(conf_a, conf_b)[idx], -disagree))]


def route(
    pool_dir: str | Path, dataset_dir: str | Path, champion: ModelRef, second: ModelRef, sink: Sink,
    threshold: float = 0.9, per_class: Mapping[str, float] | None = None, max_tasks: int | None = None,
    since: datetime | str | None = None, batch_size: int = 256, champion_tta: bool = False,
    temperatures: tuple[float, float] = (1.0, 1.0), second_tta: bool = False,
) -> RouteResult:
    """One active-learning pass over the pool's new images.

    Auto-labels go into the dataset (`tasks.data.manifest.add_images`, source `auto`, both model
    versions and scores as "vA;vB" and "sA;sB"); the rest go to `sink` as LabelingItems with both
    predictions, champion first. Handled images are recorded in the pool's state file.

    Args:
        pool_dir: the online pool (index.jsonl + images).
        dataset_dir: the labelled dataset (ImageFolder tree + manifest.csv).
        champion, second: the two models; the champion's prediction is the pre-annotation.
        sink: takes the items for labelers, returns task ids (`label_studio_sink` in the flow).
        threshold: confidence both models must reach for an auto-label.
        per_class: class -> threshold overriding `threshold` for that agreed class.
        max_tasks: at most this many tasks per run, the most informative first; None: no cap.
        since: only pool images that arrived after this time.
        batch_size: inference batch size.
        champion_tta: the champion votes with its probabilities averaged over test-time augmented
            views (`tasks.labeling.tta`), which makes it less often confidently wrong.
        second_tta: the second model votes under the same augmentation (the committee of views).
        temperatures: (champion's, second's) temperature applied to each model's probabilities
            before the vote (`tasks.labeling.vote_calibration`); (1, 1): the raw probabilities.
            The scores in auto-label rows and pre-annotations are the calibrated ones.

    Returns:
        The counts of what went where.
    """
    if max_tasks is not None and max_tasks < 0:
        raise SaofuError(f"max_tasks must be >= 0 or None, got {max_tasks}")
    with pool_lock(pool_dir):
        return _route_locked(pool_dir, dataset_dir, champion, second, sink, threshold, per_class, max_tasks, since,
                             batch_size, champion_tta, temperatures, second_tta)


def _route_locked(
    pool_dir: str | Path, dataset_dir: str | Path, champion: ModelRef, second: ModelRef, sink: Sink,
    threshold: float, per_class: Mapping[str, float] | None, max_tasks: int | None,
    since: datetime | str | None, batch_size: int, champion_tta: bool, temperatures: tuple[float, float],
    second_tta: bool = False,
) -> RouteResult:
    state = load_state(pool_dir)
    images = pool_images(pool_dir, since, state)
    result = RouteResult(new_images=len(images))
    if not images:
        return result
    classes = label_classes(champion, second)
    # calibrated on each model's own columns: a column aligned in as 0 must stay 0
    raw_a = predict_pool(champion.onnx_path, images, batch_size, tta=champion_tta)
    probs_a = align_probs(apply_temperature(raw_a, temperatures[0]), champion.classes, classes)
    raw_b = predict_pool(second.onnx_path, images, batch_size, tta=second_tta)
    probs_b = align_probs(apply_temperature(raw_b, temperatures[1]), second.classes, classes)
    auto, labels, reasons = select_batch(probs_a, probs_b, classes, threshold, per_class, champion.classes,
                                         second.classes)
    result.reasons = dict(Counter(reasons.tolist()))

    auto_idx = np.flatnonzero(auto)
    rows = [_auto_row(images[i], labels[i], probs_a[i], probs_b[i], champion, second) for i in auto_idx]
    result.auto, result.auto_rows = len(rows), rows
    if rows:
        with dataset_lock(dataset_dir):  # no ingest swaps in a copy it staged before these rows
            result.auto_added = len(add_images(dataset_dir, rows))
    state.auto |= {images[i].sha256 for i in auto_idx}
    save_state(pool_dir, state)  # the auto-labels are in; do not redo them if the sink fails

    human_idx = _human_order(reasons, probs_a.max(1), probs_b.max(1), np.flatnonzero(~auto))
    send = human_idx if max_tasks is None else human_idx[:max_tasks]
    items = [
        _pool_item(images[i], classes, probs_a[i], probs_b[i], reasons[i], champion, second) for i in send
    ]
    result.task_ids = list(sink(items)) if items else []
    result.human, result.deferred = len(items), len(human_idx) - len(send)
    state.human |= {images[i].sha256 for i in send}
    save_state(pool_dir, state)
    print(f"active learning: {result.new_images} new pool images: {result.auto} auto-labelled "
          f"({result.auto_added} new to the dataset), {result.human} to labelers, {result.deferred} deferred; "
          f"reasons {result.reasons}", flush=True)
    return result


def _auto_row(
    image: PoolImage, label: str, pa: np.ndarray, pb: np.ndarray, a: ModelRef, b: ModelRef
) -> dict[str, Any]:
    return {
        "image": str(image.path),
        "label": label,
        "source": "auto",
        "labeled_at": datetime.now(UTC).isoformat(),
        "model_versions": f"{a.model_version};{b.model_version}",
        "scores": f"{pa.max():.6f};{pb.max():.6f}",
    }


def _pool_item(
    image: PoolImage, classes: Sequence[str], pa: np.ndarray, pb: np.ndarray, reason: str,
    a: ModelRef, b: ModelRef,
) -> LabelingItem:
    return LabelingItem(
        image=image.path,
        source=POOL_SOURCE,
        sha256=image.sha256,
        predictions=[
            PredictionSpec(a.model_version, classes[int(pa.argmax())], float(pa.max())),
            PredictionSpec(b.model_version, classes[int(pb.argmax())], float(pb.max())),
        ],
        meta={"al_reason": reason, "pool_timestamp": image.timestamp.isoformat(), "pool_phase": image.phase},
    )


def label_studio_sink(
    project_title: str, classes: Sequence[str], url: str | None = None, token: str | None = None,
    files_root: str | Path | None = None,
) -> Sink:
    """A sink that imports items as tasks of the Label Studio project `project_title`.

    It connects only when first given items, so a pass that labels everything itself needs no
    Label Studio. Images must lie under the server's local-files root (see `import_tasks`).
    """
    from tasks.labeling.client import connect, ensure_project, import_tasks

    def sink(items: list[LabelingItem]) -> list[int]:
        if not items:
            return []
        client = connect(url, token)
        project_id = ensure_project(client, project_title, classes)
        return import_tasks(client, project_id, items, Path(files_root) if files_root else None)

    return sink


# ------------------------------------------------------------------------------------- badcases


def send_badcases(
    badcase_file: str | Path, sink: Sink, pool_dir: str | Path, max_tasks: int | None = None
) -> int:
    """Send an evaluation's badcases to labelers, tagged `badcase`, each once.

    The model's top class is the pre-annotation. The truth is left out of the task so labelers
    judge the image afresh (a badcase may be a wrong label, not a wrong model). Sent images are
    recorded in the pool's state file under `badcases`.

    Args:
        badcase_file: written by `write_badcases`.
        sink: as for `route`.
        pool_dir: the pool whose state file records what was sent.
        max_tasks: at most this many badcases per run; None: all.

    Returns:
        The number of badcase tasks created.
    """
    doc = read_badcases(badcase_file)
    with pool_lock(pool_dir):
        return _send_badcases_locked(doc, sink, pool_dir, max_tasks)


def _send_badcases_locked(doc: dict, sink: Sink, pool_dir: str | Path, max_tasks: int | None) -> int:
    state = load_state(pool_dir)
    fresh = [c for c in doc["badcases"] if c.sha256 not in state.badcases]
    fresh = fresh if max_tasks is None else fresh[:max_tasks]
    items = [
        LabelingItem(
            image=Path(c.path), source=BADCASE_SOURCE, sha256=c.sha256, badcase=True,
            predictions=[PredictionSpec(doc["model_version"], c.predicted, c.score)],
            meta={"eval_kind": c.kind, "eval_split": doc.get("split", ""), "eval_model_version": doc["model_version"]},
        )
        for c in fresh
    ]
    if items:
        sink(items)
    state.badcases |= {c.sha256 for c in fresh}
    save_state(pool_dir, state)
    print(f"badcases: {len(items)} sent to labelers ({len(doc['badcases']) - len(fresh)} sent before or held back)",
          flush=True)
    return len(items)


# -------------------------------------------------------------------------------- Prefect faces

# NO_CACHE: the sink is a closure and the pool changes under the same inputs; a cached result
# would skip new images.
resolve_models_task = task(name="resolve-models", cache_policy=NO_CACHE)(resolve_models)
route_task = task(name="route-pool", cache_policy=NO_CACHE)(route)
send_badcases_task = task(name="send-badcases", cache_policy=NO_CACHE)(send_badcases)
