"""MLflow at the edge: tracking runs, logging artefacts, registering model versions.

Every call goes through `client()`, an `MlflowClient` built with the project's store as both its
tracking and its registry URI (`saofu.settings`: `<SAOFU_HOME>/mlflow/mlflow.db`, or
MLFLOW_TRACKING_URI). Nothing here reads or sets MLflow's process-global URIs: a fresh process
(`saofu serve`, a Prefect worker, a test) that never configured MLflow would otherwise write to,
or look models up in, MLflow's default store, `./mlflow.db` of whatever folder it started in.
For the same reason the fluent API (`mlflow.start_run`, `mlflow.<flavor>.log_model`) and
`models:/` URIs, which MLflow resolves through the global registry, are not used.

Runs are addressed by id, never through a process-global "active run", so Prefect tasks (which
may run on other threads) can each add to the same run.

Metric names built from class folder names (`onnx_val_recall_<class>`) may hold characters MLflow
refuses in a key (`fu (red)`, `a+b`): `log_metrics` logs those under a key MLflow accepts
(`metric_key`) and keeps the real name in a `metric_name/<key>` tag of the run.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tempfile
import time
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from saofu.model_location import version_location
from saofu.settings import get_settings
from saofu.urls import hide_password

DEFAULT_EXPERIMENT = "saofu"


def tracking_uri() -> str:
    """The project's store (or MLFLOW_TRACKING_URI); a SQLite store's folder is created."""
    uri = get_settings().tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def client() -> MlflowClient:
    """A client of the project's store, for tracking and registry alike.

    Built per call from the settings (cheap: MLflow caches the store), so a changed SAOFU_HOME
    is followed and `mlflow.set_tracking_uri` elsewhere in the process changes nothing.
    """
    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def configure_mlflow(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Ensure `experiment` exists in the project's store (MLflow's globals are left alone).

    Returns:
        The experiment id.
    """
    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    # A local store gets its artefacts under mlflow/artifacts, not ./mlruns of whatever folder
    # the command happened to start in; a remote server keeps its own default.
    uri = mlflow_client.tracking_uri
    location = get_settings().artifact_root if uri.startswith("sqlite:") else None
    return mlflow_client.create_experiment(experiment, artifact_location=location)


def start_run(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Create a run, log its parameters and tags, and return its id (the run stays open)."""
    experiment_id = configure_mlflow(experiment)
    mlflow_client = client()
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=tags)
    for key, value in params.items():
        mlflow_client.log_param(run.info.run_id, key, "" if value is None else value)
    return run.info.run_id


# What MLflow accepts as a metric, param or tag key on every platform (`mlflow.utils.validation`):
# word characters, `. - /` and spaces, no colon (a Windows server refuses it), a normalised relative
# path, at most 250 characters.
_KEY_CHARACTERS = re.compile(r"[\w.\- /]*")
_MAX_KEY_LENGTH = 250
METRIC_NAME_TAG = "metric_name/"


def _is_accepted_key(key: str) -> bool:
    return (len(key) <= _MAX_KEY_LENGTH and _KEY_CHARACTERS.fullmatch(key) is not None
            and posixpath.normpath(key) == key and key != "." and not key.startswith(("/", "..")))


def metric_key(name: str) -> str:
    """`name` as MLflow accepts it as a metric key: `name` itself when MLflow takes it.

    Otherwise every refused character becomes `_` and a short hash of the real name is appended,
    so two names that differ only in refused characters (`a+b`, `a_b`) keep two keys.

    Why rename rather than refuse such a dataset at the start: a class folder name is the user's
    label, carried as-is by the checkpoint, the ONNX class map and the serving answers; only
    MLflow's key syntax objects to it, and only in the per-class metric names. Renaming there lets
    every such dataset train, with the real name kept beside the key (`log_metrics`).
    """
    if _is_accepted_key(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    safe = re.sub(r"[^\w.\- /]", "_", name)
    if posixpath.normpath(safe) != safe or safe.startswith(("/", "..")):
        safe = safe.replace("/", "_")
    key = f"{safe[:_MAX_KEY_LENGTH - 40]}-{digest}"
    return key if _is_accepted_key(key) else f"metric-{digest}"


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log `metrics` to run `run_id`; a name MLflow refuses goes under `metric_key(name)`, and the
    run gets a tag `metric_name/<key>` holding the real name."""
    now = int(time.time() * 1000)
    renamed: dict[str, str] = {}
    logged = []
    for name, value in metrics.items():
        key = metric_key(name)
        if key != name:
            renamed[key] = name
        logged.append(Metric(key, float(value), now, step or 0))
    _log_batch(run_id, logged, [RunTag(METRIC_NAME_TAG + key, name) for key, name in renamed.items()])


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    _log_batch(run_id, [], [RunTag(key, str(value)) for key, value in tags.items()])


def _log_batch(run_id: str, metrics: list[Metric], tags: list[RunTag]) -> None:
    """One store transaction per MLflow batch (at most 1,000 metrics, 100 tags), not one per value:
    a fast retrain logs 137, one at a time 0.7-1.1 s on SQLite (under a profiler)."""
    mlflow_client = client()
    for start in range(0, len(metrics), 1000):
        mlflow_client.log_batch(run_id, metrics=metrics[start:start + 1000])
    for start in range(0, len(tags), 100):
        mlflow_client.log_batch(run_id, tags=tags[start:start + 100])


def log_dict(run_id: str, data: dict, artifact_file: str) -> None:
    client().log_dict(run_id, data, artifact_file)


def log_file(run_id: str, path: str | Path, artifact_dir: str | None = None) -> None:
    client().log_artifact(run_id, str(path), artifact_dir)


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status)


