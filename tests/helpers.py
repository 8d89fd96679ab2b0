"""Helpers of the foundation tests (specs, readers, CLI, stores, real data): writing specs as TOML
into tmp_path, running the CLI, locating real data. Imported as `from helpers import ...`."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository with `shared/` beside it
DATA = REPO.parent / "shared" / "data"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(data: dict) -> str:
    """A small TOML writer: top-level scalars, then one [section] per top-level dict."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{json.dumps(kk)} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def write_toml(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(data), encoding="utf-8")
    return path


def invoke(*args: str):
    """Run the real CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from lumctl.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def spec_in(tmp_path: Path, data: dict, name: str = "x.toml") -> Path:
    """Write `data` as a spec in tmp_path whose store_root is tmp_path/stores (unless `data` sets one)."""
    return write_toml(Path(tmp_path) / name, {"store_root": str(Path(tmp_path) / "stores"), **data})
