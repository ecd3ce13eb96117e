"""The training run's configuration, apart from the loop so that reading its defaults needs no torch.

The CLI builds its option defaults from `TrainConfig`; importing it from here keeps `saofu --help`,
`saofu serve` and the other commands that do not train free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from saofu.pixels import DEFAULT_IMAGE_SIZE


@dataclass
class TrainConfig:
    """Everything a training run depends on; logged as the run's parameters."""

    model: str = "saofu_fu"
    arch: str | None = None  # whole-architecture string, for model="saofu_from_arch"
    # Defaults: the budget `saofu demo` and `saofu bench models` use. Small batches (more steps)
    # and no label smoothing: smoothing caps the confidence the 0.9-threshold measure needs.
    epochs: int = 20
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 2e-4
    label_smoothing: float = 0.0
    aug_strength: float = 0.3
    dropout: float = 0.1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    image_size: int = DEFAULT_IMAGE_SIZE
    val_share: float = 0.15  # share of each class held out when the dataset has no val/ folder

    def model_kwargs(self) -> dict:
        kw: dict = {"dropout": self.dropout}
        if self.arch:
            kw["arch"] = self.arch
        return kw
