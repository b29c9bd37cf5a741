"""Benchmarks and helpers run by the scripts beside them."""
