"""saofu models: architectures as strings, one builder, a registry of factories, cost counting.

Typical use::

    from models import create_model, model_meta, build_from_checkpoint_meta, describe
    model = create_model("saofu_fu", num_classes=2)
    describe(model, (64, 64))              # {"params": ..., "mflops": ...}
    meta = model_meta(model)               # save beside the state_dict
    same = build_from_checkpoint_meta(meta)
"""

from .arch import (
    ArchSpec,
    BlockArgs,
    decode_arch,
    decode_block,
    encode_arch,
    encode_block,
    make_divisible,
    scale_arch,
)
from .blocks import ConvBnAct, DepthwiseSeparable, InvertedResidual, SqueezeExcite
from .complexity import count_flops, count_params, describe
from .recognizer import Recognizer, TorchvisionRecognizer
from .registry import (
    SAOFU_FU_ARCH,
    SAOFU_FU_TINY_ARCH,
    build_from_checkpoint_meta,
    create_model,
    is_model,
    list_models,
    model_meta,
    register_model,
)

__all__ = [
    "SAOFU_FU_ARCH",
    "SAOFU_FU_TINY_ARCH",
    "ArchSpec",
    "BlockArgs",
    "ConvBnAct",
    "DepthwiseSeparable",
    "InvertedResidual",
    "Recognizer",
    "SqueezeExcite",
    "TorchvisionRecognizer",
    "build_from_checkpoint_meta",
    "count_flops",
    "count_params",
    "create_model",
    "decode_arch",
    "decode_block",
    "describe",
    "encode_arch",
    "encode_block",
    "is_model",
    "list_models",
    "make_divisible",
    "model_meta",
    "register_model",
    "scale_arch",
]
