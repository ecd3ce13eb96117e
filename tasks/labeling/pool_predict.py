"""An exported graph's class probabilities on image files (the online pool's, a dataset's val split).

Active learning runs only ONNX graphs, so this needs no torch: images are decoded with Pillow as
training and the serving app see them, and the champion may vote with test-time augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from saofu.errors import SaofuError
from saofu.pixels import to_rgb8
from tasks.labeling.pool import PoolImage
from tasks.labeling.tta import tta_probabilities_nhwc
from tasks.release.evaluation import onnx_classes, session, softmax
from tasks.train.onnx_interface import INPUT_NAME, OUTPUT_NAME


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = to_rgb8(ImageOps.exif_transpose(im))  # upright and scaled, as the serving app and training see it
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)  # as tasks.data.loading decodes training data
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise SaofuError(f"unreadable image: {path} ({exc.__class__.__name__})") from None


def predict_pool(
    onnx_path: str | Path, images: Sequence[PoolImage | str | Path], batch_size: int = 256, tta: bool = False,
) -> np.ndarray:
    """Class probabilities of an exported graph on pool images.

    Args:
        onnx_path: a graph from `tasks.train.export.export_onnx` (uint8 NHWC `pixels` in, `logits` out).
        images: pool images or image paths.
        batch_size: images decoded and run at once (bounds memory on a large pool).
        tta: average over the test-time augmented views (`tasks.labeling.tta`; 5x the inference).

    Returns:
        [N,C] float64 probabilities, columns in the graph's class order.
    """
    sess = session(onnx_path, threads=2)
    size = int(sess.get_modelmeta().custom_metadata_map.get("image_size", 64))
    paths = [Path(i.path if isinstance(i, PoolImage) else i) for i in images]
    out = [np.zeros((0, len(onnx_classes(sess))))]
    # PIL releases the GIL while decoding, so two threads keep both cores busy
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(paths), batch_size):
            pixels = np.stack(list(pool.map(lambda p: _decode(p, size), paths[start : start + batch_size])))
            if tta:
                out.append(tta_probabilities_nhwc(
                    lambda x: softmax(sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float64)), pixels))
            else:
                out.append(softmax(sess.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0].astype(np.float64)))
    return np.concatenate(out)
