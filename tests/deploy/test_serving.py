"""The serving app (deploy/): hot-swap under load, canary rollback, bad input, metrics, pool log.

One small recogniser is trained on the shapes fixture and registered three times in a temporary
MLflow store: versions 1 and 2 are the same network (a "good" challenger agrees with the
champion), version 3 is that network with its logits rotated, so it names a wrong class for every
image, just as confidently (a challenger "made worse"). Servers are real uvicorn servers on
loopback, on a thread of the test process.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import pytest
import torch
import uvicorn
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from deploy.app import ServeConfig, create_app
from deploy.canary import ArmStats, CanaryPolicy, CanaryRun, verdict
from deploy.model_source import ModelSet, ModelSource
from deploy.pool_log import PoolEntry, PoolStore
from deploy.server import uvicorn_config
from saofu.errors import SaofuError

MODEL = "shapes-serving"
SIZE = 32
GOOD, SAME, WRONG = "1", "2", "3"


class WrongClass(nn.Module):
    """A recogniser that moves every answer to the next class: same confidence, always wrong."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(self.net(x), shifts=1, dims=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory, shapes_dir) -> str:
    """A temporary MLflow store holding versions 1 (trained), 2 (the same) and 3 (always wrong)."""
    from tasks.data.loading import prepare_dataset
    from tasks.tracking import register_onnx, start_run
    from tasks.train.export import export_onnx
    from tasks.train.loop import TrainConfig, fit

    home = tmp_path_factory.mktemp("serving-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAOFU_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        torch.manual_seed(0)
        data = prepare_dataset(shapes_dir, SIZE, 0.15, 0, None)
        cfg = TrainConfig(model="saofu_fu_tiny", epochs=15, batch_size=32, image_size=SIZE, aug_strength=0.0)
        net = fit(cfg, data.train, data.val).model
        for expected, model in ((GOOD, net), (SAME, net), (WRONG, WrongClass(net))):
            onnx_path = export_onnx(model, data.classes, home / f"v{expected}.onnx", SIZE)
            run_id = start_run("serving-test", f"v{expected}", {}, {})
            assert register_onnx(run_id, onnx_path, MODEL, SIZE, data.classes, {}) == expected
    uri = f"sqlite:///{home}/mlflow/mlflow.db"
    set_aliases(uri, champion=GOOD)
    return uri


@pytest.fixture(scope="module")
def images(shapes_dir) -> list[bytes]:
    """PNG bytes of the shapes images, every class."""
    return [p.read_bytes() for p in sorted(shapes_dir.glob("*/*.png"))[::4]]


def set_aliases(uri: str, champion: str, challenger: str | None = None) -> None:
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.set_registered_model_alias(MODEL, "champion", champion)
    if challenger is None:
        try:
            client.delete_registered_model_alias(MODEL, "challenger")
        except Exception:  # noqa: BLE001 - not set
            pass
    else:
        client.set_registered_model_alias(MODEL, "challenger", challenger)


@contextmanager
def running(config: ServeConfig, source=None) -> Iterator[str]:
    """The app under a real uvicorn server on a free loopback port; yields its base URL."""
    app = create_app(config, source)
    server = uvicorn.Server(uvicorn_config(app, port=0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def config(uri: str, **kwargs) -> ServeConfig:
    return ServeConfig(model_name=MODEL, tracking_uri=uri, poll_seconds=0.1, **kwargs)


def post(client: httpx.Client, url: str, body: bytes, content_type: str = "image/png") -> httpx.Response:
    return client.post(f"{url}/predict", content=body, headers={"content-type": content_type})


def wait_for(predicate, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --------------------------------------------------------------------------------- hot swap


@pytest.mark.slow
def test_champion_moves_twice_under_16_clients_without_a_failed_request(store, images):
    """Behaviour, not speed (bench/serving.py measures throughput): every request of 16 busy
    clients is answered, by the champion of the moment, with that model's class for the image.
    Each step waits until every client has had an answer from the current version, however long
    the machine takes."""
    from tests.conftest import SHAPES

    set_aliases(store, champion=GOOD)
    with running(config(store)) as url:
        with httpx.Client(timeout=30) as one:  # version 1's class for each image, asked one at a time
            reference = [post(one, url, body).json()["top_class"] for body in images]
        # Version 3 is version 1 with its logits moved one class on: the next class, always.
        expected = {GOOD: reference, SAME: reference,
                    WRONG: [SHAPES[(SHAPES.index(c) + 1) % len(SHAPES)] for c in reference]}

        async def load() -> list[list[tuple[int, str | None, str | None, int]]]:
            stop = asyncio.Event()
            # per client: (status, version, top class, image index) of every request it sent
            answers: list[list[tuple[int, str | None, str | None, int]]] = [[] for _ in range(16)]

            async def client(i: int, session: aiohttp.ClientSession) -> None:
                n = 0
                while not stop.is_set():
                    k = (i * 7 + n) % len(images)
                    n += 1
                    try:
                        async with session.post(f"{url}/predict", data=images[k],
                                                headers={"content-type": "image/png"}) as r:
                            data = await r.json() if r.status == 200 else {}
                            answers[i].append((r.status, data.get("version"), data.get("top_class"), k))
                    except aiohttp.ClientError as exc:
                        answers[i].append((0, repr(exc), None, k))

            async def every_client_answered_by(version: str) -> None:
                deadline = time.monotonic() + 120  # a guard against hanging, not a speed target
                while not all(any(a[1] == version for a in mine) for mine in answers):
                    assert time.monotonic() < deadline, f"a client never got an answer from version {version}"
                    await asyncio.sleep(0.02)

            async def healthz_version(session: aiohttp.ClientSession) -> str:
                async with session.get(f"{url}/healthz") as r:
                    return (await r.json())["versions"]["champion"]

            async def move_to(version: str, session: aiohttp.ClientSession) -> None:
                await asyncio.to_thread(set_aliases, store, version)
                while await healthz_version(session) != version:
                    await asyncio.sleep(0.05)
                await every_client_answered_by(version)  # load on the new version too

            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
                clients = [asyncio.create_task(client(i, session)) for i in range(16)]
                try:
                    await every_client_answered_by(GOOD)  # load on the old version first
                    await move_to(SAME, session)
                    await move_to(WRONG, session)
                finally:
                    stop.set()
                    await asyncio.gather(*clients)
            return answers

        answers = asyncio.run(load())

    flat = [a for per_client in answers for a in per_client]
    assert [a for a in flat if a[0] != 200] == []  # every request answered
    # each by a whole model: the class that version gives the image
    assert [a for a in flat if a[2] != expected[a[1]][a[3]]] == []
    order = {GOOD: 0, SAME: 1, WRONG: 2}
    for per_client in answers:
        ranks = [order[v] for _, v, _, _ in per_client]
        assert ranks == sorted(ranks), "a client saw an older version after a newer one"
        assert set(ranks) == {0, 1, 2} and per_client[-1][1] == WRONG


CLASS_MODEL = "colour-serving"


@pytest.fixture(scope="module")
def class_change_store(tmp_path_factory) -> str:
    """Versions 1 (`fu`, `not_fu`) and 2 (`fu`, `fu_merchant`, `not_fu`, refining `fu`): untrained
    colour graphs (tests/deploy/test_canary_classes.py), the second a fast retrain's class change."""
    from tasks.tracking import register_onnx, start_run
    from tests.deploy.test_canary_classes import CHALLENGER_W, CHAMPION_W, MERCHANT, THREE, TWO, colour_model

    home = tmp_path_factory.mktemp("class-change-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAOFU_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for version, classes, weights, refines in (("1", TWO, CHAMPION_W, None), ("2", THREE, CHALLENGER_W, MERCHANT)):
            path = colour_model(home / f"v{version}.onnx", classes, weights, refines)
            run_id = start_run("serving-test", f"v{version}", {}, {})
            assert register_onnx(run_id, path, CLASS_MODEL, 8, classes, {}) == version
    uri = f"sqlite:///{home}/mlflow/mlflow.db"
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(CLASS_MODEL, "champion", "1")
    return uri


@pytest.mark.slow
def test_a_champion_whose_class_count_grew_swaps_in_under_load(class_change_store):
    """2 classes, then 3: no request fails, and each answer's classes are those of the version that gave it."""
    from tests.deploy.test_canary_classes import BLUE, GREEN, RED, THREE, TWO, png

    uri = class_change_store
    classes = {"1": set(TWO), "2": set(THREE)}
    bodies = [png(c) for c in (RED, BLUE, GREEN)]
    client_api = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client_api.set_registered_model_alias(CLASS_MODEL, "champion", "1")
    cfg = ServeConfig(model_name=CLASS_MODEL, tracking_uri=uri, poll_seconds=0.1)
    with running(cfg) as url:

        async def load() -> list[list[tuple[int, dict]]]:
            stop = asyncio.Event()
            answers: list[list[tuple[int, dict]]] = [[] for _ in range(8)]

            async def client(i: int, session: aiohttp.ClientSession) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        async with session.post(f"{url}/predict", data=bodies[(i + n) % 3],
                                                headers={"content-type": "image/png"}) as r:
                            answers[i].append((r.status, await r.json() if r.status == 200 else {}))
                    except aiohttp.ClientError as exc:
                        answers[i].append((0, {"error": repr(exc)}))

            async with aiohttp.ClientSession() as session:
                clients = [asyncio.create_task(client(i, session)) for i in range(8)]
                await asyncio.sleep(0.5)
                await asyncio.to_thread(client_api.set_registered_model_alias, CLASS_MODEL, "champion", "2")
                while True:
                    async with session.get(f"{url}/healthz") as r:
                        if (await r.json())["versions"]["champion"] == "2":
                            break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                stop.set()
                await asyncio.gather(*clients)
            return answers

        answers = asyncio.run(load())
    flat = [a for per_client in answers for a in per_client]
    assert len(flat) > 50
    assert [a for a in flat if a[0] != 200] == []
    for _, data in flat:
        assert data["top_class"] in classes[data["version"]], data
        assert data["class"] is None or data["class"] in classes[data["version"]], data
    assert {data["version"] for _, data in flat} == {"1", "2"}
    assert {data["top_class"] for _, data in flat if data["version"] == "2"} == set(THREE)  # the new class answers
    for per_client in answers:
        versions = [data["version"] for _, data in per_client]
        assert versions == sorted(versions) and versions[-1] == "2"


@pytest.mark.slow
def test_a_request_keeps_the_model_set_it_started_with(store):
    set_aliases(store, champion=GOOD)
    source = ModelSource(MODEL, tracking_uri=store, challenger_alias=None, poll_seconds=60)
    started_with = source.load()
    set_aliases(store, champion=SAME)
    assert source.refresh()
    pixels = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    assert started_with.champion.version == GOOD
    assert started_with.champion.probabilities(pixels).shape == (1, 3)  # the old session still runs
    assert source.current.champion.version == SAME
    assert source.current.generation == started_with.generation + 1
    assert not source.refresh()  # nothing moved


@pytest.mark.slow
def test_a_missing_alias_is_a_readable_error(store):
    source = ModelSource(MODEL, tracking_uri=store, champion_alias="nope", challenger_alias=None)
    with pytest.raises(SaofuError, match="has no alias 'nope'"):
        source.load()
    with pytest.raises(SaofuError, match="no alias"):
        ModelSource("no-such-model", tracking_uri=store, challenger_alias=None).load()


@pytest.mark.slow
def test_release_flow_waits_until_the_app_serves_the_promoted_version(store):
    """flows/release.py's deploy step reads the app's /healthz; it must see the alias move."""
    from tasks.release.serving_wait import wait_until_served

    set_aliases(store, champion=GOOD)
    with running(config(store)) as url:
        assert wait_until_served(url, GOOD, timeout_s=10) == GOOD
        set_aliases(store, champion=SAME)
        assert wait_until_served(url, SAME, timeout_s=20) == SAME
        assert wait_until_served(url, WRONG, timeout_s=1) == SAME  # never promoted: the last version seen
    set_aliases(store, champion=GOOD)


@pytest.mark.slow
def test_a_promotion_is_served_at_the_nudge_not_at_the_next_poll(store):
    """The release nudges the app (`POST /refresh`) after moving the alias: with a poll a minute apart,
    the new champion is served within seconds of the nudge, and not before it."""
    from tasks.release.serving_wait import nudge, wait_until_served

    set_aliases(store, champion=GOOD)
    with running(replace(config(store), poll_seconds=60)) as url:
        assert wait_until_served(url, GOOD, timeout_s=10) == GOOD
        set_aliases(store, champion=SAME)
        time.sleep(1.0)
        assert httpx.get(f"{url}/healthz").json()["versions"]["champion"] == GOOD  # the poll is a minute away
        started = time.monotonic()
        assert wait_until_served(url, SAME, timeout_s=20) == SAME  # it nudges first
        assert time.monotonic() - started < 10
        answer = httpx.post(f"{url}/refresh")
        assert answer.status_code == 202 and answer.json()["poll_seconds"] == 60
        assert httpx.get(f"{url}/refresh").status_code == 405  # a nudge changes state: POST only
    set_aliases(store, champion=GOOD)
    assert not nudge(url)  # the app is gone: no nudge taken, nothing raised


# --------------------------------------------------------------------------------- canary


@pytest.mark.slow
def test_canary_rolls_back_a_challenger_that_is_made_worse(store, images):
    set_aliases(store, champion=GOOD, challenger=WRONG)
    policy = CanaryPolicy(share=0.5, min_requests=20, check_every=5)
    with running(config(store, canary=policy)) as url, httpx.Client() as client:
        wait_for(lambda: client.get(f"{url}/healthz").json()["canary"]["status"] == "running")
        arms = []
        for i in range(150):
            r = post(client, url, images[i % len(images)])
            assert r.status_code == 200
            arms.append((r.json()["arm"], r.json()["version"]))
        health = client.get(f"{url}/healthz").json()
        metrics = client.get(f"{url}/metrics").text

    canary = health["canary"]
    assert canary["status"] == "rolled_back"
    assert "agrees with the champion" in canary["reason"]
    assert canary["challenger"]["requests"] >= 20
    assert ("challenger", WRONG) in arms[:60]  # it did get traffic before the rollback
    assert all(arm == ("champion", GOOD) for arm in arms[-60:])  # and none after
    assert 'saofu_canary_rollbacks_total{kind="agreement"} 1.0' in metrics
    assert "saofu_canary_running 0.0" in metrics


@pytest.mark.slow
def test_canary_keeps_a_challenger_that_agrees(store, images):
    set_aliases(store, champion=GOOD, challenger=SAME)
    policy = CanaryPolicy(share=0.3, min_requests=20, check_every=5, max_latency_ratio=20)
    with running(config(store, canary=policy)) as url, httpx.Client() as client:
        wait_for(lambda: client.get(f"{url}/healthz").json()["canary"]["status"] == "running")
        arms = [post(client, url, images[i % len(images)]).json()["arm"] for i in range(200)]
        canary = client.get(f"{url}/healthz").json()["canary"]
    assert canary["status"] == "running", canary["reason"]
    assert canary["agreement"] == 1.0
    assert 0.15 < arms.count("challenger") / len(arms) < 0.45
    set_aliases(store, champion=GOOD)


# --------------------------------------------------------------------------------- bad input


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_each_bad_input_gets_its_4xx_and_the_server_goes_on(store, images):
    set_aliases(store, champion=GOOD)
    cfg = config(store, max_body_bytes=64 * 1024, max_pixels=512 * 512)
    with running(cfg) as url, httpx.Client() as client:
        cases = {
            "empty body": (post(client, url, b""), 400, "empty body"),
            "text": (post(client, url, images[0], "text/plain"), 415, "Content-Type 'text/plain'"),
            "json": (post(client, url, b'{"x": 1}', "application/json"), 415, "image/png"),
            "big body": (post(client, url, b"\x89PNG" + b"0" * 100_000), 413, "at most 65,536"),
            "big image": (post(client, url, _png(2000, 2000)), 413, "2000x2000 pixels"),
            "not an image": (post(client, url, b"hello, I am not a picture"), 422, "not an image"),
            "truncated": (post(client, url, images[0][: len(images[0]) // 2]), 422, "could not be decoded"),
        }
        for name, (response, status, words) in cases.items():
            assert response.status_code == status, name
            body = response.json()
            assert body["status"] == status and words in body["error"], (name, body)
        assert client.get(f"{url}/predict").status_code == 405
        ok = post(client, url, images[0])
        assert ok.status_code == 200 and ok.json()["version"] == GOOD
        metrics = client.get(f"{url}/metrics").text
    for reason in ("empty", "content_type", "too_large", "not_an_image"):
        assert f'saofu_rejected_requests_total{{reason="{reason}"}}' in metrics


@pytest.mark.slow
def test_predict_answers_class_score_and_version(store, images):
    set_aliases(store, champion=GOOD)
    with running(config(store)) as url, httpx.Client() as client:
        jpeg = io.BytesIO()
        Image.open(io.BytesIO(images[0])).save(jpeg, "JPEG")
        for body, kind in ((images[0], "image/png"), (jpeg.getvalue(), "image/jpeg"),
                           (images[1], "application/octet-stream"), (_png(100, 60), "image/png")):
            r = post(client, url, body, kind)
            assert r.status_code == 200, r.text
            data = r.json()
            assert data["top_class"] in ("circle", "square", "triangle")
            assert 0 < data["score"] <= 1
            assert data["confident"] == (data["score"] >= 0.9)
            # no `not_fu` among the shapes: below the threshold the answer is an abstention
            assert data["class"] == (data["top_class"] if data["confident"] else None)
            assert (data["model"], data["version"], data["model_version"]) == (MODEL, GOOD, f"{MODEL}:1")


# --------------------------------------------------------------------------------- metrics


@pytest.mark.slow
def test_metrics_count_requests_per_version_with_latency_histograms(store, images):
    set_aliases(store, champion=GOOD)
    with running(config(store)) as url, httpx.Client() as client:
        for body in images[:10]:
            assert post(client, url, body).status_code == 200
        text = client.get(f"{url}/metrics").text
    answered = sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("saofu_predictions_total{") and 'version="1"' in line and 'arm="champion"' in line
    )
    assert answered == 10
    assert 'saofu_requests_total{code="200"} 10.0' in text
    assert 'saofu_request_seconds_bucket{arm="champion",le="0.005",version="1"}' in text
    assert 'saofu_request_seconds_count{arm="champion",version="1"} 10.0' in text
    assert 'saofu_model_seconds_count{arm="champion",version="1"}' in text
    assert 'saofu_model_version{arm="champion"} 1.0' in text


# --------------------------------------------------------------------------------- pool log


def _entry(data: bytes, label: str = "circle") -> PoolEntry:
    return PoolEntry(data, "PNG", {"class": label, "score": 0.95, "model_version": f"{MODEL}:1"},
                     time.time(), {"bytes": len(data)})


def _index(pool: Path) -> list[dict]:
    return [json.loads(line) for line in (pool / "index.jsonl").read_text().splitlines()]


def test_pool_log_is_content_addressed(tmp_path, images):
    store = PoolStore(tmp_path / "pool")
    first = store.add(_entry(images[0]))
    again = store.add(_entry(images[0]))
    store.close()
    assert first == again
    files = [p for p in (tmp_path / "pool").rglob("*.png")]
    assert len(files) == 1
    assert files[0].stem == hashlib.sha256(images[0]).hexdigest()
    assert [e["sha256"] for e in _index(tmp_path / "pool")] == [files[0].stem] * 2


def test_pool_log_is_bounded_and_evicts_the_oldest(tmp_path, images):
    pool = tmp_path / "pool"
    store = PoolStore(pool, max_files=3)
    shas = []
    for data in images[:5]:
        store.add(_entry(data))
        shas.append(Path(store.add(_entry(data))).stem)
    store.close()
    kept = sorted(p.stem for p in pool.rglob("*.png"))
    assert kept == sorted(shas[-3:])
    assert {e["sha256"] for e in _index(pool)} == set(shas[-3:])  # no line points at a deleted file
    assert store.evicted == 2

    by_bytes = PoolStore(tmp_path / "pool2", max_bytes=sum(len(d) for d in images[:2]))
    for data in images[:4]:
        by_bytes.add(_entry(data))
    by_bytes.close()
    assert by_bytes.bytes <= by_bytes.max_bytes and by_bytes.files < 4

    reopened = PoolStore(pool, max_files=3)  # an existing pool is adopted with its age order
    newest = Path(reopened.add(_entry(images[5]))).stem
    reopened.close()
    assert sorted(p.stem for p in pool.rglob("*.png")) == sorted(shas[-2:] + [newest])


@pytest.mark.slow
def test_served_requests_feed_the_online_pool_that_active_learning_reads(store, images, tmp_path):
    from tasks.labeling.pool import pool_images

    set_aliases(store, champion=GOOD)
    pool = tmp_path / "pool"
    with running(config(store, pool_dir=pool)) as url, httpx.Client() as client:
        for body in images[:6] + images[:2]:
            assert post(client, url, body).status_code == 200
        wait_for(lambda: (pool / "index.jsonl").exists()
                 and len((pool / "index.jsonl").read_text().splitlines()) == 8)
    lines = _index(pool)
    assert {line["prediction"]["model_version"] for line in lines} == {f"{MODEL}:1"}
    assert all(line["phase"] == "serving" and "truth" not in line for line in lines)
    assert len(list(pool.rglob("*.png"))) == 6
    found = pool_images(pool)
    assert len(found) == 6 and all(p.path.is_file() for p in found)


# --------------------------------------------------------------------------------- canary rules


class StaticSource:
    """A model source that serves one fixed set (the app only reads these attributes)."""

    loaded = True
    on_change = on_error = None

    def __init__(self, models: ModelSet):
        self.current = models

    def start(self) -> None:
        if self.on_change is not None:
            self.on_change(None, self.current)

    def stop(self) -> None:
        pass


class BrokenSession:
    def run(self, *args, **kwargs):
        raise RuntimeError("simulated onnxruntime failure")


@pytest.mark.slow
def test_a_failing_challenger_never_fails_a_request_and_is_rolled_back(store, images):
    source = ModelSource(MODEL, tracking_uri=store, challenger_alias=None)
    champion = source.load().champion
    broken = replace(champion, version="9", session=BrokenSession())
    policy = CanaryPolicy(share=1.0, min_requests=10, check_every=5)
    source = StaticSource(ModelSet(champion, broken))
    with running(config(store, canary=policy), source) as url, httpx.Client() as client:
        answers = [post(client, url, images[i % len(images)]) for i in range(20)]
        canary = client.get(f"{url}/healthz").json()["canary"]
        metrics = client.get(f"{url}/metrics").text
    assert [r.status_code for r in answers] == [200] * 20
    assert {r.json()["arm"] for r in answers} == {"champion"}
    assert canary["status"] == "rolled_back" and canary["reason"].startswith("error rate 100.0%")
    assert 'saofu_inference_errors_total{arm="challenger",version="9"} 10.0' in metrics
    assert 'saofu_canary_rollbacks_total{kind="errors"} 1.0' in metrics


def _run(champion_confident: int, challenger_confident: int, agreed: int, errors: int = 0) -> CanaryRun:
    champ, chall = ArmStats(requests=100), ArmStats(requests=100, errors=errors, confident=challenger_confident)
    champ.latencies.extend([0.001] * 10)
    chall.latencies.extend([0.001] * 10)
    return CanaryRun("1", "2", 0.0, champ, chall, shadow_confident=champion_confident, agreed=agreed)


def test_canary_verdict_names_each_measure_that_fell_behind():
    policy = CanaryPolicy(min_requests=50)
    assert verdict(_run(80, 78, 98), policy) == ("", ())
    assert verdict(_run(80, 50, 98), policy)[1] == ("confidence",)
    assert verdict(_run(80, 78, 60), policy)[1] == ("agreement",)
    assert verdict(_run(80, 78, 95, errors=5), policy)[1] == ("errors",)
    slow = _run(80, 78, 98)
    slow.challenger.latencies.extend([0.01] * 30)
    assert verdict(slow, policy)[1] == ("latency",)
    early = _run(0, 0, 0)
    early.challenger.requests = 49
    assert verdict(early, policy) == ("", ())  # too few requests to judge
    with pytest.raises(SaofuError, match="share"):
        CanaryPolicy(share=1.5)
