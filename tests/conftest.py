"""Fixtures every test directory may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.postgres_support import Postgres, start_postgres


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session (skipped without PostgreSQL, failed in CI)."""
    cluster = start_postgres()
    try:
        yield cluster
    finally:
        cluster.close()
