"""Benchmarks of the bridge against floors measured in the same run; `python -m bench --help`."""
