"""`saofu bench prefect-db`'s arithmetic on made-up draws (the servers run in the bench itself)."""

from __future__ import annotations

import pytest

from bench import prefect_db
from saofu.errors import SaofuError

pytestmark = pytest.mark.timeout(60)


def _draw(db: str, draw: int, one: list[float], three: list[float], start: float = 5.0) -> dict:
    return {"draw": draw, "database": db, "server_start_s": start, "walls": {"1": one, "3": three}}


def test_stalls_are_counted_per_database_per_load_and_per_draw():
    draws = [
        _draw("sqlite", 0, [0.1, 0.1, 2.1], [0.1] * 5 + [2.2, 6.8]),
        _draw("postgres", 0, [0.12, 0.13, 0.2], [0.3] * 7, start=4.0),
        _draw("sqlite", 1, [0.1, 0.1, 0.1], [0.1] * 6 + [2.05]),
        _draw("postgres", 1, [0.12, 0.11, 0.9], [0.25] * 7, start=6.0),
    ]
    s = prefect_db.summarize(draws, (1, 3))
    assert s["sqlite"]["clients_1"]["over_1s"] == 1 and s["sqlite"]["clients_3"]["over_1s"] == 3
    assert s["sqlite"]["over_1s_per_draw"] == {"1": [1, 0], "3": [2, 1]}
    assert s["sqlite"]["clients_3"]["max_s"] == 6.8 and s["sqlite"]["clients_3"]["subflows"] == 14
    assert s["postgres"]["clients_1"]["over_1s"] == 0 and s["postgres"]["clients_1"]["max_s"] == 0.9
    assert s["postgres"]["server_start_s"] == [4.0, 6.0]
    table = prefect_db.format_table(s, (1, 3))
    lines = table.splitlines()
    assert len(lines) == 6  # header, rule, two loads per database
    assert "SQLite (default)" in lines[2] and "3 (2, 1)" in lines[3]
    assert "PostgreSQL" in lines[4] and "0 (0, 0)" in lines[4] and "5.0" in lines[4]  # median start


def test_bad_sizes_are_refused_before_any_server_starts(tmp_path):
    with pytest.raises(SaofuError, match="at least 1, got draws 0"):
        prefect_db.run_prefect_db_bench(draws=0, out=tmp_path / "x.json", work=tmp_path)
    with pytest.raises(SaofuError, match=r"clients \[1, 0\]"):
        prefect_db.run_prefect_db_bench(client_counts=(1, 0), out=tmp_path / "x.json", work=tmp_path)
    assert not (tmp_path / "x.json").exists()
