"""Benchmarks against curl and nginx; see docs/benchmarks.md. Run: python -m benchmarks."""
