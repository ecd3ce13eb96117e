"""How `saofu` answers a mistyped command line, and what it loads to answer.

Usage errors get click's usage line and the error on stderr, exit code 2, no traceback; a bare
command group prints its help. Commands that do not train (help, serving, the registry, services)
must not import torch: it costs seconds at start and ~1 GB of memory in a long-lived `saofu serve`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.test_cli import run

# A fresh interpreter runs `saofu ARGS...` through main() and writes which heavy modules it loaded.
_PROBE = """
import atexit, json, os, sys

def report():
    heavy = ("torch", "prefect", "mlflow", "optuna")
    with open(os.environ["LOADED_OUT"], "w") as f:
        json.dump([m for m in heavy if m in sys.modules], f)

atexit.register(report)
sys.argv = ["saofu", *sys.argv[1:]]
from saofu.cli import main
main()
"""


def _loaded_by(args: list[str], home: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    out_file = home / "loaded.json"
    env = {**os.environ, "SAOFU_HOME": str(home), "LOADED_OUT": str(out_file)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=home)
    return proc, json.loads(out_file.read_text())


@pytest.mark.parametrize("args, command, error", [
    (["train", "--bogus"], "saofu train", "Error: No such option: --bogus"),
    (["bogus"], "saofu", "Error: No such command 'bogus'."),
    (["train", "--data", ".", "--epochs", "many"], "saofu train", "Error: Invalid value for '--epochs'"),
    (["data", "checkout"], "saofu data checkout", "Error: Missing argument"),
])
def test_a_usage_error_prints_usage_and_the_error_and_exits_2(tmp_path, args, command, error):
    out = run(args, tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr
    usage, hint, blank, *rest = out.stderr.splitlines()
    assert usage.startswith(f"Usage: {command} [OPTIONS]"), out.stderr
    assert hint == f"Try '{command} --help' for help." and blank == ""
    assert rest and rest[0].startswith(error), out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


@pytest.mark.parametrize("args, listed", [
    ([], ("train", "serve", "release", "data", "bench")),
    (["data"], ("generate", "versions", "checkout")),
    (["bench"], ("models", "search-seeds")),
])
def test_a_group_without_a_command_prints_its_help_and_exits_0(tmp_path, args, listed):
    out = run(args, tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"Usage: {' '.join(['saofu', *args])} [OPTIONS] COMMAND [ARGS]..." in out.stdout
    assert all(name in out.stdout for name in listed)
    assert out.stderr == ""


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["serve", "--help"], 0),
    (["serve", "--port", "0", "--model", "no-such-model"], 2),  # through deploy.server, up to the registry
    (["rollback", "no-such-model"], 2),
    (["down", "postgres"], 0),
    (["data", "versions"], 0),
])
def test_commands_that_do_not_train_never_import_torch(tmp_path, args, code):
    proc, loaded = _loaded_by(args, tmp_path)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "torch" not in loaded, f"`saofu {' '.join(args)}` imported torch"
    if args[-1] == "--help":
        assert loaded == [], f"`saofu {' '.join(args)}` imported {loaded}"


def test_ctrl_c_in_a_command_is_aborted_exit_130(monkeypatch, capsys):
    import tasks.data.versions
    from saofu.cli import main

    def interrupted(name=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks.data.versions, "list_versions", interrupted)
    monkeypatch.setattr(sys, "argv", ["saofu", "data", "versions"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip() == "aborted"
