"""The search space of the architecture and hyper-parameter search, as data.

A trial samples *values*, never modules: per-stage width, kernel, expansion, depth,
squeeze-excitation and activation, the stem and head widths, the input resolution, and the
training hyper-parameters. `plan_from_params` turns those values into a `TrialPlan` (an
architecture string plus a `TrainConfig`), so any trial can be rebuilt from the parameters Optuna
stored or MLflow logged.

Every dimension has a default: the first choice of a list, or the `default` of a range. The default
space's defaults are exactly `saofu_fu` with the training defaults, so "no search" means the
hand-made model. A sampler that cannot search every dimension (grid) searches the dimensions named
in `grid_dims` and holds the rest at their defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from models.arch import ACT_TOKENS, KERNELS, ArchSpec, BlockArgs, encode_arch
from saofu.errors import SaofuError
from tasks.train.loop import TrainConfig

Value = int | float | str


class FloatRange(BaseModel):
    """A continuous dimension: [low, high], sampled on a log scale when `log`."""

    low: float
    high: float
    log: bool = False
    default: float

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        if not self.low <= self.default <= self.high:
            raise ValueError(f"range [{self.low}, {self.high}] must hold its default {self.default}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range must start above 0, got low={self.low}")
        return self

    def grid(self, points: int = 3) -> list[float]:
        """`points` values from low to high (geometric when `log`), for the grid sampler."""
        if points == 1 or self.low == self.high:
            return [self.default]
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            return [round(math.exp(a + (b - a) * i / (points - 1)), 8) for i in range(points)]
        return [round(self.low + (self.high - self.low) * i / (points - 1), 8) for i in range(points)]


class StageSpace(BaseModel):
    """The choices of one stage; the first value of each list is its default."""

    type: Literal["ds", "ir"] = "ir"
    stride: Literal[1, 2] = 2
    widths: list[int] = Field(min_length=1)
    kernels: list[int] = Field([3, 5, 7], min_length=1)
    expansions: list[float] = Field([3, 2, 4, 6], min_length=1, description="ignored for ds stages")
    depths: list[int] = Field([1, 2], min_length=1)
    se: list[float] = Field([0.0, 0.25], min_length=1, description="0 means no squeeze-excitation")
    acts: list[Literal["re", "r6", "hs"]] = Field(["r6", "hs"], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> StageSpace:
        problems = [f"kernel {k} not in {KERNELS}" for k in self.kernels if k not in KERNELS]
        problems += [f"width {w} < 1" for w in self.widths if w < 1]
        problems += [f"depth {d} < 1" for d in self.depths if d < 1]
        problems += [f"expansion {e} < 1" for e in self.expansions if e < 1]
        problems += [f"se ratio {s} outside [0, 1]" for s in self.se if not 0 <= s <= 1]
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _default_stages() -> list[StageSpace]:
    # The defaults (first values) spell SAOFU_FU_ARCH; the alternatives are what the search tries.
    return [
        StageSpace(type="ds", stride=1, widths=[16, 8, 24], kernels=[3, 5], depths=[1], se=[0.0], acts=["r6"]),
        StageSpace(widths=[24, 16, 32], kernels=[3, 5, 7], expansions=[3, 2, 4, 6], depths=[2, 1, 3],
                   se=[0.0, 0.25], acts=["r6", "hs"]),
        StageSpace(widths=[32, 24, 48], kernels=[5, 3, 7], expansions=[3, 2, 4, 6], depths=[1, 2],
                   se=[0.25, 0.0], acts=["hs", "r6"]),
        StageSpace(widths=[48, 32, 64], kernels=[5, 3, 7], expansions=[3, 2, 4, 6], depths=[1, 2],
                   se=[0.25, 0.0], acts=["hs", "r6"]),
    ]


class SearchSpace(BaseModel):
    """Architecture (stem, stages, head, resolution) and training hyper-parameters."""

    stem_widths: list[int] = Field([16, 8, 24], min_length=1)
    stages: list[StageSpace] = Field(default_factory=_default_stages, min_length=1)
    head_widths: list[int] = Field([128, 64, 192], min_length=1)
    head_acts: list[Literal["re", "r6", "hs"]] = Field(["hs", "r6"], min_length=1)
    resolutions: list[int] = Field([64, 48, 56], min_length=1, description="input side in pixels")
    lr: FloatRange = FloatRange(low=1e-3, high=2e-2, log=True, default=TrainConfig.lr)
    weight_decay: FloatRange = FloatRange(low=1e-5, high=1e-3, log=True, default=TrainConfig.weight_decay)
    batch_sizes: list[int] = Field([TrainConfig.batch_size, 32, 128], min_length=1)
    aug_strength: FloatRange = FloatRange(low=0.0, high=0.6, default=TrainConfig.aug_strength)
    label_smoothing: FloatRange = FloatRange(low=0.0, high=0.1, default=TrainConfig.label_smoothing)
    grid_dims: list[str] = Field(
        ["s1_width", "s2_width", "s3_width", "resolution"],
        description="dimensions the grid sampler varies; the others stay at their defaults",
    )

    @model_validator(mode="after")
    def _check_grid(self) -> SearchSpace:
        unknown = sorted(set(self.grid_dims) - set(self.dimensions()))
        if unknown:
            raise ValueError(f"grid_dims names unknown dimensions {unknown}; known: {sorted(self.dimensions())}")
        return self

    def dimensions(self) -> dict[str, list[Value] | FloatRange]:
        """Every dimension by name: a list of choices or a `FloatRange`. Names are stable: they are
        the Optuna parameter names and the MLflow parameter names."""
        dims: dict[str, list[Value] | FloatRange] = {"stem_width": list(self.stem_widths)}
        for i, stage in enumerate(self.stages):
            p = f"s{i}_"
            dims[p + "width"] = list(stage.widths)
            dims[p + "kernel"] = list(stage.kernels)
            if stage.type == "ir":
                dims[p + "expansion"] = list(stage.expansions)
            dims[p + "depth"] = list(stage.depths)
            dims[p + "se"] = list(stage.se)
            dims[p + "act"] = list(stage.acts)
        dims |= {
            "head_width": list(self.head_widths), "head_act": list(self.head_acts),
            "resolution": list(self.resolutions), "lr": self.lr, "weight_decay": self.weight_decay,
            "batch_size": list(self.batch_sizes), "aug_strength": self.aug_strength,
            "label_smoothing": self.label_smoothing,
        }
        return dims

    def defaults(self) -> dict[str, Value]:
        return {name: (d.default if isinstance(d, FloatRange) else d[0]) for name, d in self.dimensions().items()}

    def searched(self) -> dict[str, list[Value] | FloatRange]:
        """The dimensions with more than one possible value (the others are constants)."""
        return {
            n: d for n, d in self.dimensions().items()
            if (isinstance(d, FloatRange) and d.low < d.high) or (isinstance(d, list) and len(d) > 1)
        }

    def grid(self, points: int = 3) -> dict[str, list[Value]]:
        """The grid sampler's search space: `grid_dims` only, ranges as `points` values."""
        dims = self.dimensions()
        return {n: (dims[n].grid(points) if isinstance(dims[n], FloatRange) else list(dims[n]))
                for n in self.grid_dims}


