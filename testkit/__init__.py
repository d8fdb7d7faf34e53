"""Harness shared by the integration tests and the benchmarks (not shipped: used from the repository root)."""
