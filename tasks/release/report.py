"""Release evaluation: a shipped ONNX recogniser judged on several labelled sets, and its runtime profile.

Plain functions, no MLflow: they return numbers and the paths of the PNGs they wrote, and the
release flow logs both. The sets themselves (fresh online slice, regression set, open badcases)
come from `tasks.release.sets`.

* `evaluate_sets`: per set, accuracy (top-1 and at the threshold), per-class precision/recall at
  the threshold (`tasks.release.evaluation.threshold_report`, so the numbers are the ones the campaign
  reports), average precision, and three PNGs: ``pr_<set>.png`` (one precision-recall curve per
  class), ``confusion_<set>.png`` and ``gallery_<set>.png`` (the images whose decision at the
  threshold is wrong, false positives first).
* `runtime_profile`: what the artefact costs on a device-like setting: onnxruntime latency at
  batch 1 on one thread, peak memory of a process that loads and runs it, file size.
* `compare_table` / `compare_plot`: several models (FP32, INT8, pruned, the current release...)
  side by side.
* `gate_metrics`: one model's numbers on one set as the gate's `CandidateMetrics`.

A model is evaluated on sets that may hold images of classes it lacks (the champion, after a
fast retrain added `fu_merchant`): those images count wrong in its accuracy, are left out of its
per-class numbers, errors and gallery, and the set's result names the classes it lacks and
gives its accuracy on the images of the classes it knows. The comparison table adds, per set
where the models' classes differ, the accuracy on the images of the classes every model knows.

Matplotlib is used through `matplotlib.figure.Figure`, not pyplot, so nothing here selects a
global backend or keeps figures alive in a pyplot registry.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from saofu.errors import SaofuError
from saofu.refines import refinement_roots
from tasks.data.loading import TensorSplit
from tasks.release.evaluation import (
    ABSTAIN,
    EvalReport,
    decide,
    measure_latency,
    predict_on_classes,
    refines_from_metadata,
    threshold_report,
)
from tasks.release.gallery import plot_gallery
from tasks.release.gate import CandidateMetrics
from tasks.train.onnx_interface import read_metadata

ERROR_KINDS = ("false_positive", "false_negative", "confusion")  # gallery order; as tasks.release.badcases names them
MAX_GALLERY = 100
_SET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------
# Per-set evaluation
# ---------------------------------------------------------------------------------------------


def pr_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, float | None]:
    """One-vs-rest precision-recall curve of one class, and its average precision.

    Args:
        scores: [N] the class's probability per image.
        positive: [N] bool, whether the image is of the class.

    Returns:
        (precision, recall) at every distinct score taken as the threshold, highest score first,
        and the average precision (the step-wise area under the curve, as scikit-learn computes
        it); None when the set holds no image of the class.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores, hits = scores[order], positive[order].astype(bool)
    tp, fp = np.cumsum(hits), np.cumsum(~hits)
    # One point per distinct score: images with equal scores cross any threshold together.
    last_of_each = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    tp, fp = tp[last_of_each], fp[last_of_each]
    precision = tp / (tp + fp)
    n_positive = int(hits.sum())
    if n_positive == 0:
        return precision, np.zeros_like(precision, dtype=float), None
    recall = tp / n_positive
    average_precision = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return precision, recall, average_precision


def _error_kind(truth: int, decision: int, negative: int | None) -> str:
    # The kinds tasks.release.badcases writes: a wrong decision on a negative image is a false positive,
    # falling back to the negative class (or abstaining) on a positive one a false negative.
    if negative is not None and truth == negative:
        return "false_positive"
    if decision == ABSTAIN or decision == negative:
        return "false_negative"
    return "confusion"


def _gallery_order(probs: np.ndarray, labels: np.ndarray, decisions: np.ndarray,
                   negative: int | None) -> list[tuple[int, str]]:
    """(row, kind) of every wrong decision: false positives, then false negatives, then confusions,
    most confident first within each kind (the errors a user notices first)."""
    wrong = np.flatnonzero(decisions != labels)
    kinds = {int(i): _error_kind(int(labels[i]), int(decisions[i]), negative) for i in wrong}
    top = probs.max(1)
    return sorted(kinds.items(), key=lambda item: (ERROR_KINDS.index(item[1]), -top[item[0]], item[0]))


