"""Release evaluation: per-set numbers against a hand computation, the PNGs, runtime profile, comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit, prepare_dataset
from tasks.release.evaluation import ABSTAIN, decide, predict_split
from tasks.release.report import (
    compare_plot,
    compare_table,
    evaluate_sets,
    flat_metrics,
    pr_curve,
    runtime_profile,
)
from tasks.train.export import export_onnx
from tasks.train.loop import TrainConfig, fit
from tests.deploy.test_canary_classes import BLUE, CHALLENGER_W, CHAMPION_W, GREEN, RED, colour_model
from tests.release.fake_clock import FakeClock, durations

THRESHOLD = 0.9


def _subset(split: TensorSplit, rows) -> TensorSplit:
    rows = torch.as_tensor(rows, dtype=torch.long)
    return TensorSplit(split.images[rows], split.labels[rows], list(split.classes),
                       [split.paths[i] for i in rows.tolist()])


@pytest.fixture(scope="module")
def exported(shapes_dir, tmp_path_factory):
    data = prepare_dataset(shapes_dir, image_size=32, val_share=0.2)
    cfg = TrainConfig(model="saofu_fu_tiny", epochs=14, batch_size=32, image_size=32)
    model = fit(cfg, data.train, data.val).model
    path = export_onnx(model, data.classes, tmp_path_factory.mktemp("release") / "m.onnx", image_size=32)
    # Three sets as a release has them: fresh, a fixed regression set, and what was wrong before.
    probs = predict_split(path, data.val)
    wrong = np.flatnonzero(probs.argmax(1) != data.val.labels.numpy())
    sets = {"online": data.val, "regression": _subset(data.train, range(0, 144, 4)),
            "badcases": _subset(data.val, wrong if len(wrong) else [0])}
    return data, path, sets


def _valid_png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


# Threshold 0 makes every decision the top class, so the errors are confusions (no negative class)
# or false positives (the fixture model's top-1 errors are squares taken for circles).
@pytest.mark.parametrize(("threshold", "negative_class"),
                         [(THRESHOLD, None), (THRESHOLD, "circle"), (0.0, None), (0.0, "square")])
def test_set_metrics_match_a_hand_computation(tmp_path, exported, threshold, negative_class):
    data, path, sets = exported
    results = evaluate_sets(path, sets, threshold, negative_class, tmp_path, max_gallery=500)
    assert list(results) == ["online", "regression", "badcases"]

    online, split = results["online"], sets["online"]
    probs, labels = predict_split(path, split), split.labels.numpy()
    neg = None if negative_class is None else data.classes.index(negative_class)
    decisions = decide(probs, threshold, neg)
    assert online["n"] == len(split)
    assert online["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean())
    assert online["accuracy_at_threshold"] == pytest.approx((decisions == labels).mean())
    for c, cls in enumerate(data.classes):
        decided, truth = decisions == c, labels == c
        hits = (decided & truth).sum()
        assert online["per_class"][cls]["precision"] == pytest.approx(hits / decided.sum() if decided.sum() else 0.0)
        assert online["per_class"][cls]["recall"] == pytest.approx(hits / truth.sum())
        assert online["per_class"][cls]["support"] == truth.sum()
    # The gallery holds exactly the images decided wrongly, false positives first.
    wrong = np.flatnonzero(decisions != labels)
    print(f"threshold {threshold}, negative class {negative_class}: {len(wrong)} wrong, {online['errors']}")
    assert sorted(online["gallery_rows"]) == wrong.tolist()
    assert online["gallery_paths"] == [split.paths[i] for i in online["gallery_rows"]]
    assert sum(online["errors"].values()) == len(wrong)
    kinds = [("false_positive" if neg is not None and labels[i] == neg
              else "false_negative" if decisions[i] in (ABSTAIN, neg) else "confusion")
             for i in online["gallery_rows"]]
    assert kinds == sorted(kinds, key=["false_positive", "false_negative", "confusion"].index)
    # Confusion: rows truth; an abstain column only without a negative class.
    confusion = np.array(online["confusion"])
    assert confusion.shape == (3, 4 if negative_class is None else 3)
    assert confusion.sum() == len(split) and np.trace(confusion) == (decisions == labels).sum()

    for name, r in results.items():
        assert set(r["files"]) == {"pr", "confusion", "gallery"}
        for kind, file in r["files"].items():
            assert file == str(tmp_path / f"{kind}_{name}.png")
            width, height = _valid_png(file)
            assert width > 100 and height > 100


def test_gallery_is_capped_at_the_most_confident_errors(tmp_path, exported):
    _, path, sets = exported
    full = evaluate_sets(path, {"online": sets["online"]}, out_dir=tmp_path / "full", max_gallery=500)["online"]
    n_wrong = sum(full["errors"].values())
    assert n_wrong >= 3, "the fixture model should still make a few mistakes at 0.9"
    capped = evaluate_sets(path, {"online": sets["online"]}, out_dir=tmp_path / "capped", max_gallery=2)["online"]
    assert capped["gallery_rows"] == full["gallery_rows"][:2]
    assert capped["errors"] == full["errors"]
    # A set with no errors still gets its (empty) gallery.
    right = np.setdiff1d(np.arange(len(sets["online"])), full["gallery_rows"])
    clean = evaluate_sets(path, {"clean": _subset(sets["online"], right)}, out_dir=tmp_path)["clean"]
    assert clean["gallery_rows"] == [] and sum(clean["errors"].values()) == 0
    _valid_png(clean["files"]["gallery"])


def test_pr_curve_and_average_precision_by_hand():
    scores = np.array([0.9, 0.8, 0.8, 0.4, 0.1])
    positive = np.array([True, False, True, True, False])
    precision, recall, ap = pr_curve(scores, positive)
    # Thresholds 0.9, 0.8 (two images at once), 0.4, 0.1.
    np.testing.assert_allclose(precision, [1, 2 / 3, 3 / 4, 3 / 5])
    np.testing.assert_allclose(recall, [1 / 3, 2 / 3, 1, 1])
    assert ap == pytest.approx(1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 4)
    assert pr_curve(scores, np.zeros(5, bool))[2] is None


def test_runtime_profile_and_comparison(tmp_path, exported, monkeypatch):
    _, path, sets = exported
    ms = durations(30, 0.1, 2.0, seed=3)  # what the 30 timed runs take (the graph still runs)
    clock = FakeClock({path: ms}).install(monkeypatch)
    profile = runtime_profile(path, runs=30, warmup=5)
    print(profile)
    clock.assert_all_taken()
    assert profile["latency_p50_ms"] == pytest.approx(np.percentile(ms, 50))
    assert profile["latency_p95_ms"] == pytest.approx(np.percentile(ms, 95))
    assert profile["latency_mean_ms"] == pytest.approx(ms.mean())
    for key in ("peak_rss_bytes", "model_rss_bytes", "file_bytes", "image_size"):
        assert isinstance(profile[key], int) and profile[key] > 0, key
    assert profile["image_size"] == 32 and profile["file_bytes"] == path.stat().st_size
    assert profile["model_rss_bytes"] < profile["peak_rss_bytes"]

    online = evaluate_sets(path, {"online": sets["online"]}, out_dir=tmp_path)
    results = {"fp32": {"sets": online, "runtime": profile}, "no-runtime": {"sets": online},
               "other": {"sets": evaluate_sets(path, {"regression": sets["regression"]}, out_dir=tmp_path)}}
    table = compare_table(results)
    print(table)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(results)
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(results)
    assert "online acc@0.9" in lines[0] and "regression acc" in lines[0]
    assert f"{online['online']['accuracy_at_threshold']:.3f}" in lines[2]
    assert lines[3].rstrip(" |").endswith("-")  # no runtime: dashes
    _valid_png(compare_plot(results, tmp_path / "compare.png"))
    flat = flat_metrics(online)
    assert flat["online/accuracy"] == online["online"]["accuracy"]
    assert all(isinstance(v, float) for v in flat.values())


def test_bad_inputs_are_refused(tmp_path, exported):
    _, path, sets = exported
    with pytest.raises(SaofuError, match="no evaluation sets"):
        evaluate_sets(path, {}, out_dir=tmp_path)
    with pytest.raises(SaofuError, match="bad evaluation set name 'on line'"):
        evaluate_sets(path, {"on line": sets["online"]}, out_dir=tmp_path)
    with pytest.raises(SaofuError, match="'empty' has no images"):
        evaluate_sets(path, {"empty": _subset(sets["online"], [])}, out_dir=tmp_path)
    with pytest.raises(SaofuError, match="negative class 'not_fu'"):
        evaluate_sets(path, {"online": sets["online"]}, negative_class="not_fu", out_dir=tmp_path)
    with pytest.raises(SaofuError, match="ONNX model not found"):
        runtime_profile(tmp_path / "missing.onnx")
    with pytest.raises(SaofuError, match="nothing to compare"):
        compare_table({})


# ---------------------------------------------------------------------- a class the model lacks (issue 13)
# Tiny hand-made graphs, no training: logits = mean colour @ W, so a colour picks the class
# (`colour_model`, tests/deploy/test_canary_classes.py).
# The champion calls a merchant's (blue) 福 `fu`; the challenger knows `fu_merchant`.


def colour_split(colours_and_labels, classes: list[str], size: int = 8) -> TensorSplit:
    images = torch.stack([torch.tensor(c, dtype=torch.uint8)[:, None, None].expand(3, size, size)
                          for c, _ in colours_and_labels]).contiguous()
    labels = torch.tensor([classes.index(label) for _, label in colours_and_labels])
    return TensorSplit(images, labels, list(classes), [f"img{i}.png" for i in range(len(labels))])


@pytest.fixture
def class_change(tmp_path):
    champion = colour_model(tmp_path / "champion.onnx", ["fu", "not_fu"], CHAMPION_W)
    challenger = colour_model(tmp_path / "challenger.onnx", ["fu", "fu_merchant", "not_fu"], CHALLENGER_W,
                              refines={"fu_merchant": "fu"})
    fresh = colour_split([(RED, "fu")] * 4 + [(BLUE, "fu_merchant")] * 3 + [(GREEN, "not_fu")] * 4,
                         ["fu", "fu_merchant", "not_fu"])
    return champion, challenger, fresh


def test_a_model_lacking_a_class_of_the_set_is_evaluated_and_says_what_it_lacks(tmp_path, class_change):
    champion_path, challenger_path, fresh = class_change
    champion = evaluate_sets(champion_path, {"fresh": fresh}, THRESHOLD, "not_fu", tmp_path / "a")["fresh"]
    assert champion["lacks"] == ["fu_merchant"] and champion["lacked_images"] == {"fu_merchant": 3}
    assert champion["model_classes"] == ["fu", "not_fu"]
    assert list(champion["per_class"]) == ["fu", "not_fu"]  # no recall of a class it cannot answer
    assert champion["per_class"]["fu"]["precision"] == pytest.approx(4 / 7)  # the merchants' 福 it calls fu
    assert champion["accuracy_at_threshold"] == pytest.approx(8 / 11)  # merchant images count wrong...
    assert champion["known_accuracy_at_threshold"] == 1.0  # ... and it is right on the rest
    assert sum(champion["errors"].values()) == 0 and champion["gallery_rows"] == []  # not errors of the model
    assert champion["classes"] == ["fu", "fu_merchant", "not_fu"]
    assert champion["confusion"] == [[4, 0, 0], [3, 0, 0], [0, 0, 4]]
    for file in champion["files"].values():
        _valid_png(file)
    flat = flat_metrics({"fresh": champion})
    assert flat["fresh/lacked_images_fu_merchant"] == 3 and flat["fresh/known_accuracy_at_threshold"] == 1.0
    assert "fresh/recall_fu_merchant" not in flat

    challenger = evaluate_sets(challenger_path, {"fresh": fresh}, THRESHOLD, "not_fu", tmp_path / "b")["fresh"]
    assert challenger["lacks"] == [] and challenger["accuracy_at_threshold"] == 1.0
    # ... and on an old set without merchant images, its new class has no support, nothing breaks
    old = colour_split([(RED, "fu"), (GREEN, "not_fu")], ["fu", "not_fu"])
    on_old = evaluate_sets(challenger_path, {"old": old}, THRESHOLD, "not_fu", tmp_path / "c")["old"]
    assert on_old["per_class"]["fu_merchant"]["support"] == 0 and on_old["accuracy_at_threshold"] == 1.0
    assert on_old["classes"] == ["fu", "not_fu", "fu_merchant"]

    # A model without the negative class abstains under the threshold, as the serving app does.
    no_negative = colour_model(tmp_path / "nn.onnx", ["fu", "fu_merchant"], [[0.1, 0], [0, 0], [0, 0.1]])
    unsure = colour_split([((250, 0, 240), "fu")], ["fu", "not_fu"])
    result = evaluate_sets(no_negative, {"u": unsure}, THRESHOLD, "not_fu", tmp_path / "d")["u"]
    assert result["negative_class"] is None and result["abstained"] == 1.0 and result["lacks"] == ["not_fu"]


def test_the_comparison_table_shows_both_models_and_the_shared_classes(tmp_path, class_change):
    from tasks.release.gate import GateConfig, evaluate_gate
    from tasks.release.report import gate_metrics, model_info

    champion_path, challenger_path, fresh = class_change
    runtime = {"latency_p50_ms": 0.1, "latency_p95_ms": 0.2, "file_bytes": 1000}
    reports = {label: {"sets": evaluate_sets(path, {"fresh": fresh}, THRESHOLD, "not_fu", tmp_path / label),
                       "runtime": runtime, "model": model_info(path)}
               for label, path in (("challenger v2", challenger_path), ("champion v1", champion_path))}
    table = compare_table(reports)
    print(table)
    lines = table.strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:5] == ["model", "lacks", "fresh acc", "fresh acc@0.9", "fresh acc@0.9 shared"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:4]}
    assert rows["challenger v2"][1:5] == ["-", "1.000", "1.000", "1.000"]
    assert rows["champion v1"][1:5] == ["fu_merchant", "0.727", "0.727", "1.000"]
    assert lines[-1] == "fresh acc@0.9 shared: on the images of the classes every model knows (fu, not_fu)"
    _valid_png(compare_plot(reports, tmp_path / "compare.png"))

    challenger = gate_metrics(reports["challenger v2"], "fresh", "2")
    champion = gate_metrics(reports["champion v1"], "fresh", "1")
    assert challenger.refines == {"fu_merchant": "fu"} and champion.refines == {}
    assert set(champion.per_class_recall) == {"fu", "not_fu"}
    assert champion.confusion["fu_merchant"] == {"fu": 3}
    gate = evaluate_gate(challenger, champion, GateConfig(new_class="fu_merchant", max_latency_ms=1.0))
    assert gate.passed, gate.table()
    assert [c.name for c in gate.checks][:5] == ["accuracy", "recall[fu]", "recall[not_fu]",
                                                 "new_class_recall[fu_merchant]", "parent_recall[fu_merchant->fu]"]
    assert gate.checks[0].value == 1.0 and "on the 8 of 11 images" in gate.checks[0].detail