def download_run_artifact(run_id: str, path: str, dst_dir: str | Path) -> str:
    """Download `path` of run `run_id`'s artefacts from the project's store into `dst_dir`.

    Returns:
        The local path of the file or folder.
    """
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    return client().download_artifacts(run_id, path, str(dst_dir))


def onnx_signature(image_size: int, num_classes: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3), "pixels")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "logits")]),
    )


def onnx_pip_requirements() -> list[str]:
    """What a registered ONNX graph needs to be served, pinned to what this process runs with.

    The list MLflow's own inference arrives at for every graph saofu registers (it adds `mlflow`
    itself). Inference loads the model in a subprocess on every save: 1.6-3.6 s of each
    registration on 2 cores, paid twice by a fast retrain (the fine-tuned version, the release).
    """
    return [f"{name}=={installed_version(name)}" for name in ("numpy", "onnx", "onnxruntime")]


def register_onnx(
    run_id: str, onnx_path: str | Path, registered_model: str, image_size: int, classes: list[str],
    version_tags: dict[str, str],
) -> str:
    """Log the ONNX graph as the run's MLflow model and register it as a new version.

    What `mlflow.onnx.log_model(..., registered_model_name=...)` does, through an explicit client:
    the fluent call resolves the store, the logged model and the registration through MLflow's
    process-global URIs.

    Returns:
        The registered version number (as MLflow's string).
    """
    mlflow_client = client()
    run = mlflow_client.get_run(run_id)
    logged = mlflow_client.create_logged_model(
        run.info.experiment_id, name="model", source_run_id=run_id, params=dict(run.data.params),
    )
    mlflow_client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    metadata = {"classes": classes, "image_size": image_size}
    try:
        with tempfile.TemporaryDirectory(prefix="saofu-onnx-") as tmp:
            local = Path(tmp) / "model"
            mlflow.onnx.save_model(
                onnx.load(str(onnx_path)), str(local),
                mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                                   model_uuid=logged.model_id, metadata=metadata),
                signature=onnx_signature(image_size, len(classes)), metadata=metadata, save_as_external_data=False,
                pip_requirements=onnx_pip_requirements(),
            )
            mlflow_client.log_model_artifacts(logged.model_id, str(local))
    except Exception:
        mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    try:
        mlflow_client.create_registered_model(registered_model)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # The source is the concrete artefact location, not `models:/<model_id>`: MLflow's SQL
    # registry resolves a `models:/` source through a client of the global store.
    mv = mlflow_client.create_model_version(
        registered_model, logged.artifact_location, run_id=run_id, model_id=logged.model_id,
        tags={key: str(value) for key, value in version_tags.items()},
    )
    version = str(mv.version)
    mlflow_client.set_logged_model_tags(
        logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": registered_model, "version": version}])},
    )
    return version


def download_model_version(name: str, version: str, dst_dir: str | Path | None = None) -> Path:
    """Download registered version `version` of `name` (its MLflow model folder) from the project's store.

    Args:
        name: registered model.
        version: version number.
        dst_dir: destination folder; None: a local store's folder is used in place, a remote
            store's is downloaded to a temporary folder.

    Returns:
        The local model folder (holding MLmodel, model.onnx, ...).
    """
    mlflow_client = client()
    location = version_location(mlflow_client, name, version)
    if dst_dir is not None:
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(
        artifact_uri=location, dst_path=str(dst_dir) if dst_dir is not None else None,
        tracking_uri=mlflow_client.tracking_uri, registry_uri=mlflow_client.tracking_uri,
    ))


def mlflow_ui_hint() -> str:
    """The command that opens the UI on the project's store."""
    uri = get_settings().tracking_uri
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {hide_password(uri)}"
