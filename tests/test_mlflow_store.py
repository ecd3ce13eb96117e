"""Every MLflow call goes to the project's store, whatever MLflow's process-global URIs say.

MLflow's defaults (`./mlflow.db`, `./mlruns` of the current folder) are what a call that missed
the project's store falls back to; here the globals point at a decoy store and the current folder
is an empty one, and neither may be touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from mlflow.tracking._model_registry import utils as registry_globals
from mlflow.tracking._tracking_service import utils as tracking_globals

from saofu.settings import get_settings

MODEL = "store-test"
CLASSES = ["a", "b", "c"]
SIZE = 32


@pytest.fixture
def decoy(saofu_home, tmp_path, monkeypatch) -> Path:
    """MLflow's global tracking and registry URIs set to another store; the cwd an empty folder."""
    decoy_db = tmp_path / "elsewhere.db"
    # Record the globals so that monkeypatch puts them back after the test.
    monkeypatch.setattr(tracking_globals, "_tracking_uri", tracking_globals._tracking_uri)
    monkeypatch.setattr(registry_globals, "_registry_uri", registry_globals._registry_uri)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{decoy_db}")
    mlflow.set_registry_uri(f"sqlite:///{decoy_db}")
    # Both calls also export their URI (MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI) for subprocesses,
    # and saofu reads MLFLOW_TRACKING_URI as the user's documented override; this test is about the
    # in-process globals, so the variables go again.
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(name, None)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return decoy_db


def test_the_client_uses_the_project_store_not_mlflows_globals(decoy, saofu_home):
    from tasks import tracking

    uri = get_settings().tracking_uri
    assert uri == f"sqlite:///{saofu_home / 'mlflow' / 'mlflow.db'}"
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == f"sqlite:///{decoy}"
    client = tracking.client()
    assert client.tracking_uri == uri
    assert client._registry_uri == uri  # no public accessor; the registry test below checks behaviour


def test_runs_registration_aliases_and_downloads_stay_in_the_project_store(decoy, saofu_home):
    import torch

    from models import create_model
    from tasks import tracking
    from tasks.labeling.active_learning import resolve_models
    from tasks.release import registry
    from tasks.train.export import export_onnx

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(export_onnx(create_model("saofu_fu_tiny", len(CLASSES)).eval(), CLASSES,
                                 saofu_home / f"{seed}.onnx", SIZE))
    run_id = tracking.start_run("store-test", "register", {"seed": 0}, {"purpose": "test"})
    tracking.log_metrics(run_id, {"accuracy": 0.5})
    versions = [tracking.register_onnx(run_id, p, MODEL, SIZE, CLASSES, {"arch": "tiny"}) for p in paths]
    tracking.finish_run(run_id)
    assert versions == ["1", "2"]
    registry.promote(MODEL, "1", "test")
    tracking.client().set_registered_model_alias(MODEL, "second", "2")

    uri = get_settings().tracking_uri
    project = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert project.get_run(run_id).data.metrics == {"accuracy": 0.5}
    assert str(project.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert project.get_model_version(MODEL, "2").tags["arch"] == "tiny"
    assert (saofu_home / "mlflow" / "artifacts").is_dir()  # the experiment's artefact root

    local = tracking.download_model_version(MODEL, "1")
    assert (local / "model.onnx").read_bytes() == Path(paths[0]).read_bytes()
    assert (local / "MLmodel").is_file()
    with pytest.warns(UserWarning):  # both are one architecture
        champion, second = resolve_models(MODEL)
    assert (champion.model_version, second.model_version) == (f"{MODEL}:1", f"{MODEL}:2")

    assert not decoy.exists()
    assert list(Path.cwd().iterdir()) == []  # no ./mlflow.db, no ./mlruns


def test_a_registered_graph_names_what_mlflows_own_inference_would(saofu_home, tmp_path):
    """saofu names the requirements itself (MLflow's inference costs seconds per registration);
    the list must be what the inference finds for the same graph, so a served model installs alike."""
    import mlflow.onnx
    from mlflow.utils.environment import infer_pip_requirements

    from models import create_model
    from tasks import tracking
    from tasks.train.export import export_onnx

    graph = export_onnx(create_model("saofu_fu_tiny", len(CLASSES)).eval(), CLASSES, tmp_path / "m.onnx", SIZE)
    run_id = tracking.start_run("store-test", "requirements", {}, {})
    version = tracking.register_onnx(run_id, graph, MODEL, SIZE, CLASSES, {})
    tracking.finish_run(run_id)

    model_dir = tracking.download_model_version(MODEL, version)
    written = (model_dir / "requirements.txt").read_text().split()
    assert [line.split("==")[0] for line in written] == ["mlflow", "numpy", "onnx", "onnxruntime"]
    # What `mlflow.onnx.save_model` writes when left to itself: the inferred set, its flavour's
    # defaults and the running mlflow (`mlflow.utils.environment._process_pip_requirements`).
    inferred = infer_pip_requirements(str(model_dir), "onnx", fallback=["inference failed"])
    mlflow_pin = f"mlflow=={mlflow.__version__}"
    assert written == sorted({mlflow_pin, *inferred, *mlflow.onnx.get_default_pip_requirements()})
