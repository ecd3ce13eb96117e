"""Where a registered model version's files are, asked of one explicit MLflow client.

MLflow resolves a `models:/` URI through its process-global registry (`./mlflow.db` in a process
that never set one), whatever `registry_uri` it is given (mlflow/mlflow#16412). The pipeline's
tracking helpers and the serving app (which imports no `tasks`) both resolve a version here,
through the client of the store they were given. Needs no mlflow import of its own.
"""

from __future__ import annotations

from saofu.errors import SaofuError


def version_location(client, name: str, version: str) -> str:
    """The concrete artefact URI (file://, s3://, mlflow-artifacts:/...) of `name` version `version`.

    Args:
        client: an `mlflow.tracking.MlflowClient` of the store to ask.

    Raises:
        SaofuError: the version's source is a `models:/` URI other than a logged model's.
    """
    uri = client.get_model_version_download_uri(name, version)
    if not uri.startswith("models:/"):
        return uri
    # Registered from `models:/<logged model id>` with no storage location resolved: look the
    # logged model up in this client's store, not the global one MLflow would ask.
    model_id = uri.removeprefix("models:/").strip("/")
    if "/" in model_id or "@" in model_id:
        raise SaofuError(f"{name} version {version}: cannot resolve its source {uri!r} to an artefact location")
    return client.get_logged_model(model_id).artifact_location
