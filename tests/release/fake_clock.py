"""A stand-in for the latency code's clock: every timed run lasts a duration the test chose.

`tasks.release.evaluation` times each onnxruntime run with `time.perf_counter()` before and after
it. `FakeClock.install` replaces that module's clock, and wraps its `session` so the clock knows
which graph ran last: the run then "lasted" the next of the durations given for that graph. The
graphs still run for real; only the stopwatch is the test's. A test can then compute the expected
percentiles from the durations itself, and a measurement that times the wrong runs (warm-up
included, some left out, one graph's times booked to another) gives other figures, or exhausts
or leaves over the durations (`assert_all_taken`).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from tasks.release import evaluation


class _Tracked:
    """An onnxruntime session that tells the clock when it ran."""

    def __init__(self, sess, key: str, clock: FakeClock):
        self._sess, self._key, self._clock = sess, key, clock

    def run(self, *args, **kwargs):
        self._clock.last = self._key
        return self._sess.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._sess, name)


class FakeClock:
    def __init__(self, durations_ms: dict[str | Path, list[float] | np.ndarray]):
        self.durations = {str(k): [float(d) for d in v] for k, v in durations_ms.items()}
        self.taken = {k: 0 for k in self.durations}
        self.last: str | None = None
        self.now = 100.0
        self.started = False

    def __call__(self) -> float:
        if self.started:  # the end of a timed run: it lasted the next duration of the graph that ran
            assert self.last is not None, "clock read around no run"
            i = self.taken[self.last]
            assert i < len(self.durations[self.last]), f"more timed runs of {self.last} than durations given"
            self.now += self.durations[self.last][i] / 1000
            self.taken[self.last] = i + 1
        else:
            self.now += 1.0  # time between runs must not count
        self.started = not self.started
        return self.now

    def install(self, monkeypatch) -> FakeClock:
        real_session = evaluation.session
        monkeypatch.setattr(evaluation, "time", SimpleNamespace(perf_counter=self))
        monkeypatch.setattr(evaluation, "session",
                            lambda path, threads=1: _Tracked(real_session(path, threads=threads), str(path), self))
        return self

    def assert_all_taken(self) -> None:
        assert not self.started and self.taken == {k: len(v) for k, v in self.durations.items()}, self.taken


def durations(n: int, low_ms: float, high_ms: float, seed: int) -> np.ndarray:
    """`n` distinct made-up run times in [low_ms, high_ms), in no order."""
    return np.random.default_rng(seed).uniform(low_ms, high_ms, n)
