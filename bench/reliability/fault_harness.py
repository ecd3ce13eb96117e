"""What the fault injections share: the colour models, a store with versions, processes, waits.

See `bench.reliability.faults` for what each fault is and checks.
"""


from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

MODEL = "faults-recognizer"
SIZE = 8  # the colour graphs' input size: a fault is about saofu's machinery, not about a model
CLASSES = ["fu", "not_fu"]
# Logits = mean RGB @ W: red answers `fu`, green `not_fu`; two versions with different weights
# tell which version answered.
WEIGHTS = {"1": [[0.1, 0], [0, 0.1], [0.1, 0]], "2": [[0.2, 0], [0, 0.2], [0.2, 0]]}
SAOFU = str(Path(sys.executable).parent / "saofu")


# ------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the block; the old values come back after."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_hashes(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root`: what a fault must leave as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def changed_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def png(colour: tuple[int, int, int], size: int = SIZE) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def colour_graph(path: Path, weights) -> Path:
    """An ONNX graph with export_onnx's interface (uint8 NHWC `pixels` -> `logits`, classes and size in
    its metadata) computing mean RGB @ `weights`: registers and loads in milliseconds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.asarray(weights, np.float32)
    nodes = [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["rgb"], axes=[1, 2], keepdims=0),
             helper.make_node("MatMul", ["rgb", "W"], ["logits"])]
    graph = helper.make_graph(
        nodes, "colour", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", w.shape[1]])],
        [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(model, {"classes": json.dumps(CLASSES), "image_size": str(SIZE), "arch": "colour2"})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def register_version(home: Path, version_key: str) -> str:
    """Register one colour graph as a new version of MODEL in the store the environment names."""
    from tasks import tracking

    run_id = tracking.start_run("faults", f"candidate-{version_key}", {}, {})
    graph = colour_graph(home / f"graph-{version_key}.onnx", WEIGHTS[version_key])
    version = tracking.register_onnx(run_id, graph, MODEL, SIZE, CLASSES, {})
    tracking.finish_run(run_id)
    return version


def colour_store(home: Path, champion: str = "1") -> str:
    """`home`'s SQLite store with versions 1 and 2 of MODEL, `champion` holding the alias; its URI."""
    from tasks.release import registry

    with environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=None):
        for key in ("1", "2"):
            register_version(home, key)
        registry.promote(MODEL, champion, "faults bench: the champion before the fault")
    return f"sqlite:///{home}/mlflow/mlflow.db"


def version_problem(uri: str, version: str) -> str:
    """'' when registered `version` of MODEL is complete (its graph loads with its classes), else why not."""
    import onnx
    from mlflow.tracking import MlflowClient

    from saofu.model_location import version_location

    try:
        location = version_location(MlflowClient(tracking_uri=uri, registry_uri=uri), MODEL, version)
        graph = onnx.load(str(Path(location.removeprefix("file://")) / "model.onnx"))
        classes = json.loads({p.key: p.value for p in graph.metadata_props}["classes"])
    except Exception as exc:  # noqa: BLE001 - any failure to load is the answer
        return f"v{version}: {type(exc).__name__}: {exc}"
    return "" if classes == CLASSES else f"v{version}: classes {classes}"


def aliases_of(uri: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    aliases = MlflowClient(tracking_uri=uri, registry_uri=uri).get_registered_model(MODEL).aliases
    return {alias: str(version) for alias, version in aliases.items()}  # the SQL store answers ints


def wait_until(predicate: Callable[[], bool], seconds: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {seconds:g} s")
        time.sleep(step)


def http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


