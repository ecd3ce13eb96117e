"""`saofu bench reliability`: every attack of the suite at full size, counted in one table.

The sections run one after another (never beside each other: the load section's memory figure
and the fault section's timings assume the machine is theirs) in a temporary folder that is
removed afterwards. The counts are added up over the sections (peak memory growth is the
largest of them) and compared with the issue's targets; every case that did not hold is listed
under the table with what was expected and what happened.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from bench.reliability.section import COUNT_KEYS, Section

# At least / at most, from the issue; "memory_growth_mb" is reported, its bound is the load section's.
TARGETS = {"bad_input_kinds": (">=", 15), "fault_kinds": (">=", 6), "requests_under_swaps": (">=", 20_000),
           "failed_requests": ("<=", 0), "rows_or_files_lost": ("<=", 0), "secrets_found": ("<=", 0)}


def _progress(message: str) -> None:
    print(f"[reliability] {message}", file=sys.stderr, flush=True)


def _sections(workdir: Path, requests: int, swaps: int, clients: int) -> list[tuple[str, Callable[[], Section]]]:
    from bench.reliability.corpus import run_corpus
    from bench.reliability.faults import run_faults
    from bench.reliability.load import run_load
    from bench.reliability.secrets_scan import run_secrets_scan

    return [
        ("bad input", lambda: run_corpus(workdir / "corpus")),
        ("faults", lambda: run_faults(workdir / "faults")),
        ("secrets", lambda: run_secrets_scan(workdir / "secrets")),
        ("load under swaps", lambda: run_load(requests=requests, swaps=swaps, clients=clients)),
    ]


def total_counts(sections: list[Section]) -> dict[str, float]:
    """The sections' counts added up; memory growth is the peak of them, not a sum."""
    totals: dict[str, float] = {}
    for key in COUNT_KEYS:
        values = [s.counts[key] for s in sections if key in s.counts]
        if key == "memory_growth_mb":
            totals[key] = max(values) if values else 0.0
        else:
            totals[key] = sum(values)
    return totals


def targets_met(totals: dict[str, float]) -> dict[str, bool]:
    return {key: (totals[key] >= bound if op == ">=" else totals[key] <= bound)
            for key, (op, bound) in TARGETS.items()}


def run_reliability_bench(requests: int = 20_000, swaps: int = 6, clients: int = 16,
                          out: Path = Path("bench/results/reliability.json")) -> dict:
    t_bench = time.perf_counter()
    sections: list[Section] = []
    with tempfile.TemporaryDirectory(prefix="saofu-reliability-") as tmp:
        for name, run_section in _sections(Path(tmp), requests, swaps, clients):
            _progress(f"{name} ...")
            t0 = time.perf_counter()
            section = run_section()
            section.seconds = time.perf_counter() - t0
            _progress(f"{name}: {len(section.cases)} cases, {len(section.failed)} not held, "
                      f"{section.seconds:.0f} s")
            sections.append(section)
    totals = total_counts(sections)
    summary = {
        **totals,
        "targets": {k: f"{op} {bound}" for k, (op, bound) in TARGETS.items()},
        "met": targets_met(totals),
        "cases_not_held": sum(len(s.failed) for s in sections),
        "sections": [{"name": s.name, "seconds": round(s.seconds, 1), "counts": s.counts,
                      "cases": [asdict(c) for c in s.cases]} for s in sections],
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "setup": {"requests": requests, "swaps": swaps, "clients": clients,
                  "bench_seconds": round(time.perf_counter() - t_bench, 1), "date": time.strftime("%Y-%m-%d")},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    summary["table"] = format_table(summary, sections)
    return summary


def format_table(summary: dict, sections: list[Section]) -> str:
    rows = [("", "measured", "target", "met")]
    for key in COUNT_KEYS:
        value = summary[key]
        shown = f"{value:.1f}" if key == "memory_growth_mb" else f"{value:,.0f}"
        target = summary["targets"].get(key, "reported")
        met = {True: "yes", False: "NO"}.get(summary["met"].get(key), "-")
        rows.append((key, shown, target, met))
    rows.append(("", "", "", ""))
    for s in sections:
        rows.append((f"section: {s.name}", f"{len(s.cases)} cases", f"{len(s.failed)} not held", f"{s.seconds:.0f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    failed = [(s.name, c) for s in sections for c in s.failed]
    if failed:
        lines += ["", "cases that did not hold:"]
        lines += [f"  [{name}] {c.kind} -> {c.target}: expected {c.expected}; got {c.got}" for name, c in failed]
    return "\n".join(lines)
