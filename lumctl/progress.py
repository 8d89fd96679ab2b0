"""Console output: one rich console; progress bars on a terminal, a plain log line every few seconds
otherwise (a log file, CI, `nohup`), so a long stage is never silent until it ends."""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False, soft_wrap=True)
QUIET = os.environ.get("RANK", "0") != "0"  # under torchrun only rank 0 talks
# seconds between two progress lines when stderr is not a terminal
LOG_EVERY = float(os.environ.get("LUMCTL_PROGRESS_EVERY", "5"))


def say(msg: str) -> None:
    """Print one line on stderr; paths such as `run[/old]` or `[bold]` are text, never markup."""
    if not QUIET:
        console.print(msg, markup=False)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LogProgress:
    """The part of rich's Progress the stages use (add_task, update), written as plain lines:
    `pretrain: 120/1000 (12%) loss 3.2100 | 0:00:35 elapsed, ~0:04:16 left`, at most one line
    every `every` seconds per task, and a last line at the end of a task that printed one."""

    def __init__(self, every: float = LOG_EVERY, write=None, clock=time.monotonic):
        self.every, self.clock = every, clock
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.tasks: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for t in self.tasks:
            if t["visible"] and t["printed"] is not None and t["printed"] != t["completed"]:
                self._line(t)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, info: str = "",
                 visible: bool = True, **_) -> int:
        now = self.clock()
        self.tasks.append({"description": description, "total": total, "completed": completed, "info": info,
                           "visible": visible, "start": now, "start_done": completed, "last": now, "printed": None})
        return len(self.tasks) - 1

    def update(self, task: int, completed: float | None = None, advance: float | None = None,
               info: str | None = None, **_) -> None:
        t = self.tasks[task]
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        if info is not None:
            t["info"] = info
        if t["visible"] and self.clock() - t["last"] >= self.every:
            self._line(t)

    def _line(self, t: dict) -> None:
        now = self.clock()
        t["last"], t["printed"] = now, t["completed"]
        done, total = t["completed"], t["total"]
        line = f"{t['description']}: {done:,.0f}" + (f"/{total:,.0f} ({100 * done / total:.0f}%)" if total else "")
        if t["info"]:
            line += f" {t['info']}"
        elapsed = now - t["start"]
        line += f" | {_hms(elapsed)} elapsed"
        rate = (done - t["start_done"]) / elapsed if elapsed > 0 else 0.0
        if total and rate > 0 and done < total:
            line += f", ~{_hms((total - done) / rate)} left"
        self.write(line)


def progress(**kw) -> Progress | LogProgress:
    """A progress bar on a terminal; plain log lines every LUMCTL_PROGRESS_EVERY seconds otherwise."""
    if not QUIET and not sys.stderr.isatty():
        return LogProgress()
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}", markup=False), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False, disable=QUIET, **kw)
