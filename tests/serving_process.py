"""The serving app as a real process, for the tests that start one: a store to serve from, start, wait, stop."""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(size: int, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, "PNG")
    return buf.getvalue()


def register_untrained(home: Path, model: str, classes: Sequence[str], size: int,
                       seeds: Sequence[int] = (0, 1)) -> None:
    """Register one untrained `saofu_fu_tiny` per seed as versions 1, 2, ... of `model` in `home`'s store."""
    import torch

    from models import create_model
    from tasks.tracking import register_onnx, start_run
    from tasks.train.export import export_onnx

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAOFU_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for seed in seeds:
            torch.manual_seed(seed)
            path = export_onnx(create_model("saofu_fu_tiny", len(classes)).eval(), list(classes),
                               home / f"graph-{seed}.onnx", size)
            register_onnx(start_run("serve-test", f"s{seed}", {}, {}), path, model, size, list(classes), {})


@contextmanager
def serving(cmd: Sequence[str], *, cwd: Path, env: dict[str, str], port: int,
            startup_s: float = 120) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start `cmd` (a serving app on `port`), wait for /healthz, yield (process, URL), then SIGTERM it.

    Fails the test, with the process's stderr, when it exits or stays silent past `startup_s`.
    """
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.communicate(timeout=10)[1][-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{' '.join(cmd)} did not answer /healthz within {startup_s:g} s")
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
