"""Asking the serving app what it serves: the release waits on it, the canary is judged by it.

The serving app (`deploy/app.py`) reports on `/healthz` the versions it serves under each alias
and, when it runs a canary (`saofu serve --canary-share`), the canary's state. The release flow
reads only that: it never talks to the app's internals, so any app that answers `/healthz` the
same way can be released to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from saofu.errors import SaofuError


def _healthz(url: str) -> dict:
    return httpx.get(url.rstrip("/") + "/healthz", timeout=2).json()


def nudge(url: str) -> bool:
    """Ask the serving app to check the registry's aliases now (`POST /refresh`), not at its next poll.

    Returns:
        Whether it took the nudge; an app that does not (not up, or without the route) still finds
        the alias at its next poll, so nothing fails here.
    """
    try:
        return httpx.post(url.rstrip("/") + "/refresh", timeout=2).status_code == 202
    except httpx.HTTPError:
        return False


def wait_until_served(url: str, version: str, timeout_s: float = 60.0) -> str | None:
    """Nudge the serving app, then poll its /healthz until its champion is `version`; the last version seen."""
    seen, deadline = None, time.monotonic() + timeout_s
    nudge(url)
    while time.monotonic() < deadline:
        try:
            seen = _healthz(url)["versions"]["champion"]
            if seen == version:
                return seen
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass  # not up yet, or not a saofu serving app: keep asking until the deadline
        time.sleep(0.1)
    return seen


@dataclass
class CanaryVerdict:
    """How the serving app's canary of one challenger ended, as far as the release waited."""

    passed: bool
    status: str  # "passed", "rolled_back", "timeout"
    detail: str
    requests: int = 0


def canary_share_of(url: str) -> float:
    """The share of traffic the serving app at `url` sends to its challenger (0: it runs no canary).

    Raises:
        SaofuError: the app does not answer /healthz like a saofu serving app.
    """
    try:
        canary = _healthz(url).get("canary")
    except (httpx.HTTPError, ValueError) as exc:
        raise SaofuError(f"the serving app at {url} does not answer /healthz ({exc}); start it with "
                         "`saofu serve --canary-share S` before a release with a canary") from None
    return float(canary["share"]) if canary else 0.0


def wait_for_canary(url: str, version: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> CanaryVerdict:
    """Wait until the app's canary of challenger `version` has been judged on enough requests.

    Passed: the canary still runs with at least its `min_requests` challenger answers (the app
    checks every measure from then on and rolls back at once when one is past its margin).
    Rolled back: the app stopped it; the reason is the app's. Timeout: not enough traffic in
    `timeout_s` (nothing is decided then: the challenger stays a challenger).
    """
    deadline = time.monotonic() + timeout_s
    last: dict = {}
    nudge(url)  # the challenger alias just moved: the canary starts when the app loads it
    while time.monotonic() < deadline:
        try:
            canary = _healthz(url).get("canary") or {}
        except (httpx.HTTPError, ValueError):
            canary = {}
        if canary.get("challenger_version") == version:
            last = canary
            requests = int((canary.get("challenger") or {}).get("requests", 0))
            if canary.get("status") == "rolled_back":
                return CanaryVerdict(False, "rolled_back", f"the serving app rolled the canary back: "
                                                           f"{canary.get('reason') or 'no reason given'}", requests)
            if canary.get("status") == "running" and requests >= int(canary.get("min_requests", 1)):
                return CanaryVerdict(True, "passed", f"{requests} canary requests, agreement "
                                                     f"{canary.get('agreement', float('nan')):.3f}", requests)
        time.sleep(poll_s)
    requests = int((last.get("challenger") or {}).get("requests", 0))
    return CanaryVerdict(False, "timeout", f"only {requests} canary requests of v{version} in {timeout_s:.0f} s; "
                                           "the challenger stays a challenger", requests)
