"""Canary: a set share of traffic goes to the challenger, which is rolled back when it falls behind.

There is no ground truth at serving time, so the challenger is judged against the champion run
in shadow on the same canary requests (the paired comparison needs far fewer requests than
comparing two disjoint streams):

* agreement - share of canary requests where the challenger's top class equals the champion's,
  on the classes both know (`compare_answers`, below);
* confident share - share whose top probability reaches the threshold, challenger vs champion on
  the same images (a model that stopped being sure of itself is suspect even when it agrees);
* error rate - inference failures per request, challenger vs champion's own traffic;
* latency - median model time, challenger vs champion.

Once the challenger has answered `min_requests` requests it is checked every `check_every`
requests; if any measure is past its margin the canary stops ("rolled back": all traffic returns
to the champion) and the reason is logged, kept in `snapshot()` and counted in the metrics. The
same challenger version is not tried again by this process; a new version under the alias starts
a fresh canary. Promotion stays the release flow's decision: moving `@champion` is never done here.

A challenger with a class the champion lacks (a fast retrain added `fu_merchant`). The champion
cannot give that answer, so the two top classes are compared on the classes both know: an answer
of a class the other model lacks is replaced by the nearest class up its refinement chain that the
other model knows (the graphs' `refines` metadata, e.g. `fu_merchant` -> `fu`). A challenger's
`fu_merchant` where the champion said `fu` is therefore agreement (the champion's expected answer
for a merchant's 福), and where the champion said `not_fu` a disagreement (the two differ on
whether it is a 福 at all). An answer with no such class (a new class refining nothing the
champion knows) cannot be compared: the request is left out of the agreement's denominator and
counted as `not_compared`. Counting it as a disagreement would roll back any challenger whose new
class is actually used (a merchant campaign is easily more than the 10 % agreement margin of the
traffic), counting it as agreement would credit answers nothing checked; how often the new
class is answered is the gate's matter (its recall target on labelled images), and the count is
shown in `snapshot()` so a challenger that answers it suspiciously often can be seen.
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from deploy.model_source import LoadedModel, ModelSet
from saofu.errors import SaofuError
from saofu.refines import known_ancestor

log = logging.getLogger("saofu.serve")

OFF = "off"
RUNNING = "running"
ROLLED_BACK = "rolled_back"


def compare_answers(challenger_class: str, champion_class: str, challenger: LoadedModel,
                    champion: LoadedModel) -> bool | None:
    """Whether two top classes agree on the classes both models know (see the module's note).

    Returns:
        True or False; None when either answer is a class the other model lacks and refines
        nothing it knows (not comparable: left out of the agreement).
    """
    if challenger_class == champion_class:
        return True
    refines = {**champion.refines, **challenger.refines}
    mine = known_ancestor(challenger_class, champion.classes, refines)
    theirs = known_ancestor(champion_class, challenger.classes, refines)
    if mine is None or theirs is None:
        return None
    return mine == theirs


@dataclass(frozen=True)
class CanaryPolicy:
    """How much traffic the challenger gets and how far behind it may fall.

    Attributes:
        share: share of requests answered by the challenger (0 disables the canary).
        min_requests: challenger requests before it is judged at all.
        check_every: challenger requests between two checks (a check sorts the latency window).
        threshold: top probability that makes a prediction "confident" (evaluation's 0.9).
        min_agreement: lowest acceptable agreement with the champion.
        max_confident_drop: how far the challenger's confident share may trail the champion's.
        max_error_rate_increase: how far its error rate may exceed the champion's.
        max_latency_ratio: how many times the champion's median model time it may take.
        latency_window: model times kept per arm for the medians.
    """

    share: float = 0.1
    min_requests: int = 200
    check_every: int = 10
    threshold: float = 0.9
    min_agreement: float = 0.9
    max_confident_drop: float = 0.1
    max_error_rate_increase: float = 0.01
    max_latency_ratio: float = 3.0
    latency_window: int = 1000

    def __post_init__(self):
        for name in ("share", "threshold", "min_agreement", "max_confident_drop", "max_error_rate_increase"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise SaofuError(f"canary {name} must be in [0, 1], got {value}")
        if self.min_requests < 1 or self.check_every < 1 or self.latency_window < 1:
            raise SaofuError("canary min_requests, check_every and latency_window must be at least 1")
        if self.max_latency_ratio <= 0:
            raise SaofuError(f"canary max_latency_ratio must be positive, got {self.max_latency_ratio}")


@dataclass
class ArmStats:
    """Live counts for one arm since the canary started."""

    requests: int = 0
    errors: int = 0
    confident: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=1000))

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def confident_share(self) -> float:
        answered = self.requests - self.errors
        return self.confident / answered if answered else 0.0

    def median_ms(self) -> float | None:
        return statistics.median(self.latencies) * 1e3 if self.latencies else None

    def to_dict(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "error_rate": self.error_rate,
                "confident_share": self.confident_share, "median_model_ms": self.median_ms()}


@dataclass
class CanaryRun:
    """One challenger version's canary: its stats, the champion's over the same period, the verdict."""

    champion_version: str
    challenger_version: str
    started_at: float
    champion: ArmStats
    challenger: ArmStats
    shadow_confident: int = 0  # champion confident on the challenger's requests
    agreed: int = 0  # challenger and shadow champion gave the same top class (on the classes both know)
    not_compared: int = 0  # answers the other model could not give: left out of the agreement
    status: str = RUNNING
    reason: str = ""
    kinds: tuple[str, ...] = ()  # which measures failed: agreement, confidence, errors, latency
    ended_at: float | None = None

    @property
    def compared(self) -> int:
        """Answered canary requests whose two answers could be compared."""
        return self.challenger.requests - self.challenger.errors - self.not_compared

    @property
    def agreement(self) -> float:
        return self.agreed / self.compared if self.compared else 1.0

    @property
    def shadow_confident_share(self) -> float:
        answered = self.challenger.requests - self.challenger.errors
        return self.shadow_confident / answered if answered else 0.0

    def to_dict(self) -> dict:
        return {
            "status": self.status, "reason": self.reason or None, "champion_version": self.champion_version,
            "challenger_version": self.challenger_version, "agreement": self.agreement,
            "compared": self.compared, "not_compared": self.not_compared,
            "champion_confident_share_on_canary": self.shadow_confident_share,
            "champion": self.champion.to_dict(), "challenger": self.challenger.to_dict(),
            "started_at": self.started_at, "ended_at": self.ended_at,
        }


def verdict(run: CanaryRun, policy: CanaryPolicy) -> tuple[str, tuple[str, ...]]:
    """Why the challenger must be rolled back ("" when it may go on), and which measures failed."""
    ch, champ = run.challenger, run.champion
    if ch.requests < policy.min_requests:
        return "", ()
    reasons, kinds = [], []
    if ch.error_rate - champ.error_rate > policy.max_error_rate_increase:
        kinds.append("errors")
        reasons.append(f"error rate {ch.error_rate:.1%} vs champion {champ.error_rate:.1%}")
    if ch.requests > ch.errors:
        if run.compared and run.agreement < policy.min_agreement:
            kinds.append("agreement")
            reasons.append(f"agrees with the champion on {run.agreement:.1%} of requests "
                           f"(minimum {policy.min_agreement:.0%}"
                           + (f"; {run.not_compared} answers not comparable left out)" if run.not_compared else ")"))
        drop = run.shadow_confident_share - ch.confident_share
        if drop > policy.max_confident_drop:
            kinds.append("confidence")
            reasons.append(f"confident on {ch.confident_share:.1%} vs champion {run.shadow_confident_share:.1%} "
                           f"of the same requests")
    ch_ms, champ_ms = ch.median_ms(), champ.median_ms()
    if ch_ms is not None and champ_ms and ch_ms > policy.max_latency_ratio * champ_ms:
        kinds.append("latency")
        reasons.append(f"median model time {ch_ms:.2f} ms vs champion {champ_ms:.2f} ms")
    return "; ".join(reasons), tuple(kinds)


class Canary:
    """Routes requests between the arms, keeps their live stats, and rolls the challenger back.

    `update` is called by the model source's poller on every swap; `route` and the `record_*`
    methods by requests. A request records into the run it was routed by, and only if that run is
    still the one for its challenger version, so a swap mid-request cannot mix two canaries' stats.

    Args:
        policy: share and margins.
        seed: seed of the routing draw (None: unpredictable).
        on_rollback: called as on_rollback(run) once the run is stopped.
    """

    def __init__(self, policy: CanaryPolicy, seed: int | None = None,
                 on_rollback: Callable[[CanaryRun], None] | None = None):
        self.policy = policy
        self.on_rollback = on_rollback
        self._random = random.Random(seed).random
        self._run: CanaryRun | None = None
        self._rolled_back: dict[str, CanaryRun] = {}  # challenger version -> its stopped run
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------- lifecycle

    def update(self, models: ModelSet) -> None:
        """Start, keep or end the canary for the challenger in `models`."""
        with self._lock:
            challenger = models.challenger
            run = self._run
            if challenger is None or self.policy.share == 0:
                self._run = None
            elif challenger.version in self._rolled_back:
                self._run = self._rolled_back[challenger.version]  # stays stopped: its verdict stands
            elif run is None or run.challenger_version != challenger.version or run.status != RUNNING:
                window = self.policy.latency_window
                self._run = CanaryRun(
                    models.champion.version, challenger.version, time.time(),
                    ArmStats(latencies=deque(maxlen=window)), ArmStats(latencies=deque(maxlen=window)),
                )
                log.info("canary started: %.0f%% of traffic to challenger v%s (champion v%s)",
                         self.policy.share * 100, challenger.version, models.champion.version)
            else:
                run.champion_version = models.champion.version

    @property
    def status(self) -> str:
        run = self._run
        return OFF if run is None else run.status

    def snapshot(self) -> dict:
        """State for /healthz and /metrics."""
        run = self._run
        base = {"share": self.policy.share, "status": self.status, "min_requests": self.policy.min_requests}
        return base if run is None else {**base, **run.to_dict()}

    # ----------------------------------------------------------------------------- requests

    def route(self, models: ModelSet) -> CanaryRun | None:
        """The run to record into if this request goes to the challenger, else None."""
        run = self._run
        if run is None or run.status != RUNNING or models.challenger is None:
            return None
        if models.challenger.version != run.challenger_version or self._random() >= self.policy.share:
            return None
        return run

    def current_run(self, models: ModelSet) -> CanaryRun | None:
        """The running canary whose challenger is `models`' (where champion requests are counted)."""
        run = self._run
        if run is None or run.status != RUNNING or models.challenger is None:
            return None
        return run if models.challenger.version == run.challenger_version else None

    def record_champion(self, run: CanaryRun, seconds: float, confident: bool, error: bool) -> None:
        """A request the champion answered while `run` was going."""
        with self._lock:
            arm = run.champion
            arm.requests += 1
            arm.errors += error
            arm.confident += confident
            if not error:
                arm.latencies.append(seconds)

    def record_challenger(
        self, run: CanaryRun, seconds: float, confident: bool, error: bool,
        shadow_confident: bool = False, agreed: bool | None = False, shadow_seconds: float | None = None,
    ) -> None:
        """A canary request: the challenger's answer and the champion's shadow answer.

        `agreed` is `compare_answers`' verdict: None (not comparable) leaves the request out of
        the agreement.
        """
        stop = None
        with self._lock:
            arm = run.challenger
            arm.requests += 1
            arm.errors += error
            if not error:
                arm.confident += confident
                arm.latencies.append(seconds)
                run.shadow_confident += shadow_confident
                if agreed is None:
                    run.not_compared += 1
                else:
                    run.agreed += agreed
            if shadow_seconds is not None:
                run.champion.latencies.append(shadow_seconds)
            if run.status == RUNNING and arm.requests % self.policy.check_every == 0:
                reason, kinds = verdict(run, self.policy)
                if reason:
                    run.status, run.reason, run.kinds, run.ended_at = ROLLED_BACK, reason, kinds, time.time()
                    self._rolled_back[run.challenger_version] = run
                    stop = run
        if stop is not None:
            log.warning("canary rolled back: challenger v%s after %d requests: %s",
                        stop.challenger_version, stop.challenger.requests, stop.reason)
            if self.on_rollback is not None:
                self.on_rollback(stop)
