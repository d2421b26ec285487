"""Rich console output shared by every stage."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# No console markup: paths, ids and comments are the user's, and '[/x]' in one must print as it is.
console = Console(stderr=True, soft_wrap=True, markup=False)  # progress and logs; long lines stay whole in a log file
results = Console(soft_wrap=True, markup=False)  # what a command answers: tables a user may redirect to a file


def warn(text: str) -> None:
    """A warning line on stderr, in yellow."""
    console.print(text, style="yellow", highlight=False)


@contextlib.contextmanager
def progress_bar(description: str, total: int):
    """A rich progress bar; yields a function that advances it by n."""
    if total <= 0:
        yield lambda n=1: None
        return
    columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    """A rich table with `columns` and `rows` (values shown with str)."""
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[str(v) for v in r])
    return t
