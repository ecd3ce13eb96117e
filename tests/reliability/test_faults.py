"""Faults injected into saofu really happen, and what must survive them does (issue 15, faults).

Each fault of `bench/reliability/faults.py` runs once per module (a fixture) at its small default
size; one test asserts that the fault really happened (requests counted, a process really killed,
ENOSPC really raised) and one that saofu came through it. What they found and this change fixed:
Label Studio down ended in an error naming neither its URL nor, for a 503, anything of saofu's
(the SDK's ApiError); an image write cut short by a full disk left its `.tmp` file in the pool.
"""

from __future__ import annotations

import pytest

from bench.reliability import faults
from bench.reliability.section import Case

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------ Label Studio


@pytest.fixture(scope="module")
def ingest_cases(tmp_path_factory) -> list[Case]:
    # Dropped connections only: each mode costs the retries' ~12 s, and the file's budget is 120 s;
    # the bench also tries a Label Studio answering 503.
    return faults.label_studio_unreachable(tmp_path_factory.mktemp("faults"), modes=("drop",))


@pytest.mark.timeout(240)
def test_ingest_retries_an_unreachable_label_studio_and_changes_nothing(ingest_cases):
    assert len(ingest_cases) == 1
    for case in ingest_cases:
        # 3 tries of the Prefect task, each request tried 3 times by the SDK: the retries happened
        assert case.got.startswith("9 requests"), case.got
        assert "files changed under the project: none" in case.got, case.got
        assert case.lost == 0


@pytest.mark.timeout(30)
def test_ingest_fails_with_a_clear_error_naming_label_studio(ingest_cases):
    assert [c.got for c in ingest_cases if not c.ok] == []


# ------------------------------------------------------------------------------------------ MLflow


@pytest.mark.timeout(240)
def test_a_registration_cut_short_never_moves_an_alias_to_a_half_registered_version(tmp_path):
    # The cut that matters most (the gate passed, champion about to move) through the proxy, then
    # SIGKILL before the version is created; the bench tries every point.
    cases = faults.mlflow_unreachable(tmp_path, cuts=(3,))
    cuts = [c for c in cases if " while " in c.target]
    assert len(cuts) == 2 and all(c.got.startswith("fault injected") for c in cuts), [c.got for c in cuts]
    assert any("SIGKILL" in c.target for c in cuts)
    assert [c.got for c in cases if not c.ok] == []
    assert sum(c.lost for c in cases) == 0


# ---------------------------------------------------------------------------------------- training


@pytest.mark.timeout(200)
def test_a_killed_training_process_resumes_from_its_checkpoint(tmp_path):
    (case,) = faults.training_killed(tmp_path, epochs=12)
    assert "killed by SIGKILL" in case.got, case.got
    assert case.ok, case.got  # resumed after the checkpointed epochs, not from epoch 1


# ------------------------------------------------------------------------------------------ search


@pytest.mark.timeout(200)
def test_a_killed_search_worker_has_its_trial_retried(tmp_path):
    (case,) = faults.search_worker_killed(tmp_path)
    assert "killed by SIGKILL" in case.got, case.got
    assert case.ok, case.got


# ----------------------------------------------------------------------------------------- serving


@pytest.mark.timeout(200)
def test_a_serving_restart_under_load_comes_back_on_the_champion(tmp_path):
    (case,) = faults.serving_restarted(tmp_path, answers_per_phase=20)
    assert case.got.startswith("exit 0"), case.got  # SIGTERM: a clean stop, not a crash
    assert case.ok, case.got
    assert case.lost == 0


# -------------------------------------------------------------------------------------- full disk


@pytest.fixture(scope="module")
def disk_full_case(tmp_path_factory) -> Case:
    (case,) = faults.pool_disk_full(tmp_path_factory.mktemp("faults"), per_phase=8)
    return case


@pytest.mark.timeout(120)
def test_a_full_disk_under_the_pool_never_fails_a_request(disk_full_case):
    got = disk_full_case.got
    assert "writes refused (ENOSPC)" in got and not got.split(";")[1].strip().startswith("0 "), got
    assert got.startswith("32/32 answered 200"), got
    assert "unreadable lines/images: none" in got and "before-fault entries lost: 0" in got, got
    assert "after-fault entries logged: 8/8" in got, got  # the writer recovered


@pytest.mark.timeout(30)
def test_a_full_disk_leaves_no_half_written_file_in_the_pool(disk_full_case):
    assert "leftovers: none" in disk_full_case.got, disk_full_case.got
    assert disk_full_case.ok


# ------------------------------------------------------------------------------------------ section


@pytest.mark.timeout(10)
def test_run_faults_counts_kinds_and_losses(monkeypatch, tmp_path):
    # The section adds its cases up; a fault whose harness breaks is a failed case, not a crash.
    def broken(workdir):
        raise RuntimeError("no such thing")

    monkeypatch.setattr(faults, "FAULTS", (
        lambda w: [Case("a", "t", "e", "g", ok=True), Case("a", "t2", "e", "g", ok=False, lost=2)],
        broken,
    ))
    section = faults.run_faults(tmp_path)
    assert section.counts == {"fault_kinds": 2, "rows_or_files_lost": 2}
    assert [c.ok for c in section.cases] == [True, False, False]
    assert "RuntimeError: no such thing" in section.cases[-1].got
