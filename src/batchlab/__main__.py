"""`python -m batchlab`: the same entry point as the `batchlab` console script."""

from batchlab.cli import main

main()
