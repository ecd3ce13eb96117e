"""The units of the release: load a trained candidate, compress it, choose the artefact to ship.

Plain functions; `flows/release.py` composes them (and keeps MLflow and the registry at its edge).
A candidate is a float model registered by the training flow; what ships is an INT8 ONNX artefact
(the phone's), either of the model as trained or of a channel-pruned and fine-tuned copy. Each is
measured on the fresh online slice, and the fastest INT8 artefact whose accuracy at the threshold
is within `accuracy_bar` of the float model's is the one registered as challenger.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from models import count_flops, count_params
from models.recognizer import Recognizer
from saofu.errors import SaofuError
from tasks import tracking
from tasks.data.loading import TensorSplit
from tasks.release.evaluation import evaluate_onnx, measure_latency
from tasks.release.quantize import quantize_int8
from tasks.train.export import export_onnx
from tasks.train.loop import TrainConfig, epoch_printer, load_checkpoint

ARTEFACT_TAG = "saofu.artefact"  # set on versions the release registers: "int8" or "pruned+int8"


@dataclass
class Candidate:
    """A trained float model version and what it was trained on."""

    name: str
    version: str
    run_id: str
    checkpoint: str
    classes: list[str]
    image_size: int
    arch: str
    data_dir: str
    data_version: str


def latest_float_version(name: str) -> str:
    """The newest version of `name` that a training run registered (not a release artefact)."""
    client = tracking.client()
    versions = [v for v in client.search_model_versions(f"name = '{name}'") if ARTEFACT_TAG not in (v.tags or {})]
    if not versions:
        raise SaofuError(f"registered model {name!r} has no trained version to release: run `saofu train` first")
    return str(max(int(v.version) for v in versions))


def load_candidate(name: str, version: str | None, dst_dir: str | Path) -> Candidate:
    """Download the candidate's checkpoint from its training run and read its lineage.

    Raises:
        SaofuError: unknown version, a release artefact given as candidate, or a run without checkpoint.
    """
    client = tracking.client()
    version = version or latest_float_version(name)
    try:
        mv = client.get_model_version(name, version)
    except Exception as exc:
        raise SaofuError(f"registered model {name!r} has no version {version!r}") from exc
    tags = mv.tags or {}
    if ARTEFACT_TAG in tags:
        raise SaofuError(f"{name} version {version} is already a release artefact ({tags[ARTEFACT_TAG]}); "
                         f"release the trained version it came from ({tags.get('parent_version', '?')})")
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = client.download_artifacts(mv.run_id, "checkpoint/checkpoint.pt", str(dst))
    except Exception as exc:
        raise SaofuError(f"{name} version {version}: its run {mv.run_id} has no checkpoint/checkpoint.pt "
                         "(only models trained by the training flow can be released)") from exc
    _, state = load_checkpoint(ckpt)
    run = client.get_run(mv.run_id)
    return Candidate(
        name=name, version=str(version), run_id=mv.run_id, checkpoint=ckpt, classes=list(state["classes"]),
        image_size=int(state["config"]["image_size"]), arch=tags.get("arch", ""),
        data_dir=tags.get("data_dir") or run.data.params.get("data_dir", ""), data_version=tags.get("data_version", ""),
    )


@dataclass
class Variant:
    """One artefact a candidate could ship as, measured on the fresh slice."""

    label: str  # fp32 | int8 | pruned fp32 | pruned+int8
    path: str
    int8: bool
    pruned: bool
    params: int
    mflops: float
    accuracy: float = 0.0
    accuracy_at_threshold: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p95_ms: float = 0.0
    size_bytes: int = 0


def build_variants(
    candidate: Candidate, train: TensorSplit, val: TensorSplit, out_dir: str | Path, prune_amount: float = 0.25,
    fine_tune_epochs: int = 3, seed: int = 0, include_unpruned: bool = True,
) -> list[Variant]:
    """Export the candidate as FP32 and static INT8 ONNX and, when it is a saofu recogniser and
    `prune_amount` > 0, a channel-pruned copy fine-tuned for `fine_tune_epochs`, also in both.

    `include_unpruned=False` leaves the unpruned pair out (a caller comparing several amounts
    needs it once)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = load_checkpoint(candidate.checkpoint)
    size = candidate.image_size
    models = [("", model)] if include_unpruned else []
    if prune_amount > 0 and isinstance(model, Recognizer):
        from tasks.release.pruning import fine_tune, prune_recognizer

        print(f"pruning {prune_amount:.0%} of the hidden channels, then {fine_tune_epochs} epochs of fine-tuning",
              flush=True)
        # The training images rank the channels and re-estimate BatchNorm statistics after slicing.
        pruned = prune_recognizer(model, prune_amount, train)
        if fine_tune_epochs:
            pruned = fine_tune(pruned, train, val, epochs=fine_tune_epochs, cfg=TrainConfig(seed=seed),
                               on_epoch=epoch_printer(fine_tune_epochs, prefix="  fine-tune ")).model
        models.append(("pruned ", pruned))
    elif prune_amount > 0:
        print(f"not pruning: {type(model).__name__} is not a saofu recogniser", flush=True)
    variants = []
    for prefix, m in models:
        stem = prefix.strip().replace(" ", "_") or "model"
        fp32 = export_onnx(m, candidate.classes, out / f"{stem}.fp32.onnx", size)
        int8 = quantize_int8(fp32, train, out / f"{stem}.int8.onnx")
        params, mflops = count_params(m), count_flops(m, size) / 1e6
        variants.append(Variant(f"{prefix}fp32", str(fp32), False, bool(prefix), params, mflops))
        variants.append(Variant(f"{prefix.strip()}+int8" if prefix else "int8", str(int8), True, bool(prefix),
                                params, mflops))
    return variants


