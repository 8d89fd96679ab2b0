"""Small helpers around zarr v3: write numpy arrays with sensible chunks, read them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr


def create(path: Path) -> zarr.Group:
    return zarr.open_group(str(path), mode="w", zarr_format=3)


def open_read(path: Path) -> zarr.Group:
    return zarr.open_group(str(path), mode="r", zarr_format=3)


def open_write(path: Path) -> zarr.Group:
    """An existing group, to write into its arrays (torchrun ranks filling their chunks)."""
    return zarr.open_group(str(path), mode="r+", zarr_format=3)


def put(group: zarr.Group, name: str, data: np.ndarray, chunk_rows: int | None = None) -> None:
    """Write `data` as array `name` (a/b paths make subgroups). Strings are stored as vlen UTF-8."""
    data = np.asarray(data)
    if data.dtype.kind in "UO":
        arr = group.create_array(name, shape=data.shape, dtype=str, chunks=tuple(max(1, n) for n in data.shape) or (1,),
                                 overwrite=True)
        if data.size:
            arr[...] = data.astype(str)
        return
    if chunk_rows is None:  # ~8 MiB chunks along the first axis
        row_bytes = max(1, data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64)))
        chunk_rows = max(1, min(len(data) if data.ndim else 1, (8 << 20) // row_bytes))
    chunks = (max(1, chunk_rows),) + tuple(max(1, n) for n in data.shape[1:]) if data.ndim else ()
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks or None, overwrite=True)
    if data.size:
        arr[...] = data


def get(group: zarr.Group, name: str) -> np.ndarray:
    return np.asarray(group[name][...])


def load_groups(group: zarr.Group, names: tuple[str, ...], lazy: tuple[str, ...] = ()) -> dict:
    """The arrays of the sub-groups `names` keyed by path ("events/item"); those of the `lazy`
    sub-groups stay Zarr arrays (read in slices when indexed), the rest are loaded as numpy."""
    out = {}
    for sub in names:
        if sub in group:
            for name in group[sub].array_keys():
                key = f"{sub}/{name}"
                out[key] = group[key] if sub in lazy else get(group, key)
    return out


class Appender:
    """Fill a zarr array of known shape front to back, whole chunks at a time (memory: about one chunk).

    `write(block)` takes the next rows in order; `close()` writes the last partial chunk and checks
    that every row was written."""

    def __init__(self, group: zarr.Group, name: str, shape: tuple[int, ...], dtype, chunk_rows: int | None = None):
        dtype = np.dtype(dtype)
        if chunk_rows is None:  # ~8 MiB chunks along the first axis, as `put`
            row_bytes = max(1, dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64)))
            chunk_rows = max(1, min(max(1, shape[0]), (8 << 20) // row_bytes))
        self.chunk_rows = chunk_rows
        self.arr = group.create_array(name, shape=shape, dtype=dtype,
                                      chunks=(chunk_rows,) + tuple(max(1, n) for n in shape[1:]), overwrite=True)
        self.done = 0
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def write(self, block: np.ndarray) -> None:
        self.pending.append(np.asarray(block, self.arr.dtype))
        self.n_pending += len(block)
        if self.n_pending >= self.chunk_rows:
            buf = np.concatenate(self.pending)
            n = len(buf) // self.chunk_rows * self.chunk_rows
            self.arr[self.done:self.done + n] = buf[:n]
            self.done += n
            self.pending, self.n_pending = [buf[n:]], len(buf) - n

    def close(self) -> None:
        if self.n_pending:
            self.arr[self.done:self.done + self.n_pending] = np.concatenate(self.pending)
            self.done += self.n_pending
            self.pending, self.n_pending = [], 0
        if self.done != self.arr.shape[0]:
            raise RuntimeError(f"{self.arr.name}: wrote {self.done} of {self.arr.shape[0]} rows")
