"""Bad training input gets one clear answer before any epoch, and nothing partly stored.

Class folder names MLflow refuses in a key train and log; a class too small to split is named;
files Pillow cannot decode (bombs, truncated, odd headers) are left out and named, or the folder
is refused when they are more than a handful; 16-bit and float images keep their range; the
decoded-tensor cache never runs code when read and mends itself when it cannot be read.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from saofu.errors import SaofuError
from tasks.data import loading
from tasks.data.loading import prepare_dataset
from tests.conftest import make_shapes_dataset

SIZE = 16


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(ihdr: bytes) -> bytes:
    """A PNG of a header and no pixel data: what Pillow makes of it is decided by the header."""
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b""))
            + _png_chunk(b"IEND", b""))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_class_folders_mlflow_refuses_in_keys_train_and_log_under_safe_keys(saofu_home, tmp_path):
    from tasks.tracking import METRIC_NAME_TAG, tracking_uri
    from tasks.train.loop import TrainConfig
    from tasks.train.steps import evaluate_recognizer, export_recognizer, train_recognizer

    data = make_shapes_dataset(tmp_path / "ds", n_per_class=4, size=SIZE)
    (data / "circle").rename(data / "fu (red)")
    (data / "square").rename(data / "a+b")
    cfg = TrainConfig(model="saofu_fu_tiny", epochs=1, batch_size=8, image_size=SIZE, device="cpu")
    trained = train_recognizer.fn(str(data), cfg, str(tmp_path / "run"), "odd-class-names")
    exported = export_recognizer.fn(trained.checkpoint, str(tmp_path / "run" / "model.onnx"))
    report = evaluate_recognizer.fn(exported.onnx_path, str(data), str(tmp_path / "run" / "eval.json"), SIZE,
                                    negative_class=None, run_id=trained.run_id)

    assert trained.classes == ["a+b", "fu (red)", "triangle"]  # the real names are the class map
    run = MlflowClient(tracking_uri=tracking_uri()).get_run(trained.run_id)
    real_names = {value: key.removeprefix(METRIC_NAME_TAG) for key, value in run.data.tags.items()
                  if key.startswith(METRIC_NAME_TAG)}
    for cls in ("a+b", "fu (red)"):
        for kind in ("recall", "precision"):
            name = f"onnx_val_{kind}_{cls}"
            key = real_names[name]  # logged under another key, the real name beside it
            assert run.data.metrics[key] == report["per_class"][cls][kind]
    assert run.data.metrics["onnx_val_recall_triangle"] == report["per_class"]["triangle"]["recall"]
    assert len(real_names) == 4  # only the refused names were renamed


@pytest.mark.timeout(30)
def test_one_image_per_class_is_named_with_the_minimum_before_decoding(tmp_path, monkeypatch, capsys):
    data = make_shapes_dataset(tmp_path / "ds", n_per_class=1, size=SIZE)
    cache = tmp_path / "cache"

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("decoded a dataset that cannot be split")

    with monkeypatch.context() as patched:
        patched.setattr(loading, "_decode", no_decoding)
        with pytest.raises(SaofuError, match="nothing to validate on") as err:
            prepare_dataset(data, SIZE, cache_dir=cache)
    assert all(f"'{cls}' (1 image)" in str(err.value) for cls in ("circle", "square", "triangle"))
    assert "at least 2 images" in str(err.value)
    assert not cache.exists()  # nothing stored

    # One class that can be split is enough: the others are trained on and named as not validated.
    for extra in range(2):
        (data / "square" / f"extra{extra}.png").write_bytes((data / "square" / "0000.png").read_bytes())
    prepared = prepare_dataset(data, SIZE)
    assert prepared.val.labels.tolist() == [prepared.classes.index("square")]
    assert len(prepared.train) == 4
    assert "not validated" in capsys.readouterr().out


@pytest.mark.timeout(30)
def test_undecodable_images_are_left_out_and_named_and_the_dataset_is_untouched(tmp_path, capsys):
    data = make_shapes_dataset(tmp_path / "ds", n_per_class=4, size=SIZE)
    good = (data / "circle" / "0000.png").read_bytes()
    bad = {
        # 10^10 pixels announced: Pillow's DecompressionBombError
        "circle/bomb.png": _png(struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)),
        # between once and twice Pillow's limit: only a warning from Pillow, refused all the same
        "square/big.png": _png(struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0)),
        "square/truncated.png": good[: len(good) // 2],
        "triangle/odd_header.png": _png(struct.pack(">I", SIZE)),  # Pillow: ValueError, Truncated IHDR chunk
    }
    for name, content in bad.items():
        (data / name).write_bytes(content)
    before = _snapshot(data)

    for _ in range(2):  # decoded, then from the cache: named both times
        prepared = prepare_dataset(data, SIZE, cache_dir=tmp_path / "cache")
        printed = capsys.readouterr().out
        assert sorted(Path(p).relative_to(data).as_posix() for p, _ in prepared.unreadable) == sorted(bad)
        assert all(name in printed for name in bad)
        assert len(prepared.train) + len(prepared.val) == 12  # every readable image, no other
        assert not {str(data / name) for name in bad} & set(prepared.train.paths + prepared.val.paths)
    reasons = dict(prepared.unreadable)
    assert "DecompressionBomb" in reasons[str(data / "circle/bomb.png")]
    assert "DecompressionBomb" in reasons[str(data / "square/big.png")]
    assert "ValueError" in reasons[str(data / "triangle/odd_header.png")]
    assert _snapshot(data) == before  # nothing written into the dataset


@pytest.mark.timeout(30)
def test_more_than_a_handful_of_undecodable_images_refuses_the_folder_naming_them(tmp_path):
    data = make_shapes_dataset(tmp_path / "ds", n_per_class=4, size=SIZE)
    for i in range(loading.MAX_UNREADABLE + 1):
        (data / "square" / f"not_an_image_{i}.png").write_text("saved from a web page")
    with pytest.raises(SaofuError, match=f"{loading.MAX_UNREADABLE + 1} of 18 images .* cannot be decoded") as err:
        prepare_dataset(data, SIZE, cache_dir=tmp_path / "cache")
    assert all(f"not_an_image_{i}.png" in str(err.value) for i in range(loading.MAX_UNREADABLE + 1))
    assert not (tmp_path / "cache").exists()


def _gradient(mode: str) -> tuple[Image.Image, str]:
    ramp = np.tile(np.linspace(0.0, 1.0, SIZE), (SIZE, 1))
    if mode == "I;16":  # 16-bit PNG, the full 0..65535 range
        return Image.fromarray((ramp * 65535).astype(np.uint16)), "png"
    if mode == "I":  # 32-bit integer TIFF holding 16-bit values
        return Image.fromarray((ramp * 65535).astype(np.int32)), "tif"
    if mode == "F":  # float TIFF in [0, 1]
        return Image.fromarray(ramp.astype(np.float32)), "tif"
    return Image.fromarray((ramp * 10 - 3).astype(np.float32)), "tif"  # "F wide": float with no convention


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "F wide"])
@pytest.mark.timeout(30)
def test_16_bit_and_float_images_keep_their_gradient(tmp_path, mode):
    data = make_shapes_dataset(tmp_path / "ds", n_per_class=3, size=SIZE)
    image, suffix = _gradient(mode)
    path = data / "circle" / f"gradient.{suffix}"
    image.save(path)
    assert Image.open(path).mode == mode.split()[0]  # the file really holds that mode

    prepared = prepare_dataset(data, SIZE, val_share=0.5)
    split = next(s for s in (prepared.train, prepared.val) if str(path) in s.paths)
    pixels = split.images[split.paths.index(str(path))]
    row = pixels[0, SIZE // 2].tolist()
    assert row == sorted(row) and row[0] <= 1 and row[-1] >= 254  # the whole range, in order
    assert len(set(row)) == SIZE  # every step of the gradient kept
    assert torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[0], pixels[2])  # grey stays grey


@pytest.mark.timeout(30)
def test_a_16_bit_image_is_trained_on_the_pixels_it_is_served_with(tmp_path):
    """Scaled by one rule in both places: a dark 16-bit scan stays dark in training and serving."""
    from deploy.decoding import decode_image

    dark = (np.tile(np.linspace(0.0, 0.25, SIZE), (SIZE, 1)) * 65535).astype(np.uint16)
    path = tmp_path / "dark.png"
    Image.fromarray(dark).save(path)

    trained = loading._decode(path, SIZE)
    served, _ = decode_image(path.read_bytes(), SIZE, max_pixels=SIZE * SIZE)
    assert np.array_equal(trained, served[0])
    assert trained.max() <= 65  # a quarter of the range stays a quarter: not stretched to white


class _RunsCodeWhenLoaded:
    """A pickled object whose loading creates a file: what an unsafe load would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("content", ["runs_code", "damaged"])
