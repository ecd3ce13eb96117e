"""Where saofu keeps its state, resolved lazily (nothing is created or set at import).

Everything lives under one project folder, `SAOFU_HOME` (default: the current directory), so a
checkout, a test's temporary folder and a team's shared volume all work the same way:

    $SAOFU_HOME/mlflow/mlflow.db        MLflow tracking + registry (SQLite)
    $SAOFU_HOME/mlflow/artifacts/       MLflow artefacts
    $SAOFU_HOME/data/                   generated worlds, prepared-tensor caches, the online pool,
                                        the labelled dataset
    $SAOFU_HOME/runs/                   per-run working folders (checkpoints, ONNX, reports)

`MLFLOW_TRACKING_URI` overrides the tracking store (e.g. a team's `mlflow server`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return (self.mlflow_dir / "artifacts").as_uri()

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def online_pool_dir(self) -> Path:
        """The online pool: where `saofu serve` logs requests by default and active learning reads."""
        return self.home / "data" / "online_pool"

    @property
    def labelled_dir(self) -> Path:
        """The labelled dataset the scheduled flows look for first (`make demo` ingests into it)."""
        return self.home / "data" / "labelled"

    @property
    def cache_dir(self) -> Path:
        return self.home / "data" / ".cache"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


def get_settings() -> Settings:
    """Read the environment now (not at import), so tests can point SAOFU_HOME elsewhere."""
    return Settings(home=Path(os.environ.get("SAOFU_HOME", ".")).resolve())
