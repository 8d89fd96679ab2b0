"""Progress without a terminal: one plain line every few seconds, a last line at the end."""

from __future__ import annotations

from lumctl.progress import LogProgress


def test_log_progress_prints_every_few_seconds_and_at_the_end():
    now = [0.0]
    lines: list[str] = []
    with LogProgress(every=5, write=lines.append, clock=lambda: now[0]) as bar:
        t = bar.add_task("pretrain", total=100, completed=0, info="")
        for step in range(1, 41):
            now[0] += 0.5                                   # 2 steps a second
            bar.update(t, completed=step, info=f"loss {1 / step:.4f}")
        hidden = bar.add_task("query", total=3, visible=False)
        bar.update(hidden, advance=3)
    # a line at 5 s (step 10), 10 s (20), 15 s (30), 20 s (40); 40 is also the end: no second line
    assert lines == ["pretrain: 10/100 (10%) loss 0.1000 | 0:00:05 elapsed, ~0:00:45 left",
                     "pretrain: 20/100 (20%) loss 0.0500 | 0:00:10 elapsed, ~0:00:40 left",
                     "pretrain: 30/100 (30%) loss 0.0333 | 0:00:15 elapsed, ~0:00:35 left",
                     "pretrain: 40/100 (40%) loss 0.0250 | 0:00:20 elapsed, ~0:00:30 left"]


def test_log_progress_last_line_and_resumed_rate():
    now = [0.0]
    lines: list[str] = []
    with LogProgress(every=10, write=lines.append, clock=lambda: now[0]) as bar:
        t = bar.add_task("query", total=8, completed=2)     # resumed at 2: the rate counts from there
        now[0] = 10.0
        bar.update(t, advance=2)
        now[0] = 12.0
        bar.update(t, advance=4)
    assert lines == ["query: 4/8 (50%) | 0:00:10 elapsed, ~0:00:20 left",
                     "query: 8/8 (100%) | 0:00:12 elapsed"]
