"""One ONNX graph ready to answer: loaded, checked against its class map, warmed up.

`load_model` opens a graph exported by tasks.train.export.export_onnx (uint8 [N,H,W,3] pixels in,
probabilities out, the class map and refinements in its metadata) and refuses, before it can
answer, a graph whose warm-up output is not one probability per listed class. `LoadedModel` and
`ModelSet` are immutable: deploy.model_source swaps whole sets.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from saofu.errors import SaofuError

CHAMPION = "champion"
CHALLENGER = "challenger"
# The largest input side a graph may declare: the warm-up (and every request) allocates size^2 x 3
# pixels, and a graph's metadata is as untrusted as its weights.
MAX_IMAGE_SIZE = 2048


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """One registered version, ready to run: its session and what its metadata says.

    The graph is `tasks.train.export.export_onnx`'s: uint8 NHWC RGB `pixels` in, `logits` out, class
    names (JSON) and input size in the ONNX metadata, and optionally `refines` (JSON: new class ->
    the class it refines, e.g. `{"fu_merchant": "fu"}`; {} without it), which the canary uses to
    compare a challenger with a champion that lacks the new class. Names are read from the session
    rather than imported from tasks.train.export, which would pull in torch.
    """

    name: str
    version: str
    session: ort.InferenceSession
    classes: tuple[str, ...]
    image_size: int
    input_name: str
    output_name: str
    path: str
    refines: Mapping[str, str] = field(default_factory=dict)

    @property
    def model_version(self) -> str:
        """`name:version`, as active learning and the manifests name a model."""
        return f"{self.name}:{self.version}"

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Softmax of the graph's logits for uint8 pixels [N,H,W,3] -> float [N,C]."""
        logits = self.session.run([self.output_name], {self.input_name: pixels})[0]
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class ModelSet:
    """What is served right now: the champion, and the challenger when one is set and differs."""

    champion: LoadedModel
    challenger: LoadedModel | None = None
    generation: int = 1  # +1 on every swap

    def versions(self) -> dict[str, str | None]:
        return {
            CHAMPION: self.champion.version,
            CHALLENGER: self.challenger.version if self.challenger else None,
        }


def parse_refines(text: str | None, where: str) -> dict[str, str]:
    """The `refines` metadata entry: JSON {class: the class it refines}; {} when absent or empty.

    (`tasks.release.evaluation.refines_from_metadata` reads the same entry; the app imports no `tasks`.)

    Raises:
        SaofuError: not a JSON object mapping class names to other class names (named by `where`).
    """
    if not text:
        return {}
    try:
        refines = json.loads(text)
    except json.JSONDecodeError:
        refines = None
    if not isinstance(refines, dict) or not all(isinstance(k, str) and isinstance(v, str) and k != v
                                                for k, v in refines.items()):
        raise SaofuError(f"{where}: its `refines` metadata must be a JSON object mapping a class to the class it "
                         f"refines, got {text[:80]!r}")
    return refines


def build_session(onnx_path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session on `threads` intra-op threads (1: the request is the unit of parallelism)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # onnxruntime's own warnings would go to stderr on every load
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def load_model(onnx_path: str | Path, name: str, version: str, threads: int = 1) -> LoadedModel:
    """Open an exported graph, check its interface, and run it once (first runs allocate).

    Raises:
        SaofuError: no such file, a graph onnxruntime cannot open, no class map in the metadata
            (or one whose length is not the number of logits the warm-up run gives), a malformed
            `refines` or `image_size` entry, or not the uint8 NHWC interface.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise SaofuError(f"{name} version {version}: ONNX model not found at {path}")
    try:
        sess = build_session(path, threads)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a damaged graph
        raise SaofuError(f"{name} version {version}: onnxruntime cannot open {path} (a damaged or partial "
                         f"upload?): {_short(exc)}") from None
    meta = sess.get_modelmeta().custom_metadata_map
    if "classes" not in meta:
        raise SaofuError(f"{name} version {version} ({path}) has no class map in its ONNX metadata: "
                         "export it with tasks.train.export.export_onnx")
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    if inp.type != "tensor(uint8)" or len(inp.shape) != 4 or inp.shape[3] != 3:
        raise SaofuError(f"{name} version {version} takes {inp.type} {inp.shape}; the serving app needs "
                         "uint8 [N,H,W,3] pixels (tasks.train.export.export_onnx's interface)")
    size = parse_image_size(meta.get("image_size"), inp.shape, f"{name} version {version} ({path})")
    model = LoadedModel(
        name=name, version=str(version), session=sess, classes=parse_classes(meta["classes"], f"{name} version "
                                                                             f"{version} ({path})"),
        image_size=size, input_name=inp.name, output_name=out.name, path=str(path),
        refines=parse_refines(meta.get("refines"), f"{name} version {version} ({path})"),
    )
    # The warm-up run is also the check: what a request will get is what is compared here.
    probs = model.probabilities(np.zeros((1, size, size, 3), np.uint8))
    if probs.ndim != 2 or probs.shape[0] != 1:
        raise SaofuError(f"{name} version {version} ({path}) outputs shape {list(probs.shape)} for one image; the "
                         "serving app needs [N, classes] logits")
    width = probs.shape[1]
    if width != len(model.classes):
        # A class-count change (2 -> 3 classes) must come with its own class list, or every answer
        # would name the wrong class (or none: an index past the list is a 500): refuse the
        # version, the app keeps serving what it has.
        raise SaofuError(f"{name} version {version} ({path}) outputs {width} logits but its metadata lists "
                         f"{len(model.classes)} classes {list(model.classes)}")
    if not np.isfinite(probs).all():
        raise SaofuError(f"{name} version {version} ({path}) outputs NaN or infinite logits for a blank image")
    return model


def parse_image_size(text: str | None, input_shape: list, where: str) -> int:
    """The input side from the `image_size` metadata entry, checked against the graph's own input shape.

    Without the entry: the graph's static height, else 64.

    Raises:
        SaofuError: not a whole number in 1..MAX_IMAGE_SIZE, or not the side the graph's input declares.
    """
    height, width = input_shape[1], input_shape[2]
    static = (height, width) if isinstance(height, int) and isinstance(width, int) else None
    if text is None:
        return static[0] if static else 64
    try:
        size = int(text)
    except ValueError:
        raise SaofuError(f"{where}: its `image_size` metadata must be a whole number of pixels, got "
                         f"{text[:40]!r}") from None
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise SaofuError(f"{where}: its `image_size` metadata is {size}; a served model takes 1..{MAX_IMAGE_SIZE} "
                         "pixels a side")
    if static is not None and static != (size, size):
        raise SaofuError(f"{where}: its `image_size` metadata says {size} but its graph takes {height}x{width} "
                         "pixels")
    return size


def parse_classes(text: str, where: str) -> tuple[str, ...]:
    """The `classes` metadata entry: a JSON list of distinct, non-empty class names.

    Raises:
        SaofuError: anything else (a JSON string would otherwise be read as one class per letter).
    """
    try:
        classes = json.loads(text)
    except json.JSONDecodeError:
        classes = None
    if (not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes)
            or len(set(classes)) != len(classes)):
        raise SaofuError(f"{where}: its `classes` metadata must be a JSON list of distinct class names, got "
                         f"{text[:80]!r}")
    return tuple(classes)


def _short(exc: BaseException, limit: int = 400) -> str:
    text = str(exc) or exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
