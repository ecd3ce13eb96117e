"""What a fresh interpreter loads for each entry point: the layers stay light where they must.

The serving app runs on onnxruntime, never torch or Prefect; the model definitions need neither
Prefect nor MLflow; the CLI imports torch, Prefect and MLflow inside the commands that use them, so
`saofu --help` and `saofu serve` start in well under a second. `tests/test_layout.py` checks the
same layering statically, on the source.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "prefect", "mlflow")


def _loaded(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module, forbidden", [
    ("deploy.app", {"torch", "prefect"}),
    ("deploy.server", {"torch", "prefect"}),
    ("models", {"prefect", "mlflow"}),
    ("saofu.cli", {"torch", "prefect", "mlflow"}),
    ("tasks.train.config", {"torch", "prefect", "mlflow"}),
    # the commands that do not train: active learning and ingest run ONNX graphs and validation only
    ("flows.active_learning", {"torch"}),
    ("flows.ingest", {"torch"}),
])
def test_a_fresh_import_leaves_the_heavy_libraries_out(module, forbidden):
    loaded = _loaded(module) & forbidden
    hint = f"find the chain: python -X importtime -c 'import {module}'"
    assert not loaded, f"`import {module}` imports {sorted(loaded)} ({hint})"
