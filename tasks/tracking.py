"""MLflow at the edge: tracking runs, logging artefacts, registering model versions.

Runs are addressed by id through `MlflowClient`, never through a process-global "active run", so
Prefect tasks (which may run on other threads) can each add to the same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from saofu.settings import get_settings

DEFAULT_EXPERIMENT = "saofu"


def configure_mlflow(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at the project's store (or MLFLOW_TRACKING_URI) and ensure the experiment.

    Returns:
        The experiment id.
    """
    settings = get_settings()
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    # A local store gets its artefacts under mlflow/artifacts, not ./mlruns of whatever folder
    # the command happened to start in; a remote server keeps its own default.
    location = settings.artifact_root if uri.startswith("sqlite:") else None
    return client.create_experiment(experiment, artifact_location=location)


def start_run(experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Create a run, log its parameters and tags, and return its id (the run stays open)."""
    experiment_id = configure_mlflow(experiment)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, "" if value is None else value)
    return run.info.run_id


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value), step=step or 0)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


def log_dict(run_id: str, data: dict, artifact_file: str) -> None:
    MlflowClient().log_dict(run_id, data, artifact_file)


def log_file(run_id: str, path: str | Path, artifact_dir: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_dir)


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status)


def onnx_signature(image_size: int, num_classes: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3), "pixels")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "logits")]),
    )


def register_onnx(
    run_id: str, onnx_path: str | Path, registered_model: str, image_size: int, classes: list[str],
    version_tags: dict[str, str],
) -> str:
    """Log the ONNX graph as the run's MLflow model and register it as a new version.

    Returns:
        The registered version number (as MLflow's string).
    """
    configure_mlflow()  # same store as the run; the experiment already exists
    model = onnx.load(str(onnx_path))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            model,
            name="model",
            registered_model_name=registered_model,
            signature=onnx_signature(image_size, len(classes)),
            save_as_external_data=False,
            metadata={"classes": classes, "image_size": image_size},
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in version_tags.items():
        client.set_model_version_tag(registered_model, version, key, str(value))
    return version


def mlflow_ui_hint() -> str:
    """The command that opens the UI on the store this process uses."""
    settings = get_settings()
    uri = settings.tracking_uri
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --port 5000"
    return f"open {uri}"
