"""Analyses built on runs: gradient-competition trials, scaling fits, throughput."""
