"""Real servers for integration tests: Label Studio on a free loopback port, stopped at the end.

Label Studio is installed once into a cached venv shared by all runs (`$SAOFU_LABELSTUDIO_VENV`,
default `<checkout>/.saofu/labelstudio-venv`); the first run takes minutes, later ones seconds.
Each test session gets a fresh project folder, database and files root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from services import labeling as service
from tasks.labeling.client import connect

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LS_VENV = REPO_ROOT / ".saofu" / "labelstudio-venv"


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: starts real servers (Label Studio) on loopback")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _saofu_env(home: Path, venv: Path) -> Iterator[None]:
    """Point saofu's settings at the test's folder only while the service is started or stopped.

    Not for the whole session: later tests must see the environment they expect.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAOFU_HOME", str(home))
        mp.setenv("SAOFU_LABELSTUDIO_VENV", str(venv))
        for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"):
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> Iterator[service.LabelStudioHandle]:
    """A running Label Studio with a fresh database; images under `handle.files_root` are served."""
    home = tmp_path_factory.mktemp("ls-home")
    venv = Path(os.environ.get("SAOFU_LABELSTUDIO_VENV") or DEFAULT_LS_VENV)
    with _saofu_env(home, venv):
        service.ensure_installed(venv)
        handle = service.start(port=free_port(), files_root=home)
    try:
        yield handle
    finally:
        with _saofu_env(home, venv):
            service.stop()


@pytest.fixture(scope="session")
def client(label_studio):
    """An SDK client with the admin's token."""
    return connect(label_studio.url, label_studio.token)


def _chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _apt_install_chromium() -> str:
    """Install Debian's `chromium`; returns '' on success, else why it failed."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "no apt-get, or not root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, timeout=600)
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    return "" if result.returncode == 0 else result.stderr[-500:]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a Chromium binary, installed with apt-get when missing; fails (says why) if impossible."""
    found = _chromium_binary()
    if found is None:
        why = _apt_install_chromium()
        found = _chromium_binary()
        if found is None:
            pytest.fail(f"headless Chromium unavailable and `apt-get install chromium` failed: {why}")
    return found
