"""Hot swap keeps serving through bad versions and flaky registries (issue 15, hole 8).

Before: a version refused at load was only a warning in the log while `/healthz` said "ok"; a
restart while the champion alias pointed at a broken version could not start at all; and every
download from a remote registry went into a new temporary folder that nothing removed, one more
on each retry. Now: a version whose class list does not match its logits is refused with one
clear log line, the app keeps answering with the version it had and `/healthz` says `degraded`
(which version, why); the last champion that loaded and warmed up is kept under the app's state
folder and served at start when the alias's version cannot be; every download goes into a folder
of its own, removed when it fails and once no served model needs it.

One MLflow store holds untrained colour graphs (tests/deploy/test_canary_classes.py): 1 and 3
good, 2 with 3 logits for 2 class names (its every answer is the third logit: a 500 if served),
4 registered good and then its artefact overwritten with garbage (a corrupt upload).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import httpx
import pytest
from mlflow.tracking import MlflowClient

import deploy.model_source as model_source
from deploy.app import ServeConfig
from deploy.model_source import ModelSource
from saofu.errors import SaofuError
from tests.deploy.test_canary_classes import CHAMPION_W, SIZE, TWO, colour_model, png
from tests.deploy.test_serving import running

MODEL = "hot-swap"
GOOD, WRONG_WIDTH, OTHER_GOOD, CORRUPT = "1", "2", "3", "4"
THIRD_LOGIT_WINS = [[0, 0, 0.1], [0, 0, 0.1], [0, 0, 0.1]]  # 3 logits, the last always largest
RED = (250, 0, 0)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    from tasks.tracking import register_onnx, start_run

    home = tmp_path_factory.mktemp("hot-swap-home")
    graphs = {GOOD: (TWO, CHAMPION_W), WRONG_WIDTH: (TWO, THIRD_LOGIT_WINS), OTHER_GOOD: (TWO, CHAMPION_W),
              CORRUPT: (TWO, CHAMPION_W)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAOFU_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for version, (classes, weights) in graphs.items():
            path = colour_model(home / f"v{version}.onnx", classes, weights)
            assert register_onnx(start_run("hot-swap-test", f"v{version}", {}, {}), path, MODEL, SIZE, classes,
                                 {}) == version
    uri = f"sqlite:///{home}/mlflow/mlflow.db"
    location = ModelSource(MODEL, tracking_uri=uri, challenger_alias=None).location(CORRUPT)
    stored = Path(url2pathname(urlparse(location).path)) / "model.onnx"
    assert stored.is_file()
    stored.write_bytes(b"\x08\x07not an ONNX graph, an upload cut short")
    return uri


def promote(uri: str, version: str) -> None:
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(MODEL, "champion", version)


def config(uri: str, **kwargs) -> ServeConfig:
    return ServeConfig(model_name=MODEL, tracking_uri=uri, poll_seconds=0.1, **kwargs)


def predict(client: httpx.Client) -> httpx.Response:
    return client.post("/predict", content=png(RED), headers={"content-type": "image/png"})


def wait_for_health(client: httpx.Client, predicate, seconds: float = 30.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        health = client.get("/healthz").json()
        if predicate(health):
            return health
        assert time.monotonic() < deadline, f"timed out; last /healthz: {health}"
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_a_graph_whose_classes_do_not_match_its_logits_is_refused_and_the_old_version_keeps_answering(
        store, caplog):
    promote(store, GOOD)
    with running(config(store)) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert predict(client).json()["version"] == GOOD
        with caplog.at_level(logging.ERROR, logger="saofu.serve"):
            promote(store, WRONG_WIDTH)
            # refused (degraded), or swapped in: then its answers show what serving it would cost
            health = wait_for_health(client, lambda h: h["status"] != "ok" or h["versions"]["champion"] != GOOD)
            answers = [predict(client)
                       for _ in range(10)]
        assert [a.status_code for a in answers] == [200] * 10, answers[0].text
        assert {a.json()["version"] for a in answers} == {GOOD}
        assert health["status"] == "degraded" and health["versions"]["champion"] == GOOD
        degraded = health["degraded"]
        assert (degraded["served_version"], degraded["served_from"]) == (GOOD, "previous")
        assert (degraded["alias"], degraded["alias_version"]) == ("champion", WRONG_WIDTH)
        assert "outputs 3 logits but its metadata lists 2 classes" in degraded["reason"]
        refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refusing")]
        assert len(refused) == 1, refused  # one clear line, not one per poll
        assert f"refusing {MODEL} version {WRONG_WIDTH}" in refused[0] and "still serving version 1" in refused[0]

        promote(store, OTHER_GOOD)  # the next good version swaps in and the app is healthy again
        health = wait_for_health(client, lambda h: h["versions"]["champion"] == OTHER_GOOD)
        assert health["status"] == "ok" and "degraded" not in health
        assert predict(client).json()["version"] == OTHER_GOOD


@pytest.mark.timeout(180)
def test_a_broken_champion_at_start_is_served_by_the_last_known_good_copy(store, tmp_path, saofu_home):
    from deploy.server import default_last_good_dir

    assert default_last_good_dir() == saofu_home / ".saofu" / "serving" / "last-good"  # what `saofu serve` keeps
    last_good = tmp_path / "last-good"
    promote(store, GOOD)
    first = ModelSource(MODEL, tracking_uri=store, challenger_alias=None, last_good_dir=last_good)
    first.load()
    first.stop()
    kept = sorted(p.name for p in (last_good / MODEL).iterdir() if not p.name.startswith("."))
    assert len(kept) == 2 and kept[0] == "last-good.json" and kept[1].startswith("v1-"), kept

    promote(store, CORRUPT)  # then the process restarts
    with pytest.raises(SaofuError):  # no copy kept: it cannot start, as before
        ModelSource(MODEL, tracking_uri=store, challenger_alias=None, last_good_dir=tmp_path / "empty").load()
    with running(config(store, last_good_dir=last_good)) as url, httpx.Client(base_url=url, timeout=10) as client:
        health = client.get("/healthz")
        answer = predict(client)
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "degraded"
        degraded = health.json()["degraded"]
        assert (degraded["served_version"], degraded["served_from"], degraded["alias_version"]) == \
            (GOOD, "last-good", CORRUPT)
        assert degraded["reason"]
        assert answer.status_code == 200 and answer.json()["version"] == GOOD

        promote(store, OTHER_GOOD)  # fixed by a new promotion: served, and kept as the new copy
        health = wait_for_health(client, lambda h: h["versions"]["champion"] == OTHER_GOOD)
        assert health["status"] == "ok"
    kept = sorted(p.name for p in (last_good / MODEL).iterdir() if not p.name.startswith("."))
    assert len(kept) == 2 and kept[0] == "last-good.json" and kept[1].startswith("v3-"), kept


@pytest.mark.timeout(180)
def test_failed_downloads_leave_no_folder_behind_and_old_downloads_go_after_a_swap(store, tmp_path, monkeypatch):
    import mlflow

    real_download = mlflow.artifacts.download_artifacts
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # every temporary folder of this process lands here
    monkeypatch.setattr(model_source, "RETRY_FAILED_SECONDS", 0.0)
    failing = {"on": True}
    calls: list[str] = []

    def remote_registry(artifact_uri, dst_path=None, **kwargs):
        """What a remote artefact store does: download into dst_path, or a new temporary folder."""
        dst = dst_path or tempfile.mkdtemp()
        calls.append(dst)
        if failing["on"]:
            (Path(dst) / "model.onnx").write_bytes(b"half a graph")
            raise ConnectionError("connection reset by the registry")
        return real_download(artifact_uri=artifact_uri, dst_path=dst, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", remote_registry)

    def leftovers() -> list[Path]:
        return sorted(p for p in tmp.rglob("*") if p.is_file())

    promote(store, GOOD)
    source = ModelSource(MODEL, tracking_uri=store, challenger_alias=None, poll_seconds=60)
    try:
        for _ in range(3):  # the registry drops each try
            with pytest.raises(ConnectionError):
                source.load()
        assert len(calls) == 3 and leftovers() == []

        failing["on"] = False
        assert source.load().champion.version == GOOD
        assert [p.name for p in leftovers()] == ["model.onnx"]  # the served version's graph, nothing else

        promote(store, WRONG_WIDTH)  # downloaded fine, refused at load: its folder goes too
        with pytest.raises(SaofuError, match="outputs 3 logits"):
            source.refresh()
        assert [p.name for p in leftovers()] == ["model.onnx"]

        promote(store, OTHER_GOOD)
        assert source.refresh() and source.current.champion.version == OTHER_GOOD
        files = leftovers()
        assert len(files) == 1 and Path(source.current.champion.path) == files[0]  # the old download is gone
    finally:
        source.stop()
    assert leftovers() == []
    assert len(calls) == 6