def measure_variants(variants: list[Variant], fresh: TensorSplit, threshold: float,
                     negative_class: str | None) -> list[Variant]:
    """Accuracy on the fresh slice and onnxruntime latency (batch 1, one thread) of every variant."""
    size = int(fresh.images.shape[-1])
    for v in variants:
        report = evaluate_onnx(v.path, fresh, threshold, negative_class)
        latency = measure_latency(v.path, image_size=size, threads=1, runs=300)
        v.accuracy, v.accuracy_at_threshold = report.accuracy, report.accuracy_at_threshold
        v.latency_p50_ms, v.latency_p95_ms = latency["latency_p50_ms"], latency["latency_p95_ms"]
        v.size_bytes = Path(v.path).stat().st_size
    return variants


def choose_artefact(variants: list[Variant], accuracy_bar: float) -> Variant | None:
    """The fastest INT8 variant within `accuracy_bar` (accuracy at threshold) of the float model.

    None when no INT8 variant meets the bar: nothing ships.
    """
    reference = next(v for v in variants if v.label == "fp32")
    ok = [v for v in variants if v.int8 and v.accuracy_at_threshold >= reference.accuracy_at_threshold - accuracy_bar]
    return min(ok, key=lambda v: v.latency_p50_ms) if ok else None


def format_variants(variants: list[Variant], chosen: Variant | None) -> str:
    head = (f"{'artefact':<17}{'params':>9}{'MFLOPs':>8}{'acc':>8}{'acc@thr':>9}{'p50 ms':>8}{'p95 ms':>8}"
            f"{'KiB':>8}")
    lines = [head, "-" * len(head)]
    for v in variants:
        mark = "  <- ships" if chosen is not None and v.path == chosen.path else ""
        lines.append(f"{v.label:<17}{v.params:>9,}{v.mflops:>8.2f}{v.accuracy:>8.4f}{v.accuracy_at_threshold:>9.4f}"
                     f"{v.latency_p50_ms:>8.3f}{v.latency_p95_ms:>8.3f}{v.size_bytes / 1024:>8.1f}{mark}")
    return "\n".join(lines)


def variants_json(variants: list[Variant]) -> str:
    return json.dumps([asdict(v) for v in variants], indent=1)
