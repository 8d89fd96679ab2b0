"""Console output: one rich console, progress bars for anything that takes more than a few seconds."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)
QUIET = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 talks


def say(msg: str) -> None:
    """Print one line on stderr; paths such as `run[/old]` or `[bold]` are text, never markup."""
    if not QUIET:
        console.print(msg, markup=False)


def progress(**kw) -> Progress:
    """A progress bar on stderr; silent when stderr is not a terminal unless forced."""
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False, disable=QUIET or not sys.stderr.isatty(), **kw)
