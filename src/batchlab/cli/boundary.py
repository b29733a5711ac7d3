"""The CLI's one error boundary: what any failure looks like on the terminal.

- A user error (`BatchlabError`, a pydantic `ValidationError`, a click usage error, an OS error
  on a path the user gave) is ONE line on stderr and exit code 2.
- Ctrl-C is one line and exit 130.
- Anything else is a bug: one "internal error" line naming a log file that holds the traceback,
  and exit 1. A raw traceback never reaches the terminal.

Messages are printed as plain text (never through rich markup), so `[base]` or
`batchlab[ray]` in a message reach the user whole.

With `--json`, stdout carries exactly one JSON object, success or failure (`{"error": ...,
"code": ...}`): while the command runs, `sys.stdout` is stderr, so whatever a user's model or
data function prints cannot pollute it, and the command's object goes out through
`emit_json` to the real stdout.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchlab.errors import BatchlabError

_json_out: Any = None  # the real stdout while a --json command runs (sys.stdout is stderr)
_emitted = False
USER_ERROR = 2
INTERNAL_ERROR = 1
INTERRUPTED = 130


MAX_WORD = 200


def one_line(msg: str) -> str:
    """Collapse a message onto one line (multi-line library messages included); a word longer
    than MAX_WORD characters (a 20,000-character argument echoed back) is cut in the middle."""
    return " ".join(w if len(w) <= MAX_WORD else f"{w[:80]}...({len(w)} characters)...{w[-40:]}"
                    for w in str(msg).split())


def say_error(msg: str) -> None:
    """`error: MSG` on stderr as one plain line (red on a terminal; never markup-parsed)."""
    text = one_line(msg)
    if sys.stderr.isatty() and not os.environ.get("NO_COLOR"):
        sys.stderr.write(f"\x1b[31merror:\x1b[0m {text}\n")
    else:
        sys.stderr.write(f"error: {text}\n")
    sys.stderr.flush()


def emit_json(doc: Any, text: str | None = None) -> None:
    """Print the command's one JSON object (`doc`, or `text` already encoded) on the real
    stdout, even while user code's prints are being sent to stderr."""
    import json

    global _emitted
    out = _json_out if _json_out is not None else sys.stdout
    out.write((text if text is not None else json.dumps(doc)) + "\n")
    out.flush()
    _emitted = True


def _json_error(msg: str, code: int) -> None:
    """Under --json, a failure is the one object on stdout too (unless one was printed)."""
    if _json_out is not None and not _emitted:
        emit_json({"error": one_line(msg), "code": code})


def say_warning(msg: str) -> None:
    sys.stderr.write(f"warning: {one_line(msg)}\n")
    sys.stderr.flush()


def log_dir() -> Path:
    """`$BATCHLAB_LOG_DIR`, else the platform's user log folder for batchlab."""
    env = os.environ.get("BATCHLAB_LOG_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_log_dir("batchlab"))


def write_crash_log(exc: BaseException, title: str = "batchlab internal error") -> Path | None:
    """The traceback (plus the command line) in a new file of the log folder, or of the temp
    folder when that cannot be written; None if nowhere can."""
    import tempfile

    text = (f"{title} at {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            f"command: {' '.join(sys.argv)}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (log_dir(), Path(tempfile.gettempdir()) / "batchlab-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def _usage_error(e: BaseException) -> str | None:
    """The message of a click usage error (typer vendors click: matched by duck type)."""
    if hasattr(e, "format_message") and hasattr(e, "exit_code"):
        return str(e.format_message())
    return None


def _os_error(e: OSError) -> str:
    """An OS error on a path: `cannot write PATH: Permission denied`-style."""
    where = f" {e.filename}" if e.filename else ""
    return f"file system error on{where}: {e.strerror or e}"


def run_guarded(entry: Callable[[], Any]) -> None:
    """Run the CLI `entry` (a click/typer app called with standalone_mode=False) and turn every
    outcome into an exit code; see the module docstring."""
    global _json_out, _emitted

    json_mode = "--json" in sys.argv[1:]
    real_stdout = sys.stdout
    _emitted = False
    if json_mode:
        _json_out, sys.stdout = real_stdout, sys.stderr
    try:
        _run(entry)
    finally:
        if json_mode:
            sys.stdout, _json_out = real_stdout, None


def _fail(msg: str, code: int) -> None:
    say_error(msg)
    _json_error(msg, code)
    sys.exit(code)


def _run(entry: Callable[[], Any]) -> None:
    from pydantic import ValidationError

    from batchlab.config import format_validation_error

    try:
        rc = entry()
        if rc == INTERRUPTED:  # typer turns Ctrl-C into a *returned* 130 without standalone mode
            raise KeyboardInterrupt
    except BatchlabError as e:
        msg = str(e)
        if e.__cause__ is not None and type(e).__name__ == "UserCodeError":
            log = write_crash_log(e.__cause__, "error in the user's code")
            msg += f" (traceback in {log})" if log else ""
        _fail(msg, getattr(e, "exit_code", USER_ERROR))
    except ValidationError as e:
        _fail(format_validation_error(e), USER_ERROR)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; finished runs are stored, re-run to resume\n")
        _json_error("interrupted; finished runs are stored, re-run to resume", INTERRUPTED)
        sys.exit(INTERRUPTED)
    except SystemExit:
        raise
    except OSError as e:  # a path the user gave: missing, read-only, a folder, disk full...
        _fail(_os_error(e), USER_ERROR)
    except Exception as e:
        name = type(e).__name__
        msg = _usage_error(e)
        if msg is not None:
            _fail(msg, USER_ERROR)
        if name == "Exit":
            sys.exit(getattr(e, "exit_code", 0))
        if name == "Abort":
            _json_error("aborted", INTERRUPTED)
            sys.exit(INTERRUPTED)
        log = write_crash_log(e)
        where = f"traceback in {log}" if log else "no log could be written"
        _fail(f"internal error: {name}: {one_line(str(e))[:300]} ({where}); please report it",
              INTERNAL_ERROR)
