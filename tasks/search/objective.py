"""What a search trial is worth: the combined score, and the objective that trains and reports it.

The combined score (MnasNet's reward, with FLOPs and parameters as the cost terms)::

    score = accuracy * (MFLOPs / T_f) ** w_f * (kparams / T_s) ** w_s [* (latency_ms / T_l) ** w_l]

Negative weights penalise cost above the target and reward cost below it, smoothly (a soft
constraint: MnasNet's w = -0.07 trades about 5% accuracy for half the cost). FLOPs and parameters
are known from the architecture before training starts, so the score can be reported every epoch
with the epoch's validation accuracy, and pruners (Hyperband, median) act on it. The optional
latency term is the onnxruntime latency of the trial's INT8 artefact, measured after training:
blocks differ in how much INT8 speeds them up, which FLOPs cannot see.

No Prefect, no MLflow here: tracking is the caller's, through the `TrialHooks` callbacks.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from pydantic import BaseModel, Field

from models import count_flops, count_params, create_model
from tasks.data.loading import TensorSplit
from tasks.search.space import SearchSpace, TrialPlan, plan_from_params, suggest_params
from tasks.train.loop import fit


class ScoreTargets(BaseModel):
    """Targets (T) and weights (w) of the combined score's cost terms."""

    mflops: float = Field(5.0, gt=0, description="FLOPs target in MFLOPs (multiply-accumulates)")
    kparams: float = Field(40.0, gt=0, description="parameter target in thousands")
    latency_ms: float = Field(0.2, gt=0, description="INT8 onnxruntime latency target, batch 1, 1 thread")
    w_flops: float = Field(-0.07, le=0)
    w_params: float = Field(-0.07, le=0)
    w_latency: float = Field(-0.07, le=0, description="used only when latency is measured")


def combined_score(accuracy: float, mflops: float, kparams: float, targets: ScoreTargets,
                   latency_ms: float | None = None) -> float:
    """accuracy x (MFLOPs/T_f)^w_f x (kparams/T_s)^w_s [x (latency/T_l)^w_l]."""
    score = accuracy * (mflops / targets.mflops) ** targets.w_flops * (kparams / targets.kparams) ** targets.w_params
    if latency_ms is not None:
        score *= (latency_ms / targets.latency_ms) ** targets.w_latency
    return score


@dataclass
class TrialCosts:
    """The costs known before training: FLOPs (MACs) at the trial's resolution and parameters."""

    mflops: float
    kparams: float


def trial_costs(plan: TrialPlan, num_classes: int) -> TrialCosts:
    model = create_model("saofu_from_arch", num_classes=num_classes, arch=plan.arch)
    return TrialCosts(count_flops(model, plan.image_size) / 1e6, count_params(model) / 1e3)


@dataclass
class TrialOutcome:
    """What a finished (or pruned) trial reports to its hooks."""

    plan: TrialPlan
    costs: TrialCosts
    accuracy: float  # last reported validation accuracy
    score: float
    epochs: int  # epochs actually trained (fewer than the budget when pruned)
    seconds: float
    pruned: bool
    latency_ms: float | None = None


@dataclass
class TrialHooks:
    """Callbacks through which the caller tracks trials (e.g. as nested MLflow runs)."""

    on_start: Callable[[optuna.Trial, TrialPlan, TrialCosts], None] = lambda trial, plan, costs: None
    on_epoch: Callable[[optuna.Trial, int, dict[str, float]], None] = lambda trial, epoch, metrics: None
    on_end: Callable[[optuna.Trial, TrialOutcome], None] = lambda trial, outcome: None
    on_error: Callable[[optuna.Trial, BaseException], None] = lambda trial, error: None


DataFor = Callable[[int], tuple[TensorSplit, TensorSplit]]  # resolution -> (train, val)


