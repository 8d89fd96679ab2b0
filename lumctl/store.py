"""Stores on disk: atomic writes, manifests and up-to-date checks.

Every stage writes its output into a temporary sibling directory and renames it into place,
so a killed run never leaves a half-written store under the real name. The manifest
(`manifest.json`) is written last, inside the temporary directory; a store without a
complete manifest is never accepted downstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lumctl import __version__
from lumctl.errors import InputError

MANIFEST = "manifest.json"


def hash_obj(obj: Any) -> str:
    """Stable sha256 of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def hash_file(path: Path, full_limit: int = 512 << 20) -> str:
    """Content hash of a raw input file. Files over `full_limit` bytes hash their size plus the
    first and last 16 MiB (hashing a multi-GB Taobao log on every run would cost minutes)."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= full_limit:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(16 << 20))
            f.seek(size - (16 << 20))
            h.update(f.read())
    return h.hexdigest()


def read_manifest(store: Path) -> dict | None:
    """The manifest of a complete store, or None when there is no complete store at `store`."""
    p = Path(store) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) and m.get("complete") is True else None


def require_store(store: Path, stage: str) -> dict:
    """The manifest of an upstream store, or a one-line error telling which command makes it."""
    m = read_manifest(store)
    if m is None:
        raise InputError(str(store), f"no complete {stage} store here (run `lumctl {stage}` first)")
    return m


def store_hash(manifest: dict) -> str:
    """Identity of a store: the hash of its manifest without the wall-clock fields."""
    return hash_obj({k: v for k, v in manifest.items() if k not in ("created", "seconds")})


def is_up_to_date(store: Path, spec_hash: str, inputs: dict[str, str]) -> bool:
    m = read_manifest(store)
    return (
        m is not None
        and m.get("spec_hash") == spec_hash
        and m.get("inputs") == inputs
        and m.get("lumctl_version") == __version__
    )


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success rename it to `target`
    (replacing an old store), on failure delete it. Readers see the old store or the new one,
    never a mix."""
    tmp = fresh_dir_beside(target)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def fresh_dir_beside(target: Path) -> Path:
    """A new empty temporary directory in the folder of `target` (so a rename can move it there)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`, replacing an old `target`."""
    target = Path(target)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        target.rename(old)
    Path(tmp).rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_manifest(tmp: Path, *, stage: str, spec_hash: str, inputs: dict[str, str],
                   counts: dict[str, Any], extra: dict[str, Any] | None = None,
                   started: float | None = None) -> dict:
    """Write the manifest last, marking the store complete."""
    m = {
        "stage": stage,
        "complete": True,
        "spec_hash": spec_hash,
        "inputs": inputs,
        "counts": counts,
        "lumctl_version": __version__,
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 3) if started else None,
        **(extra or {}),
    }
    (Path(tmp) / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True, default=str))
    return m


def _versions() -> dict[str, str]:
    import sys
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for pkg in ("numpy", "numba", "zarr", "pyarrow", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
