"""The units of the release: load a trained candidate, compress it, choose the artefact to ship.

Plain functions; `flows/release.py` composes them (and keeps MLflow and the registry at its edge).
A candidate is a float model registered by the training flow; what ships is one ONNX artefact (the
phone's): FP32 or static INT8, of the model as trained or of a channel-pruned and fine-tuned copy.
Each is measured on the fresh online slice, and the fastest artefact whose accuracy at the
threshold is within `accuracy_bar` of the float model's is the one registered as challenger, where
"fastest" only counts a difference the timing noise cannot explain (`clearly_faster`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models import count_flops, count_params
from models.recognizer import Recognizer
from saofu.errors import SaofuError
from tasks import tracking
from tasks.data.loading import TensorSplit
from tasks.release.evaluation import evaluate_onnx, measure_latency_interleaved
from tasks.release.quantize import quantize_int8
from tasks.train.export import export_onnx
from tasks.train.loop import TrainConfig, checkpoint_config, epoch_printer, load_checkpoint, save_checkpoint

ARTEFACT_TAG = "saofu.artefact"  # set on versions the release registers: the Variant label ("int8", ...)


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
    refines: dict[str, str] = field(default_factory=dict)  # a fast retrain's class refinements
    val_share: float = 0.15  # how its training run split off validation: the same split is held out later
    split_seed: int = 0


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
        refines=dict(state.get("refines") or {}), val_share=float(state["config"].get("val_share", 0.15)),
        split_seed=int(state["config"].get("seed", 0)),
    )


def shipped_checkpoint(name: str, version: str, dst_dir: str | Path) -> str | None:
    """The float weights release artefact `version` of `name` was exported from (pruned or not), or
    None for a version whose release run kept none (released before the weights were kept)."""
    client = tracking.client()
    mv = client.get_model_version(name, version)
    if ARTEFACT_TAG not in (mv.tags or {}):
        return None
    if not any(a.path == "checkpoint/checkpoint.pt" for a in client.list_artifacts(mv.run_id, "checkpoint")):
        return None
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    return client.download_artifacts(mv.run_id, "checkpoint/checkpoint.pt", str(dst_dir))


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
    latency_p25_ms: float = 0.0  # p25..p75: the spread of single runs that a speed difference must clear
    latency_p75_ms: float = 0.0
    latency_round_p50_ms: list[float] = field(default_factory=list)  # median of each interleaved round
    latency_runs: int = 0
    # The float weights the graph was exported from (loop.save_checkpoint's format): the candidate's
    # own checkpoint, or the pruned model's. The release keeps them with the shipped version, so a
    # fast retrain fine-tunes the model that serves, not the unpruned one it was cut from.
    checkpoint: str = ""


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
    model, state = load_checkpoint(candidate.checkpoint)
    refines = state.get("refines") or {}  # a fast retrain's class refinements go into every graph
    size = candidate.image_size
    models = [("", model, candidate.checkpoint)] if include_unpruned else []
    if prune_amount > 0 and isinstance(model, Recognizer):
        from tasks.release.pruning import fine_tune, prune_recognizer

        print(f"pruning {prune_amount:.0%} of the hidden channels, then {fine_tune_epochs} epochs of fine-tuning",
              flush=True)
        # The training images rank the channels and re-estimate BatchNorm statistics after slicing.
        pruned = prune_recognizer(model, prune_amount, train)
        if fine_tune_epochs:
            pruned = fine_tune(pruned, train, val, epochs=fine_tune_epochs, cfg=TrainConfig(seed=seed),
                               on_epoch=epoch_printer(fine_tune_epochs, prefix="  fine-tune ")).model
        # Saved like a training checkpoint (the base run's config, classes and refinements, the
        # pruned architecture in its model_meta), so it rebuilds and fine-tunes like any other.
        pruned_ckpt = out / "pruned" / "checkpoint.pt"
        save_checkpoint(pruned_ckpt, pruned, None, None, int(state.get("epoch", 0)), checkpoint_config(state),
                        candidate.classes, [], float(state.get("best_val_accuracy", 0.0)), refines)
        models.append(("pruned ", pruned, str(pruned_ckpt)))
    elif prune_amount > 0:
        print(f"not pruning: {type(model).__name__} is not a saofu recogniser", flush=True)
    variants = []
    for prefix, m, ckpt in models:
        stem = prefix.strip().replace(" ", "_") or "model"
        fp32 = export_onnx(m, candidate.classes, out / f"{stem}.fp32.onnx", size, refines)
        int8 = quantize_int8(fp32, train, out / f"{stem}.int8.onnx")
        params, mflops = count_params(m), count_flops(m, size) / 1e6
        variants.append(Variant(f"{prefix}fp32", str(fp32), False, bool(prefix), params, mflops, checkpoint=ckpt))
        variants.append(Variant(f"{prefix.strip()}+int8" if prefix else "int8", str(int8), True, bool(prefix),
                                params, mflops, checkpoint=ckpt))
    return variants


def measure_variants(variants: list[Variant], fresh: TensorSplit, threshold: float, negative_class: str | None,
                     *, rounds: int = 5, runs: int = 200, warmup: int = 50) -> list[Variant]:
    """Accuracy on the fresh slice and onnxruntime latency (batch 1, one thread) of every variant.

    The variants are timed together, turn about (`measure_latency_interleaved`: `rounds` rounds of
    `runs` runs each, after `warmup` runs), so a slow spell of the machine falls on all of them and
    `choose_artefact` can compare them round by round.

    Returns:
        `variants`, filled in place.
    """
    size = int(fresh.images.shape[-1])
    for v in variants:
        report = evaluate_onnx(v.path, fresh, threshold, negative_class)
        v.accuracy, v.accuracy_at_threshold = report.accuracy, report.accuracy_at_threshold
        v.size_bytes = Path(v.path).stat().st_size
    latencies = measure_latency_interleaved([v.path for v in variants], image_size=size, threads=1, rounds=rounds,
                                            runs=runs, warmup=warmup)
    for v, lat in zip(variants, latencies):
        v.latency_p50_ms, v.latency_p95_ms = lat.p50_ms, lat.p95_ms
        v.latency_p25_ms, v.latency_p75_ms = lat.p25_ms, lat.p75_ms
        v.latency_round_p50_ms, v.latency_runs = lat.round_p50_ms, lat.runs
    return variants


def clearly_faster(a: Variant, b: Variant, min_gain: float = 0.05) -> bool:
    """Whether `a` is faster than `b` by more than timing noise explains.

    All three must hold: `a`'s median is at least `min_gain` below `b`'s (a difference too small to
    survive the move to another CPU is no reason to ship a different graph); `a`'s whole
    interquartile range of single runs lies below `b`'s (the medians differ by more than the runs'
    spread); and, when both were timed in the same interleaved rounds, `a`'s median is lower in
    every round (a slow spell of the machine during some rounds cannot make the difference).

    It implies a lower p75, so it never runs in a circle: among any variants, some are left that
    none is clearly faster than.
    """
    if not (a.latency_p50_ms > 0 and b.latency_p50_ms > 0):
        return False  # not measured: nothing to prefer it on
    if a.latency_p50_ms > (1 - min_gain) * b.latency_p50_ms or a.latency_p75_ms >= b.latency_p25_ms:
        return False
    ra, rb = a.latency_round_p50_ms, b.latency_round_p50_ms
    # Rounds pair up only when both were timed by the same call (same count); otherwise the two
    # conditions above decide alone.
    return len(ra) != len(rb) or all(x < y for x, y in zip(ra, rb))


def tie_break_key(v: Variant) -> tuple:
    """Order among variants no other is clearly faster than: the first ships.

    Fewer MFLOPs, then fewer parameters: when our x86 timing cannot separate two graphs, the
    compute they need is the cost that carries over to the phone's CPU (and less memory, a smaller
    download). Then FP32 before INT8 of the same model: the plain graph computes exactly what was
    trained and evaluated, with no Quantize/Dequantize work and no dependence on a calibration
    sample, so INT8 ships only when it is measurably faster. The label last, so the choice never
    depends on the list's order.
    """
    return (v.mflops, v.params, v.int8, v.label)


def choose_artefact(variants: list[Variant], accuracy_bar: float, *, min_gain: float = 0.05) -> Variant | None:
    """The fastest variant (FP32 or INT8, pruned or not) within `accuracy_bar` of the float model.

    Eligible: accuracy at the threshold >= the unpruned FP32's minus `accuracy_bar` (the FP32
    reference itself always is, for a bar >= 0). Among the eligible, those that no other eligible
    variant is `clearly_faster` than are the fastest within noise; of these the first by
    `tie_break_key` ships.

    Returns:
        The variant to ship; None when none meets the bar (a NaN accuracy never does).

    Raises:
        SaofuError: no unpruned FP32 variant to measure the bar from, or `min_gain` outside [0, 1).
    """
    if not 0 <= min_gain < 1:
        raise SaofuError(f"min_gain must be in [0, 1), got {min_gain}")
    reference = next((v for v in variants if v.label == "fp32"), None)
    if reference is None:
        raise SaofuError(f"no unpruned fp32 variant among {[v.label for v in variants]} to set the accuracy bar")
    eligible = [v for v in variants if v.accuracy_at_threshold >= reference.accuracy_at_threshold - accuracy_bar]
    fastest = [v for v in eligible if not any(clearly_faster(u, v, min_gain) for u in eligible)]
    return min(fastest, key=tie_break_key) if fastest else None


def format_variants(variants: list[Variant], chosen: Variant | None) -> str:
    head = (f"{'artefact':<17}{'params':>9}{'MFLOPs':>8}{'acc':>8}{'acc@thr':>9}{'p50 ms':>8}{'p25-p75 ms':>14}"
            f"{'p95 ms':>8}{'KiB':>8}")
    lines = [head, "-" * len(head)]
    for v in variants:
        mark = "  <- ships" if chosen is not None and v.path == chosen.path else ""
        lines.append(f"{v.label:<17}{v.params:>9,}{v.mflops:>8.2f}{v.accuracy:>8.4f}{v.accuracy_at_threshold:>9.4f}"
                     f"{v.latency_p50_ms:>8.3f}{f'{v.latency_p25_ms:.3f}-{v.latency_p75_ms:.3f}':>14}"
                     f"{v.latency_p95_ms:>8.3f}{v.size_bytes / 1024:>8.1f}{mark}")
    return "\n".join(lines)


def variants_json(variants: list[Variant]) -> str:
    return json.dumps([asdict(v) for v in variants], indent=1)
