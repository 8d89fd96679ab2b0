"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def machine(**extra) -> dict:
    """Where a benchmark ran: platform, CPUs, library versions, git commit, plus `extra`."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for pkg in ("numpy", "numba", "pyarrow", "zarr", "torch"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    info.update(extra)
    return info


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
