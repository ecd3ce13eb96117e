"""Model registry: named factories, `create_model`, and checkpoint metadata to rebuild a model.

Every model the pipeline trains comes from `create_model(name, num_classes, **kwargs)`. The created
module records ``model_name``, ``model_kwargs``, ``arch_string``, ``num_classes`` and
``default_input_size``; `model_meta` turns those into a JSON-ready dict the training code saves in
checkpoints and logs to MLflow, and `build_from_checkpoint_meta` rebuilds the same (untrained)
module from it, ready for ``load_state_dict``.

Registered factories:

* ``saofu_fu`` - the default recogniser for 64x64 character crops (~34 k parameters, ~4.2 MMACs at 64x64).
* ``saofu_fu_tiny`` - a smaller one for quick runs and tests.
* ``saofu_from_arch`` - any whole-architecture string (``arch=``); what a search trial builds.
* ``mobilenet_v3_small_{050,075,100}``, ``mobilenet_v2_035`` - torchvision baselines, random init
  (``weights=None``; nothing is ever downloaded).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torchvision
from torch import nn

from saofu.errors import SaofuError

from .arch import ArchSpec
from .expand import DEFAULT_SHARED_STAGES, EXPANDED_MODEL, ExpandedRecognizer
from .recognizer import Recognizer, TorchvisionRecognizer

DEFAULT_INPUT_SIZE = 64

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory ``fn(num_classes, **kwargs) -> nn.Module`` under `name`.

    Args:
        name: the registry name; must not be taken already.

    Returns:
        The decorator, which returns the factory unchanged.
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def is_model(name: str) -> bool:
    """Whether `name` is a registered model."""
    return name in _REGISTRY


def _get_factory(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        raise SaofuError(f"unknown model {name!r}: known models are {', '.join(list_models())}")
    return _REGISTRY[name]


def _accepts(factory: Callable[..., nn.Module], param: str) -> bool:
    return param in inspect.signature(factory).parameters


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build a registered model with freshly initialised weights.

    Args:
        name: registry name (see `list_models`).
        num_classes: classifier output size, an int >= 1.
        **kwargs: factory arguments (e.g. ``width_mult``, ``dropout``, ``arch``); keep them
            JSON-serialisable, since `model_meta` stores them.

    Returns:
        The module, with ``model_name``, ``model_kwargs`` and ``default_input_size`` set.

    Raises:
        SaofuError: unknown name, bad `num_classes`, or arguments the factory does not take.
    """
    factory = _get_factory(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise SaofuError(f"bad num_classes {num_classes!r} for model {name!r}: "
                         "must be an int >= 1")
    try:
        inspect.signature(factory).bind(num_classes=num_classes, **kwargs)
    except TypeError as err:
        accepted = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
        raise SaofuError(f"bad arguments for model {name!r}: {err}; it accepts "
                         f"{', '.join(accepted)}") from None
    model = factory(num_classes=num_classes, **kwargs)
    model.model_name = name
    # The architecture travels as `arch_string`; keeping it out of the kwargs avoids saving it twice.
    model.model_kwargs = {k: v for k, v in kwargs.items() if k != "arch"}
    model.default_input_size = DEFAULT_INPUT_SIZE
    return model


def model_meta(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must carry to rebuild `model` (pair of `build_from_checkpoint_meta`).

    Args:
        model: a module made by `create_model`.

    Returns:
        ``{"model_name": str, "num_classes": int, "arch": str, "kwargs": dict}``.
    """
    missing = [a for a in ("model_name", "num_classes", "arch_string", "model_kwargs")
               if not hasattr(model, a)]
    if missing:
        raise SaofuError(f"model {type(model).__name__} lacks {', '.join(missing)}: "
                         "build it with models.create_model")
    return {
        "model_name": model.model_name,
        "num_classes": int(model.num_classes),
        "arch": model.arch_string,
        "kwargs": dict(model.model_kwargs),
    }


def build_from_checkpoint_meta(meta: dict[str, Any]) -> nn.Module:
    """Rebuild the untrained module a checkpoint was saved from.

    Factories that take ``arch`` (the saofu ones) are given the stored architecture string, so a
    checkpoint rebuilds exactly even if a factory's default architecture changes later. For the
    others the rebuilt module's ``arch_string`` must equal the stored one.

    Args:
        meta: the dict `model_meta` produced.

    Returns:
        The module, ready for ``load_state_dict``.

    Raises:
        SaofuError: missing keys, unknown model, or an architecture that no longer matches.
    """
    missing = [k for k in ("model_name", "num_classes", "arch") if k not in meta]
    if missing:
        raise SaofuError(f"checkpoint meta lacks {', '.join(map(repr, missing))}: "
                         f"got keys {sorted(meta)}")
    name = meta["model_name"]
    kwargs = dict(meta.get("kwargs") or {})
    if name == EXPANDED_MODEL:  # made by a fast retrain (`models.expand`), not by a factory: no registry name
        inner = build_from_checkpoint_meta(kwargs["base"])
        # Checkpoints from before the parent gate have no gate keys: off.
        model = ExpandedRecognizer(inner, int(meta["num_classes"]) - inner.num_classes,
                                   int(kwargs.get("shared_stages", DEFAULT_SHARED_STAGES)),
                                   float(kwargs.get("parent_gate", 0.0)), kwargs.get("gate_parents"))
        if model.arch_string != meta["arch"]:
            raise SaofuError(f"checkpoint arch {meta['arch']!r} does not match the expanded model it "
                             f"describes ({model.arch_string!r})")
        return model
    if _accepts(_get_factory(name), "arch"):
        kwargs["arch"] = meta["arch"]
    model = create_model(name, meta["num_classes"], **kwargs)
    if model.arch_string != meta["arch"]:
        raise SaofuError(f"checkpoint arch {meta['arch']!r} does not match what model {name!r} "
                         f"builds now ({model.arch_string!r})")
    return model


# ---------------------------------------------------------------------------------------------
# saofu recognisers
# ---------------------------------------------------------------------------------------------

# Sized for 64x64 crops of one character: stride 16 overall (4x4 final map at 64x64), ReLU6 in
# the early high-resolution stages (cheap), hard-swish + SE in the late low-resolution ones where
# they cost little and help most (MobileNetV3's finding), k5 mixed in for stroke-level context.
SAOFU_FU_ARCH = (
    "stem16"
    "|ds_r1_k3_s1_c16"
    "|ir_r2_k3_s2_e3_c24"
    "|ir_r1_k5_s2_e3_c32_se0.25_ahs"
    "|ir_r1_k5_s2_e3_c48_se0.25_ahs"
    "|head128_ahs"
)

SAOFU_FU_TINY_ARCH = (
    "stem8"
    "|ds_r1_k3_s1_c8"
    "|ir_r1_k3_s2_e3_c16"
    "|ir_r1_k5_s2_e3_c24_se0.25_ahs"
    "|ir_r1_k3_s2_e3_c32_se0.25_ahs"
    "|head64_ahs"
)


@register_model("saofu_fu")
def saofu_fu(num_classes: int, arch: str | ArchSpec = SAOFU_FU_ARCH, width_mult: float = 1.0,
             dropout: float = 0.2, in_chans: int = 3) -> Recognizer:
    """The default saofu recogniser (`SAOFU_FU_ARCH`); `arch` is for rebuilding checkpoints."""
    return Recognizer(arch, num_classes, width_mult=width_mult, dropout=dropout, in_chans=in_chans)


@register_model("saofu_fu_tiny")
def saofu_fu_tiny(num_classes: int, arch: str | ArchSpec = SAOFU_FU_TINY_ARCH,
                  width_mult: float = 1.0, dropout: float = 0.1, in_chans: int = 3) -> Recognizer:
    """A smaller saofu recogniser (`SAOFU_FU_TINY_ARCH`) for quick runs."""
    return Recognizer(arch, num_classes, width_mult=width_mult, dropout=dropout, in_chans=in_chans)


@register_model("saofu_from_arch")
def saofu_from_arch(num_classes: int, arch: str | ArchSpec, width_mult: float = 1.0,
                    dropout: float = 0.2, in_chans: int = 3) -> Recognizer:
    """A recogniser from any whole-architecture string: what a search trial builds."""
    return Recognizer(arch, num_classes, width_mult=width_mult, dropout=dropout, in_chans=in_chans)


# ---------------------------------------------------------------------------------------------
# torchvision baselines (random init, never downloaded weights)
# ---------------------------------------------------------------------------------------------


def _mobilenet_v3_small(num_classes: int, width_mult: float, dropout: float) -> nn.Module:
    net = torchvision.models.mobilenet_v3_small(weights=None, width_mult=width_mult,
                                                num_classes=num_classes, dropout=dropout)
    arch = f"torchvision:mobilenet_v3_small(width_mult={width_mult})"
    return TorchvisionRecognizer(net, arch, num_classes)


@register_model("mobilenet_v3_small_050")
def mobilenet_v3_small_050(num_classes: int, dropout: float = 0.2) -> nn.Module:
    """torchvision MobileNetV3-Small, width 0.5, random init."""
    return _mobilenet_v3_small(num_classes, 0.5, dropout)


@register_model("mobilenet_v3_small_075")
def mobilenet_v3_small_075(num_classes: int, dropout: float = 0.2) -> nn.Module:
    """torchvision MobileNetV3-Small, width 0.75, random init."""
    return _mobilenet_v3_small(num_classes, 0.75, dropout)


@register_model("mobilenet_v3_small_100")
def mobilenet_v3_small_100(num_classes: int, dropout: float = 0.2) -> nn.Module:
    """torchvision MobileNetV3-Small, width 1.0, random init."""
    return _mobilenet_v3_small(num_classes, 1.0, dropout)


@register_model("mobilenet_v2_035")
def mobilenet_v2_035(num_classes: int, dropout: float = 0.2) -> nn.Module:
    """torchvision MobileNetV2, width 0.35, random init."""
    net = torchvision.models.mobilenet_v2(weights=None, width_mult=0.35, num_classes=num_classes,
                                          dropout=dropout)
    return TorchvisionRecognizer(net, "torchvision:mobilenet_v2(width_mult=0.35)", num_classes)
