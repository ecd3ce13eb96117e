"""The bench's record of Prefect client retries: driven by Prefect's own retrying client."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import pytest

from bench.prefect_retries import CLIENT_LOGGER, ClientRetry, client_retries, parse_retry

pytestmark = pytest.mark.timeout(60)


def _answer_503_then_200() -> httpx.MockTransport:
    answered = []

    def handler(request: httpx.Request) -> httpx.Response:
        answered.append(request.url.path)
        return httpx.Response(503 if len(answered) == 1 else 200, json={})

    return httpx.MockTransport(handler)


def test_a_503_the_real_client_retries_is_recorded_with_the_seconds_it_slept():
    from prefect.client.base import PrefectHttpxAsyncClient

    async def get() -> int:
        async with PrefectHttpxAsyncClient(transport=_answer_503_then_200(), base_url="http://prefect.test") as c:
            return (await c.get("/api/flow_runs/")).status_code

    with client_retries() as retries:
        started = time.perf_counter()
        status = asyncio.run(get())
        waited = time.perf_counter() - started
    assert status == 200
    assert len(retries) == 1 and retries[0].status == 503
    # The back-off the client logged is the one it slept (2 s with jitter for a first retry).
    assert 1.0 < retries[0].seconds <= waited < retries[0].seconds + 1.0


def test_outside_the_block_nothing_is_recorded_and_the_logger_is_as_it_was():
    log = logging.getLogger(CLIENT_LOGGER)
    level, propagate, handlers = log.level, log.propagate, list(log.handlers)
    with client_retries() as retries:
        log.debug("Received response with retryable status code 503. Another attempt will be made in 2.1s. "
                  "This is attempt 1/6.")
    log.debug("Received response with retryable status code 503. Another attempt will be made in 2.1s.")
    assert retries == [ClientRetry(503, 2.1)]
    assert (log.level, log.propagate, log.handlers) == (level, propagate, handlers)


def test_inside_the_block_debug_lines_stay_quiet_and_warnings_still_reach_prefect_s_handlers():
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    parent = logging.getLogger(CLIENT_LOGGER).parent
    collector = Collect(logging.DEBUG)
    parent.addHandler(collector)
    try:
        with client_retries() as retries:
            log = logging.getLogger(CLIENT_LOGGER)
            log.debug("Connecting to the API")
            log.warning("the server answered slowly")
    finally:
        parent.removeHandler(collector)
    assert retries == [] and seen == ["the server answered slowly"]


@pytest.mark.parametrize("message, expected", [
    ("Received response with retryable status code 503. Another attempt will be made in 2.0467s. "
     "This is attempt 1/6.", ClientRetry(503, 2.0467)),
    ("Encountered retryable exception during request. Another attempt will be made in 4s. This is attempt 2/6.",
     ClientRetry(None, 4.0)),
    ("Connecting to API at http://127.0.0.1:4200/api/", None),
])
def test_each_kind_of_retry_line_is_read_and_other_lines_are_not(message, expected):
    assert parse_retry(message) == expected
