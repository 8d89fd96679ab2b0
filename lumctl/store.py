"""Stores on disk: atomic writes, manifests and up-to-date checks.

Every stage writes its output into a temporary sibling directory and renames it into place,
so a killed run never leaves a half-written store under the real name. The manifest
(`manifest.json`) is written last, inside the temporary directory; a store without a
complete manifest is never accepted downstream.

Stores can also be read from fsspec URLs (`s3://bucket/stores/...`, `memory://` in tests;
spec key `inputs_root`), so the ranks of a cluster read one copy. Object stores have no
rename, so there the manifest alone is the commit marker: `copy_store` deletes the old
manifest first, then the old files, copies the data, and writes the manifest last; a reader
(`read_manifest`) accepts a store only once its complete manifest is there.
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


def is_url(loc: str | Path) -> bool:
    return "://" in str(loc)


def join(loc: str | Path, *parts: str) -> str | Path:
    """`loc / parts`: a Path for a local path, a string for a URL (pathlib would fold its '//')."""
    if is_url(loc):
        return "/".join([str(loc).rstrip("/"), *parts])
    return Path(loc).joinpath(*parts)


def read_manifest(store: str | Path) -> dict | None:
    """The manifest of a complete store, or None when there is no complete store at `store`."""
    try:
        if is_url(store):
            import fsspec
            with fsspec.open(join(store, MANIFEST), "r") as f:
                m = json.loads(f.read())
        else:
            p = Path(store) / MANIFEST
            if not p.is_file():
                return None
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


def require_checkpoint(path: Path, why: str) -> Path:
    """A checkpoint folder (model.pt + config.json), or a one-line error on the folder saying `why`."""
    if not ((path / "model.pt").is_file() and (path / "config.json").is_file()):
        raise InputError(str(path), why)
    return path


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


def copy_store(src: str | Path, dst: str | Path) -> None:
    """Copy the complete store `src` to `dst` (local paths or fsspec URLs), replacing what is there.
    The commit protocol of object stores: old manifest removed first, manifest written last."""
    from fsspec.core import url_to_fs
    if read_manifest(src) is None:
        raise InputError(str(src), "no complete store here to copy")
    sfs, spath = url_to_fs(str(src))
    dfs, dpath = url_to_fs(str(dst))
    dpath = dpath.rstrip("/")
    if dfs.exists(f"{dpath}/{MANIFEST}"):
        dfs.rm(f"{dpath}/{MANIFEST}")           # from here on readers see no store at dst ...
    if dfs.exists(dpath):
        dfs.rm(dpath, recursive=True)           # ... and no stale chunk survives into the new one
    files = [f for f in sfs.find(spath) if not f.endswith(f"/{MANIFEST}")]
    for f in [*files, f"{spath.rstrip('/')}/{MANIFEST}"]:
        to = f"{dpath}/{f[len(spath.rstrip('/')):].lstrip('/')}"
        dfs.makedirs(to.rsplit("/", 1)[0], exist_ok=True)
        with sfs.open(f, "rb") as a, dfs.open(to, "wb") as b:
            shutil.copyfileobj(a, b)


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
