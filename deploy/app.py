"""The serving app: `POST /predict` (image bytes -> class), `GET /healthz`, `GET /metrics`.

Per-request cost is what the app is judged on (the model itself takes ~0.2 ms), so the request
path is plain Starlette with no middleware, JSON by orjson, Prometheus children looked up once,
and inference inline on the event loop: a 1-thread onnxruntime run takes well under a
millisecond, less than a hop to a thread pool and back would cost. Decoding is what a request
can make expensive, so it runs on a small bounded pool (deploy/decoding.py: only PNG, JPEG and
WebP, the pixel count checked from the header first, JPEG draft mode), except for small images
whose header announces few pixels; `/healthz` never waits behind a decode. Disk writes (the
online pool) and registry checks (the model poller) run on their own threads.

Bad input never reaches the model: the content type, size and format are checked first and
answered with a 4xx whose JSON names the problem:

    400 empty body | 413 body or image too large | 415 not an image content type, or an image
    format other than PNG, JPEG, WebP | 422 not an image | 503 too many decodes waiting

`/healthz` answers 200 `"status": "degraded"` (with what is served and why) while the champion
alias points at a version that could not be loaded: the app serves the version it had, or at
start the last-known-good copy (deploy/model_source.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from deploy.canary import RUNNING, Canary, CanaryPolicy, CanaryRun, compare_answers
from deploy.decoding import DecodePool, Rejected, decode_image
from deploy.model_source import CHALLENGER, CHAMPION, LoadedModel, ModelSet, ModelSource
from deploy.pool_log import PoolEntry, PoolLogger, PoolStore
from saofu.errors import SaofuError
from saofu.refines import refined_decision, refinement_roots

log = logging.getLogger("saofu.serve")

ACCEPTED_TYPES = "image/png, image/jpeg, image/webp (any image/*) or application/octet-stream"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)
MODEL_BUCKETS = (0.0001, 0.0002, 0.0003, 0.0005, 0.00075, 0.001, 0.002, 0.005, 0.01, 0.05)


@dataclass(frozen=True)
class ServeConfig:
    """Everything the app needs to know; `deploy.server.serve` builds one from its arguments.

    Attributes:
        model_name: registered model to serve (`models:/<name>@<champion_alias>`).
        tracking_uri: MLflow store (None: the project's).
        champion_alias: alias that answers requests.
        challenger_alias: alias of the canary's challenger.
        canary: canary policy; None (or share 0) ignores the challenger alias.
        poll_seconds: how often the aliases are checked.
        pool_dir: online pool to log requests into; None logs nothing.
        pool_max_files: images the pool keeps at most.
        pool_max_bytes: bytes the pool keeps at most (images and its index).
        pool_max_pending_bytes: request bytes waiting for the pool's writer at most; past it a
            request is answered but not logged (counted in `saofu_pool_dropped`).
        max_body_bytes: largest accepted request body.
        max_pixels: largest accepted image (width x height), checked before decoding.
        decode_threads: decodes running at once off the event loop.
        decode_queue: requests that may wait for a decode thread; one more is answered 503 at once.
        inline_decode_bytes: bodies up to this size whose header announces at most
            `inline_decode_pixels` pixels are decoded on the event loop (cheaper than a thread
            hop); 0 decodes every body on the decode threads.
        inline_decode_pixels: see `inline_decode_bytes`.
        threshold: top probability a prediction needs to count (below it: the negative class).
        negative_class: where predictions below the threshold go, when the model has the class;
            otherwise `class` is null (an abstention).
        threads: onnxruntime intra-op threads per session.
        wait_for_champion: start even when the champion alias is not set yet (`saofu up` starts
            the app before anything is promoted). Until the poll finds one, `/predict` and
            `/healthz` answer 503 with `"status": "no-champion"` and a message saying no model is
            promoted yet; without it, a missing champion fails the app's startup.
        last_good_dir: where a copy of the last champion that loaded and warmed up is kept, served
            (degraded) when the champion's version cannot be loaded at start; None keeps none
            (`deploy.server.serve` uses <SAOFU_HOME>/.saofu/serving/last-good).
    """

    model_name: str
    tracking_uri: str | None = None
    champion_alias: str = CHAMPION
    challenger_alias: str = CHALLENGER
    canary: CanaryPolicy | None = None
    poll_seconds: float = 5.0
    pool_dir: str | Path | None = None
    pool_max_files: int = 10_000
    pool_max_bytes: int = 256 * 2**20
    pool_max_pending_bytes: int = 64 * 2**20
    max_body_bytes: int = 4 * 2**20
    max_pixels: int = 4096 * 4096
    decode_threads: int = 2
    decode_queue: int = 32
    inline_decode_bytes: int = 16 * 1024
    inline_decode_pixels: int = 128 * 128
    threshold: float = 0.9
    negative_class: str | None = "not_fu"
    threads: int = 1
    wait_for_champion: bool = False
    last_good_dir: str | Path | None = None


def check_content_type(content_type: str | None) -> None:
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if not (kind.startswith("image/") or kind == "application/octet-stream"):
        shown = f"Content-Type {kind!r}" if kind else "no Content-Type"
        raise Rejected(415, "content_type", f"{shown}: send the image's bytes as the body with {ACCEPTED_TYPES}")


class ServingMetrics:
    """The app's Prometheus metrics, in their own registry (several apps can live in one process)."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("saofu_requests", "HTTP requests to /predict by status code",
                                ["code"], registry=registry)
        self.rejected = Counter("saofu_rejected_requests", "Requests refused before inference, by reason",
                                ["reason"], registry=registry)
        self.predictions = Counter("saofu_predictions", "Answered predictions by model version, arm and class",
                                   ["version", "arm", "label"], registry=registry)
        self.latency = Histogram("saofu_request_seconds", "Time in the app per answered /predict request",
                                 ["version", "arm"], buckets=LATENCY_BUCKETS, registry=registry)
        self.model_time = Histogram("saofu_model_seconds", "onnxruntime time per run (shadow runs included)",
                                    ["version", "arm"], buckets=MODEL_BUCKETS, registry=registry)
        self.inference_errors = Counter("saofu_inference_errors", "Model runs that raised", ["version", "arm"],
                                        registry=registry)
        self.swaps = Counter("saofu_model_swaps", "Published model sets after the first", registry=registry)
        self.source_errors = Counter("saofu_model_source_errors", "Failed alias checks or model loads",
                                     registry=registry)
        self.rollbacks = Counter("saofu_canary_rollbacks", "Canaries stopped, by the measure that failed",
                                 ["kind"], registry=registry)
        self.pool_dropped = Gauge("saofu_pool_dropped", "Requests not logged because the queue was full",
                                  registry=registry)
        registry.register(_SnapshotCollector(snapshot))
        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels):
        """`metric.labels(*labels)`, cached: labels() costs a lock and a dict build per call."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotCollector:
    """Gauges computed at scrape time from the app's state (versions, canary, pool)."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def describe(self):
        return []

    def collect(self):
        state = self.snapshot()
        version = GaugeMetricFamily("saofu_model_version", "Version served per arm (0: none)", labels=["arm"])
        for arm, v in state["versions"].items():
            version.add_metric([arm], float(v) if v and v.isdigit() else 0.0)
        yield version
        canary = state.get("canary")
        if canary is not None:
            yield GaugeMetricFamily("saofu_canary_running", "1 while a canary runs", value=canary["status"] == RUNNING)
            yield GaugeMetricFamily("saofu_canary_share", "Share of traffic sent to the challenger",
                                    value=canary["share"] if canary["status"] == RUNNING else 0.0)
            if "agreement" in canary:
                yield GaugeMetricFamily("saofu_canary_agreement", "Challenger/champion top-class agreement",
                                        value=canary["agreement"])
                yield GaugeMetricFamily("saofu_canary_not_compared", "Canary answers of a class the other model "
                                        "lacks (nothing it knows refined): left out of the agreement",
                                        value=canary["not_compared"])
                conf = GaugeMetricFamily("saofu_canary_confident_share", "Share of confident answers on canary "
                                         "requests", labels=["arm"])
                conf.add_metric([CHAMPION], canary["champion_confident_share_on_canary"])
                conf.add_metric([CHALLENGER], canary["challenger"]["confident_share"])
                yield conf
                errors = GaugeMetricFamily("saofu_canary_error_rate", "Inference error rate per arm", labels=["arm"])
                for arm in (CHAMPION, CHALLENGER):
                    errors.add_metric([arm], canary[arm]["error_rate"])
                yield errors
        pool = state.get("pool")
        if pool is not None:
            for key in ("files", "bytes", "index_bytes", "evicted", "compacted_lines", "logged", "failed", "queued",
                        "queued_bytes", "dropped_bytes"):
                yield GaugeMetricFamily(f"saofu_pool_{key}", f"Online pool: {key}", value=pool[key])


