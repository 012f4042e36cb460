"""Batch jobs: the on-disk store, the runner that feeds the pool, and the
command-line client."""
