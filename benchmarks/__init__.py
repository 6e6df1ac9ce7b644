"""remedis benchmarks: `python benchmarks/run.py [--reduced]` (see benchmarks/README.md)."""