class Serving:
    """The app's moving parts: model source, canary, pool logger and metrics, started together."""

    def __init__(self, config: ServeConfig, source: ModelSource | None = None):
        self.config = config
        policy = config.canary if config.canary is not None and config.canary.share > 0 else None
        self.canary = Canary(policy, on_rollback=self._on_rollback) if policy else None
        self.metrics = ServingMetrics(self.snapshot)
        self.source = source or ModelSource(
            config.model_name, tracking_uri=config.tracking_uri, champion_alias=config.champion_alias,
            challenger_alias=config.challenger_alias if policy else None, poll_seconds=config.poll_seconds,
            threads=config.threads, last_good_dir=config.last_good_dir,
        )
        self.source.on_change = self._on_change
        self.source.on_error = self._on_error
        if self.source.loaded:
            self._on_change(None, self.source.current)
        self.decoder = DecodePool(config.decode_threads, config.decode_queue, config.inline_decode_bytes,
                                  config.inline_decode_pixels)
        self.pool: PoolLogger | None = None
        if config.pool_dir is not None:
            self.pool = PoolLogger(PoolStore(config.pool_dir, config.pool_max_files, config.pool_max_bytes),
                                   max_pending_bytes=config.pool_max_pending_bytes)

    def start(self) -> None:
        if self.config.wait_for_champion:
            self.source.start(wait_for_champion=True)
        else:
            self.source.start()  # any source with start(), e.g. tests' stand-ins
        if self.pool is not None:
            self.pool.start()

    def stop(self) -> None:
        self.source.stop()
        if self.pool is not None:
            self.pool.stop()

    def _on_change(self, old: ModelSet | None, new: ModelSet) -> None:
        if old is not None:
            self.metrics.swaps.inc()
        if self.canary is not None:
            self.canary.update(new)

    def _on_error(self, what: str, exc: BaseException) -> None:
        self.metrics.source_errors.inc()

    def _on_rollback(self, run: CanaryRun) -> None:
        for kind in run.kinds or ("unknown",):
            self.metrics.rollbacks.labels(kind).inc()

    def snapshot(self) -> dict:
        models = self.source.current if self.source.loaded else None
        return {
            "model": self.config.model_name,
            "versions": models.versions() if models else {CHAMPION: None, CHALLENGER: None},
            "generation": models.generation if models else 0,
            "canary": self.canary.snapshot() if self.canary else None,
            "pool": self.pool.stats() if self.pool else None,
            "decode": {"pending": self.decoder.pending, "refused": self.decoder.refused},
        }


