"""The parent gate of an expanded model: a refining class answered only where the base is not sure of
another class (`models.expand.ParentGate`).

What must hold: where the base's softmax puts at least the gate's certainty on a class other than
the new class's parent, the expanded model answers as the base; elsewhere, and in training, the
gate changes nothing; the setting survives a checkpoint, the ONNX export and INT8 quantization
(the gate stays in float there); a fine-tune sets it from its config.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from models import build_from_checkpoint_meta, create_model, model_meta
from models.expand import GATED_MARGIN, ExpandedRecognizer, expand_recognizer
from saofu.errors import SaofuError
from tasks.data.preprocess import PixelInput
from tasks.release.quantize import quantize_int8
from tasks.train.export import export_onnx
from tasks.train.fine_tune import FineTuneConfig, fine_tune
from tasks.train.loop import load_checkpoint
from tests.train.two_shapes import OLD

pytestmark = pytest.mark.timeout(300)

CLASSES = ["circle", "square", "circle_red", "blob"]  # circle_red refines circle; blob refines nothing


def eager_branch(base_path, sure: float) -> ExpandedRecognizer:
    """The trained two-shape base expanded, circle_red outscoring every class wherever the gate lets it."""
    torch.manual_seed(0)
    model = expand_recognizer(load_checkpoint(base_path)[0], OLD, CLASSES[2:], refines={"circle_red": "circle"},
                              parent_gate=sure)
    with torch.no_grad():
        model.classifier.bias[0] = 50.0
    return model.eval()


def val_pixels(shapes) -> torch.Tensor:
    """The two-shape validation images as the shipped graph takes them (uint8 NHWC)."""
    return shapes.val.images.permute(0, 2, 3, 1).contiguous()


def logits_of(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return PixelInput(model)(pixels)


def onnx_proba(path, pixels: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"pixels": pixels.numpy()})[0]).softmax(1).numpy()


def split_point(sure: torch.Tensor) -> float:
    """The middle of the widest gap between the images' certainties: some are gated, some not, none near it."""
    values = sure.sort().values
    widest = int((values[1:] - values[:-1]).argmax())
    return float((values[widest] + values[widest + 1]) / 2)


def test_the_refining_class_is_held_down_only_where_the_base_is_sure_of_another_class(shapes, base):
    pixels = val_pixels(shapes)
    probe = eager_branch(base, 0.0)
    base_logits = logits_of(probe.base, pixels)
    sure_of_square = base_logits.softmax(1)[:, 1]
    cut = split_point(sure_of_square)
    model = eager_branch(base, cut)
    gated = sure_of_square >= cut
    assert 0 < gated.sum() < len(gated)
    ungated, logits = logits_of(probe, pixels), logits_of(model, pixels)
    assert torch.equal(logits[:, :2], base_logits)  # the old logits are the base's, gate or none
    assert torch.equal(logits[~gated], ungated[~gated])  # not sure: nothing moves
    assert torch.equal(logits[:, 3], ungated[:, 3])  # a class refining nothing is never gated
    assert torch.allclose(logits[gated, 2], base_logits[gated].amax(1) - GATED_MARGIN)
    assert (ungated.argmax(1) == 2).all()  # ungated, circle_red takes every image...
    assert (logits.softmax(1)[gated, 2] < 1e-4).all()  # ...gated, none the base is sure is a square,
    assert torch.equal(logits[gated].argmax(1), base_logits[gated].argmax(1))  # which get the base's answer
    model.parent_gate.train()  # what model.train() does to it (the branch's BatchNorm would move too)
    assert torch.equal(logits_of(model, pixels), ungated)  # training sees the branch's own logits


def test_the_gate_survives_the_checkpoint_meta_and_old_checkpoints_have_none(base):
    model = eager_branch(base, 0.97)
    meta = model_meta(model)
    assert meta["kwargs"]["parent_gate"] == 0.97 and meta["kwargs"]["gate_parents"] == [0, -1]
    rebuilt = build_from_checkpoint_meta(meta)
    assert rebuilt.parent_gate.sure == 0.97 and rebuilt.parent_gate.parents == [0, -1]
    assert torch.equal(rebuilt.parent_gate.others, model.parent_gate.others)
    before_gates = {**meta, "kwargs": {k: v for k, v in meta["kwargs"].items()
                                       if k not in ("parent_gate", "gate_parents")}}
    old = build_from_checkpoint_meta(before_gates)
    assert old.parent_gate.sure == 0.0 and old.parent_gate.parents == [-1, -1]