def _plot_pr(probs: np.ndarray, labels: np.ndarray, classes: list[str], report: EvalReport, path: Path,
             title: str, known: Sequence[str]) -> dict[str, float | None]:
    """One PR curve per class the model knows, with the threshold's operating point; returns each one's AP."""
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    average_precisions = {}
    for c, name in enumerate(classes):
        if name not in known:
            continue  # a class the model lacks has no scores to rank by
        precision, recall, ap = pr_curve(probs[:, c], labels == c)
        average_precisions[name] = ap
        if ap is None:
            continue
        # Start at recall 0 with the first point's precision, so the step curve reads left to right.
        (line,) = ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="post",
                          label=f"{name} (AP {ap:.3f})")
        point = report.per_class[name]
        ax.plot(point.recall, point.precision, "o", color=line.get_color())
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"{title}\n(dots: decisions at threshold {report.threshold:g})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return average_precisions


def _plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str,
                    lacked: Sequence[str] = ()) -> None:
    fig = Figure(figsize=(1.2 * confusion.shape[1] + 2.5, 1.0 * confusion.shape[0] + 2))
    ax = fig.add_subplot()
    ax.imshow(confusion, cmap="Blues", vmin=0, vmax=max(1, int(confusion.max())))
    names = [f"{c} (model lacks)" if c in lacked else c for c in classes]
    columns = names + ["abstain"] if confusion.shape[1] > len(classes) else names
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), names)
    ax.set(xlabel="decision", ylabel="truth", title=title)
    for (row, col), count in np.ndenumerate(confusion):
        ax.text(col, row, str(count), ha="center", va="center",
                color="white" if count > confusion.max() / 2 else "black", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def evaluate_set(onnx_path: str | Path, name: str, split: TensorSplit, out_dir: str | Path, threshold: float = 0.9,
                 negative_class: str | None = None, max_gallery: int = MAX_GALLERY) -> dict[str, Any]:
    """Metrics and PNGs of one labelled set (see `evaluate_sets`)."""
    if not _SET_NAME_RE.match(name):
        raise SaofuError(f"bad evaluation set name {name!r}: use letters, digits, '_', '-', '.' (it names files)")
    if split is None or len(split) == 0:
        raise SaofuError(f"evaluation set {name!r} has no images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probs, classes, model_classes = predict_on_classes(onnx_path, split)
    if negative_class is not None and negative_class not in classes:
        raise SaofuError(f"negative class {negative_class!r} is not one of the classes {classes}")
    # As the serving app: under the threshold, the negative class only where the model has it.
    negative_class = negative_class if negative_class in model_classes else None
    labels = split.labels.numpy()
    # The graph's refinements decide as the serving app does (a sure group, an unsure member: its root).
    refines = refines_from_metadata(read_metadata(onnx_path))
    report = threshold_report(probs, labels, classes, threshold, negative_class, refines)
    negative = classes.index(negative_class) if negative_class is not None else None
    decisions = decide(probs, threshold, negative, refinement_roots(classes, refines) if refines else None)
    lacks = [c for c in split.classes if c not in model_classes]
    known_rows = np.isin(labels, [classes.index(c) for c in model_classes])
    # Images of a lacked class are wrong by construction: counted in `lacked_images`, not errors.
    errors = [(i, kind) for i, kind in _gallery_order(probs, labels, decisions, negative) if known_rows[i]]
    shown = errors[:max_gallery]

    files = {kind: out_dir / f"{kind}_{name}.png" for kind in ("pr", "confusion", "gallery")}
    average_precisions = _plot_pr(probs, labels, classes, report, files["pr"], f"{name}: precision-recall",
                                  model_classes)
    confusion = np.asarray(report.confusion)
    if negative is not None:
        confusion = confusion[:, :-1]  # nothing abstains when under-threshold falls back to a class
    _plot_confusion(confusion, classes, files["confusion"], f"{name}: decisions at threshold {threshold:g}", lacks)
    plot_gallery(split, classes, probs, decisions, shown, len(errors), files["gallery"],
                  f"{name}: wrong at threshold {threshold:g}")
    known_n = int(known_rows.sum())
    return {
        "n": report.n,
        "accuracy": report.accuracy,
        "accuracy_at_threshold": report.accuracy_at_threshold,
        "known_accuracy_at_threshold": float((decisions == labels)[known_rows].mean()) if known_n else None,
        "abstained": report.abstained,
        "threshold": threshold,
        "negative_class": negative_class,
        "classes": classes,
        "model_classes": model_classes,
        "lacks": lacks,
        "lacked_images": {c: int((labels == classes.index(c)).sum()) for c in lacks},
        "per_class": {cls: {"precision": report.per_class[cls].precision, "recall": report.per_class[cls].recall,
                            "support": report.per_class[cls].support, "average_precision": average_precisions[cls]}
                      for cls in classes if cls in model_classes},
        "confusion": confusion.tolist(),
        "errors": {kind: sum(k == kind for _, k in errors) for kind in ERROR_KINDS},
        # Image by image, in the set's order: what another model's answers are paired with (`tasks.release.changes`).
        "decisions": ["" if d == ABSTAIN else classes[d] for d in decisions.tolist()],
        "top_classes": [classes[t] for t in probs.argmax(1).tolist()],
        "top_probs": [round(float(p), 4) for p in probs.max(1)],
        "gallery_rows": [i for i, _ in shown],
        "gallery_paths": [split.paths[i] for i, _ in shown] if split.paths else [],
        "files": {kind: str(p) for kind, p in files.items()},
    }


def evaluate_sets(onnx_path: str | Path, sets: Mapping[str, TensorSplit], threshold: float = 0.9,
                  negative_class: str | None = None, out_dir: str | Path = ".",
                  max_gallery: int = MAX_GALLERY) -> dict[str, dict[str, Any]]:
    """Evaluate an exported recogniser on several labelled sets.

    Decisions are the app's: the top class where its probability reaches `threshold`, else
    `negative_class` (or an abstention, which counts as wrong, when None); see tasks.release.evaluation.

    Args:
        onnx_path: the graph `tasks.train.export.export_onnx` (or `tasks.release.quantize.quantize_int8`) wrote.
        sets: set name (used in file names: letters, digits, ``_-.``) -> decoded split, e.g.
            ``{"online": ..., "regression": ..., "badcases": ...}``. Its classes may differ from
            the model's: images of a class the model lacks count wrong (see the module's note).
        threshold: the confidence threshold.
        negative_class: the class under-threshold predictions fall back to (``"not_fu"``) where the
            model has it (elsewhere they abstain, as in the serving app), or None.
        out_dir: where ``pr_<set>.png``, ``confusion_<set>.png`` and ``gallery_<set>.png`` go.
        max_gallery: most images in one gallery (the most confident errors of each kind first).

    Returns:
        Per set name, a JSON-ready dict: ``n``, ``accuracy`` (top-1), ``accuracy_at_threshold``
        (all images), ``known_accuracy_at_threshold`` (on the images of the classes the model
        knows; None without any), ``abstained`` (share under the threshold), ``threshold``,
        ``negative_class`` (the one used: None where the model lacks it), ``classes`` (the set's
        classes, then the model's others: the confusion's rows and columns), ``model_classes``,
        ``lacks`` (the set's classes the model lacks) with ``lacked_images`` (class -> images),
        ``per_class`` (each class the model knows -> precision, recall, support at the
        threshold, and ``average_precision`` of its PR curve, None without positives),
        ``confusion`` (rows truth, columns decision over ``classes``, plus an abstain column
        when there is no negative class), ``errors`` (count per kind, images of lacked classes left out:
        false_positive, false_negative, confusion), ``decisions`` / ``top_classes`` / ``top_probs``
        (per image, in the set's order: the decision, '' for an abstention, and the top class with
        its probability), ``gallery_rows`` / ``gallery_paths`` (the
        images in the gallery, in its order) and ``files`` (kind -> PNG path).

    Raises:
        SaofuError: no sets, a bad set name, an empty set, a negative class that is a class of
            neither the set nor the model, a missing ONNX file.
    """
    if not sets:
        raise SaofuError("no evaluation sets given")
    return {name: evaluate_set(onnx_path, name, split, out_dir, threshold, negative_class, max_gallery)
            for name, split in sets.items()}


def flat_metrics(set_results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """`evaluate_sets`' numbers as one flat dict for ``mlflow.log_metrics``: ``<set>/<metric>``.

    Per-class metrics become ``<set>/<precision|recall|ap>_<class>``; a missing AP is left out,
    and so is ``known_accuracy_at_threshold`` where the model knows no class of the set.
    """
    flat: dict[str, float] = {}
    for name, r in set_results.items():
        for key in ("n", "accuracy", "accuracy_at_threshold", "abstained"):
            flat[f"{name}/{key}"] = float(r[key])
        if r.get("known_accuracy_at_threshold") is not None:
            flat[f"{name}/known_accuracy_at_threshold"] = float(r["known_accuracy_at_threshold"])
        for cls, n in r.get("lacked_images", {}).items():
            flat[f"{name}/lacked_images_{cls}"] = float(n)
        for kind, count in r["errors"].items():
            flat[f"{name}/{kind}s"] = float(count)
        for cls, m in r["per_class"].items():
            flat[f"{name}/precision_{cls}"] = m["precision"]
            flat[f"{name}/recall_{cls}"] = m["recall"]
            if m["average_precision"] is not None:
                flat[f"{name}/ap_{cls}"] = m["average_precision"]
    return flat


# ---------------------------------------------------------------------------------------------
# Runtime profile
# ---------------------------------------------------------------------------------------------

# Runs in a fresh interpreter that imports only numpy and onnxruntime, so the parent's torch and
# data do not count. Peak RSS is the kernel's high-water mark VmHWM, reset to the current RSS
# (writing 5 to /proc/self/clear_refs) once the imports are done: the peak then covers loading
# the graph, creating the session and running it, and not the import's transient allocations.
_MEMORY_PROBE = r"""
import json, resource, sys
import numpy as np
import onnxruntime as ort

def status_kib(field):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None

def maxrss_kib():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux

path, size, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pixels = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    exact = status_kib("VmHWM") is not None
except OSError:
    exact = False
before = status_kib("VmRSS") if exact else maxrss_kib()
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
feed = {sess.get_inputs()[0].name: pixels}
for _ in range(runs):
    sess.run(None, feed)
peak = status_kib("VmHWM") if exact else maxrss_kib()
print(json.dumps({"before_kib": before, "peak_kib": peak, "exact": exact}))
"""


def peak_memory(onnx_path: str | Path, image_size: int, runs: int = 50) -> dict[str, int]:
    """Peak resident memory of a fresh process that loads `onnx_path` and runs it `runs` times at batch 1.

    Native memory (onnxruntime's arenas, the graph's weights) is invisible to tracemalloc, so this
    measures the process's resident set instead (the probe above): ``peak_rss_bytes`` is the whole
    process's peak (interpreter, numpy and onnxruntime included: what a Python server pays),
    ``model_rss_bytes`` the peak minus the resident set just before the session was created: what
    loading and running this model adds. Where the peak cannot be reset (no Linux /proc), the
    process's lifetime peak is used, which can hide a model smaller than the imports' transient
    peak; a warning says so.

    Returns:
        ``{"peak_rss_bytes": int, "model_rss_bytes": int}``.
    """
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(onnx_path), str(image_size), str(runs)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SaofuError(f"memory probe failed on {onnx_path}: {done.stderr.strip().splitlines()[-1:]}")
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    if not probe["exact"]:
        warnings.warn("peak RSS could not be reset after imports: model_rss_bytes may be underestimated",
                      stacklevel=2)
    return {"peak_rss_bytes": probe["peak_kib"] * 1024,
            "model_rss_bytes": max(0, probe["peak_kib"] - probe["before_kib"]) * 1024}


def runtime_profile(onnx_path: str | Path, image_size: int | None = None, runs: int = 200,
                    warmup: int = 20) -> dict[str, float]:
    """What the shipped artefact costs: latency at batch 1 on one thread, peak memory, file size.

    Args:
        onnx_path: the exported graph.
        image_size: input side length; None reads it from the graph's metadata.
        runs, warmup: timed and untimed inferences for the latency.

    Returns:
        A flat, all-numeric dict (ready for ``mlflow.log_metrics``): ``latency_p50_ms``,
        ``latency_p95_ms``, ``latency_mean_ms`` (`tasks.release.evaluation.measure_latency`, one thread),
        ``peak_rss_bytes`` and ``model_rss_bytes`` (`peak_memory`), ``file_bytes``, ``image_size``.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise SaofuError(f"ONNX model not found: {path}")
    if image_size is None:
        size_text = read_metadata(path).get("image_size")
        if not size_text:
            raise SaofuError(f"{path} has no image_size metadata: pass image_size")
        image_size = int(size_text)
    latency = measure_latency(path, image_size=image_size, threads=1, warmup=warmup, runs=runs)
    return {
        "latency_p50_ms": latency["latency_p50_ms"],
        "latency_p95_ms": latency["latency_p95_ms"],
        "latency_mean_ms": latency["latency_mean_ms"],
        **peak_memory(path, image_size),
        "file_bytes": path.stat().st_size,
        "image_size": image_size,
    }


def release_report(onnx_path: str | Path, sets: Mapping[str, TensorSplit], out_dir: str | Path,
                   threshold: float = 0.9, negative_class: str | None = None) -> dict[str, Any]:
    """`evaluate_sets` and `runtime_profile` of one model: one entry of `compare_table`'s input.

    Returns:
        ``{"sets": ..., "runtime": ..., "model": {"classes": [...], "refines": {...}}}`` (the graph's
        class list and its `refines` metadata, {} without it).
    """
    return {"sets": evaluate_sets(onnx_path, sets, threshold, negative_class, out_dir),
            "runtime": runtime_profile(onnx_path), "model": model_info(onnx_path)}


def model_info(onnx_path: str | Path) -> dict[str, Any]:
    """The graph's classes and `refines` map (`tasks.release.evaluation.refines_from_metadata`)."""
    meta = read_metadata(onnx_path)
    return {"classes": json.loads(meta["classes"]), "refines": refines_from_metadata(meta)}


def confusion_by_class(set_result: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """A set result's confusion as true class -> decision -> images ('' for an abstention), zeros left out."""
    classes = set_result["classes"]
    confusion = {}
    for truth, row in zip(classes, set_result["confusion"]):
        columns = classes + [""] if len(row) > len(classes) else classes
        confusion[truth] = {decision: int(n) for decision, n in zip(columns, row) if n}
    return confusion


def gate_metrics(report: Mapping[str, Any], set_name: str = "fresh", version: str | None = None) -> CandidateMetrics:
    """One model's `release_report` on `set_name` as the gate's metrics (recall of the classes it knows,
    its confusion there, latency, size, and its graph's `refines` map).

    Raises:
        SaofuError: the report has no such set, or no runtime profile.
    """
    if set_name not in report.get("sets", {}) or "runtime" not in report:
        raise SaofuError(f"the release report has no {set_name!r} set or no runtime profile to gate on")
    result, runtime = report["sets"][set_name], report["runtime"]
    return CandidateMetrics(
        accuracy=result["accuracy_at_threshold"],
        per_class_recall={c: m["recall"] for c, m in result["per_class"].items()},
        latency_p50_ms=runtime["latency_p50_ms"], latency_p95_ms=runtime["latency_p95_ms"],
        size_bytes=int(runtime["file_bytes"]), n_images=result["n"], version=version,
        confusion=confusion_by_class(result) if "classes" in result else None,
        refines=report.get("model", {}).get("refines", {}),
    )


# ---------------------------------------------------------------------------------------------
# Several models side by side
# ---------------------------------------------------------------------------------------------


def _set_names(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in results.values():
        names += [n for n in r.get("sets", {}) if n not in names]
    return names


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _shared_classes(results: Mapping[str, Mapping[str, Any]], set_name: str) -> list[str] | None:
    """The classes every model evaluated on `set_name` knows, in the set's order; None when all know the same."""
    per_model = [r["sets"][set_name] for r in results.values() if set_name in r.get("sets", {})]
    known = [set(r.get("model_classes") or r["per_class"]) for r in per_model]
    if len({frozenset(k) for k in known}) <= 1 and not any(r.get("lacks") for r in per_model):
        return None
    shared = set.intersection(*known)
    return [c for c in per_model[0].get("classes", per_model[0]["per_class"]) if c in shared]


def _accuracy_on(set_result: Mapping[str, Any], truths: Sequence[str]) -> float | None:
    """Accuracy at the threshold on the images whose true class is in `truths` (None: no such image)."""
    if "classes" not in set_result:
        return None
    confusion = confusion_by_class(set_result)
    rows = [confusion.get(t, {}) for t in truths]
    n = sum(sum(row.values()) for row in rows)
    return sum(row.get(t, 0) for t, row in zip(truths, rows)) / n if n else None


def compare_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table, one row per model: accuracy on each set, latency, memory and size.

    Where the models' classes differ on a set (a challenger with a class the champion lacks),
    that set gets a third column, the accuracy at the threshold on the images of the classes
    every model knows (the like-for-like comparison), and a `lacks` column names, per model, the
    sets' classes it cannot answer; a note under the table says which classes were shared.

    Args:
        results: model label -> ``{"sets": evaluate_sets(...), "runtime": runtime_profile(...)}``
            (`release_report`); either part may be missing, its cells show ``-``.

    Returns:
        The table; per set, top-1 accuracy and accuracy at the threshold.
    """
    if not results:
        raise SaofuError("nothing to compare: no model results given")
    names = _set_names(results)
    shared = {n: _shared_classes(results, n) for n in names}
    thresholds = {r["threshold"] for m in results.values() for r in m.get("sets", {}).values()}
    at = f"acc@{thresholds.pop():g}" if len(thresholds) == 1 else "acc@thr"
    lacking = {label: sorted({c for r in m.get("sets", {}).values() for c in r.get("lacks", ())})
               for label, m in results.items()}
    set_columns = [f"{n} {col}" for n in names for col in ("acc", at) + ((f"{at} shared",) if shared[n] else ())]
    header = ["model", *set_columns, "p50 ms", "p95 ms", "peak MiB", "model MiB", "size KiB"]
    if any(lacking.values()):
        header.insert(1, "lacks")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for label, m in results.items():
        sets, rt = m.get("sets", {}), m.get("runtime", {})
        cells = [str(label)]
        if any(lacking.values()):
            cells.append(", ".join(lacking[label]) or "-")
        for n in names:
            cells += [_fmt(sets[n]["accuracy"] if n in sets else None, ".3f"),
                      _fmt(sets[n]["accuracy_at_threshold"] if n in sets else None, ".3f")]
            if shared[n]:
                cells.append(_fmt(_accuracy_on(sets[n], shared[n]) if n in sets else None, ".3f"))
        mib = {k: rt[k] / 2**20 if k in rt else None for k in ("peak_rss_bytes", "model_rss_bytes")}
        cells += [_fmt(rt.get("latency_p50_ms"), ".3f"), _fmt(rt.get("latency_p95_ms"), ".3f"),
                  _fmt(mib["peak_rss_bytes"], ".1f"), _fmt(mib["model_rss_bytes"], ".1f"),
                  _fmt(rt["file_bytes"] / 1024 if "file_bytes" in rt else None, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"{n} {at} shared: on the images of the classes every model knows ({', '.join(shared[n])})"
             for n in names if shared[n]]
    return "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)


def compare_plot(results: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """One PNG comparing models: accuracy at the threshold per set, latency p50 (p95 whisker), file size.

    Args:
        results: as for `compare_table`.
        path: the PNG to write.

    Returns:
        The written path.
    """
    if not results:
        raise SaofuError("nothing to compare: no model results given")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels, names = list(results), _set_names(results)
    fig = Figure(figsize=(13, 4.2))
    acc_ax, lat_ax, size_ax = fig.subplots(1, 3, gridspec_kw={"width_ratios": [2, 1, 1]})
    width = 0.8 / max(1, len(labels))
    for k, label in enumerate(labels):
        sets = results[label].get("sets", {})
        values = [sets[n]["accuracy_at_threshold"] if n in sets else np.nan for n in names]
        acc_ax.bar(np.arange(len(names)) + (k - (len(labels) - 1) / 2) * width, values, width, label=label)
    acc_ax.set_xticks(range(len(names)), names)
    acc_ax.set(ylim=(0, 1.05), ylabel="accuracy at threshold", title="accuracy per set")
    acc_ax.legend(fontsize=8)
    runtime = [results[label].get("runtime", {}) for label in labels]
    p50 = np.array([r.get("latency_p50_ms", np.nan) for r in runtime])
    p95 = np.array([r.get("latency_p95_ms", np.nan) for r in runtime])
    colours = [f"C{k}" for k in range(len(labels))]
    lat_ax.bar(labels, p50, color=colours, yerr=[np.zeros_like(p50), np.nan_to_num(p95 - p50)], capsize=4)
    lat_ax.set(ylabel="ms", title="latency p50 (whisker: p95), batch 1, 1 thread")
    size_ax.bar(labels, [r.get("file_bytes", np.nan) / 1024 for r in runtime], color=colours)
    size_ax.set(ylabel="KiB", title="ONNX file size")
    for ax in (lat_ax, size_ax):
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