@pytest.mark.timeout(30)
def test_a_cache_file_that_is_unsafe_or_damaged_is_not_run_but_decoded_again(tmp_path, content, capsys):
    data = make_shapes_dataset(tmp_path / "ds", n_per_class=3, size=SIZE)
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = cache / f"{loading.fingerprint_dataset(data, SIZE, 0.15, 0)}.v{loading.CACHE_FORMAT}.pt"
    marker = tmp_path / "code_ran"
    if content == "runs_code":
        torch.save({"format": loading.CACHE_FORMAT, "splits": _RunsCodeWhenLoaded(marker)}, entry)
    else:
        entry.write_bytes(b"PK\x03\x04 half a zip file")

    prepared = prepare_dataset(data, SIZE, cache_dir=cache)
    assert not marker.exists()
    assert f"cache {entry} cannot be read" in capsys.readouterr().out
    fresh = prepare_dataset(data, SIZE)
    assert torch.equal(prepared.train.images, fresh.train.images) and prepared.val.paths == fresh.val.paths
    assert torch.load(entry, weights_only=True)["format"] == loading.CACHE_FORMAT  # replaced by a safe entry


@pytest.mark.timeout(30)
def test_a_checkpoint_that_would_run_code_is_refused_not_loaded(tmp_path):
    """Checkpoints travel as MLflow artefacts: reading one must never run what it carries."""
    from tasks.train.loop import checkpoint_arch, load_checkpoint

    marker = tmp_path / "code_ran"
    crafted = tmp_path / "best.pt"
    torch.save({"model": {}, "model_meta": {"arch": "saofu_fu"}, "payload": _RunsCodeWhenLoaded(marker)}, crafted)

    for read in (load_checkpoint, checkpoint_arch):
        with pytest.raises(SaofuError, match="could run code"):
            read(crafted)
    assert not marker.exists()
