"""Benchmark scripts; `python -m bench.run --help` lists them."""
