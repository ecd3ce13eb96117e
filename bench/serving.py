"""`saofu bench serving`: the serving app beside `mlflow models serve` of the same registered model.

Both servers run at once on loopback, each one process (uvicorn, one worker: MLflow's default),
and are driven in turn by the same bounded asyncio load generator (aiohttp, keep-alive): each
point is `clients` concurrent clients sending one request after another for `seconds`, after a
warm-up. The generator shares the machine with the servers, as a phone's requests would not; both
servers pay that equally.

What each server is sent is what a client of it must send for one 64x64 crop:

* the app: the crop's PNG bytes (`Content-Type: image/png`); it decodes, runs and logs the request
  into a bounded online pool, as in production;
* `mlflow models serve`: the decoded pixels as a JSON tensor (`{"inputs": [[[[r, g, b], ...]]]}`),
  the only input its ONNX flavour takes for a uint8 [N,H,W,3] signature.

Before timing, one answer from each is compared: both must name the same top class.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BENCH_MODEL = "bench-serving"
CLASSES = ["fu", "fu_merchant", "not_fu"]
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _register_bench_model(home: Path, image_size: int) -> str:
    """Register a freshly initialised `saofu_fu` (the shipped architecture) in a temporary store.

    Throughput does not depend on what the weights learned, so nothing is trained.
    """
    import torch

    from models import create_model
    from tasks.tracking import client, register_onnx, start_run
    from tasks.train.export import export_onnx

    torch.manual_seed(0)
    model = create_model("saofu_fu", len(CLASSES)).eval()
    onnx_path = export_onnx(model, CLASSES, home / "bench.onnx", image_size)
    run_id = start_run("bench-serving", "bench-serving", {"model": "saofu_fu"}, {})
    version = register_onnx(run_id, onnx_path, BENCH_MODEL, image_size, CLASSES, {})
    client().set_registered_model_alias(BENCH_MODEL, "champion", version)
    return version


def _crops(n: int, image_size: int) -> list[bytes]:
    """PNG bytes of `n` Fu-world scans (what phones send); noise crops when no font is installed."""
    try:
        from datetime import datetime

        from tasks.data.fu_world import png_bytes
        from tasks.data.stream import simulate_scans

        scans = simulate_scans(n, seed=0, start=datetime(2026, 1, 28), rate_per_hour=10.0, image_size=image_size)
        return [png_bytes(s.image) for s in scans]
    except Exception:  # noqa: BLE001 - the benchmark measures serving, not the renderer
        rng = np.random.default_rng(0)
        out = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(buf, "PNG")
            out.append(buf.getvalue())
        return out


def _mlflow_payload(png: bytes) -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint8)[None]
    return json.dumps({"inputs": pixels.tolist()}).encode()


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own group: stopped with everything it started


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


async def _drive(url: str, bodies: list[bytes], content_type: str, clients: int, seconds: float,
                 warmup: float) -> dict:
    """`clients` concurrent closed-loop clients for `warmup` + `seconds`; only the latter is measured."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    headers = {"content-type": content_type}
    measuring = False
    stop_at = time.perf_counter() + warmup + seconds

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        n = i
        while time.perf_counter() < stop_at:
            body = bodies[n % len(bodies)]
            n += clients
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            if measuring:
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client(i, session)) for i in range(clients)]
        await asyncio.sleep(warmup)
        measuring = True
        began = time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1e3
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
        "mean_ms": float(ms.mean()) if len(ms) else None,
    }


def _run_async(coro):
    try:
        import uvloop

        factory = uvloop.new_event_loop  # a cheaper client leaves more CPU to the servers
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _check_same_model(ours: str, theirs: str, png: bytes, payload: bytes) -> dict:
    """One image through both: the top classes must match, or the comparison would be moot."""
    import httpx

    a = httpx.post(ours, content=png, headers={"content-type": "image/png"}, timeout=30).json()
    b = httpx.post(theirs, content=payload, headers={"content-type": "application/json"}, timeout=30).json()
    predictions = b["predictions"]
    logits = np.asarray(predictions["logits"] if isinstance(predictions, dict) else predictions, dtype=np.float64)
    theirs_top = CLASSES[int(logits.reshape(-1, len(CLASSES))[0].argmax())]
    if theirs_top != a["top_class"]:
        raise RuntimeError(f"the servers disagree on one image: app {a['top_class']!r}, mlflow {theirs_top!r}")
    return {"top_class": a["top_class"], "app_version": a["version"]}


def format_table(rows: list[dict]) -> str:
    head = f"{'server':<22}{'clients':>8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'requests':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['server']:<22}{r['clients']:>8}{r['requests_per_s']:>10.0f}{r['p50_ms']:>9.2f}"
                     f"{r['p99_ms']:>9.2f}{r['errors']:>8}{r['requests']:>10}")
    return "\n".join(lines)


