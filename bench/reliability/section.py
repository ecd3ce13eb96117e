"""What one part of the reliability bench reports: its counts and one row per case tried."""

from __future__ import annotations

from dataclasses import dataclass, field

# The counts `bench/results/reliability.json` carries at its top level (summed over sections).
COUNT_KEYS = ("bad_input_kinds", "fault_kinds", "requests_under_swaps", "failed_requests",
              "rows_or_files_lost", "secrets_found", "memory_growth_mb")


@dataclass
class Case:
    """One thing tried: what it was, where it was offered, what was expected and what happened."""

    kind: str
    target: str
    expected: str
    got: str
    ok: bool
    lost: int = 0  # rows or files lost or partly stored because of this case


@dataclass
class Section:
    name: str
    cases: list[Case] = field(default_factory=list)
    counts: dict[str, float] = field(default_factory=dict)  # keys from COUNT_KEYS
    seconds: float = 0.0

    @property
    def failed(self) -> list[Case]:
        return [c for c in self.cases if not c.ok]
