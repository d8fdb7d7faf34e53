"""PostgreSQL for the tests: the cluster of ``testkit.postgres``, skipped or failed when it is missing.

Missing binaries skip the test, unless ``CUSTOS_REQUIRE_POSTGRES=1`` (CI)
makes it fail. One cluster per test session (``tests/conftest.py``, fixture
``postgres``); each test that asks for a database gets a fresh one.
"""

from __future__ import annotations

import os

import pytest

from testkit.postgres import Postgres, TcpProxy, bin_dir

__all__ = ["Postgres", "TcpProxy", "require_postgres", "start_postgres"]

REQUIRE_ENV = "CUSTOS_REQUIRE_POSTGRES"


def require_postgres() -> None:
    """Skip (or fail, in CI) when PostgreSQL is not installed."""
    if bin_dir() is not None:
        return
    install = "apt-get install postgresql"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL is required ({REQUIRE_ENV}=1) but not installed: {install}")
    pytest.skip(f"no PostgreSQL ({install}); {REQUIRE_ENV}=1, as in CI, makes this a failure")


def start_postgres() -> Postgres:
    require_postgres()
    return Postgres.start()
