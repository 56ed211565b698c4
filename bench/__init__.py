"""The Headoni benchmark (issue 4): `python -m bench`; see README, "Benchmark"."""
