"""The folder layout says the architecture: imports point down, stages are folders, no state in git.

Static checks on the source (the AST, `git ls-files`), so they run in a second and name the file
that breaks a rule. `tests/test_imports.py` checks what a fresh interpreter actually loads.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("saofu", "models", "tasks", "flows", "services", "deploy", "bench")

# What each layer may import from the project's own packages (saofu.settings/saofu.errors are
# importable from every layer; the CLI, saofu.cli, only from itself). Every import points down.
ALLOWED = {
    "models": {"models", "saofu"},
    "tasks": {"tasks", "models", "services", "saofu"},  # services: a service's client settings only
    "flows": {"flows", "tasks", "models", "saofu"},
    "services": {"services", "saofu"},
    "deploy": {"deploy", "saofu"},
}
MAX_LINES = 600
STAGES = ("data", "labeling", "search", "train", "release")


def _modules(layer: str) -> list[Path]:
    return sorted(p for p in (REPO / layer).rglob("*.py") if ".venv" not in p.parts)


def _project_imports(path: Path) -> set[str]:
    """Dotted names of the project modules `path` imports (top level and inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {name for name in found if name.split(".")[0] in LAYERS}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_down(layer):
    wrong = []
    for path in _modules(layer):
        for name in _project_imports(path):
            top = name.split(".")[0]
            if top not in ALLOWED[layer] or name.startswith("saofu.cli"):
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_pipeline_tasks_never_call_a_service_lifecycle():
    """Tasks may read a service's connection settings, never start or stop it."""
    lifecycle = {"start", "stop", "ensure_installed", "start_postgres", "stop_postgres", "running_postgres"}
    wrong = []
    for path in _modules("tasks"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("services"):
                wrong += [f"{path.relative_to(REPO)}: {a.name}" for a in node.names if a.name in lifecycle]
    assert not wrong, wrong


def test_tasks_are_grouped_by_stage_and_names_do_not_repeat_their_folder():
    loose = [p.name for p in (REPO / "tasks").glob("*.py") if p.name not in {"__init__.py", "tracking.py"}]
    assert not loose, f"modules outside a stage folder of tasks/: {loose}"
    for stage in STAGES:
        assert (REPO / "tasks" / stage / "__init__.py").exists(), f"tasks/{stage}/ is missing"
    prefixed = [str(p.relative_to(REPO)) for p in (REPO / "tasks").rglob("*.py")
                if p.stem.startswith(f"{p.parent.name}_")]
    assert not prefixed, f"file names repeating their folder's name: {prefixed}"


def test_no_module_over_the_size_limit_without_a_reason_at_its_top():
    """A module over ~600 lines says why at its top (a docstring line starting with "Size:")."""
    too_long = []
    for layer in LAYERS:
        for path in _modules(layer):
            lines = path.read_text().splitlines()
            doc = ast.get_docstring(ast.parse("\n".join(lines))) or ""
            if len(lines) > MAX_LINES and "Size:" not in doc:
                too_long.append(f"{path.relative_to(REPO)} ({len(lines)} lines)")
    assert not too_long, f"modules over {MAX_LINES} lines with no reason at their top: {too_long}"


def test_git_holds_no_database_run_folder_or_generated_data():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True,
                             timeout=60).stdout.split()
    state = [name for name in tracked
             if name.endswith((".db", ".sqlite", ".sqlite3", ".pt", ".onnx"))
             or name.split("/")[0] in {"mlruns", "runs", "data", ".saofu"}
             or name.startswith("mlflow/") and name != "mlflow/README.md"]
    assert not state, f"state committed to git: {state}"
