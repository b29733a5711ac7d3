"""User-facing errors.

Anything the user can fix (bad input, missing data, corrupt files) raises `BatchlabError`.
The CLI turns it into one line on stderr and exit code 2; library users get a normal exception.
"""


class BatchlabError(Exception):
    """An error caused by input the user controls; the message must say what to do."""


class DataError(BatchlabError):
    """Missing, truncated or corrupt dataset files."""


class ConfigError(BatchlabError):
    """A configuration that cannot be run."""


class AllRunsFailed(BatchlabError):
    """Every training run of an experiment failed: its outputs hold no measurement. Exit code
    1 (not 2): the input was accepted, the work was not done."""

    exit_code = 1