@dataclass(frozen=True)
class TrialPlan:
    """What one trial trains: an architecture string at a resolution, with its hyper-parameters."""

    arch: str
    image_size: int
    lr: float
    weight_decay: float
    batch_size: int
    aug_strength: float
    label_smoothing: float

    def train_config(self, epochs: int, seed: int = 0, device: str = "auto") -> TrainConfig:
        return TrainConfig(
            model="saofu_from_arch", arch=self.arch, epochs=epochs, batch_size=self.batch_size, lr=self.lr,
            weight_decay=self.weight_decay, label_smoothing=self.label_smoothing,
            aug_strength=self.aug_strength, seed=seed, device=device, image_size=self.image_size,
        )


def suggest_params(trial: Any, space: SearchSpace, only: set[str] | None = None) -> dict[str, Value]:
    """Ask an Optuna trial for every searched dimension (or those in `only`); defaults elsewhere.

    Constant dimensions are not suggested at all, so they cost the samplers nothing.
    """
    params = space.defaults()
    for name, dim in space.searched().items():
        if only is not None and name not in only:
            continue
        if isinstance(dim, FloatRange):
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
        else:
            params[name] = trial.suggest_categorical(name, dim)
    return params


def plan_from_params(params: dict[str, Any], space: SearchSpace) -> TrialPlan:
    """Build the trial's plan from its parameter values; missing dimensions take their defaults.

    Raises:
        SaofuError: a value that is not one of its dimension's choices, or an unknown name.
    """
    unknown = sorted(set(params) - set(space.dimensions()))
    if unknown:
        raise SaofuError(f"unknown search parameters {unknown}; this space has {sorted(space.dimensions())}")
    values = space.defaults() | dict(params)
    for name, dim in space.dimensions().items():
        v = values[name]
        if isinstance(dim, FloatRange):
            if not dim.low <= float(v) <= dim.high:
                raise SaofuError(f"{name}={v} is outside [{dim.low}, {dim.high}]")
        elif v not in dim:
            raise SaofuError(f"{name}={v!r} is not one of {dim}")

    def act(token: str) -> str:
        return ACT_TOKENS[token]

    stages = []
    for i, stage in enumerate(space.stages):
        p = f"s{i}_"
        stages.append((BlockArgs(
            block_type=stage.type, repeats=int(values[p + "depth"]), kernel=int(values[p + "kernel"]),
            stride=stage.stride, out_chs=int(values[p + "width"]),
            expansion=float(values[p + "expansion"]) if stage.type == "ir" else 1.0,
            se_ratio=float(values[p + "se"]), act=act(values[p + "act"]),
        ),))
    spec = ArchSpec(stem=int(values["stem_width"]), stages=tuple(stages), head=int(values["head_width"]),
                    head_act=act(values["head_act"]))
    return TrialPlan(
        arch=encode_arch(spec), image_size=int(values["resolution"]), lr=float(values["lr"]),
        weight_decay=float(values["weight_decay"]), batch_size=int(values["batch_size"]),
        aug_strength=float(values["aug_strength"]), label_smoothing=float(values["label_smoothing"]),
    )
