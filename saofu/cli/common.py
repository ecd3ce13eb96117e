"""What every command group shares: the `--json` option, the one summary it prints, progress on
stderr, and running a flow.

Light on purpose: every group imports it when `saofu` builds its command tree, so nothing here may
import torch, Prefect or MLflow at module level.
"""

from __future__ import annotations

import contextlib
import json
import sys

import typer

JsonOpt = typer.Option(False, "--json", help="Print one machine-readable JSON summary on stdout.")


@contextlib.contextmanager
def progress_to_stderr(enabled: bool):
    """With --json, stdout carries only the summary: route progress prints to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def emit(summary: dict, as_json: bool, human: str) -> None:
    """Print `summary` as one JSON object with --json, else the human-readable text."""
    if as_json:
        print(json.dumps(summary, default=str))
    else:
        print(human)


def run_flow(flow_fn, params):
    """Run a flow on the configured Prefect API (an ephemeral one when none is set), without a
    heartbeat thread (`flows.heartbeat`): the command that started the run watches it."""
    from flows.heartbeat import without_heartbeat

    with without_heartbeat():
        return flow_fn(params)
