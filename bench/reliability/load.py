"""Load under swaps: requests to a real `saofu serve` process while its models are swapped under it.

A temporary project (its own SAOFU_HOME and SQLite MLflow store) registers three versions of one
untrained `saofu_fu_tiny`: 1 and 2 are the same weights (the champion alias moves between them),
3 is those weights again with the class names rotated, so the canary's challenger disagrees with
the champion on every request and is rolled back, deterministically, once it has answered the
policy's `min_requests`. `saofu serve` runs it on loopback with a canary share, a short alias poll
and a small online pool (so the pool evicts and compacts all along).

`clients` closed-loop aiohttp clients send PNG crops (a fixed set, cycled: images repeat as a
popular one would) while a controller does what a user does, one step after another, each once
the load has reached its share of `requests`:

* move `@champion` (`tasks.release.registry.promote`, what `saofu promote` calls) `swaps` times,
  between 1 and 2, and wait until an answer comes from the new version;
* after the first swap, name version 3 `@challenger` (`registry.set_challenger`, as the release
  flow does) and wait for the app's verdict the way the release flow waits for it
  (`tasks.release.serving_wait.wait_for_canary`): rolled back.

The load runs until `requests` are sent and every step is done (a slow step makes the load
longer, never shorter). Any answer but a 200, and any connection error, is a failed request.
The server's resident memory is sampled once the warm-up is done and at the end. When the load is
over, the pool is checked: every answered request logged or counted as dropped, every index line
readable and its image on disk, the pool within its bounds.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bench.reliability.fault_harness import environment, free_port
from bench.reliability.section import Case, Section

MODEL = "load-recognizer"
CLASSES = ["fu", "fu_merchant", "not_fu"]
ROTATED = CLASSES[1:] + CLASSES[:1]  # version 3's names: every answer differs from the champion's
SIZE = 32
REPO = Path(__file__).resolve().parents[2]
STEP_TIMEOUT_S = 60.0  # a swap or a canary verdict not seen within this is a failed case


def _register_versions(home: Path) -> None:
    """Versions 1 and 2 (one untrained graph) and 3 (the same weights, class names rotated) of MODEL.

    Version 2 is a second registration of version 1's logged model (MLflow allows that): a swap
    loads it from the registry all the same, and one logging fewer saves seconds of every test run.
    """
    import torch

    from models import create_model
    from tasks.release import registry
    from tasks.tracking import client, finish_run, register_onnx, start_run
    from tasks.train.export import export_onnx

    torch.manual_seed(0)
    model = create_model("saofu_fu_tiny", len(CLASSES)).eval()
    versions = []
    for key, classes in (("1", CLASSES), ("3", ROTATED)):
        run_id = start_run("load-bench", f"v{key}", {}, {})
        graph = export_onnx(model, classes, home / f"graph-{key}.onnx", SIZE)
        versions.append(register_onnx(run_id, graph, MODEL, SIZE, classes, {}))
        finish_run(run_id)
        if key == "1":
            first = client().get_model_version(MODEL, versions[0])
            versions.append(str(client().create_model_version(MODEL, first.source, run_id=first.run_id,
                                                              model_id=first.model_id).version))
    if versions != ["1", "2", "3"]:
        raise RuntimeError(f"expected versions 1, 2 and 3 in a fresh store, got {versions}")
    registry.promote(MODEL, "1", "load bench: the first champion")


def _crops(n: int) -> list[bytes]:
    """`n` distinct noise crops as PNG bytes (what is decoded is what is measured, not what is seen)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _rss_mb(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for process {pid}") from None


@dataclass
class _Load:
    """What the clients saw: per answered request (start time, version, arm), and every failure."""

    requests: int
    sent: int = 0
    answers: list[tuple[float, str, str]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    steps_done: bool = False
    waiters: list[tuple[str, float, asyncio.Future]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def fail(self, what: str) -> None:
        self.failures[what] = self.failures.get(what, 0) + 1

    def answered(self, started: float, version: str, arm: str) -> None:
        self.answers.append((started, version, arm))
        for waiter in list(self.waiters):
            want, since, future = waiter
            if arm == "champion" and version == want and started >= since and not future.done():
                future.set_result(asyncio.get_running_loop().time())
                self.waiters.remove(waiter)

    def first_answer_from(self, version: str, since: float) -> asyncio.Future:
        """Resolves to when the first champion answer from `version` to a request sent after `since` came in."""
        future = asyncio.get_running_loop().create_future()
        self.waiters.append((version, since, future))
        return future

    async def reached(self, n: int) -> None:
        while self.sent < n:
            await asyncio.sleep(0.01)


async def _client(url: str, bodies: list[bytes], load: _Load, session) -> None:
    import aiohttp

    loop = asyncio.get_running_loop()
    headers = {"content-type": "image/png"}
    while load.sent < load.requests or not load.steps_done:
        n = load.sent
        load.sent += 1
        started = loop.time()
        try:
            async with session.post(url, data=bodies[n % len(bodies)], headers=headers) as r:
                body = await r.read()
                status = r.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            load.fail(type(exc).__name__)
            continue
        if status != 200:
            load.fail(f"HTTP {status}")
            continue
        try:
            answer = json.loads(body)
            load.answered(started, str(answer["version"]), str(answer["arm"]))
        except (ValueError, KeyError, TypeError):
            load.fail("unreadable 200")


def _promote(home: Path, version: str) -> None:
    from tasks.release import registry

    with environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=None):
        registry.promote(MODEL, version, f"load bench: swap to {version} under load")


def _set_challenger(home: Path, version: str) -> None:
    from tasks.release import registry

    with environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=None):
        registry.set_challenger(MODEL, version)


async def _swap(home: Path, load: _Load, old: str, new: str) -> Case:
    loop = asyncio.get_running_loop()
    moved = loop.time()
    await asyncio.to_thread(_promote, home, new)
    try:
        seen = await asyncio.wait_for(load.first_answer_from(new, moved), STEP_TIMEOUT_S)
    except TimeoutError:
        return Case("model-swap", f"@champion {old} -> {new} under load",
                    f"answers from v{new} within {STEP_TIMEOUT_S:.0f} s", "none seen", ok=False)
    # The new set was published before that answer was made: a request sent after it came in
    # must not be answered by the old one (one sent before may, by design: it read the set first).
    await asyncio.sleep(0.2)
    stale = sum(1 for started, version, arm in load.answers
                if arm == "champion" and version == old and started > seen)
    return Case("model-swap", f"@champion {old} -> {new} under load",
                f"answers from v{new}, none from v{old} to requests sent after the first v{new} answer came in",
                f"first v{new} answer {seen - moved:.2f} s after the move; {stale} v{old} answers after it",
                ok=stale == 0)


async def _canary(home: Path, url: str, load: _Load, policy_min: int) -> Case:
    from tasks.release.serving_wait import wait_for_canary

    await asyncio.to_thread(_set_challenger, home, "3")
    verdict = await asyncio.to_thread(wait_for_canary, url, "3", STEP_TIMEOUT_S, 0.1)
    decided = asyncio.get_running_loop().time()
    await asyncio.sleep(0.3)
    late = sum(1 for started, version, arm in load.answers if arm == "challenger" and started > decided)
    answered = sum(1 for _, version, arm in load.answers if arm == "challenger" and version == "3")
    return Case("canary-rollback", "@challenger 3 (every answer differs from the champion's) under load",
                f"challenger v3 answers its share, is rolled back after {policy_min} requests, answers none after",
                f"{verdict.status}: {verdict.detail}; {answered} challenger answers, {late} after the verdict",
                ok=verdict.status == "rolled_back" and answered >= policy_min and late == 0)


async def _drive(url: str, home: Path, pid: int, bodies: list[bytes], requests: int, swaps: int, clients: int,
                 canary_min: int) -> tuple[_Load, list[Case], dict[str, float]]:
    import aiohttp

    load = _Load(requests)
    cases: list[Case] = []
    memory: dict[str, float] = {}
    warmup = max(100, requests // 10)
    steps = swaps + 1  # the canary is one step
    spacing = max(1, (requests - warmup) // (steps + 1))

    async def controller() -> None:
        try:
            await load.reached(warmup)
            memory["after_warmup_mb"] = _rss_mb(pid)
            versions = ["1", "2"]
            champion = "1"
            for step in range(steps):
                await load.reached(warmup + step * spacing)
                if step == 1 or (step == 0 and swaps == 0):
                    cases.append(await _canary(home, url, load, canary_min))
                    continue
                new = versions[(versions.index(champion) + 1) % 2]
                cases.append(await _swap(home, load, champion, new))
                champion = new
        finally:
            load.steps_done = True

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        control = asyncio.create_task(controller())
        await asyncio.gather(*(_client(f"{url}/predict", bodies, load, session) for _ in range(clients)))
        await control
    memory["end_mb"] = _rss_mb(pid)
    return load, cases, memory


def _healthz(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/healthz", timeout=5).json()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"saofu serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"saofu serve not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _check_pool(pool: Path, stats: dict, answered: int, max_files: int) -> Case:
    """Every answered request logged or counted dropped; every line readable with its image there."""
    from tasks.labeling.pool import pool_images

    unreadable = missing = 0
    shas = set()
    for raw in (pool / "index.jsonl").read_bytes().split(b"\n"):
        if not raw:
            continue
        try:
            line = json.loads(raw)
            shas.add(line["sha256"])
            missing += not (pool / line["path"]).is_file()
        except (ValueError, KeyError, TypeError):
            unreadable += 1
    readable = len(pool_images(pool, state=None)) if not unreadable else 0
    accounted = stats["logged"] + stats["dropped"] + stats["failed"]
    unaccounted = abs(answered - accounted)
    lost = unreadable + missing + stats["failed"] + unaccounted
    return Case("pool-under-load", f"online pool (at most {max_files} images) behind the load",
                "every 200 logged or counted dropped; every line readable, its image on disk; within bounds",
                f"{answered} answered, {stats['logged']} logged, {stats['dropped']} dropped, {stats['failed']} "
                f"failed, {stats['evicted']} images evicted, {stats.get('compacted_lines', 0)} lines compacted; "
                f"{unreadable} unreadable lines, {missing} lines without their image; {len(shas)} images "
                f"({readable} for active learning)",
                ok=lost == 0 and len(shas) <= max_files, lost=lost)


def run_load(requests: int = 20_000, swaps: int = 6, clients: int = 16, *, canary_share: float = 0.25,
             canary_min_requests: int = 100, pool_max_files: int = 48, n_images: int = 64,
             max_growth_mb: float = 64.0, poll_seconds: float = 0.2, workdir: str | Path | None = None) -> Section:
    """Send `requests` requests to a real `saofu serve` while `@champion` moves `swaps` times and a canary
    is rolled back (see the module's docstring).

    Args:
        requests: requests to send at least (more when a step is still waiting for its answer).
        swaps: champion alias moves during the load.
        clients: concurrent closed-loop clients.
        canary_share: share of requests the challenger answers while its canary runs.
        canary_min_requests: challenger answers before the app judges it (a multiple of its check, 10).
        pool_max_files: the online pool's bound (`--pool-max-files`): small, so it evicts under the load.
        n_images: distinct crops cycled through.
        max_growth_mb: the server's RSS growth from the end of the warm-up to the end that still holds.
        poll_seconds: the app's alias poll.
        workdir: where the temporary project lives (default: a new temporary folder, removed after).

    Returns:
        The section: counts `requests_under_swaps`, `failed_requests`, `memory_growth_mb` and
        `rows_or_files_lost`; one case per swap, the canary, the load, the memory, the pool and the stop.
    """
    started = time.perf_counter()
    tmp = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="saofu-load-"))
    home, pool, log = tmp / "home", tmp / "pool", tmp / "serve.log"
    home.mkdir(parents=True, exist_ok=True)
    with environment(SAOFU_HOME=str(home), MLFLOW_TRACKING_URI=None):
        _register_versions(home)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SAOFU_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "saofu.cli", "serve", "--port", str(port), "--model", MODEL,
           "--canary-share", str(canary_share), "--canary-min-requests", str(canary_min_requests),
           "--pool", str(pool), "--pool-max-files", str(pool_max_files), "--poll-seconds", str(poll_seconds),
           "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    section = Section("load under swaps")
    try:
        _wait_ready(url, proc, log)
        load, cases, memory = asyncio.run(_drive(url, home, proc.pid, _crops(n_images), requests, swaps, clients,
                                                 canary_min_requests))
        stats = _drain_pool_stats(url)
    finally:
        exit_code = _stop(proc)
    answered = len(load.answers)
    growth = memory["end_mb"] - memory["after_warmup_mb"]
    errors = [line for line in log.read_text(errors="replace").splitlines()
              if "Traceback" in line or " ERROR " in line]
    section.cases = [
        *cases,
        Case("requests-under-swaps", f"{clients} clients, {len(cases)} swaps and canary steps",
             "every request answered 200", f"{load.sent} sent, {answered} answered 200, {load.failed} failed "
             f"{dict(sorted(load.failures.items()))}", ok=load.failed == 0),
        Case("memory", "saofu serve resident memory, end of warm-up -> end of load",
             f"growth under {max_growth_mb:.0f} MB", f"{memory['after_warmup_mb']:.1f} MB -> {memory['end_mb']:.1f} MB "
             f"({growth:+.1f} MB)", ok=growth < max_growth_mb),
        _check_pool(pool, stats, answered, pool_max_files),
        Case("clean-stop", "saofu serve, SIGTERM after the load", "exit 0, no traceback or error in its log",
             f"exit {exit_code}; {len(errors)} error lines" + (f": {errors[0][:200]}" if errors else ""),
             ok=exit_code == 0 and not errors),
    ]
    section.counts = {"requests_under_swaps": load.sent, "failed_requests": load.failed,
                      "memory_growth_mb": round(growth, 1),
                      "rows_or_files_lost": sum(c.lost for c in section.cases)}
    section.seconds = time.perf_counter() - started
    if workdir is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return section


def _drain_pool_stats(url: str, timeout: float = 10.0) -> dict:
    """The app's pool stats once its queue is written (the writer wakes every 0.1 s)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = _healthz(url)["pool"]
        if stats["queued"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
