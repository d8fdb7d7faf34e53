"""The fake enclave the client's tests talk to, served over TLS on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.client.fake_enclave import FakeEnclave, serving


@pytest.fixture
def fake() -> FakeEnclave:
    return FakeEnclave()


@pytest.fixture
def address(fake: FakeEnclave) -> Iterator[str]:
    with serving(fake) as addr:
        yield addr
