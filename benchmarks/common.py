"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def append_result(out: str | Path, result: dict) -> None:
    """Append `result` to the JSON list in `out` (created if missing)."""
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    history = []
    if out_path.is_file():
        try:
            history = json.loads(out_path.read_text())
        except json.JSONDecodeError:
            history = []
        if not isinstance(history, list):
            history = [history]
    history.append(result)
    out_path.write_text(json.dumps(history, indent=2) + "\n")
    print(f"appended to {out_path}", file=sys.stderr)
