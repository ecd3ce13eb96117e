"""Training as plain functions: learns, is seeded, checkpoints and resumes."""

from __future__ import annotations

import pytest
import torch

from models import create_model
from saofu.errors import SaofuError
from tasks.data.loading import TensorSplit, prepare_dataset
from tasks.train.loop import TrainConfig, augment, fit, load_checkpoint, place, predict_proba

TINY = dict(model="saofu_fu_tiny", epochs=10, batch_size=32, lr=1e-2, image_size=32)


@pytest.fixture(scope="module")
def shapes(shapes_dir):
    return prepare_dataset(shapes_dir, image_size=32, val_share=0.2)


def test_tiny_training_is_clearly_above_chance(shapes):
    seen = []
    result = fit(TrainConfig(**TINY), shapes.train, shapes.val, on_epoch=lambda e, m: seen.append(e))
    assert seen == list(range(1, 11))
    assert result.history[-1]["val_accuracy"] >= 0.7  # chance is 1/3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_same_seed_same_model(shapes):
    cfg = TrainConfig(**{**TINY, "epochs": 2})
    a = fit(cfg, shapes.train, shapes.val).model.state_dict()
    b = fit(cfg, shapes.train, shapes.val).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Killed(Exception):
    """Stands for the process dying between epochs."""


def _kill_after(n):
    def on_epoch(epoch, metrics):
        if epoch == n:
            raise _Killed

    return on_epoch


def test_resume_continues_to_the_same_weights_as_an_uninterrupted_run(shapes, tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 4})
    full = fit(cfg, shapes.train, shapes.val, tmp_path / "full.pt")
    ckpt = tmp_path / "killed.pt"
    with pytest.raises(_Killed):
        fit(cfg, shapes.train, shapes.val, ckpt, on_epoch=_kill_after(2))
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2
    resumed = fit(cfg, shapes.train, shapes.val, ckpt, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_checkpoint_alone_rebuilds_the_model(shapes, tmp_path):
    result = fit(TrainConfig(**{**TINY, "epochs": 2}), shapes.train, shapes.val, tmp_path / "c.pt")
    model, state = load_checkpoint(tmp_path / "c.pt")
    assert state["classes"] == shapes.classes
    assert state["config"]["model"] == "saofu_fu_tiny"
    cpu = torch.device("cpu")
    assert torch.allclose(predict_proba(model, shapes.val, cpu), predict_proba(result.model, shapes.val, cpu))


def test_on_the_cpu_training_runs_channels_last_and_answers_as_the_same_weights_in_nchw(shapes):
    # `place` only changes the layout; the checkpoint test above loads its weights back into NCHW
    cpu = torch.device("cpu")
    result = fit(TrainConfig(**{**TINY, "epochs": 1}), shapes.train, shapes.val)
    convs = [p for p in result.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    torch.manual_seed(0)
    nchw = create_model("saofu_fu_tiny", 3).eval()
    weights = {k: v.clone() for k, v in nchw.state_dict().items()}
    placed = place(create_model("saofu_fu_tiny", 3), cpu).eval()
    placed.load_state_dict(weights)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in placed.parameters() if p.dim() == 4)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in nchw.parameters() if p.dim() == 4)
    assert torch.allclose(predict_proba(placed, shapes.val, cpu), predict_proba(nchw, shapes.val, cpu), atol=1e-5)


def test_augment_keeps_shape_and_range_and_is_seeded():
    x = torch.rand(8, 3, 32, 32)
    a = augment(x, 0.8, torch.Generator().manual_seed(1))
    b = augment(x, 0.8, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
    assert torch.equal(augment(x, 0.0, torch.Generator()), x)


def test_bad_config_is_a_clear_error(shapes):
    with pytest.raises(SaofuError, match="epochs"):
        fit(TrainConfig(**{**TINY, "epochs": 0}), shapes.train, shapes.val)
    with pytest.raises(SaofuError, match="unknown model 'nope'|nope"):
        fit(TrainConfig(**{**TINY, "model": "nope"}), shapes.train, shapes.val)
    with pytest.raises(SaofuError, match="checkpoint not found"):
        load_checkpoint("/nonexistent/c.pt")


def test_whole_split_inference_runs_saofu_recognisers_in_small_batches_on_the_cpu(monkeypatch):
    import tasks.train.loop as loop
    from models.expand import expand_recognizer

    cpu = torch.device("cpu")
    saofu = create_model("saofu_fu_tiny", 2)
    expanded = expand_recognizer(create_model("saofu_fu_tiny", 2).eval(), ["a", "b"], ["c"])
    assert loop.inference_batch(saofu, cpu) == loop.inference_batch(expanded, cpu) == loop.SAOFU_INFERENCE_BATCH
    assert loop.inference_batch(create_model("mobilenet_v3_small_050", 2), cpu) == loop.OTHER_INFERENCE_BATCH
    assert loop.inference_batch(saofu, torch.device("cuda")) == loop.OTHER_INFERENCE_BATCH  # measured on CPUs only
    sizes = []
    real = loop.iterate_batches
    monkeypatch.setattr(loop, "iterate_batches", lambda split, n, **kw: (sizes.append(n), real(split, n, **kw))[1])
    split = TensorSplit(torch.zeros(130, 3, 32, 32, dtype=torch.uint8), torch.zeros(130, dtype=torch.int64),
                        ["a", "b"], [])
    assert loop.predict_proba(saofu, split, cpu).shape == (130, 2)
    assert loop.predict_proba(saofu, split, cpu, batch_size=7).shape == (130, 2)
    assert sizes == [loop.SAOFU_INFERENCE_BATCH, 7]
