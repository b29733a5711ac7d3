"""Runs and where they live: the SQLite store, train-with-store (`training`), sweeps,
executors (local and Ray)."""
