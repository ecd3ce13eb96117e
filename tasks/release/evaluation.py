"""Evaluation of the shipped artefact: accuracy at a confidence threshold and onnxruntime latency.

The campaign's measure is image-level at a threshold: a prediction counts only when the model's
top probability reaches it (default 0.9). Below it the app does not accept the scan: the
decision falls back to the negative class when the dataset has one (`not_fu` in the Fu world),
and otherwise is an abstention, which counts as wrong.

A model need not know every class of the images it is evaluated on: after a fast retrain added
`fu_merchant`, the champion is still evaluated on a slice with merchant images
(`predict_on_classes`). Its probabilities are laid out over the slice's classes plus its own, with
0 for a class it lacks, so it never decides one: those images count wrong, and callers say which
classes it lacked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from saofu.errors import SaofuError
from saofu.refines import refinement_roots
from tasks.train.onnx_interface import INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:  # annotations only: evaluating a graph needs onnxruntime, not torch
    from tasks.data.loading import TensorSplit

ABSTAIN = -1


@dataclass
class ClassMetrics:
    precision: float
    recall: float
    support: int


@dataclass
class EvalReport:
    accuracy: float  # top-1, no threshold
    accuracy_at_threshold: float
    threshold: float
    negative_class: str | None
    abstained: float  # share of images under the threshold
    per_class: dict[str, ClassMetrics]
    confusion: list[list[int]]  # rows: truth, columns: decision (last column: abstain)
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def session(onnx_path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session pinned to `threads` threads (1 = the phone-like setting)."""
    if not Path(onnx_path).is_file():
        raise SaofuError(f"ONNX model not found: {onnx_path}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def onnx_classes(sess: ort.InferenceSession) -> list[str]:
    return json.loads(sess.get_modelmeta().custom_metadata_map["classes"])


def refines_from_metadata(meta: Mapping[str, str]) -> dict[str, str]:
    """The graph's optional `refines` metadata: JSON {new class: the class it refines}; {} without it.

    A fast retrain that adds `fu_merchant` (a merchant's own 福, which an older model calls `fu`)
    records `{"fu_merchant": "fu"}`, so that comparisons with a model lacking the new class know
    which of its answers is the expected one.

    Raises:
        SaofuError: the entry is not a JSON object of class names, or a class refines itself.
    """
    text = meta.get("refines")
    if not text:
        return {}
    try:
        refines = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SaofuError(f"the graph's `refines` metadata is not JSON ({exc}): {text[:80]!r}") from None
    if not isinstance(refines, dict) or not all(isinstance(k, str) and isinstance(v, str) and k != v
                                                for k, v in refines.items()):
        raise SaofuError(f"the graph's `refines` metadata must map class names to other class names, got {text[:80]!r}")
    return refines


def onnx_refines(sess: ort.InferenceSession) -> dict[str, str]:
    return refines_from_metadata(sess.get_modelmeta().custom_metadata_map)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def graph_image_size(sess: ort.InferenceSession) -> tuple[int, int] | None:
    """The (height, width) the graph's NHWC `pixels` input is fixed to, or None when not fixed."""
    shape = sess.get_inputs()[0].shape
    if len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[2], int):
        return shape[1], shape[2]
    return None


def _pixels_at(split: TensorSplit, size: tuple[int, int] | None) -> np.ndarray:
    """The split's images as NHWC uint8 at `size` (height, width): as decoded, or decoded again at that size.

    Two models of different input sizes are judged on the same sets (a release after a search that
    chose another resolution than the champion's): each sees the images decoded from their files at
    its own size, as the serving app decodes a request for the model it runs. A split whose files
    are gone is resized from its decoded pixels instead.
    """
    pixels = split.images.permute(0, 2, 3, 1).contiguous().numpy()
    if size is None or tuple(pixels.shape[1:3]) == tuple(size):
        return pixels
    from PIL import Image

    height, width = size
    if height == width and len(split.paths) == len(pixels) and all(Path(p).is_file() for p in split.paths):
        from tasks.data.loading import _decode  # decoded as training and serving decode (square inputs)

        return np.stack([_decode(Path(p), height) for p in split.paths])
    return np.stack([np.asarray(Image.fromarray(px).resize((width, height), Image.BILINEAR)) for px in pixels])