def run_serving_bench(
    out: str | Path = "bench/results/serving.json", clients: tuple[int, ...] = (1, 16), seconds: float = 10.0,
    warmup: float = 2.0, image_size: int = 64, model_name: str | None = None, tracking_uri: str | None = None,
    n_images: int = 64,
) -> dict:
    """Serve one registered model with the app and with `mlflow models serve`; measure both.

    Args:
        out: JSON results file.
        clients: concurrency levels, each one point per server.
        seconds: measured time per point (after `warmup` seconds of the same load).
        warmup: unmeasured seconds of load before each point.
        image_size: crop side (of the bench model; a given model's own size is not checked).
        model_name: a registered model whose `@champion` to serve; None registers a fresh
            `saofu_fu` in a temporary store.
        tracking_uri: its MLflow store (default: the project's).
        n_images: distinct crops cycled through.

    Returns:
        {"summary": the JSON written, "table": the printed table}.
    """
    tmp = Path(tempfile.mkdtemp(prefix="saofu-bench-serving-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # mlflow finds `uvicorn`
    procs: list[subprocess.Popen] = []
    try:
        if model_name is None:
            env["SAOFU_HOME"] = str(tmp / "home")
            env.pop("MLFLOW_TRACKING_URI", None)
            os.environ["SAOFU_HOME"], saved = env["SAOFU_HOME"], os.environ.get("SAOFU_HOME")
            saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
            try:
                _register_bench_model(tmp / "home", image_size)
            finally:
                os.environ.pop("SAOFU_HOME")
                if saved is not None:
                    os.environ["SAOFU_HOME"] = saved
                if saved_uri is not None:
                    os.environ["MLFLOW_TRACKING_URI"] = saved_uri
            model_name = BENCH_MODEL
            tracking_uri = f"sqlite:///{tmp / 'home' / 'mlflow' / 'mlflow.db'}"
        if tracking_uri is None:
            from saofu.settings import get_settings

            tracking_uri = get_settings().tracking_uri
        env["MLFLOW_TRACKING_URI"] = tracking_uri

        ours_port, theirs_port = _free_port(), _free_port()
        ours_log, theirs_log = tmp / "app.log", tmp / "mlflow.log"
        procs.append(_start([sys.executable, "-m", "deploy.server", "--port", str(ours_port), "--model", model_name,
                             "--pool", str(tmp / "pool"), "--log-level", "warning"], {**env, "PYTHONPATH": str(REPO)},
                            ours_log))
        mlflow_bin = shutil.which("mlflow", path=env["PATH"]) or "mlflow"
        procs.append(_start([mlflow_bin, "models", "serve", "-m", f"models:/{model_name}@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(theirs_port)], env, theirs_log))
        ours = f"http://127.0.0.1:{ours_port}"
        theirs = f"http://127.0.0.1:{theirs_port}"
        _wait_ready(f"{ours}/healthz", procs[0], ours_log)
        _wait_ready(f"{theirs}/ping", procs[1], theirs_log)

        pngs = _crops(n_images, image_size)
        payloads = [_mlflow_payload(p) for p in pngs]
        check = _check_same_model(f"{ours}/predict", f"{theirs}/invocations", pngs[0], payloads[0])
        load_before = os.getloadavg()
        rows = []
        for c in clients:
            for server, url, bodies, kind in (
                ("saofu serve (app)", f"{ours}/predict", pngs, "image/png"),
                ("mlflow models serve", f"{theirs}/invocations", payloads, "application/json"),
            ):
                point = _run_async(_drive(url, bodies, kind, c, seconds, warmup))
                rows.append({"server": server, **point})
                print(format_table(rows[-1:]).splitlines()[-1], flush=True)
        load_after = os.getloadavg()
    finally:
        for proc in procs:
            _stop(proc)

    by = {(r["server"], r["clients"]): r for r in rows}
    speedup = {
        str(c): by[("saofu serve (app)", c)]["requests_per_s"] / by[("mlflow models serve", c)]["requests_per_s"]
        for c in clients if by[("mlflow models serve", c)]["requests_per_s"]
    }
    top = max(clients)
    summary = {
        "benchmark": "serving",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "model": model_name,
        "image_size": image_size,
        "payloads": {"app": "PNG bytes", "mlflow": "JSON tensor {'inputs': [1,H,W,3] uint8}"},
        "mean_payload_bytes": {"app": int(np.mean([len(p) for p in pngs])),
                               "mlflow": int(np.mean([len(p) for p in payloads]))},
        "same_answer_check": check,
        "seconds_per_point": seconds,
        "warmup_seconds": warmup,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rows": rows,
        "speedup_requests_per_s": speedup,
        "targets": {
            "speedup_at_least_5x": all(v >= 5 for v in speedup.values()),
            f"app_p99_under_20ms_at_{top}": by[("saofu serve (app)", top)]["p99_ms"] < 20,
        },
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    table = (format_table(rows) + "\nspeed-up (req/s, app / mlflow): "
             + ", ".join(f"{v:.1f}x at {c} client{'s' if c != '1' else ''}" for c, v in speedup.items())
             + f"\nloopback, closed-loop clients, {seconds:.0f} s per point; load average {load_before[0]:.1f} "
               f"before, {load_after[0]:.1f} after\n\n{summary['device']}; written to {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return {"summary": summary, "table": table}


if __name__ == "__main__":
    print(run_serving_bench()["table"])