def test_a_second_change_grows_the_gate_and_the_runs_setting_is_the_whole_models(base):
    model = eager_branch(base, 0.97)  # circle_red refines circle, blob nothing
    grown = expand_recognizer(model, OLD + CLASSES[2:], ["square_red", "blob_red"],
                              refines={"square_red": "square", "blob_red": "blob"}, parent_gate=0.9)
    # square_red refines a base class; blob_red refines a branch class, which the base cannot be sure of
    assert grown.parent_gate.parents == [0, -1, 1, -1] and grown.parent_gate.sure == 0.9
    assert grown.parent_gate.others.tolist() == [[0, 1], [0, 0], [1, 0], [0, 0]]
    assert model_meta(grown)["kwargs"]["gate_parents"] == [0, -1, 1, -1]
    assert expand_recognizer(model, OLD + CLASSES[2:], []).parent_gate.sure == 0.0  # the run's setting wins


def test_bad_gate_settings_are_refused_with_the_setting_named(base):
    with pytest.raises(SaofuError, match="parent_gate must be between 0"):
        eager_branch(base, 1.5)
    with pytest.raises(SaofuError, match="parent_gate must be between 0"):
        eager_branch(base, 0.0).set_parent_gate(-0.1)
    recogniser = create_model("saofu_fu_tiny", 2)
    with pytest.raises(SaofuError, match="gate_parents"):
        ExpandedRecognizer(recogniser, 1, gate_parents=[2])
    with pytest.raises(SaofuError, match="gate_parents"):
        ExpandedRecognizer(recogniser, 2, gate_parents=[0])


def test_the_onnx_graphs_gate_as_the_model_does_and_int8_keeps_the_gate_in_float(shapes, base, tmp_path):
    pixels = val_pixels(shapes)
    sure_of_square = logits_of(eager_branch(base, 0.0).base, pixels).softmax(1)[:, 1]
    cut = split_point(sure_of_square)
    model = eager_branch(base, cut)
    fp32 = export_onnx(model, CLASSES, tmp_path / "g.onnx", image_size=32)
    int8 = quantize_int8(fp32, pixels.numpy(), tmp_path / "g8.onnx")
    assert np.abs(onnx_proba(fp32, pixels) - logits_of(model, pixels).softmax(1).numpy()).max() < 1e-4
    gated = (sure_of_square >= cut).numpy()
    # INT8: the base's softmax is taken in float from its dequantized logits, so images the base is
    # clearly sure (or clearly unsure) of are gated as in FP32: circle_red silenced on the first
    q = onnx_proba(int8, pixels)
    clear = np.abs(sure_of_square.numpy() - cut) > 0.05
    assert gated[clear].sum() >= 4 and (~gated[clear]).sum() >= 4
    assert ((q[:, 2] < 1e-3) == gated)[clear].all()
    nodes = onnx.load(str(int8)).graph.node
    gate = [n for n in nodes if "/parent_gate/" in n.name and n.op_type != "Where"]
    assert {"Softmax", "GreaterOrEqual"} <= {n.op_type for n in gate}
    inside = {o for n in gate for o in n.output}
    quantized = [n.name for n in nodes if n.op_type == "QuantizeLinear" and inside & set(n.input)]
    assert not quantized  # the softmax and the certainty it is compared with stay in float


def test_a_fine_tune_sets_the_gate_from_its_config(shapes, base, tmp_path):
    cfg = FineTuneConfig(new_classes=["triangle"], refines={"triangle": "circle"}, epochs=2, batch_size=16,
                         budget_s=120, parent_gate=0.9)
    r = fine_tune(base, shapes, cfg, tmp_path / "best.pt")
    rebuilt, state = load_checkpoint(r.checkpoint_path)
    assert state["model_meta"]["kwargs"]["parent_gate"] == 0.9
    assert rebuilt.parent_gate.parents == [OLD.index("circle")]
    pixels = val_pixels(shapes)
    gated = logits_of(rebuilt.eval(), pixels)
    rebuilt.set_parent_gate(0.0)
    ungated = logits_of(rebuilt, pixels)
    sure_square = gated[:, :2].softmax(1)[:, 1] >= 0.9
    assert 0 < sure_square.sum() < len(sure_square)
    assert torch.equal(gated[~sure_square], ungated[~sure_square])  # the gate moves nothing else
    # where the base is sure of a square, triangle is held under it (it may have been there already)
    assert torch.equal(gated[sure_square, 2],
                       torch.minimum(ungated[sure_square, 2], gated[sure_square, :2].amax(1) - GATED_MARGIN))
    with pytest.raises(SaofuError, match="parent_gate must be in"):
        fine_tune(base, shapes, FineTuneConfig(new_classes=["triangle"], parent_gate=2.0), tmp_path / "x.pt")
