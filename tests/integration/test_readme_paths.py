"""A new user's path, exactly as the README tells it, on a fresh copy of the project.

The commands run as subprocesses of the installed `saofu` (the project's `.venv/bin` first on
PATH, which is what the README's `. .venv/bin/activate` does), with the project folder as the
working directory and none of saofu's, MLflow's, Prefect's or Label Studio's environment
variables: only what the README tells a user to set (nothing, for these paths).

The project is a copy of the checkout's files (tracked and untracked-but-not-ignored, mtimes
kept) beside a link to the checkout's `.venv`, so `make demo` finds its set-up done and runs
`saofu demo`; nothing the commands write lands in the developer's checkout.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import SHAPES, make_shapes_dataset
from tests.integration.user_shell import REPO, VENV
from tests.integration.user_shell import user_env as _user_env
from tests.serving_process import free_port, serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _copy_project(dst: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True, timeout=60,
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if not src.is_file():  # deleted in the work tree, not yet committed
            continue
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)  # keeps mtimes: make sees the set-up as done
    (dst / ".venv").symlink_to(VENV, target_is_directory=True)
    # Label Studio's own venv (made once by the set-up of the checkout's first `saofu up labeling`):
    # linked like .venv, so the demo finds it installed instead of installing it again.
    labelstudio_venv = REPO / ".saofu" / "labelstudio-venv"
    if labelstudio_venv.is_dir():
        (dst / ".saofu").mkdir()
        (dst / ".saofu" / "labelstudio-venv").symlink_to(labelstudio_venv, target_is_directory=True)
    return dst


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    if not (VENV / "bin" / "saofu").exists():
        pytest.fail(f"{VENV} has no saofu: run `make install` (or `make test`) first")
    project = _copy_project(tmp_path_factory.mktemp("fresh") / "saofu")
    # `make demo` must not re-run the set-up here: it would point the shared editable install at this copy.
    stale = subprocess.run(["make", "-q", "install"], cwd=project, env=_user_env(), timeout=60)
    if stale.returncode != 0:
        pytest.fail("the checkout's .venv is older than pyproject.toml/constraints.txt: run `make install` first")
    return project


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` as the user would; on a time-out the whole process group goes (make's `saofu demo` too)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=_user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"{' '.join(cmd)} took over {timeout:g} s:\n{out[-3000:]}\n{err[-3000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    said = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{said}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


@contextmanager
def _serve(project: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    port = free_port()
    with serving(["saofu", "serve", "--port", str(port), *args], cwd=project, env=_user_env(), port=port) as served:
        yield served


def _loaded_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


DEMO_DEPLOYMENTS = {"fast-retrain", "active-learning", "ingest", "release", "search", "cycle"}


@pytest.mark.timeout(2400)
def test_make_demo_runs_the_whole_loop_and_leaves_it_running(project):
    """`make demo`: every service healthy at the end, the deployments with their schedules on the
    printed Prefect URL, the fast retrain run as a deployment run, and the README's `curl` answered
    by the champion; `saofu down` stops it all."""
    try:
        demo = _run(["make", "demo"], project, timeout=1800)
        lines = demo.stdout.strip().splitlines()
        assert lines[-1] == "stop everything with: saofu down", lines[-12:]
        assert any(line.startswith("fast retrain (deployment run)") for line in lines), lines
        services = json.loads(_run(["saofu", "status", "--json"], project, timeout=120).stdout)["services"]
        assert all(s["healthy"] for s in services.values()), services
        prefect = services["prefect"]["url"]
        assert prefect in demo.stdout and services["serving"]["url"] == "http://127.0.0.1:8000"

        deployments = {d["name"]: d for d in httpx.post(f"{prefect}/api/deployments/filter", json={}).json()}
        assert set(deployments) == DEMO_DEPLOYMENTS
        assert deployments["ingest"]["schedules"] and deployments["cycle"]["schedules"]
        fast_runs = httpx.post(f"{prefect}/api/flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployments["fast-retrain"]["id"]]}}}).json()
        assert [r["state"]["type"] for r in fast_runs] == ["COMPLETED"], fast_runs

        history = json.loads(_run(["saofu", "history", "fu-recognizer", "--json"], project, 120).stdout)["history"]
        champion = history[-1]["version"]
        scan = next((project / "data").glob("fu_world_demo_*/test/fu/*.png"))
        answer = httpx.post("http://127.0.0.1:8000/predict", content=_png(scan),
                            headers={"content-type": "image/png"}, timeout=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == "fu-recognizer" and body["version"] == champion, (body, history)
        assert body["top_class"] in {"fu", "not_fu", "fu_merchant"}
        maps = _loaded_libraries(services["serving"]["pid"])
        assert "libtorch" not in maps and "/torch/" not in maps, "the serving process has loaded torch"
        assert "onnxruntime" in maps  # the check reads the right process
        # every MLflow call used the project's store: no stray default store in the working directory
        assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
    finally:
        subprocess.run(["saofu", "down"], cwd=project, env=_user_env(), capture_output=True, timeout=300)
    assert not any(s["running"] for s in json.loads(
        _run(["saofu", "status", "--json"], project, timeout=120).stdout)["services"].values())


@pytest.mark.timeout(1800)
def test_train_only_demo_release_serve_as_the_readme_says(tmp_path_factory):
    """`saofu demo --train-only` → `saofu release` → `saofu serve --port P`: the Fu model answers."""
    project = _copy_project(tmp_path_factory.mktemp("train-only") / "saofu")
    demo = _run(["saofu", "demo", "--train-only"], project, timeout=900)
    tail = demo.stdout.strip().splitlines()[-4:]
    assert any("saofu release" in line for line in tail), f"the demo's last lines say nothing of what next: {tail}"

    release = _run(["saofu", "release"], project, timeout=900)
    assert "promoted: fu-recognizer version" in release.stdout, release.stdout[-2000:]

    scan = next((project / "data").rglob("fu/*.png"))  # a scan of the generated world
    with _serve(project) as (server, url):
        answer = httpx.post(f"{url}/predict", content=_png(scan),
                            headers={"content-type": "image/png"}, timeout=10)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == "fu-recognizer" and body["top_class"] in {"fu", "not_fu"}, body


@pytest.mark.timeout(1500)
def test_own_imagefolder_dataset_trains_releases_and_serves(project, tmp_path):
    """Train → release → serve on a small non-Fu ImageFolder dataset, a class added by `saofu fast-retrain`
    while it serves, then training again after a move."""
    data = make_shapes_dataset(tmp_path / "shapes", n_per_class=50, size=32)
    triangles = tmp_path / "campaign" / "triangle"
    triangles.parent.mkdir()
    (data / "triangle").rename(triangles)  # the class that arrives later
    _run(["saofu", "train", "--data", str(data), "--registered-model", "shapes", "--epochs", "3",
          "--image-size", "32"], project, timeout=600)
    release = _run(["saofu", "release", "--model", "shapes"], project, timeout=600)
    assert "promoted: shapes version" in release.stdout, release.stdout[-2000:]

    with _serve(project, "--model", "shapes") as (server, url):
        answer = httpx.post(f"{url}/predict", content=_png(next((data / "circle").glob("*.png"))),
                            headers={"content-type": "image/png"}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["top_class"] in SHAPES, answer.json()

        # The README's fast retrain from a folder of labels; the gate's targets opened wide (3 epochs
        # of training make no 95 % model), so what is checked is the path: one run, shipped, served.
        fast = _run(["saofu", "fast-retrain", "--add", "triangle", "--labels", str(triangles.parent),
                     "--model", "shapes", "--budget-min", "0.2", "--new-class-recall", "0",
                     "--max-old-drop-pts", "100", "--serve-url", url, "--json"], project, timeout=900)
        summary = json.loads(fast.stdout)
        assert summary["promoted"] and summary["served_version"] == summary["challenger_version"], summary
        assert summary["labels_added"] == 50 and "fine-tune" in summary["steps"]
        answer = httpx.post(f"{url}/predict", content=_png(next(triangles.glob("*.png"))),
                            headers={"content-type": "image/png"}, timeout=10).json()
        assert answer["version"] == summary["challenger_version"] and answer["top_class"] in SHAPES, answer

    # A user re-extracts the dataset elsewhere and trains again in the same project home.
    moved = shutil.copytree(data, tmp_path / "shapes-moved")
    shutil.rmtree(data)
    _run(["saofu", "train", "--data", str(moved), "--registered-model", "shapes", "--epochs", "1",
          "--image-size", "32"], project, timeout=600)


@pytest.mark.timeout(120)
def test_usage_errors_are_usage_lines_not_tracebacks(project):
    env = _user_env()
    bare = subprocess.run(["saofu"], cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert bare.returncode == 0 and "Usage:" in bare.stdout and "Traceback" not in bare.stderr
    bogus = subprocess.run(["saofu", "train", "--bogus"], cwd=project, env=env, capture_output=True, text=True,
                           timeout=60)
    assert bogus.returncode == 2, (bogus.returncode, bogus.stderr)
    assert "Usage:" in bogus.stderr and "--bogus" in bogus.stderr and "Traceback" not in bogus.stderr
