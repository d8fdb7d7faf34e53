"""The benchmark scenarios, in the order they run. Each module has ``NAME`` and ``run(bench) -> rows``."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from bench._context import Bench
from bench._stats import Row
from bench.scenarios import (
    attestation,
    cold_start,
    generation,
    inference,
    language_model,
    ledger,
    provisioning,
    replicas,
)

Scenario = Callable[[Bench], list[Row]]

MODULES: tuple[ModuleType, ...] = (
    inference,
    provisioning,
    ledger,
    replicas,
    attestation,
    cold_start,
    language_model,
    generation,
)
SCENARIOS: dict[str, Scenario] = {module.NAME: module.run for module in MODULES}
