"""Compound scaling (EfficientNet, Tan & Le 2019): grow or shrink a found architecture to a FLOP target.

One coefficient phi scales depth by alpha**phi, width by beta**phi and input resolution by
gamma**phi together, with EfficientNet's alpha=1.2, beta=1.1, gamma=1.15 (alpha * beta**2 * gamma**2
~= 2: each unit of phi about doubles FLOPs). Widths and repeats are integers, so FLOPs move in steps;
`compound_scale` searches phi by bisection and returns the scaled model closest to the target.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arch import decode_arch, encode_arch, scale_arch
from .complexity import count_flops, count_params
from .recognizer import Recognizer

ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15  # depth, width, resolution (EfficientNet-B0's grid search)


@dataclass(frozen=True)
class ScaledArch:
    arch: str  # the scaled architecture string (widths and repeats baked in)
    image_size: int
    phi: float
    mflops: float
    params: int


def scale_once(arch: str, image_size: int, phi: float, num_classes: int = 2,
               alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA) -> ScaledArch:
    """`arch` at `image_size` scaled by coefficient `phi` (0: unchanged; negative shrinks)."""
    spec = scale_arch(decode_arch(arch), width=beta**phi, depth=alpha**phi)
    size = max(16, int(round(image_size * gamma**phi / 8)) * 8)  # multiples of 8 keep every stride exact
    model = Recognizer(spec, num_classes)
    return ScaledArch(encode_arch(spec), size, phi, count_flops(model, size) / 1e6, count_params(model))


def compound_scale(arch: str, image_size: int, target_mflops: float, num_classes: int = 2,
                   alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA,
                   phi_range: tuple[float, float] = (-3.0, 4.0), steps: int = 24) -> ScaledArch:
    """Scale `arch` (at `image_size`) so its FLOPs come as close to `target_mflops` as the grid allows.

    Raises:
        ValueError: a non-positive target, or a target outside what `phi_range` can reach.
    """
    if not target_mflops > 0:
        raise ValueError(f"target_mflops must be > 0, got {target_mflops}")
    lo, hi = phi_range
    at = {phi: scale_once(arch, image_size, phi, num_classes, alpha, beta, gamma) for phi in (lo, hi)}
    if not at[lo].mflops <= target_mflops <= at[hi].mflops:
        raise ValueError(f"target {target_mflops} MFLOPs is outside what phi in {phi_range} reaches "
                         f"({at[lo].mflops:.2f}-{at[hi].mflops:.2f} MFLOPs)")
    for _ in range(steps):
        mid = (lo + hi) / 2
        at[mid] = scale_once(arch, image_size, mid, num_classes, alpha, beta, gamma)
        lo, hi = (mid, hi) if at[mid].mflops < target_mflops else (lo, mid)
    return min(at.values(), key=lambda s: abs(s.mflops - target_mflops))
