"""Structured channel pruning: really smaller, sliced correctly, rebuildable, recoverable by a fine-tune."""

from __future__ import annotations

import copy

import pytest
import torch

from models import build_from_checkpoint_meta, count_flops, count_params, create_model, model_meta
from models.arch import BlockArgs, decode_block, encode_block, make_divisible
from models.blocks import InvertedResidual
from saofu.errors import SaofuError
from tasks.data.loading import prepare_dataset
from tasks.release.pruning import HEAD, channel_importance, expansion_for, fine_tune, kept_channels, prune_recognizer
from tasks.train.export import export_onnx
from tasks.train.loop import TrainConfig, evaluate, fit, load_checkpoint, save_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(shapes_dir):
    data = prepare_dataset(shapes_dir, image_size=32, val_share=0.2)
    cfg = TrainConfig(model="saofu_fu_tiny", epochs=20, batch_size=32, image_size=32)
    return data, cfg, fit(cfg, data.train, data.val).model


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_pruned_model_has_fewer_params_and_flops_and_a_smaller_onnx_file(tmp_path):
    model = create_model("saofu_fu", num_classes=2)
    pruned = prune_recognizer(model, 0.5)
    assert count_params(pruned) < 0.65 * count_params(model)
    assert count_flops(pruned) < 0.7 * count_flops(model)
    big = export_onnx(model, ["fu", "not_fu"], tmp_path / "full.onnx")
    small = export_onnx(pruned, ["fu", "not_fu"], tmp_path / "pruned.onnx")
    assert small.stat().st_size < 0.7 * big.stat().st_size
    # Only hidden and head channels go: input, output and stem widths stay.
    assert pruned.arch_string.startswith("stem16|ds_r1_k3_s1_c16|")
    assert pruned.num_features == 64


def test_amount_zero_keeps_every_channel_and_the_outputs(trained):
    data, _, model = trained
    pruned = prune_recognizer(model, 0.0)
    assert pruned.arch_string == model.arch_string
    kept, trained_weights = pruned.state_dict(), model.state_dict()
    assert kept.keys() == trained_weights.keys()
    assert all(torch.equal(kept[k], trained_weights[k]) for k in kept)  # every weight, value for value
    x = torch.randn(8, 3, 32, 32)
    # to float rounding: `fit` trains channels-last on the CPU (`loop.place`), the pruned copy is NCHW
    assert torch.allclose(_logits(pruned, x), _logits(model, x), atol=1e-5)


@pytest.mark.parametrize("with_examples", [False, True], ids=["bn-scale", "activations"])
def test_pruning_only_dead_channels_keeps_the_outputs(trained, with_examples):
    """Channels the next layer ignores are ranked last and removed; the logits must not move."""
    data, _, model = trained
    model = copy.deepcopy(model)
    widths = prune_recognizer(model, 0.5)  # only to learn the kept widths
    gen = torch.Generator().manual_seed(0)
    live = {}
    prunable = set(channel_importance(model)) - {HEAD}
    with torch.no_grad():
        for name in sorted(prunable):
            block = model.get_submodule(name)
            hidden, keep = block.conv_dw[0].out_channels, widths.get_submodule(name).conv_dw[0].out_channels
            assert keep < hidden
            live[name] = torch.randperm(hidden, generator=gen)[:keep].sort().values
            dead = torch.ones(hidden, dtype=torch.bool)
            dead[live[name]] = False
            block.conv_pwl[0].weight[:, dead] = 0
            if hasattr(block.se, "conv_reduce"):
                block.se.conv_reduce.weight[:, dead] = 0
        live[HEAD] = torch.randperm(model.num_features, generator=gen)[: widths.num_features].sort().values
        dead = torch.ones(model.num_features, dtype=torch.bool)
        dead[live[HEAD]] = False
        model.classifier.weight[:, dead] = 0

    examples = data.train if with_examples else None
    importance = channel_importance(model, examples)
    assert {name: kept_channels(imp, len(live[name])).tolist() for name, imp in importance.items()} == {
        name: idx.tolist() for name, idx in live.items()}
    pruned = prune_recognizer(model, 0.5, examples, recalibrate_bn=False)
    x = torch.randn(8, 3, 32, 32)
    torch.testing.assert_close(_logits(pruned, x), _logits(model, x), atol=1e-5, rtol=1e-5)


def test_pruned_checkpoint_rebuilds_with_identical_outputs(tmp_path, trained):
    data, cfg, model = trained
    pruned = prune_recognizer(model, 0.5, data.train)
    rebuilt = build_from_checkpoint_meta(model_meta(pruned))
    rebuilt.load_state_dict(pruned.state_dict())
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(_logits(rebuilt, x), _logits(pruned, x))
    # Through a real checkpoint file too.
    save_checkpoint(tmp_path / "pruned.pt", pruned, None, None, 0, cfg, data.classes, [], 0.0)
    loaded, _ = load_checkpoint(tmp_path / "pruned.pt")
    assert loaded.arch_string == pruned.arch_string
    assert torch.equal(_logits(loaded, x), _logits(pruned, x))


def test_width_multiplier_is_baked_into_the_pruned_architecture():
    model = create_model("saofu_fu_tiny", num_classes=3, width_mult=1.5)
    pruned = prune_recognizer(model, 0.25)
    assert "width_mult" not in model_meta(pruned)["kwargs"]
    rebuilt = build_from_checkpoint_meta(model_meta(pruned))
    rebuilt.load_state_dict(pruned.state_dict())  # same shapes everywhere
    assert rebuilt.stem[0].out_channels == model.stem[0].out_channels


def test_fine_tune_brings_accuracy_back_near_the_original(trained):
    data, cfg, model = trained
    original = evaluate(model, data.val, CPU)["val_accuracy"]
    pruned = prune_recognizer(model, 0.5, data.train)
    assert count_params(pruned) < 0.65 * count_params(model)
    result = fine_tune(pruned, data.train, data.val, epochs=4, lr=2e-3, cfg=cfg)
    tuned = evaluate(result.model, data.val, CPU)["val_accuracy"]
    print(f"val accuracy: original {original:.3f}, pruned by half and fine-tuned {tuned:.3f}")
    assert original >= 0.85
    assert tuned >= original - 0.1  # 36 val images: 0.1 is under 4 of them
    assert len(result.history) == 4 and result.model is pruned


def test_expansion_ratio_round_trips_through_the_block_string():
    for in_chs in range(8, 97, 4):
        for hidden in range(make_divisible(in_chs), 6 * in_chs + 1, 8):
            e = expansion_for(in_chs, hidden)
            args = decode_block(encode_block(BlockArgs("ir", 1, 3, 1, 24, expansion=e)))
            block = InvertedResidual(in_chs, 24, expansion=args.expansion)
            assert block.conv_dw[0].out_channels == hidden, (in_chs, hidden, e)
            assert len(str(e)) <= 5, e  # short enough to read


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_amount_is_refused(amount):
    with pytest.raises(SaofuError, match="pruning amount"):
        prune_recognizer(create_model("saofu_fu_tiny", num_classes=2), amount)


def test_bad_inputs_are_refused(trained):
    data, _, model = trained
    with pytest.raises(SaofuError, match="saofu Recognizer"):
        prune_recognizer(create_model("mobilenet_v3_small_050", num_classes=2), 0.5)
    with pytest.raises(SaofuError, match="epochs"):
        fine_tune(copy.deepcopy(model), data.train, data.val, epochs=0)
    with pytest.raises(SaofuError, match="2 classes"):
        fine_tune(create_model("saofu_fu_tiny", num_classes=2), data.train, data.val, epochs=1)