def onnx_predict_proba(sess: ort.InferenceSession, split: TensorSplit, batch_size: int = 256) -> np.ndarray:
    """Probabilities [N,C] of an ONNX recogniser on a decoded split (at the graph's input size, see `_pixels_at`)."""
    pixels = _pixels_at(split, graph_image_size(sess))
    out = [
        sess.run([OUTPUT_NAME], {INPUT_NAME: pixels[i : i + batch_size]})[0]
        for i in range(0, len(pixels), batch_size)
    ]
    return softmax(np.concatenate(out).astype(np.float64))


def decide(probs: np.ndarray, threshold: float, negative_index: int | None,
           roots: Sequence[int] | None = None) -> np.ndarray:
    """Top class where its probability reaches `threshold`, else the negative class or ABSTAIN.

    With `roots` (`saofu.refines.refinement_roots`: a model whose classes refine others), a top
    class under the threshold whose refinement group reaches it together decides the group's root
    (`saofu.refines.refined_decision`, what the serving app answers).
    """
    top = probs.argmax(1)
    fallback = ABSTAIN if negative_index is None else negative_index
    decided = np.where(probs.max(1) >= threshold, top, fallback)
    if roots is not None and len(set(roots)) < len(roots):
        roots_arr = np.asarray(roots)
        group = (probs * (roots_arr[None, :] == roots_arr[top][:, None])).sum(1)
        unsure = probs.max(1) < threshold
        decided = np.where(unsure & (group >= threshold), roots_arr[top], decided)
    return decided


def threshold_report(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], threshold: float = 0.9,
    negative_class: str | None = None, refines: Mapping[str, str] | None = None,
) -> EvalReport:
    """Accuracy, per-class precision/recall and confusion at a confidence threshold.

    Args:
        probs: [N,C] class probabilities.
        labels: [N] true class indices.
        classes: class names in column order.
        threshold: minimum top probability for a prediction to count.
        negative_class: class that low-confidence predictions fall back to (None: abstain).
        refines: the model's refinements (`decide`'s groups); None: none.
    """
    if not 0.0 <= threshold <= 1.0:
        raise SaofuError(f"threshold must be in [0, 1], got {threshold}")
    if negative_class is not None and negative_class not in classes:
        raise SaofuError(f"negative class {negative_class!r} is not one of the classes {classes}")
    neg = classes.index(negative_class) if negative_class is not None else None
    decisions = decide(probs, threshold, neg, refinement_roots(classes, refines) if refines else None)
    k = len(classes)
    confusion = np.zeros((k, k + 1), dtype=np.int64)
    for truth, d in zip(labels, decisions):
        confusion[truth, d if d != ABSTAIN else k] += 1
    per_class = {}
    for c, name in enumerate(classes):
        tp = confusion[c, c]
        predicted = confusion[:, c].sum()
        support = confusion[c].sum()
        per_class[name] = ClassMetrics(
            precision=float(tp / predicted) if predicted else 0.0,
            recall=float(tp / support) if support else 0.0,
            support=int(support),
        )
    return EvalReport(
        accuracy=float((probs.argmax(1) == labels).mean()),
        accuracy_at_threshold=float((decisions == labels).mean()),
        threshold=threshold,
        negative_class=negative_class,
        abstained=float((probs.max(1) < threshold).mean()),
        per_class=per_class,
        confusion=confusion.tolist(),
        n=len(labels),
    )


def predict_split(onnx_path: str | Path, split: TensorSplit) -> np.ndarray:
    """Probabilities [N,C] of an exported graph on a decoded split (class maps must match)."""
    sess = session(onnx_path, threads=2)
    classes = onnx_classes(sess)
    if classes != split.classes:
        raise SaofuError(f"model classes {classes} differ from the data's classes {split.classes}")
    return onnx_predict_proba(sess, split)


def evaluation_classes(data_classes: Sequence[str], model_classes: Sequence[str]) -> list[str]:
    """What an evaluation counts over: the data's classes (so labels index them), then the model's others."""
    return list(data_classes) + [c for c in model_classes if c not in data_classes]


