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