@dataclass
class Objective:
    """Optuna objective: sample a plan, train it, report the combined score every epoch.

    Single-objective studies get the combined score (maximise). Multi-objective studies (NSGA-II)
    get (accuracy, MFLOPs, kparams[, latency]) to maximise/minimise/minimise[/minimise] and are
    never pruned: Optuna's pruners take one value.
    """

    space: SearchSpace
    data_for: DataFor
    epochs: int
    targets: ScoreTargets = field(default_factory=ScoreTargets)
    multi_objective: bool = False
    measure_latency: bool = False
    only: set[str] | None = None  # the dimensions the sampler searches (grid: space.grid_dims)
    seed: int = 0
    device: str = "cpu"
    hooks: TrialHooks = field(default_factory=TrialHooks)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        plan = plan_from_params(suggest_params(trial, self.space, self.only), self.space)
        train, val = self.data_for(plan.image_size)
        costs = trial_costs(plan, len(train.classes))
        trial.set_user_attr("arch", plan.arch)
        trial.set_user_attr("resolution", plan.image_size)
        trial.set_user_attr("mflops", costs.mflops)
        trial.set_user_attr("kparams", costs.kparams)
        self.hooks.on_start(trial, plan, costs)
        state = {"accuracy": 0.0, "score": 0.0, "epochs": 0}
        started = time.perf_counter()

        def report(epoch: int, metrics: dict[str, float]) -> None:
            accuracy = metrics["val_accuracy"]
            score = combined_score(accuracy, costs.mflops, costs.kparams, self.targets)
            state.update(accuracy=accuracy, score=score, epochs=epoch)
            trial.set_user_attr("epochs", epoch)
            trial.set_user_attr("seconds", time.perf_counter() - started)
            self.hooks.on_epoch(trial, epoch, {**metrics, "score": score})
            if self.multi_objective:
                return
            trial.report(score, epoch)
            # Not at the last epoch: the training is spent by then, and a pruned trial's score is
            # not counted. (Hyperband's top rung is max_resource itself, so it would prune there.)
            if epoch < self.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} with score {score:.4f}")

        try:
            result = fit(plan.train_config(self.epochs, self.seed, self.device), train, val, on_epoch=report)
            latency = int8_latency_ms(result.model, train) if self.measure_latency else None
        except optuna.TrialPruned:
            trial.set_user_attr("accuracy", state["accuracy"])
            self.hooks.on_end(trial, TrialOutcome(plan, costs, state["accuracy"], state["score"], state["epochs"],
                                                  time.perf_counter() - started, pruned=True))
            raise
        except BaseException as exc:
            self.hooks.on_error(trial, exc)
            raise
        score = combined_score(state["accuracy"], costs.mflops, costs.kparams, self.targets, latency)
        trial.set_user_attr("accuracy", state["accuracy"])
        if latency is not None:
            trial.set_user_attr("latency_ms", latency)
        self.hooks.on_end(trial, TrialOutcome(plan, costs, state["accuracy"], score, state["epochs"],
                                              time.perf_counter() - started, pruned=False, latency_ms=latency))
        if self.multi_objective:
            values = (state["accuracy"], costs.mflops, costs.kparams)
            return values + ((latency,) if latency is not None else ())
        return score


def directions(multi_objective: bool, measure_latency: bool) -> list[str]:
    if not multi_objective:
        return ["maximize"]
    return ["maximize", "minimize", "minimize"] + (["minimize"] if measure_latency else [])


def int8_latency_ms(model: Any, calibration: TensorSplit, runs: int = 200) -> float:
    """p50 latency (ms, batch 1, one thread) of the model's static-INT8 ONNX artefact."""
    from tasks.release.evaluation import measure_latency
    from tasks.release.quantize import quantize_int8
    from tasks.train.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="saofu-trial-") as tmp:
        size = int(calibration.images.shape[-1])  # images are uint8 [N, 3, H, W]
        fp32 = export_onnx(model, list(calibration.classes), Path(tmp) / "model.onnx", size)
        int8 = quantize_int8(fp32, calibration, Path(tmp) / "model.int8.onnx", n_calibration=64)
        stats = measure_latency(int8, image_size=size, runs=runs)
    return float(stats["latency_p50_ms"])
