"""Runs and where they live: the SQLite store, sweeps, executors (local and Ray)."""
