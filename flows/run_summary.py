"""A flow run's summary as a Prefect markdown artifact: where whoever clicked the run in the UI looks.

The Prefect UI shows a run's artifacts on the run's page (its Artifacts tab) and, by key, on the
Artifacts page: the latest first, the earlier runs' under the same key as its history. The text
log says the same in more words; the artifact is the part someone reads before deciding what next.
"""

from __future__ import annotations

import re

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact


def artifact_key(flow_name: str, model: str) -> str:
    """`flow_name` and `model` folded into what Prefect takes as a key: lowercase letters, digits, dashes."""
    return re.sub(r"[^a-z0-9]+", "-", f"{flow_name}-{model}".lower()).strip("-")


def text_block(text: str) -> str:
    """`text` as a fenced block: the tables saofu prints keep their columns."""
    return f"```text\n{text.rstrip()}\n```"


def key_value_table(rows: list[tuple[str, str]]) -> str:
    """(name, value) rows as a two-column markdown table (a `|` in a value would end its cell)."""
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v.replace('|', '/')} |" for k, v in rows])


def promoted_verdict(version: str, served: str | None) -> str:
    """The verdict of a run that moved the champion, as the fast retrain's and the release's summaries say it."""
    return f"promoted: version {version} is the champion" + (f", served ({served})" if served else "")


def publish(markdown: str, key: str, description: str) -> None:
    """Store `markdown` on the current flow run; a failure to store it is logged, not raised.

    The summary is written after the run's work is done (a model may already be serving): a
    summary that could not be stored must not turn a run that shipped into a failed one. Outside
    a flow run (the flow's function called as a plain function) there is no run page: nothing is stored.
    """
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return
    try:
        create_markdown_artifact(markdown=markdown, key=key, description=description)
    except Exception as e:  # noqa: BLE001 - any API failure: the run's own outcome stands
        get_run_logger().warning("could not store the run's summary artifact %r: %s", key, e)
