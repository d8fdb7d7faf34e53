"""Models the benchmarks serve: the demo classifier and builders for larger ones."""
