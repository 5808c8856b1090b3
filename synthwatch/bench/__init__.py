"""Benchmarks that print numbers measured in one run (never timed tests): ``synthwatch bench ...``."""
