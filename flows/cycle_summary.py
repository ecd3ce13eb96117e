"""A nightly cycle's outcome as markdown, for its run's page in the Prefect UI (`flows.run_summary.publish`).

Whoever opens last night's cycle wants first whether the champion changed, then what each stage
did and how long it took: a stage that skipped itself says why (no second model yet, no Label
Studio project), which the run's log buries among every subflow's lines. The release stage's own
run carries the gate's table (`flows/release_summary.py`); this one links the night together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flows.run_summary import key_value_table, promoted_verdict

if TYPE_CHECKING:  # flows.cycle imports this module
    from flows.cycle import CycleParams, CycleResult


def cycle_verdict(result: CycleResult) -> str:
    """What the night did, in one line."""
    if result.skipped:
        return f"skipped: {result.skipped}"
    if result.promoted:
        return promoted_verdict(result.champion_after, None)
    stays = f"version {result.champion_after}" if result.champion_after else "unset"
    return f"version {result.version} trained, not promoted: the champion stays {stays}"


def cycle_summary(result: CycleResult, params: CycleParams, dataset: str, stages: tuple[str, ...]) -> str:
    """The run's summary: the verdict as the heading, the night's facts, then one row per stage."""
    rows = [("dataset", dataset), ("version trained", result.version or "-"),
            ("champion after", result.champion_after or "-"), ("wall time", f"{result.seconds:.0f} s")]
    table = ["| stage | seconds | outcome |", "|---|---:|---|"]
    for stage in stages:
        outcome = result.stages.get(stage, "").replace("|", "/")
        table.append(f"| {stage} | {result.steps.get(stage, 0.0):.1f} | {outcome} |")
    return "\n\n".join([f"# Nightly cycle of `{params.registered_model}`: {cycle_verdict(result)}",
                        key_value_table(rows), "## Stages\n\n" + "\n".join(table)]) + "\n"
