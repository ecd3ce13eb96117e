"""Wall time of a flow's consecutive steps, and how much of it was spent inside task bodies.

`lap(name, body_s)` closes the step that ran since the previous lap; `body_s` is the time the
step's task (or subflow) spent in its own body, so `bodies` sums the work and the rest of the wall
time is orchestration (Prefect's bookkeeping, result persistence).
"""

from __future__ import annotations

import time


class StepClock:
    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self.outside: dict[str, float] = {}  # step -> its wall time outside its body: where orchestration goes
        self.bodies = 0.0
        self._last = time.perf_counter()

    def lap(self, name: str, body_s: float = 0.0) -> None:
        now = time.perf_counter()
        self.steps[name] = self.steps.get(name, 0.0) + now - self._last
        self.outside[name] = self.outside.get(name, 0.0) + max(now - self._last - body_s, 0.0)
        self.bodies += body_s
        self._last = now
