"""Expansion: a fast retrain that adds classes keeps the base frozen and answers them from a branch.

`models.expand` builds the model; `tasks.train.fine_tune` chooses it for new classes on a saofu
recogniser. What must hold: the old classes' logits are the base's bit for bit, before and after
training; the expanded model saves, rebuilds and exports like any other; a second change on it
works (another new class grows the branch, a corrected old class trains the base too).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from models import build_from_checkpoint_meta, create_model, model_meta
from models.expand import ExpandedRecognizer, can_expand, expand_recognizer
from saofu.errors import SaofuError
from tasks.data.loading import PreparedData, TensorSplit
from tasks.train.export import export_onnx, parity_max_abs_diff
from tasks.train.fine_tune import FineTuneConfig, fine_tune
from tasks.train.loop import TrainConfig, load_checkpoint, place, predict_proba, save_checkpoint
from tasks.train.onnx_interface import read_metadata
from tests.train.two_shapes import OLD

pytestmark = pytest.mark.timeout(300)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def expanded(shapes, base, tmp_path_factory):
    cfg = FineTuneConfig(new_classes=["triangle"], epochs=8, batch_size=16, budget_s=300)
    return fine_tune(base, shapes, cfg, tmp_path_factory.mktemp("ft") / "best.pt")


def test_an_untrained_expansion_answers_as_its_base_and_rebuilds_and_exports(tmp_path):
    torch.manual_seed(0)
    model = create_model("saofu_fu_tiny", 2).eval()
    classes = ["circle", "square", "circle_red"]
    grown = expand_recognizer(model, classes[:2], classes[2:], refines={"circle_red": "circle"}).eval()
    assert isinstance(grown, ExpandedRecognizer) and grown.num_classes == 3
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        old, new = model(x), grown(x)
    assert torch.equal(new[:, :2], old)  # the base's logits, bit for bit
    assert torch.equal(new.argmax(1), old.argmax(1))  # the refining class starts under its parent
    assert not any(p.requires_grad for p in grown.base.parameters())
    assert all(p.requires_grad for p in grown.branch_stages.parameters())
    save_checkpoint(tmp_path / "e.pt", grown, None, None, 0, TrainConfig(model="saofu_fu_tiny", image_size=32),
                    classes, [], 0.0, {"circle_red": "circle"})
    rebuilt, state = load_checkpoint(tmp_path / "e.pt")
    assert type(build_from_checkpoint_meta(state["model_meta"])) is ExpandedRecognizer
    with torch.no_grad():
        assert torch.equal(rebuilt(x), new)
    path = export_onnx(rebuilt, classes, tmp_path / "e.onnx", image_size=32)
    assert json.loads(read_metadata(path)["classes"]) == classes
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert parity_max_abs_diff(rebuilt, path, pixels) < 1e-4


def test_only_saofu_recognisers_expand_and_bad_meta_is_named():
    assert can_expand(create_model("saofu_fu_tiny", 2))
    assert not can_expand(create_model("mobilenet_v3_small_050", 2))
    with pytest.raises(SaofuError, match="only a saofu Recognizer"):
        expand_recognizer(create_model("mobilenet_v3_small_050", 2), OLD, ["triangle"])
    meta = model_meta(expand_recognizer(create_model("saofu_fu_tiny", 2), OLD, ["triangle"]))
    with pytest.raises(SaofuError, match="does not match"):
        build_from_checkpoint_meta({**meta, "arch": "expanded3(" + meta["arch"].split("(", 1)[1]})


def test_training_the_new_class_leaves_every_old_logit_as_it_was(expanded, shapes, base):
    r = expanded
    assert r.method == "expand" and r.classes == ["circle", "square", "triangle"]
    assert r.recall_after["triangle"] >= 0.6  # learned (chance 1/3)
    base_model, _ = load_checkpoint(base)
    rebuilt, state = load_checkpoint(r.checkpoint_path)
    assert state["model_meta"]["model_name"] == "saofu_expanded"
    with torch.no_grad():
        x = torch.randn(8, 3, 32, 32)
        # bit for bit in one layout: the saved model and the base as loaded (NCHW), and as trained
        # (channels-last on the CPU, `loop.place`); across layouts the sums are ordered differently
        assert torch.equal(rebuilt(x)[:, :2], base_model(x))
        assert torch.equal(r.model(x)[:, :2], place(copy.deepcopy(base_model), CPU)(x))
    # so an old-class answer can only change where the new class outscores it
    probs = predict_proba(rebuilt, shapes.val, CPU)
    before = predict_proba(base_model, shapes.val, CPU)
    moved = probs[:, :2].argmax(1) != before.argmax(1)
    assert not moved.any()
    assert torch.allclose(predict_proba(r.model, shapes.val, CPU), probs, atol=1e-6)


def test_a_second_new_class_grows_the_branch_and_keeps_the_first_three(expanded, shapes, tmp_path):
    # a fourth class made up of the triangles' images, so the data has one more class to add
    classes = ["circle", "square", "triangle", "triangle2"]
    half = shapes.train.labels == 2
    half &= torch.arange(len(half)) % 2 == 0
    train = TensorSplit(shapes.train.images, torch.where(half, 3, shapes.train.labels), classes, shapes.train.paths)
    vhalf = (shapes.val.labels == 2) & (torch.arange(len(shapes.val.labels)) % 2 == 0)
    val = TensorSplit(shapes.val.images, torch.where(vhalf, 3, shapes.val.labels), classes, shapes.val.paths)
    data = PreparedData(classes, train, val, None, "x", "")
    cfg = FineTuneConfig(new_classes=["triangle2"], refines={"triangle2": "triangle"}, epochs=2, batch_size=16,
                         budget_s=120)
    r = fine_tune(expanded.checkpoint_path, data, cfg, tmp_path / "best.pt")
    assert r.method == "expand" and r.classes == classes
    assert isinstance(r.model, ExpandedRecognizer) and r.model.classifier.out_features == 2
    first, _ = load_checkpoint(expanded.checkpoint_path)
    with torch.no_grad():
        x = torch.randn(4, 3, 32, 32)
        rebuilt, state = load_checkpoint(tmp_path / "best.pt")
        assert torch.equal(rebuilt(x)[:, :2], first(x)[:, :2])  # the champion's classes: untouched
        assert state["classes"] == classes and torch.allclose(rebuilt(x), r.model(x), atol=1e-5)


def test_a_corrected_old_class_on_an_expanded_model_trains_its_base(expanded, shapes, tmp_path):
    cfg = FineTuneConfig(changed_classes=["square"], epochs=2, batch_size=16, budget_s=120)
    r = fine_tune(expanded.checkpoint_path, shapes, cfg, tmp_path / "best.pt")
    assert r.method == "grow" and r.classes == expanded.classes
    first, _ = load_checkpoint(expanded.checkpoint_path)
    moved = [not torch.equal(a, b) for a, b in zip(r.model.base.parameters(), first.base.parameters(), strict=True)]
    assert any(moved)  # "square" is the base's class: its weights had to move


def test_expand_false_grows_the_classifier_as_before(shapes, base, tmp_path):
    cfg = FineTuneConfig(new_classes=["triangle"], epochs=1, batch_size=16, budget_s=120, expand=False)
    r = fine_tune(base, shapes, cfg, tmp_path / "best.pt")
    assert r.method == "grow" and not isinstance(r.model, ExpandedRecognizer) and r.model.num_classes == 3