def align_probs(probs: np.ndarray, model_classes: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """[N, len(classes)]: each class's probability under the model, 0 for a class it lacks.

    A softmax is never 0, so a lacked class is never the top class nor reaches a threshold.
    """
    out = np.zeros((len(probs), len(classes)), dtype=probs.dtype)
    index = {c: i for i, c in enumerate(classes)}
    for j, cls in enumerate(model_classes):
        out[:, index[cls]] = probs[:, j]
    return out


def predict_on_classes(onnx_path: str | Path, split: TensorSplit) -> tuple[np.ndarray, list[str], list[str]]:
    """Probabilities of a graph on a split whose classes may differ from the model's.

    Returns:
        (probs [N, len(classes)] laid out by `align_probs`, classes = `evaluation_classes` (the
        split's first, so its labels index them), the model's own classes).
    """
    sess = session(onnx_path, threads=2)
    model_classes = onnx_classes(sess)
    classes = evaluation_classes(split.classes, model_classes)
    return align_probs(onnx_predict_proba(sess, split), model_classes, classes), classes, model_classes


def evaluate_onnx(
    onnx_path: str | Path, split: TensorSplit, threshold: float = 0.9, negative_class: str | None = None
) -> EvalReport:
    """Evaluate an exported graph on a decoded split (class maps must match)."""
    probs = predict_split(onnx_path, split)
    return threshold_report(probs, split.labels.numpy(), split.classes, threshold, negative_class)


def measure_latency(
    onnx_path: str | Path, image_size: int = 64, threads: int = 1, warmup: int = 20, runs: int = 200
) -> dict[str, float]:
    """onnxruntime latency at batch 1 on `threads` threads: p50/p95/mean in milliseconds."""
    sess = session(onnx_path, threads=threads)
    pixels = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3), dtype=np.uint8)
    for _ in range(warmup):
        sess.run([OUTPUT_NAME], {INPUT_NAME: pixels})
    times = np.empty(runs)
    for i in range(runs):
        t = time.perf_counter()
        sess.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        times[i] = (time.perf_counter() - t) * 1000
    return {
        "latency_p50_ms": float(np.percentile(times, 50)),
        "latency_p95_ms": float(np.percentile(times, 95)),
        "latency_mean_ms": float(times.mean()),
        "threads": threads,
    }


@dataclass
class LatencyStats:
    """Batch-1 latency of one graph over interleaved rounds, in milliseconds (all runs pooled)."""

    p50_ms: float
    p95_ms: float
    p25_ms: float
    p75_ms: float
    mean_ms: float
    round_p50_ms: list[float]  # median of each round, in round order: how stable it stayed over time
    runs: int  # timed runs in all


def measure_latency_interleaved(
    onnx_paths: Sequence[str | Path], image_size: int = 64, threads: int = 1, rounds: int = 5, runs: int = 200,
    warmup: int = 50,
) -> list[LatencyStats]:
    """onnxruntime latency at batch 1 of several graphs measured turn about, so they can be compared.

    Timing one graph after the other lets a slow spell of the machine (another process, a frequency
    step) land on one of them only; here every round times each graph `runs` times, the order
    rotating by one each round so none is always first. Sessions are created and warmed up once.

    Args:
        onnx_paths: the graphs (same input size).
        image_size: input side length.
        threads: onnxruntime intra-op threads (1 = the phone-like setting).
        rounds: rounds of `runs` timed runs per graph.
        runs: timed runs per graph and round.
        warmup: untimed runs per graph before the first round.

    Returns:
        One LatencyStats per path, in the order given.
    """
    if rounds < 1 or runs < 1:
        raise SaofuError(f"latency needs at least one round and one run, got rounds={rounds}, runs={runs}")
    sessions = [session(p, threads=threads) for p in onnx_paths]
    feed = {INPUT_NAME: np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3), dtype=np.uint8)}
    outputs = [OUTPUT_NAME]
    for sess in sessions:
        for _ in range(warmup):
            sess.run(outputs, feed)
    times = np.empty((len(sessions), rounds, runs))
    clock = time.perf_counter
    for r in range(rounds):
        for k in range(len(sessions)):
            i = (r + k) % len(sessions)
            run = sessions[i].run
            for j in range(runs):
                t = clock()
                run(outputs, feed)
                times[i, r, j] = clock() - t
    times *= 1000
    stats = []
    for per_round in times:
        pooled = per_round.ravel()
        p25, p50, p75, p95 = np.percentile(pooled, [25, 50, 75, 95])
        stats.append(LatencyStats(
            p50_ms=float(p50), p95_ms=float(p95), p25_ms=float(p25), p75_ms=float(p75), mean_ms=float(pooled.mean()),
            round_p50_ms=[float(m) for m in np.median(per_round, axis=1)], runs=int(pooled.size),
        ))
    return stats