def _json(data: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _rejection(exc: Rejected) -> Response:
    return _json({"error": exc.message, "reason": exc.reason, "status": exc.status}, exc.status)


def create_app(config: ServeConfig, source: ModelSource | None = None) -> Starlette:
    """The ASGI app. Models are loaded (if `source` is not loaded yet) when the app starts.

    Args:
        config: what to serve and how.
        source: a model source to use instead of building one from `config` (e.g. pre-loaded by
            `serve`, so that a missing alias fails before the port is opened).
    """
    check_config(config)
    serving = Serving(config, source)
    metrics, canary, pool, decoder = serving.metrics, serving.canary, serving.pool, serving.decoder
    threshold, negative = config.threshold, config.negative_class
    max_body, max_pixels = config.max_body_bytes, config.max_pixels
    ok_child = metrics.child(metrics.requests, "200")

    def answer(model: LoadedModel, probs: np.ndarray, arm: str) -> dict:
        top = int(probs.argmax())
        score = float(probs[top])
        confident = score >= threshold
        label = model.classes[top]
        decided = label if confident else (negative if negative in model.classes else None)
        if not confident and model.refines:
            # Sure it is a `fu` (fu + fu_merchant together), not sure which: answer the general class.
            sure = refined_decision(probs.tolist(), threshold, refinement_roots(model.classes, model.refines))
            if sure is not None:
                decided, score, confident = model.classes[sure[0]], sure[1], True
        return {"class": decided, "top_class": label, "score": score, "confident": confident,
                "model": model.name, "version": model.version, "model_version": model.model_version, "arm": arm}

    def run_model(model: LoadedModel, pixels: np.ndarray, arm: str) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        probs = model.probabilities(pixels)[0]
        seconds = time.perf_counter() - started
        metrics.child(metrics.model_time, model.version, arm).observe(seconds)
        return probs, seconds

    def infer(models: ModelSet, pixels: np.ndarray) -> dict:
        """Answer from the champion, or from the challenger on canary requests (champion in shadow)."""
        champion = models.champion
        run = canary.route(models) if canary is not None else None
        if run is not None:
            challenger = models.challenger
            try:
                probs_c, seconds_c = run_model(challenger, pixels, CHALLENGER)
            except Exception:  # noqa: BLE001 - a broken challenger must not fail the request
                log.exception("challenger v%s failed; answering from the champion", challenger.version)
                metrics.child(metrics.inference_errors, challenger.version, CHALLENGER).inc()
                canary.record_challenger(run, 0.0, False, True)
            else:
                probs, seconds = run_model(champion, pixels, CHAMPION)  # shadow: agreement and confidence
                result = answer(challenger, probs_c, CHALLENGER)
                # Each model's classes name its own answer: after a class change they differ.
                agreed = compare_answers(result["top_class"], champion.classes[int(probs.argmax())], challenger,
                                         champion)
                canary.record_challenger(
                    run, seconds_c, result["confident"], False, shadow_confident=bool(probs.max() >= threshold),
                    agreed=agreed, shadow_seconds=seconds,
                )
                return result
        during = canary.current_run(models) if canary is not None else None
        try:
            probs, seconds = run_model(champion, pixels, CHAMPION)
        except Exception:
            metrics.child(metrics.inference_errors, champion.version, CHAMPION).inc()
            if during is not None:
                canary.record_champion(during, 0.0, False, True)
            raise
        result = answer(champion, probs, CHAMPION)
        if during is not None:
            canary.record_champion(during, seconds, result["confident"], False)
        return result

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        arrived = time.time()
        try:
            check_content_type(request.headers.get("content-type"))
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_body:
                raise Rejected(413, "too_large", f"body is {int(declared):,} bytes; at most {max_body:,} are accepted")
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise Rejected(413, "too_large", f"body is over {max_body:,} bytes, the most accepted")
                chunks.append(chunk)
            body = b"".join(chunks)
            if not body:
                raise Rejected(400, "empty", f"empty body: send the image's bytes as the body ({ACCEPTED_TYPES})")
            if not serving.source.loaded:
                return no_champion()
            models = serving.source.current  # this request's models, whatever is published meanwhile
            size = models.champion.image_size
            opened = decoder.opened_inline(body, max_pixels)
            if opened is not None:
                pixels, meta = decode_image(body, size, max_pixels, opened)
            else:  # off the event loop: /healthz and small requests never wait behind it
                pixels, meta = await decoder.run(decode_image, body, size, max_pixels)
            result = infer(models, pixels)
        except Rejected as exc:
            metrics.child(metrics.requests, str(exc.status)).inc()
            metrics.child(metrics.rejected, exc.reason).inc()
            return _rejection(exc)
        except Exception:  # noqa: BLE001 - answer, count and keep serving
            # The client gets an incident id, never the exception's text (paths, versions, internals);
            # the log has the traceback under the same id.
            incident = uuid.uuid4().hex[:12]
            log.exception("/predict failed (incident %s)", incident)
            metrics.child(metrics.requests, "500").inc()
            return _json({"error": f"inference failed (incident {incident}; the details are in the server's log)",
                          "status": 500, "incident": incident}, 500)
        ok_child.inc()
        metrics.child(metrics.predictions, result["version"], result["arm"], str(result["class"])).inc()
        metrics.child(metrics.latency, result["version"], result["arm"]).observe(time.perf_counter() - started)
        if pool is not None and not pool.submit(PoolEntry(body, meta["format"] or "", result, arrived, meta)):
            metrics.pool_dropped.set(pool.dropped)
        return _json(result)

    def no_champion() -> Response:
        """503 before any model is promoted (wait_for_champion): say so, and why, in the JSON."""
        metrics.child(metrics.requests, "503").inc()
        return _json({"error": no_champion_message(), "reason": "no_champion", "status": 503}, 503)

    def no_champion_message() -> str:
        return (f"no model is promoted yet: {config.model_name!r} has no {config.champion_alias!r} version to "
                f"serve; promote one (`saofu release`, or `saofu promote {config.model_name} VERSION --reason ...`) "
                f"and this app picks it up within {config.poll_seconds:g}s")

    async def healthz(request: Request) -> Response:
        # 200 "ok" once a champion is served; before that 503, "loading" (the startup load runs) or,
        # with wait_for_champion, "no-champion" with the message and the last registry answer.
        state = serving.snapshot()
        degraded = getattr(serving.source, "degraded", None) if serving.source.loaded else None
        if degraded is not None:
            # Serving, but not what the alias names: the version it had, or the last-known-good copy.
            state.update(status="degraded", degraded=degraded)
        elif serving.source.loaded:
            state["status"] = "ok"
        elif config.wait_for_champion:
            state.update(status="no-champion", message=no_champion_message(),
                         last_error=getattr(serving.source, "last_error", None))
        else:
            state["status"] = "loading"
        return _json(state, 200 if serving.source.loaded else 503)

    async def refresh(request: Request) -> Response:
        # A nudge, not a command: the app checks the registry's aliases now instead of at its next
        # poll (the release sends it after promoting), and serves whatever they name, as a poll would.
        check_soon = getattr(serving.source, "check_soon", None)
        if check_soon is None:
            return _json({"error": "this app's model source polls on its own schedule only", "status": 501}, 501)
        check_soon()
        return _json({"status": "checking", "poll_seconds": config.poll_seconds}, 202)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _json({"error": exc.detail, "status": exc.status_code}, exc.status_code)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await run_in_threadpool(serving.start)  # registry and downloads are blocking I/O
        try:
            yield
        finally:
            await run_in_threadpool(serving.stop)

    app = Starlette(
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/refresh", refresh, methods=["POST"]),
            Route("/metrics", prometheus, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.serving = serving
    return app


def check_config(config: ServeConfig) -> None:
    """Refuse settings that cannot work, naming the setting."""
    if not 0.0 <= config.threshold <= 1.0:
        raise SaofuError(f"threshold must be in [0, 1], got {config.threshold}")
    if config.max_body_bytes < 1 or config.max_pixels < 1:
        raise SaofuError("max_body_bytes and max_pixels must be positive")
    if config.decode_threads < 1 or config.decode_queue < 0:
        raise SaofuError(f"decode_threads must be >= 1 and decode_queue >= 0, got {config.decode_threads} and "
                         f"{config.decode_queue}")
    if config.inline_decode_bytes < 0 or config.inline_decode_pixels < 0:
        raise SaofuError("inline_decode_bytes and inline_decode_pixels must be >= 0")
