"""A rich progress bar for library code that reports `progress(description, done, total)`
(for example `Context.progress`): one bar per description, removed when it completes."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressBars:
    """Callable as `progress(description, done, total)`; draws on `console` (stderr)."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.console, self.enabled = console, enabled
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, description: str, done: float, total: float) -> None:
        if not self.enabled:
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                transient=True)
            self._progress.start()
        if description not in self._tasks:
            self._tasks[description] = self._progress.add_task(description, total=total)
        task = self._tasks[description]
        self._progress.update(task, completed=done, total=total)
        if done >= total:
            self._progress.remove_task(task)
            del self._tasks[description]
            if not self._tasks:
                self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._tasks.clear()
