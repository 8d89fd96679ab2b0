"""Helpers of the foundation tests (specs, readers, CLI, stores, real data): writing specs as TOML
into tmp_path, running the CLI, locating real data. Imported as `from helpers import ...`."""

from __future__ import annotations

import os
from pathlib import Path

from lumctl.spec_io import dump_toml

REPO = Path(__file__).resolve().parents[1]
# the real datasets, found as the shipped specs find them: $LUMCTL_DATA, else ../shared/data beside the clone
DATA = Path(os.environ.get("LUMCTL_DATA") or REPO.parent / "shared" / "data").resolve()


def write_toml(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(data), encoding="utf-8")
    return path


def invoke(*args: str):
    """Run the real CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from lumctl.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


def spec_in(tmp_path: Path, data: dict, name: str = "x.toml") -> Path:
    """Write `data` as a spec in tmp_path whose store_root is tmp_path/stores (unless `data` sets one)."""
    return write_toml(Path(tmp_path) / name, {"store_root": str(Path(tmp_path) / "stores"), **data})


def tiny(tmp_path: Path, name: str = "tiny.toml", store_root: Path | None = None, **sections) -> Path:
    """A 50-user synthetic experiment (synth, tokenize, pack); sections override."""
    data = {
        "experiment": "tiny",
        "synth": {"users": 50, "items": 40, "categories": 5, "scenarios": 2, "events_per_user": [4, 25], "seed": 3},
        "tokenize": {"format": "synth", "conditions": [
            {"name": "scenario", "source": "column", "column": "scenario"},
            {"name": "category", "source": "item_attr", "column": "category"}]},
        "pack": {"seq_len": 64, "max_items": 20},
    }
    if store_root is not None:
        data["store_root"] = str(store_root)
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return spec_in(tmp_path, data, name)
