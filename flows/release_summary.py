"""A release run's outcome as markdown, for its page in the Prefect UI (`flows.run_summary.publish`).

Whoever opens a scheduled release's run wants the verdict first (did the champion change, and if
not, which checks failed), then the gate's table, the artefacts compression weighed, and the two
models side by side; the run's log holds the same tables among everything else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flows.run_summary import key_value_table, promoted_verdict, text_block

if TYPE_CHECKING:  # flows.release imports this module
    from flows.release import ReleaseParams, ReleaseResult


def release_verdict(result: ReleaseResult) -> str:
    """What the release did, in one line."""
    if result.challenger_version is None:
        return "nothing registered: no artefact met the accuracy bar"
    stays = f"the champion stays {'version ' + result.champion_after if result.champion_after else 'unset'}"
    if result.promoted:
        return promoted_verdict(result.challenger_version, result.served_version)
    if result.gate_passed:
        return f"the canary refused version {result.challenger_version}: {stays}"
    failed = result.gate_table.strip().splitlines()[-1] if result.gate_table.strip() else "gate failed"
    return f"version {result.challenger_version} refused ({failed}): {stays}"


def release_summary(result: ReleaseResult, params: ReleaseParams) -> str:
    """The run's summary: verdict as the heading, what was judged against what, then the tables."""
    rows = [("candidate", f"version {result.candidate_version}"),
            ("shipped artefact", result.shipped or "-"),
            ("challenger", f"version {result.challenger_version or '-'}"),
            ("champion", f"{result.champion_before or 'none'} -> {result.champion_after or 'none'}"),
            ("fresh slice", f"{result.fresh_source} ({result.fresh_kind or '?'})"),
            ("wall time", f"{result.seconds:.0f} s")]
    if result.canary:
        rows.append(("canary", result.canary))
    if params.serve_url:
        rows.append(("serving app", f"{params.serve_url}: answers version {result.served_version or '-'}"))
    sections = [f"# Release of `{params.registered_model}`: {release_verdict(result)}", key_value_table(rows)]
    for title, text in (("Gate", result.gate_table), ("Compression: the artefacts weighed", result.variants_table),
                        ("Challenger and champion", result.compare_table),
                        ("What changed, image by image", result.changes_table)):
        if text.strip():
            sections.append(f"## {title}\n\n{text_block(text)}")
    steps = "\n".join(f"{name:<10} {seconds:7.2f}" for name, seconds in result.steps.items())
    sections.append(f"## Steps (seconds)\n\n{text_block(steps)}")
    return "\n\n".join(sections) + "\n"
