"""The release's view of the serving app: waiting for a version, and the canary's verdict from /healthz."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saofu.errors import SaofuError
from tasks.release.serving_wait import canary_share_of, wait_for_canary, wait_until_served


class _Script:
    """/healthz answers: each GET takes the next body (the last one repeats)."""

    def __init__(self, bodies: list[dict]):
        self.bodies, self.calls = bodies, 0

    def next(self) -> dict:
        body = self.bodies[min(self.calls, len(self.bodies) - 1)]
        self.calls += 1
        return body


@pytest.fixture
def healthz():
    script = _Script([{}])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            data = json.dumps(script.next()).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield script, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _canary(status: str, version: str, requests: int, **extra) -> dict:
    return {"versions": {"champion": "1", "challenger": version},
            "canary": {"share": 0.1, "status": status, "min_requests": 5, "challenger_version": version,
                       "challenger": {"requests": requests}, "agreement": 0.97, **extra}}


@pytest.mark.timeout(30)
def test_the_canary_passes_once_judged_on_its_minimum_requests(healthz):
    script, url = healthz
    script.bodies = [_canary("running", "1", 99), _canary("running", "2", 1), _canary("running", "2", 4),
                     _canary("running", "2", 5)]
    verdict = wait_for_canary(url, "2", timeout_s=10, poll_s=0.01)
    assert verdict.passed and verdict.status == "passed" and verdict.requests == 5
    assert script.calls == 4  # the old challenger's canary (v1) did not count


@pytest.mark.timeout(30)
def test_a_rolled_back_canary_is_not_promoted_and_says_why(healthz):
    script, url = healthz
    script.bodies = [_canary("running", "2", 2), _canary("rolled_back", "2", 3, reason="agreement 0.61 < 0.9")]
    verdict = wait_for_canary(url, "2", timeout_s=10, poll_s=0.01)
    assert not verdict.passed and verdict.status == "rolled_back" and "agreement 0.61" in verdict.detail


@pytest.mark.timeout(30)
def test_too_little_traffic_decides_nothing(healthz):
    script, url = healthz
    script.bodies = [_canary("running", "2", 1)]
    verdict = wait_for_canary(url, "2", timeout_s=0.3, poll_s=0.01)
    assert not verdict.passed and verdict.status == "timeout" and "only 1 canary requests" in verdict.detail


@pytest.mark.timeout(30)
def test_the_share_and_the_served_version_are_read_from_healthz(healthz):
    script, url = healthz
    script.bodies = [_canary("running", "2", 0)]
    assert canary_share_of(url) == 0.1
    script.bodies = [{"versions": {"champion": "1"}, "canary": None}]
    assert canary_share_of(url) == 0.0
    script.bodies = [{"versions": {"champion": "1"}}, {"versions": {"champion": "3"}}]
    script.calls = 0
    assert wait_until_served(url, "3", timeout_s=5) == "3"
    with pytest.raises(SaofuError, match="does not answer"):
        canary_share_of("http://127.0.0.1:9")
