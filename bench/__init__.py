"""Custos benchmarks: ``just bench [--quick]``, i.e. ``python -m bench.run``.

Not tests: nothing here asserts a time.
"""
