"""The ledger's two backends: tests that take ``ledger_db`` run once on SQLite and once on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.postgres_support import Postgres


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_db(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    """Where a test's ledger lives: an SQLite file in its temp dir, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "ledger.sqlite3"
    cluster: Postgres = request.getfixturevalue("postgres")
    return cluster.new_database()
