"""Dual-model active learning: the selection rule, the pool's state, routing with real ONNX models.

No Label Studio here: `route` and `send_badcases` hand their tasks to a sink, and these tests pass a
recording fake (the integration tests cover the real server).
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import create_model
from saofu.errors import SaofuError
from tasks.data.manifest import read_manifest
from tasks.data.preprocess import normalize, to_float
from tasks.data.stream import simulate_scans, write_scans
from tasks.labeling.active_learning import (
    A_LOW,
    AGREE,
    B_LOW,
    BOTH_LOW,
    DISAGREE,
    Prediction,
    model_ref,
    parse_model_spec,
    predict_pool,
    resolve_models,
    route,
    select,
    select_batch,
    send_badcases,
)
from tasks.labeling.client import task_payload
from tasks.labeling.pool import load_state, pool_images
from tasks.release.badcases import BadCase, compare_badcases, find_badcases, read_badcases, write_badcases
from tasks.train.export import export_onnx

CLASSES = ["fu", "not_fu"]
START = datetime(2025, 1, 28, 8, 0)


# --------------------------------------------------------------------------------- selection rule


def test_agree_and_both_confident_is_auto_with_that_label():
    d = select(Prediction("fu", 0.97, "a:1"), Prediction("fu", 0.95, "b:1"), threshold=0.9)
    assert d.auto and d.label == "fu" and d.reason == AGREE


def test_disagreement_goes_to_a_human_even_when_both_are_confident():
    d = select(Prediction("fu", 0.99), Prediction("not_fu", 0.99), threshold=0.9)
    assert not d.auto and d.label is None and d.reason == DISAGREE


@pytest.mark.parametrize(
    ("score_a", "score_b", "reason"),
    [(0.89, 0.95, A_LOW), (0.95, 0.5, B_LOW), (0.6, 0.7, BOTH_LOW)],
)
def test_agreement_under_the_threshold_goes_to_a_human(score_a, score_b, reason):
    d = select(Prediction("fu", score_a), Prediction("fu", score_b), threshold=0.9)
    assert not d.auto and d.reason == reason


def test_exactly_at_the_threshold_is_auto():
    assert select(Prediction("fu", 0.9), Prediction("fu", 0.9), threshold=0.9).auto


def test_a_stricter_per_class_threshold_changes_only_that_class():
    strict = {"fu_merchant": 0.99}
    merchant = (Prediction("fu_merchant", 0.95), Prediction("fu_merchant", 0.96))
    fu = (Prediction("fu", 0.95), Prediction("fu", 0.96))
    assert select(*merchant, threshold=0.9).auto
    assert select(*merchant, threshold=0.9, per_class_threshold=strict).reason == BOTH_LOW
    assert select(*fu, threshold=0.9, per_class_threshold=strict).auto


def test_a_bad_threshold_is_refused():
    with pytest.raises(SaofuError, match="threshold"):
        select(Prediction("fu", 0.9), Prediction("fu", 0.9), threshold=1.5)
    with pytest.raises(SaofuError, match="unknown classes"):
        select_batch(np.ones((1, 2)) / 2, np.ones((1, 2)) / 2, CLASSES, 0.9, {"fu_merchant": 0.95})


def _random_probs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    p = rng.dirichlet(np.full(k, 0.3), n)
    # a tenth of the rows exactly at the 0.9 threshold used below, to exercise the >= edge
    edge = np.flatnonzero(rng.random(n) < 0.1)
    p[edge] = 0.1 / (k - 1)
    p[edge, rng.integers(0, k, len(edge))] = 0.9
    return p


def test_the_vectorised_rule_matches_the_scalar_one_on_random_cases():
    rng = np.random.default_rng(0)
    classes = ["fu", "not_fu", "fu_merchant"]
    per_class = {"fu_merchant": 0.97}
    pa, pb = _random_probs(rng, 2000, 3), _random_probs(rng, 2000, 3)
    # two models that often agree, as real ones do
    pb[:700] = pa[:700]
    pb[700:1000] = 0.8 * pa[700:1000] + 0.2 * pb[700:1000]
    auto, labels, reasons = select_batch(pa, pb, classes, 0.9, per_class)
    for i in range(len(pa)):
        d = select(
            Prediction(classes[pa[i].argmax()], pa[i].max()), Prediction(classes[pb[i].argmax()], pb[i].max()),
            0.9, per_class,
        )
        assert (d.auto, d.reason) == (bool(auto[i]), reasons[i]), i
        if d.auto:
            assert labels[i] == d.label
    assert 0 < auto.sum() < len(auto)  # both outcomes were exercised
    assert {DISAGREE, AGREE, A_LOW, B_LOW, BOTH_LOW} <= set(reasons)


# ------------------------------------------------------------------------------------------ pool


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    pool = tmp_path_factory.mktemp("pool")
    write_scans(simulate_scans(24, seed=3, start=START, rate_per_hour=60.0, image_size=32), pool)
    return pool


@pytest.fixture
def pool(tmp_path, pool_dir) -> Path:
    """A private copy of the pool, so each test starts without a state file."""
    return Path(shutil.copytree(pool_dir, tmp_path / "pool"))


def test_pool_images_never_expose_the_simulators_truth(pool):
    images = pool_images(pool)
    assert len(images) == 24
    for image in images:
        assert image.path.is_file() and image.path.name == f"{image.sha256}.png"
        assert set(vars(image)) == {"sha256", "path", "timestamp", "phase"}  # no truth, no label
    times = [i.timestamp for i in images]
    assert times == sorted(times)


def test_pool_images_since_a_time_and_after_a_recorded_state(pool):
    images = pool_images(pool)
    cut = images[9].timestamp
    assert [i.sha256 for i in pool_images(pool, since=cut)] == [i.sha256 for i in images[10:]]
    assert len(pool_images(pool, since=cut.isoformat())) == 14
    # record the first five as handled: they are not offered again
    (pool / ".al_state.json").write_text(json.dumps({"format": 1, "auto": [i.sha256 for i in images[:5]]}))
    assert [i.sha256 for i in pool_images(pool)] == [i.sha256 for i in images[5:]]


def test_pool_images_grow_with_the_stream(pool):
    first = pool_images(pool)
    later = START + timedelta(days=2)
    write_scans(simulate_scans(3, seed=99, start=later, rate_per_hour=60.0, image_size=32), pool)
    assert len(pool_images(pool)) == len(first) + 3
    assert len(pool_images(pool, since=first[-1].timestamp)) == 3


# ---------------------------------------------------------------------------- two real ONNX models

# Per image (by position in the pool, cycling): each model's (class, confidence).
CASES = [
    (("fu", 0.97), ("fu", 0.95)),  # agree, both confident -> auto fu
    (("not_fu", 0.98), ("not_fu", 0.96)),  # -> auto not_fu
    (("fu", 0.97), ("not_fu", 0.97)),  # disagree -> human
    (("fu", 0.97), ("fu", 0.70)),  # the second is unsure -> human
]


def _gap(label: str, confidence: float) -> float:
    """Logit(fu) - logit(not_fu) that gives `label` this probability."""
    g = float(np.log(confidence / (1 - confidence)))
    return g if label == "fu" else -g


def _decoded(images) -> torch.Tensor:
    from PIL import Image

    arrays = [np.asarray(Image.open(i.path).convert("RGB")) for i in images]
    return torch.from_numpy(np.stack(arrays))


def _steered_model(name: str, pixels: torch.Tensor, gaps: np.ndarray) -> nn.Module:
    """A random-init model whose last layer is solved so its logit gap on `pixels` equals `gaps`.

    Known predictions without training: the features of N <= feature-width images are linearly
    independent, so a least-squares last layer hits any N targets exactly.
    """
    torch.manual_seed(0)
    model = create_model(name, 2)
    # Fresh BatchNorm statistics leave features ~1e-5; calibrate them on these images first.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    x = normalize(to_float(pixels.permute(0, 3, 1, 2)))  # what the exported graph does to pixels
    with torch.no_grad():
        model.train()(x)
        model.eval()
        feats = model.forward_head(model.forward_features(x), pre_logits=True).double()
        design = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], 1)
        w = torch.linalg.lstsq(design, torch.from_numpy(gaps / 2)[:, None]).solution[:, 0]
        last = model.classifier if isinstance(model.classifier, nn.Linear) else model.classifier[-1]
        last.weight.copy_(torch.stack([w[:-1], -w[:-1]]).float())
        last.bias.copy_(torch.stack([w[-1], -w[-1]]).float())
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory, pool_dir):
    """Champion (saofu_fu_tiny) and second (mobilenet_v3_small_050) with the CASES predictions."""
    out = tmp_path_factory.mktemp("models")
    images = pool_images(pool_dir)
    pixels = _decoded(images)
    refs = []
    for which, (name, version) in enumerate([("saofu_fu_tiny", "1"), ("mobilenet_v3_small_050", "2")]):
        gaps = np.array([_gap(*CASES[i % len(CASES)][which]) for i in range(len(images))])
        model = _steered_model(name, pixels, gaps)
        path = export_onnx(model, CLASSES, out / f"{name}.onnx", image_size=32)
        refs.append(model_ref(path, ["champ", "second"][which], version))
    return refs


class RecordingSink:
    """Stands in for Label Studio: keeps what it was given, returns made-up task ids."""

    def __init__(self):
        self.calls: list[list] = []

    def __call__(self, items):
        self.calls.append(list(items))
        start = sum(map(len, self.calls[:-1]))
        return list(range(start, start + len(items)))

    @property
    def items(self):
        return [i for call in self.calls for i in call]


def test_the_steered_models_predict_what_the_cases_say(models, pool):
    champ, second = models
    assert champ.arch != second.arch  # different architectures, as the rule wants
    images = pool_images(pool)
    pa, pb = predict_pool(champ.onnx_path, images), predict_pool(second.onnx_path, images, batch_size=5)
    for i in range(len(images)):
        (la, ca), (lb, cb) = CASES[i % len(CASES)]
        assert (CLASSES[pa[i].argmax()], CLASSES[pb[i].argmax()]) == (la, lb)
        assert pa[i].max() == pytest.approx(ca, abs=2e-3) and pb[i].max() == pytest.approx(cb, abs=2e-3)


def test_pool_tta_is_the_mean_of_the_plain_predictions_on_the_view_images(models, pool, tmp_path):
    # An independent path: the views written to disk as images and predicted one set at a time.
    from PIL import Image

    from tasks.labeling.tta import augmented_views

    champ, _ = models
    images = pool_images(pool)
    pixels = _decoded(images).permute(0, 3, 1, 2).contiguous()
    per_view = []
    for k, view in enumerate(augmented_views(pixels)):
        paths = []
        for i, img in enumerate(view):
            path = tmp_path / f"v{k}_{i}.png"
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
            paths.append(path)
        per_view.append(predict_pool(champ.onnx_path, paths))
    tta = predict_pool(champ.onnx_path, images, batch_size=7, tta=True)
    assert np.allclose(tta, np.mean(per_view, 0), atol=1e-6)
    assert np.allclose(tta.sum(1), 1) and not np.allclose(tta, predict_pool(champ.onnx_path, images))


def test_route_auto_labels_agreements_and_sends_the_rest_with_both_predictions(models, pool, tmp_path):
    champ, second = models
    dataset = tmp_path / "dataset"
    sink = RecordingSink()
    images = pool_images(pool)
    result = route(pool, dataset, champ, second, sink, threshold=0.9)

    assert (result.new_images, result.auto, result.auto_added, result.human, result.deferred) == (24, 12, 12, 12, 0)
    assert result.reasons == {AGREE: 12, DISAGREE: 6, B_LOW: 6}

    rows = read_manifest(dataset)
    assert len(rows) == 12
    expected = {images[i].sha256: CASES[i % 4][0][0] for i in range(24) if i % 4 in (0, 1)}
    assert {r["sha256"]: r["label"] for r in rows} == expected
    for r in rows:
        assert r["source"] == "auto"
        assert r["model_versions"] == "champ:1;second:2"
        score_a, score_b = map(float, r["scores"].split(";"))
        assert min(score_a, score_b) >= 0.9
        assert (dataset / r["path"]).is_file()

    assert len(sink.calls) == 1
    sent = {i.sha256: i for i in sink.items}
    assert set(sent) == {images[i].sha256 for i in range(24) if i % 4 in (2, 3)}
    for item in sent.values():
        assert item.source == "online_pool" and not item.badcase
        assert [p.model_version for p in item.predictions] == ["champ:1", "second:2"]  # champion first
        assert item.predictions[0].label == "fu"
        assert item.meta["al_reason"] in (DISAGREE, B_LOW)
        assert "truth" not in item.meta
    # what Label Studio would import: both predictions, the champion's first
    payload = task_payload(sink.items[0], pool.parent, CLASSES)
    assert [p["model_version"] for p in payload["predictions"]] == ["champ:1", "second:2"]
    assert payload["data"]["source"] == "online_pool" and payload["data"]["al_reason"] == DISAGREE
    # disagreements first: they teach the most
    assert [i.meta["al_reason"] for i in sink.items[:6]] == [DISAGREE] * 6

    again = route(pool, dataset, champ, second, sink, threshold=0.9)
    assert (again.new_images, again.auto, again.human) == (0, 0, 0)
    assert len(sink.calls) == 1 and len(read_manifest(dataset)) == 12


def test_a_lower_threshold_lets_the_unsure_agreements_through(models, pool, tmp_path):
    sink = RecordingSink()
    result = route(pool, tmp_path / "ds", *models, sink, threshold=0.6)
    assert (result.auto, result.human) == (18, 6)
    # ... unless that class keeps a strict threshold of its own
    other = shutil.copytree(tmp_path / "pool", tmp_path / "pool2", ignore=shutil.ignore_patterns(".al_state.json"))
    strict = route(other, tmp_path / "ds2", *models, RecordingSink(), threshold=0.6, per_class={"fu": 0.9})
    assert (strict.auto, strict.human) == (12, 12)


def test_max_tasks_defers_the_rest_to_the_next_run(models, pool, tmp_path):
    sink = RecordingSink()
    first = route(pool, tmp_path / "ds", *models, sink, threshold=0.9, max_tasks=4)
    assert (first.auto, first.human, first.deferred) == (12, 4, 8)
    assert all(i.meta["al_reason"] == DISAGREE for i in sink.items)
    state = load_state(pool)
    assert len(state.auto) == 12 and len(state.human) == 4
    second = route(pool, tmp_path / "ds", *models, sink, threshold=0.9)
    assert (second.new_images, second.auto, second.human, second.deferred) == (8, 0, 8, 0)
    assert len({i.sha256 for i in sink.items}) == 12


def test_a_failing_sink_keeps_the_auto_labels_and_retries_the_tasks(models, pool, tmp_path):
    def broken(items):
        raise RuntimeError("Label Studio is down")

    with pytest.raises(RuntimeError):
        route(pool, tmp_path / "ds", *models, broken, threshold=0.9)
    assert len(read_manifest(tmp_path / "ds")) == 12
    retry = route(pool, tmp_path / "ds", *models, RecordingSink(), threshold=0.9)
    assert (retry.new_images, retry.auto, retry.human) == (12, 0, 12)


def test_a_second_run_on_the_same_pool_waits_for_the_first_and_then_gives_up_clearly(
    models, pool, tmp_path, monkeypatch
):
    import subprocess
    import sys

    import tasks.labeling.pool as pool_module

    holder = subprocess.Popen(  # another process (a scheduled run) holds the pool's lock
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); "
         "l.acquire(); print('held', flush=True); time.sleep(60)", str(pool / pool_module.LOCK_NAME)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(pool_module, "LOCK_WAIT_S", 0.3)
        with pytest.raises(SaofuError, match="another active-learning run holds .*al_state.lock"):
            route(pool, tmp_path / "ds", *models, RecordingSink(), threshold=0.9)
        assert not (tmp_path / "ds").exists() and load_state(pool).processed == set()  # nothing was done
    finally:
        holder.kill()
        holder.wait()
    done = route(pool, tmp_path / "ds", *models, RecordingSink(), threshold=0.9)  # released when it died
    assert (done.auto, done.human) == (12, 12)


# ---------------------------------------------------------------------------------------- badcases


def test_badcases_are_the_wrong_decisions_at_the_threshold(pool):
    images = pool_images(pool)[:4]
    paths = [str(i.path) for i in images]
    probs = np.array([[0.95, 0.05], [0.97, 0.03], [0.6, 0.4], [0.2, 0.8]])
    labels = np.array([0, 1, 0, 1])  # right, false positive, unsure fu -> not_fu, right
    cases = find_badcases(probs, labels, CLASSES, paths, threshold=0.9, negative_class="not_fu")
    assert [(c.truth, c.predicted, c.decision, c.kind) for c in cases] == [
        ("not_fu", "fu", "fu", "false_positive"),
        ("fu", "fu", "not_fu", "false_negative"),
    ]
    assert cases[0].sha256 == images[1].sha256 and cases[0].score == pytest.approx(0.97)
    # without a fallback class an unsure prediction is an abstention, also wrong
    abstain = find_badcases(probs, labels, CLASSES, paths, threshold=0.9)
    assert [(c.decision, c.kind) for c in abstain] == [
        ("fu", "confusion"), ("", "false_negative"), ("", "false_negative"),
    ]


def test_badcases_go_to_labelers_once_tagged_with_the_models_prediction(pool, tmp_path):
    images = pool_images(pool)[:3]
    cases = [
        BadCase(str(i.path), i.sha256, "fu", "not_fu", "not_fu", 0.93, "false_negative") for i in images
    ]
    path = write_badcases(tmp_path / "badcases.json", cases, "champ:1", CLASSES, 0.9, "not_fu", "test", 50)
    assert read_badcases(path)["badcases"] == cases
    sink = RecordingSink()
    assert send_badcases(path, sink, pool, max_tasks=2) == 2
    assert send_badcases(path, sink, pool) == 1  # only the one held back
    assert send_badcases(path, sink, pool) == 0
    assert [i.sha256 for i in sink.items] == [i.sha256 for i in images]
    for item in sink.items:
        assert item.badcase and item.source == "evaluation"
        assert [(p.model_version, p.label, p.score) for p in item.predictions] == [("champ:1", "not_fu", 0.93)]
        assert "fu" not in item.meta.values()  # the truth is not shown to labelers


def test_compare_badcases_counts_what_a_newer_model_fixed():
    old = [BadCase("a", "1", "fu", "not_fu", "not_fu", 0.9, "false_negative"),
           BadCase("b", "2", "not_fu", "fu", "fu", 0.9, "false_positive")]
    new = [old[1], BadCase("c", "3", "fu", "not_fu", "not_fu", 0.9, "false_negative")]
    assert compare_badcases(old, new) == {"fixed": 1, "still_wrong": 1, "new": 1}


def test_a_bad_badcase_file_is_named(tmp_path):
    with pytest.raises(SaofuError, match="badcase file not found"):
        read_badcases(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text('{"format": "other"}')
    with pytest.raises(SaofuError, match="not a saofu badcase file"):
        read_badcases(tmp_path / "x.json")


# -------------------------------------------------------------------------------- model resolution


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, ("fu", "second", None)),
        ("@shadow", ("fu", "shadow", None)),
        ("fu-mobile@champion", ("fu-mobile", "champion", None)),
        ("fu-mobile/3", ("fu-mobile", None, "3")),
        ("fu-mobile", ("fu-mobile", None, None)),
    ],
)
def test_second_model_specs(spec, expected):
    assert parse_model_spec(spec, "fu") == expected


def test_resolve_models_downloads_champion_and_second_and_names_a_missing_alias(saofu_home, models):

    from tasks import tracking

    champ, second = models
    for ref, name in ((champ, "fu"), (second, "fu"), (champ, "fu-same-arch")):
        run_id = tracking.start_run("test-al", "register", {}, {})
        tracking.register_onnx(run_id, ref.onnx_path, name, 32, CLASSES, {})
    with pytest.raises(SaofuError, match="no alias 'champion'.*set_registered_model_alias"):
        resolve_models("fu")
    client = tracking.client()
    client.set_registered_model_alias("fu", "champion", "1")
    with pytest.raises(SaofuError, match="no alias 'second'"):
        resolve_models("fu")
    client.set_registered_model_alias("fu", "second", "2")

    a, b = resolve_models("fu", dst_dir=saofu_home / "dl")
    assert (a.model_version, b.model_version) == ("fu:1", "fu:2")
    assert a.arch == champ.arch and b.arch == second.arch
    assert predict_pool(a.onnx_path, []).shape == (0, 2)

    # the latest version of another registered model, with the same architecture: a warning, or
    # an error when asked to be strict
    with pytest.warns(UserWarning, match="same architecture"):
        resolve_models("fu", "fu-same-arch")
    with pytest.raises(SaofuError, match="same architecture"):
        resolve_models("fu", "fu-same-arch", require_different_arch=True)
    with pytest.raises(SaofuError, match="must be another one"):
        resolve_models("fu", "@champion")


# ------------------------------------------------------------------------------------------ flow


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_the_flow_routes_the_pool_sends_badcases_and_logs_the_counts(
    prefect_api, saofu_home, models, pool, tmp_path, monkeypatch
):

    import flows.active_learning as al_flow
    from tasks import tracking

    champ, second = models
    for ref in models:
        tracking.register_onnx(tracking.start_run("test-al", "register", {}, {}), ref.onnx_path, "fu", 32, CLASSES, {})
    client = tracking.client()
    client.set_registered_model_alias("fu", "champion", "1")
    client.set_registered_model_alias("fu", "second", "2")
    sinks: list[RecordingSink] = []

    def fake_sink(project, classes):
        assert (project, classes) == ("fu-test", CLASSES)
        sinks.append(RecordingSink())
        return sinks[-1]

    monkeypatch.setattr(al_flow, "label_studio_sink", fake_sink)
    image = pool_images(pool)[0]
    badcase_file = write_badcases(
        tmp_path / "bad.json", [BadCase(str(image.path), image.sha256, "fu", "not_fu", "not_fu", 0.95,
                                        "false_negative")],
        "fu:1", CLASSES, 0.9, "not_fu", "test", 10,
    )
    params = al_flow.ActiveLearningParams(
        pool_dir=str(pool), dataset_dir=str(tmp_path / "ds"), registered_model="fu", project="fu-test",
        include_badcases=True, badcase_file=str(badcase_file),
        # the steered models give the CASES' confidences on these exact pixels only; moved views
        # give arbitrary ones (TTA itself is tested against files of the views above)
        champion_tta=False, second_tta=False, threshold=0.9,
    )
    result = al_flow.active_learning_flow(params)

    assert (result.champion, result.second) == ("fu:1", "fu:2")
    assert (result.new_images, result.auto, result.human, result.badcases) == (24, 12, 12, 1)
    # 12 to labelers, 1 badcase, and 5 blind spot checks of the 12 auto-labels (5 % but at least 5)
    assert result.spot_checks == 5
    items = [item for s in sinks for item in s.items]
    assert len(items) == 18
    checks = [item for item in items if item.source == "spot_check"]
    auto_shas = {r["sha256"] for r in read_manifest(tmp_path / "ds") if r["source"] == "auto"}
    assert len(checks) == 5 and {c.sha256 for c in checks} <= auto_shas
    assert all(not c.predictions for c in checks)  # blind: no pre-annotation to confirm
    assert len(read_manifest(tmp_path / "ds")) == 12
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "saofu-active-learning"
    assert {k: run.data.metrics[k] for k in ("auto", "human", "badcases", "spot_checks")} == {
        "auto": 12, "human": 12, "badcases": 1, "spot_checks": 5}
    assert run.data.params["threshold"] == "0.9"


def test_flow_params_are_checked_before_anything_runs():
    from pydantic import ValidationError

    from flows.active_learning import ActiveLearningParams

    with pytest.raises(ValidationError, match="less than or equal to 1"):
        ActiveLearningParams(pool_dir="p", dataset_dir="d", threshold=1.2)
    with pytest.raises(ValidationError, match="greater than or equal to 0.5"):
        ActiveLearningParams(pool_dir="p", dataset_dir="d", per_class_thresholds={"fu": 0.3})
    with pytest.raises(ValidationError, match="no badcase_file"):
        ActiveLearningParams(pool_dir="p", dataset_dir="d", include_badcases=True)


# ------------------------------------------------------------------ two models, different classes (issue 13)
# After a fast retrain the champion knows `fu_merchant`; the second model does not yet. Untrained
# colour graphs (tests/deploy/test_canary_classes.py) make the answers known: red is `fu` for both,
# green `not_fu`, blue a merchant's 福 (`fu_merchant` for a 3-class model, `fu` for a 2-class one).

THREE = ["fu", "fu_merchant", "not_fu"]


def test_a_class_the_other_model_lacks_goes_to_a_human():
    from tasks.labeling.active_learning import UNKNOWN_TO_OTHER

    three, two = THREE, CLASSES
    for b_label in ("fu", "not_fu"):  # whatever the other says, it could not have said fu_merchant
        d = select(Prediction("fu_merchant", 0.99), Prediction(b_label, 0.99), 0.9, classes_a=three, classes_b=two)
        assert not d.auto and d.reason == UNKNOWN_TO_OTHER
    d = select(Prediction("fu", 0.99), Prediction("fu_merchant", 0.99), 0.9, classes_a=two, classes_b=three)
    assert d.reason == UNKNOWN_TO_OTHER  # the same the other way round
    # On the classes both know the rule is unchanged.
    assert select(Prediction("fu", 0.97), Prediction("fu", 0.95), 0.9, classes_a=three, classes_b=two).auto
    assert select(Prediction("fu", 0.97), Prediction("not_fu", 0.95), 0.9, classes_a=three,
                  classes_b=two).reason == DISAGREE


def test_the_vectorised_rule_matches_the_scalar_one_with_different_class_lists():
    from tasks.labeling.active_learning import UNKNOWN_TO_OTHER
    from tasks.release.evaluation import align_probs

    rng = np.random.default_rng(1)
    pa = _random_probs(rng, 1000, 3)  # the champion: fu, fu_merchant, not_fu
    pb = align_probs(_random_probs(rng, 1000, 2), CLASSES, THREE)  # the second: no fu_merchant column
    pb[:400] = align_probs(pa[:400][:, [0, 2]] / pa[:400][:, [0, 2]].sum(1, keepdims=True), CLASSES, THREE)
    auto, labels, reasons = select_batch(pa, pb, THREE, 0.9, None, THREE, CLASSES)
    for i in range(len(pa)):
        d = select(Prediction(THREE[pa[i].argmax()], pa[i].max()), Prediction(THREE[pb[i].argmax()], pb[i].max()),
                   0.9, None, THREE, CLASSES)
        assert (d.auto, d.reason) == (bool(auto[i]), reasons[i]), i
    assert {UNKNOWN_TO_OTHER, DISAGREE, AGREE} <= set(reasons)
    assert "fu_merchant" not in set(labels[auto])


@pytest.fixture
def colour_pool(tmp_path) -> Path:
    """3 red, 3 blue and 2 green images in an online pool, as the serving app logs them."""
    from deploy.pool_log import PoolEntry, PoolStore
    from tests.deploy.test_canary_classes import png

    store = PoolStore(tmp_path / "colour_pool")
    colours = [(250, 0, i) for i in range(3)] + [(i, 0, 250) for i in range(3)] + [(i, 250, 0) for i in range(2)]
    for k, colour in enumerate(colours):
        store.add(PoolEntry(png(colour), "PNG", {"model_version": "fu:1"}, START.timestamp() + k, {}))
    store.close()
    return tmp_path / "colour_pool"


@pytest.mark.parametrize("new_class_in", ["champion", "second"])
def test_route_sends_images_of_a_class_one_model_lacks_to_labelers(colour_pool, tmp_path, new_class_in):
    from tasks.labeling.active_learning import UNKNOWN_TO_OTHER, label_classes
    from tests.deploy.test_canary_classes import CHALLENGER_W, CHAMPION_W, MERCHANT, colour_model

    three = model_ref(colour_model(tmp_path / "three.onnx", THREE, CHALLENGER_W, MERCHANT), "fu", "2")
    two = model_ref(colour_model(tmp_path / "two.onnx", CLASSES, CHAMPION_W), "fu-second", "1")
    champion, second = (three, two) if new_class_in == "champion" else (two, three)
    assert label_classes(champion, second) == (THREE if new_class_in == "champion" else ["fu", "not_fu", "fu_merchant"])
    sink = RecordingSink()
    result = route(colour_pool, tmp_path / "ds", champion, second, sink, threshold=0.9)

    assert (result.new_images, result.auto, result.human) == (8, 5, 3)
    assert result.reasons == {AGREE: 5, UNKNOWN_TO_OTHER: 3}
    assert sorted(r["label"] for r in read_manifest(tmp_path / "ds")) == ["fu"] * 3 + ["not_fu"] * 2
    blue = ("fu_merchant", "fu") if new_class_in == "champion" else ("fu", "fu_merchant")
    for item in sink.items:
        assert item.meta["al_reason"] == UNKNOWN_TO_OTHER
        assert tuple(p.label for p in item.predictions) == blue  # champion first
    assert result.metrics()["reason_class_unknown_to_the_other_model"] == 3


def test_resolve_models_accepts_two_class_lists_that_overlap(saofu_home, tmp_path):
    from tasks import tracking
    from tests.deploy.test_canary_classes import CHALLENGER_W, CHAMPION_W, colour_model

    graphs = [(colour_model(tmp_path / "three.onnx", THREE, CHALLENGER_W), THREE),
              (colour_model(tmp_path / "two.onnx", CLASSES, CHAMPION_W), CLASSES),
              (colour_model(tmp_path / "shapes.onnx", ["circle", "square"], CHAMPION_W), ["circle", "square"])]
    for path, classes in graphs:
        tracking.register_onnx(tracking.start_run("test-al", "register", {}, {}), path, "fu", 8, classes, {})
    client = tracking.client()
    client.set_registered_model_alias("fu", "champion", "1")
    client.set_registered_model_alias("fu", "second", "2")
    a, b = resolve_models("fu", dst_dir=saofu_home / "dl")
    assert (a.classes, b.classes) == (tuple(THREE), tuple(CLASSES))
    with pytest.raises(SaofuError, match="share no class"):
        resolve_models("fu", "fu/3")
