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

Stores verify their content. The manifest records a sha256 per array (per file outside Zarr
arrays: `checksums`), a seal over the manifest itself, and the identity of the code that wrote it
(`code`: a hash of the package's files, plus the git commit and dirty flag when there is one).
`require_store` verifies an upstream store before a stage reads it: a missing, truncated or
altered chunk, or a hand-edited manifest, is one line naming the store and the array, and
`is_up_to_date` then says "rebuild" instead of "up to date". A store written by other code is
stale too, unless LUMCTL_ALLOW_OTHER_CODE=1.

Concurrency: `store_lock` (one lock file beside each store) lets one run of a stage write a store
at a time; the temporary folders of `atomic_dir` carry their owner (pid and host) in their name, so
a later run removes those whose owner is gone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lumctl import __version__
from lumctl.errors import InputError

MANIFEST = "manifest.json"
SKIP_CHECKSUM = ("checkpoints",)  # pretrain's resume points: not read downstream, rewritten while a run goes on


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


def input_files_hashes(files: list[Path], root: Path, items: Path | None = None) -> dict[str, str]:
    """{name: content hash} of raw input files: a file's name is its path relative to `root` (the data
    folder, or the data file itself), so the same data at another path has the same identity; the item
    table (`items`) is named `items:<file name>`."""
    root = Path(root)
    out = {}
    for f in files:
        f = Path(f)
        if items is not None and f == items:
            name = f"items:{f.name}"
        elif root.is_dir() and f.is_relative_to(root):
            name = f.relative_to(root).as_posix()
        else:
            name = f.name
        out[name] = hash_file(f)
    return out


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
    """The manifest of an upstream store whose content matches it, or a one-line error telling which
    command makes it (or rebuilds it)."""
    m = read_manifest(store)
    if m is None:
        raise InputError(str(store), f"no complete {stage} store here (run `lumctl {stage}` first)")
    problem = verify_store(store, m)
    if problem is not None:
        raise InputError(str(store), f"{problem}; run `lumctl {stage}` to rebuild it")
    return m


def require_checkpoint(path: Path, why: str) -> Path:
    """A checkpoint folder (model.pt + config.json), or a one-line error on the folder saying `why`.
    A checkpoint inside a store (e.g. pretrain/final) is usable only once that store's manifest says the
    store is complete and its content matches."""
    path = Path(path)
    if not ((path / "model.pt").is_file() and (path / "config.json").is_file()):
        raise InputError(str(path), why)
    for up in list(path.resolve().parents)[:3]:
        if (up / MANIFEST).exists():
            m = read_manifest(up)
            stage = _stage_of(up)
            if m is None:
                raise InputError(str(path), f"the {stage} store {up} is not complete (a run is going on, or was "
                                 f"stopped before its manifest); run `lumctl {stage}` to finish it")
            require_store(up, stage)
            break
    return path


def _stage_of(store: Path) -> str:
    try:
        return str(json.loads((Path(store) / MANIFEST).read_text()).get("stage") or Path(store).name)
    except (OSError, ValueError, AttributeError):
        return Path(store).name


def begin_store(store: Path, stage: str) -> None:
    """Mark a store written in place (pretrain) as not complete until write_manifest marks it complete:
    readers, and checkpoints inside it, are refused meanwhile."""
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    tmp = store / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"stage": stage, "complete": False, "pid": os.getpid(), "host": socket.gethostname()}))
    os.replace(tmp, store / MANIFEST)


def store_hash(manifest: dict) -> str:
    """Identity of a store: the hash of its manifest without the wall-clock fields (and the seal over them),
    so an identical rebuild does not make its downstream stores stale."""
    return hash_obj({k: v for k, v in manifest.items() if k not in ("created", "seconds", "seal")})


def is_up_to_date(store: Path, spec_hash: str, inputs: dict[str, str]) -> bool:
    """The store is complete, made from this spec section and these inputs by this code, and its content
    matches its manifest (a damaged store is rebuilt, not reported up to date)."""
    m = read_manifest(store)
    return (
        m is not None
        and m.get("spec_hash") == spec_hash
        and m.get("inputs") == inputs
        and m.get("lumctl_version") == __version__
        and same_code(m)
        and verify_store(store, m) is None
    )


