"""`saofu bench reliability` adds the sections' counts up honestly and lists every case that did not hold."""

from __future__ import annotations

import pytest

from bench.reliability.run import format_table, targets_met, total_counts
from bench.reliability.section import Case, Section

pytestmark = pytest.mark.timeout(30)


def _sections() -> list[Section]:
    corpus = Section("bad input", [Case("truncated png", "serving", "400", "400", True),
                                   Case("ico bomb", "serving", "415", "500", False)],
                     counts={"bad_input_kinds": 15, "rows_or_files_lost": 0})
    load = Section("load under swaps", [Case("swap 1", "serving", "version 2 answers", "version 2", True)],
                   counts={"requests_under_swaps": 20_000, "failed_requests": 3, "memory_growth_mb": 12.5})
    leak = Section("secrets", [], counts={"secrets_found": 1, "memory_growth_mb": 4.0})
    return [corpus, load, leak]


def test_counts_add_up_and_memory_growth_is_the_peak():
    totals = total_counts(_sections())
    assert totals["bad_input_kinds"] == 15
    assert totals["requests_under_swaps"] == 20_000
    assert totals["failed_requests"] == 3 and totals["secrets_found"] == 1
    assert totals["memory_growth_mb"] == 12.5  # the peak, not 16.5
    assert totals["fault_kinds"] == 0  # a section that did not run counts nothing


def test_a_failed_request_or_a_found_secret_misses_its_target():
    met = targets_met(total_counts(_sections()))
    assert met["bad_input_kinds"] and met["requests_under_swaps"] and met["rows_or_files_lost"]
    assert not met["failed_requests"] and not met["secrets_found"] and not met["fault_kinds"]


def test_the_table_names_every_case_that_did_not_hold():
    sections = _sections()
    totals = total_counts(sections)
    summary = {**totals, "targets": {"failed_requests": "<= 0"}, "met": targets_met(totals)}
    table = format_table(summary, sections)
    assert "[bad input] ico bomb -> serving: expected 415; got 500" in table
    assert "truncated png" not in table  # held cases are counted, not listed
    assert any(line.startswith("failed_requests") and line.rstrip().endswith("NO") for line in table.splitlines())
