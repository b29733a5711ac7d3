"""The command line (typer + rich live only here): `batchlab train | sweep | runs | experiment |
reproduce | recommend | data | schedule-preset`."""

from batchlab.cli.root import RichReporter, app, main

__all__ = ["RichReporter", "app", "main"]
