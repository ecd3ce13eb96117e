"""The training flow: generate (or take) data → train → export ONNX → evaluate → register.

One pydantic parameter model: the Prefect UI renders it as a form and validates it before the run
starts, and the same object is logged to MLflow as the run's parameters.
"""


from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from saofu.settings import get_settings
from tasks.data.fu_world import WorldConfig, world_folder_name
from tasks.tracking import finish_run
from tasks.train.loop import TrainConfig
from tasks.train.steps import (
    evaluate_recognizer,
    export_recognizer,
    generate_fu_world,
    register_recognizer,
    train_recognizer,
)


class TrainFlowParams(BaseModel):
    """Parameters of one training run."""

    data_dir: str | None = Field(
        None, description="ImageFolder dataset (flat, or with train/val/test). Empty: generate the Fu world."
    )
    world_n: int = Field(WorldConfig.n, ge=60, description="Images to generate when no data_dir is given.")
    world_seed: int = Field(0, description="Seed of the generated world.")
    merchant: bool = Field(False, description="Add the directional class fu_merchant to the generated world.")
    model: str = Field("saofu_fu", description="Registered model factory (see `saofu models list`).")
    arch: str | None = Field(None, description="Architecture string, for model saofu_from_arch.")
    image_size: int = Field(TrainConfig.image_size, ge=16, le=512)
    epochs: int = Field(TrainConfig.epochs, ge=1, le=500)
    batch_size: int = Field(TrainConfig.batch_size, ge=2, le=4096)
    lr: float = Field(TrainConfig.lr, gt=0, le=1)
    weight_decay: float = Field(TrainConfig.weight_decay, ge=0)
    label_smoothing: float = Field(TrainConfig.label_smoothing, ge=0, lt=1)
    aug_strength: float = Field(TrainConfig.aug_strength, ge=0, le=1)
    val_share: float = Field(TrainConfig.val_share, gt=0, lt=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threshold: float = Field(0.9, ge=0, le=1, description="Confidence a prediction must reach to count.")
    negative_class: str | None = Field(
        "not_fu", description="Class that low-confidence predictions fall back to (if the data has it)."
    )
    registered_model: str = Field("fu-recognizer", min_length=1, description="MLflow registered model name.")
    experiment: str = Field("saofu-train", min_length=1, description="MLflow experiment.")
    tags: dict[str, str] = Field(
        default_factory=dict, description="Extra MLflow run tags (e.g. the search study this run retrains)."
    )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            model=self.model, arch=self.arch, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
            weight_decay=self.weight_decay, label_smoothing=self.label_smoothing,
            aug_strength=self.aug_strength, seed=self.seed, device=self.device,
            image_size=self.image_size, val_share=self.val_share,
        )


class TrainFlowResult(BaseModel):
    run_id: str
    registered_model: str
    version: str
    val_accuracy: float
    test_accuracy_at_threshold: float
    eval_split: str
    params: int
    mflops: float
    latency_p50_ms: float
    onnx_path: str
    parity_max_abs_diff: float
    data_dir: str
    tracking_uri: str


@flow(name="train", log_prints=True)
def train_flow(params: TrainFlowParams = TrainFlowParams()) -> TrainFlowResult:
    """Train, export, evaluate and register one recogniser."""
    settings = get_settings()
    world_name = world_folder_name(params.world_n, params.world_seed, params.image_size,
                                   "merchant" if params.merchant else "")
    data_dir = params.data_dir or generate_fu_world(
        str(settings.data_dir / world_name), params.world_n, params.world_seed, params.image_size,
        params.merchant,
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = settings.runs_dir / f"train-{stamp}-{flow_run.get_id() or 'local'}"[:48]
    tags = {**params.tags, "prefect_flow_run_id": str(flow_run.get_id() or ""), "flow": "train"}
    cfg = params.train_config()
    trained = train_recognizer(data_dir, cfg, str(run_dir), params.experiment, tags)
    try:
        exported = export_recognizer(trained.checkpoint, str(run_dir / "model.onnx"), data_dir, trained.run_id)
        report = evaluate_recognizer(
            exported.onnx_path, data_dir, str(run_dir / "eval.json"), params.image_size, params.threshold,
            params.negative_class, params.val_share, params.seed, trained.run_id,
        )
        version = register_recognizer(
            trained.run_id, exported.onnx_path, params.registered_model, params.image_size, trained.classes,
            {
                "arch": trained.arch, "model": cfg.model, "data_fingerprint": trained.data_fingerprint,
                "data_version": trained.data_version,
                "data_dir": str(Path(data_dir).resolve()), "run_id": trained.run_id, **tags,
                "val_accuracy": f"{trained.val_accuracy:.4f}",
                f"{report['split']}_accuracy_at_threshold": f"{report['accuracy_at_threshold']:.4f}",
            },
        )
    except BaseException:
        finish_run(trained.run_id, "FAILED")  # the MLflow run must not stay RUNNING
        raise
    result = TrainFlowResult(
        run_id=trained.run_id, registered_model=params.registered_model, version=version,
        val_accuracy=trained.val_accuracy, test_accuracy_at_threshold=report["accuracy_at_threshold"],
        eval_split=report["split"], params=trained.params, mflops=trained.mflops,
        latency_p50_ms=report["latency_p50_ms"], onnx_path=exported.onnx_path,
        parity_max_abs_diff=exported.parity_max_abs_diff, data_dir=str(data_dir),
        tracking_uri=settings.tracking_uri,
    )
    get_run_logger().info("registered %s version %s (run %s)", result.registered_model, version, result.run_id)
    return result


if __name__ == "__main__":
    train_flow()
