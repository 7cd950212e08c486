"""Benchmarks: side-by-side timings of our JAX code against the diffusers reference."""