# ------------------------------------------------------------------------------------ code identity
def allow_other_code() -> bool:
    """LUMCTL_ALLOW_OTHER_CODE=1: accept stores written by other code as up to date."""
    return os.environ.get("LUMCTL_ALLOW_OTHER_CODE", "").lower() in ("1", "true", "yes")


def same_code(manifest: dict) -> bool:
    return allow_other_code() or (manifest.get("code") or {}).get("hash") == code_identity()["hash"]


@functools.lru_cache(maxsize=1)
def code_identity() -> dict:
    """Which code writes a store: a sha256 of the package's .py files (what decides staleness), and, when
    the package sits in a git checkout, its commit and whether the package's files differ from it."""
    import subprocess
    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    out = {"hash": h.hexdigest(), "git": None, "dirty": None}
    try:
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=10, cwd=pkg)
        head = run(["git", "rev-parse", "HEAD"])
        if head.returncode == 0:
            out["git"] = head.stdout.strip()
            out["dirty"] = bool(run(["git", "status", "--porcelain", "--", "."]).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


# ------------------------------------------------------------------------------------ content checksums
def _files(store: str | Path) -> tuple[object, str, list[str]]:
    """(filesystem, root, relative paths of the store's files): the manifest, dot-files and SKIP_CHECKSUM
    folders left out."""
    from fsspec.core import url_to_fs
    fs, root = url_to_fs(str(store))
    root = root.rstrip("/")
    rel = sorted(f[len(root):].lstrip("/") for f in fs.find(root))
    keep = [r for r in rel if r != MANIFEST and not any(part.startswith(".") for part in r.split("/"))
            and r.split("/")[0] not in SKIP_CHECKSUM]
    return fs, root, keep


def _unit(rel: str, arrays: set[str]) -> str:
    """The array a file belongs to (the deepest folder holding an array's zarr.json), else the file itself."""
    parts = rel.split("/")
    for k in range(len(parts) - 1, 0, -1):
        d = "/".join(parts[:k])
        if d in arrays:
            return d
    return rel


def content_checksums(store: str | Path) -> dict[str, str]:
    """sha256 per Zarr array (over its files' names and bytes) and per other file of a store."""
    fs, root, rel = _files(store)
    arrays = set()
    for r in rel:
        if r.endswith("/zarr.json"):
            try:
                if json.loads(fs.cat_file(f"{root}/{r}")).get("node_type") == "array":
                    arrays.add(r[: -len("/zarr.json")])
            except ValueError:
                pass
    hashes: dict[str, hashlib._Hash] = {}
    buf = bytearray(256 << 10)  # one small buffer, reused: hashing a large store adds no memory
    view = memoryview(buf)
    for r in rel:
        h = hashes.setdefault(_unit(r, arrays), hashlib.sha256())
        h.update(r.encode() + b"\0")
        with fs.open(f"{root}/{r}", "rb") as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        h.update(b"\0")
    return {k: v.hexdigest() for k, v in sorted(hashes.items())}


def _seal(manifest: dict) -> str:
    return hash_obj({k: v for k, v in manifest.items() if k != "seal"})


_VERIFIED: set[tuple] = set()  # local stores this process verified: (store, seal, every file's size and mtime)


def _listing(store: str | Path) -> tuple | None:
    if is_url(store):
        return None
    _, root, rel = _files(store)
    return tuple((r, *(lambda st: (st.st_size, st.st_mtime_ns))(os.stat(f"{root}/{r}"))) for r in rel)


def verify_store(store: str | Path, manifest: dict) -> str | None:
    """None when the store's content matches its manifest, else what differs (one phrase)."""
    if "checksums" not in manifest or "seal" not in manifest:
        return "store has no checksums (written by an older lumctl)"
    if _seal(manifest) != manifest["seal"]:
        return f"{MANIFEST} was altered after it was written"
    listing = _listing(store)
    key = (str(store), manifest["seal"], listing)
    if listing is not None and key in _VERIFIED:
        return None
    want, have = manifest["checksums"], content_checksums(store)
    for name in sorted(set(want) | set(have)):
        if name not in have:
            return f"array {name}: missing"
        if name not in want:
            return f"array {name}: not in the manifest"
        if want[name] != have[name]:
            return f"array {name}: content differs from the manifest (a chunk missing, truncated or altered)"
    if listing is not None:
        _VERIFIED.add(key)
    return None


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


def _owned_name(target: Path, kind: str) -> Path:
    """`.<name>.<kind>-<pid>-<random>@<host>` beside `target`: its owner is in its name."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"


_OWNED = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-[0-9a-f]+(?:@(.+))?$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_dead(folder: Path) -> list[Path]:
    """Remove the temporary folders (`.*.tmp-*`, `.*.old-*`) in `folder` whose owner process is gone.
    Only owners on this host are checked (a name without a host is from this host); others are kept."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for d in entries:
        m = _OWNED.match(d.name)
        if m is None or not d.is_dir():
            continue
        pid, owner_host = int(m.group(1)), m.group(2) or host
        if owner_host == host and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def fresh_dir_beside(target: Path) -> Path:
    """A new empty temporary directory in the folder of `target` (so a rename can move it there). Leftover
    temporary folders of dead runs in that folder are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead(target.parent)
    tmp = _owned_name(target, "tmp")
    tmp.mkdir()
    return tmp


def resumable_dir(target: Path, key: str) -> Path:
    """The folder a resumable stage writes `target` in, `.<name>.partial-<key[:16]>` beside it: made, or
    kept as an interrupted run of the same work (`key`: spec, inputs and code) left it, for the stage
    to continue. Partial folders of other work on the same target, and dead runs' temporary folders,
    are removed. Call it holding the target's store lock."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead(target.parent)
    mine = target.parent / f".{target.name}.partial-{key[:16]}"
    for d in target.parent.glob(f".{target.name}.partial-*"):
        if d != mine:
            shutil.rmtree(d, ignore_errors=True)
    mine.mkdir(exist_ok=True)
    return mine


def replace_dir(tmp: Path, target: Path) -> None:
    """Rename the finished `tmp` to `target`, replacing an old `target`."""
    target = Path(target)
    old = None
    if target.exists():
        old = _owned_name(target, "old")
        target.rename(old)
    Path(tmp).rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------ locks
def _lock_wait() -> float | None:
    """Seconds a run waits for another run's lock on the same store: LUMCTL_LOCK_WAIT (default: forever)."""
    v = os.environ.get("LUMCTL_LOCK_WAIT", "").strip()
    if not v:
        return None
    try:
        return max(0.0, float(v))
    except ValueError:
        raise InputError("LUMCTL_LOCK_WAIT", f"must be a number of seconds (got {v!r})") from None


@contextmanager
def store_lock(target: Path, stage: str) -> Iterator[None]:
    """Hold `<parent>/.<name>.lock` while a stage writes `target`: a second run of the same stage on the
    same store waits (LUMCTL_LOCK_WAIT seconds, default until the first ends) or stops with one line.
    Temporary folders of dead runs beside the store are removed once the lock is held."""
    import fcntl
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds the lock for all ranks
        yield
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.lock"
    wait, t0, told = _lock_wait(), time.time(), False
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            if wait is not None and time.time() - t0 >= wait:
                raise InputError(str(target), f"another `lumctl {stage}` ({holder}) is writing this store; "
                                 "wait for it to end (or set LUMCTL_LOCK_WAIT)") from None
            if not told:
                from lumctl.progress import say
                say(f"{stage}: waiting for another run ({holder}) writing {target}")
                told = True
            time.sleep(0.2)
            continue
        try:  # the holder before us may have removed the file: lock the file that is at `path` now
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        sweep_dead(target.parent)
        if target.is_dir():
            sweep_dead(target)
        yield
    finally:
        try:
            os.unlink(path)  # removed while still held; a waiting run then re-opens a fresh file
        except OSError:
            pass
        f.close()  # closing the file releases the lock


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
        "code": code_identity(),
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 3) if started else None,
        **(extra or {}),
    }
    m["checksums"] = content_checksums(tmp)
    m = json.loads(json.dumps(m, default=str))  # the seal covers what a reader will parse back
    m["seal"] = _seal(m)
    # written beside, then renamed: a reader never sees half a manifest
    part = Path(tmp) / f".{MANIFEST}.tmp-{os.getpid()}"
    part.write_text(json.dumps(m, indent=2, sort_keys=True))
    os.replace(part, Path(tmp) / MANIFEST)
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
