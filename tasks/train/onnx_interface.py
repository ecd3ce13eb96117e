"""The exported graph's interface, readable without torch: its input and output names, its metadata.

Every shipped graph takes raw uint8 NHWC `pixels` and returns `logits` (`tasks.train.export` writes
it); evaluation, active learning and the serving app only read graphs, so they import this, not the
exporter (which needs torch).
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an exported graph (classes is JSON)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map)
