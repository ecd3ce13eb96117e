"""Prefect's client retries, counted: each is a stall the orchestration's share pays for.

Prefect's client retries a request the server answers 503 (or that fails to connect) after an
exponential back-off, 2 s with jitter for the first retry (`prefect.client.base`), and logs that
only at DEBUG. On a SQLite-backed server, Prefect's own API included (what `saofu fast-retrain`
runs on with no PREFECT_API_URL), a write that meets another one answers 503 ("database is
locked", PrefectHQ/prefect issue 18934; README, `bench/prefect_db.py`): one subflow in twenty
stalled 2 s there. A bench that times orchestration records these retries, so a slow draw names its
cause instead of leaving a guess.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

CLIENT_LOGGER = "prefect.client"  # `prefect.client.base.logger`, where the retry is logged
_RETRY = re.compile(r"(?:status code (?P<status>\d+)|exception)\D*?Another attempt will be made in "
                    r"(?P<seconds>[0-9.]+)s")


@dataclass(frozen=True)
class ClientRetry:
    status: int | None  # the HTTP status answered, None when the request raised (a connection error)
    seconds: float  # how long the client slept before trying again


def parse_retry(message: str) -> ClientRetry | None:
    """The retry a client log line reports, or None for any other line."""
    found = _RETRY.search(message)
    if found is None:
        return None
    return ClientRetry(int(found["status"]) if found["status"] else None, float(found["seconds"]))


class _RetryRecorder(logging.Handler):
    def __init__(self, into: list[ClientRetry], parent: logging.Logger) -> None:
        super().__init__(logging.DEBUG)
        self.into, self.parent = into, parent

    def emit(self, record: logging.LogRecord) -> None:
        retry = parse_retry(record.getMessage())
        if retry is not None:
            self.into.append(retry)
        elif record.levelno > logging.DEBUG:  # what the client logged anyway still reaches Prefect's handlers
            self.parent.handle(record)


@contextmanager
def client_retries() -> Iterator[list[ClientRetry]]:
    """The Prefect client retries made inside the block (any thread), appended to the list yielded.

    The client logger is switched to DEBUG for the block without letting its debug lines reach
    Prefect's console: it stops propagating, and its other records are handed to its parent."""
    log = logging.getLogger(CLIENT_LOGGER)
    retries: list[ClientRetry] = []
    recorder = _RetryRecorder(retries, log.parent or logging.getLogger())
    level, propagate = log.level, log.propagate
    log.addHandler(recorder)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield retries
    finally:
        log.removeHandler(recorder)
        log.setLevel(level)
        log.propagate = propagate
