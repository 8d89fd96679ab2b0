"""Stage `pack`: each user's training events -> packed rows of `seq_len` tokens (Numba), streamed.

Store layout (`stores/<experiment>/pack/rows.zarr`), arrays as in docs/CONTRACTS.md:
  type int8 [R, S], item int32 [R, S], cond int32 [R, S, F], segment int32 [R, S],
  pos int32 [R, S], loss_mask bool [R, S], target int32 [R, S], user int32 [R, S],
  ts int64 [R, S] (the event's timestamp, for models with time features such as HSTU)
The training part of each user (events before its split's train_end), most recent
`max_items` kept. With a cutoff ([tokenize.split] pretrain_fraction / pretrain_before / pretrain_quantile)
only each user's train events before it (users/pretrain_end): the LUM never trains on the DLRM's samples.

Out of core, in two passes over contiguous blocks of users:
  1. plan (lengths only): the per-user arrays (users/offsets, users/split, users/pretrain_end; [U])
     give each user's window; users are cut in order into blocks whose rows and event span fit
     `[pack] block_mib`, and each block is bin-packed on its own (`assign_rows`, longest first).
     Every user's row and start, and the store's row count, are known before any event is read.
  2. fill: per block, one slice read of events/item, events/cond, events/timestamp covering its
     users (users are contiguous in the event arrays, so a block is one sequential read, never a
     scattered gather), the rows filled (`fill_rows`, into two reused buffers) and appended to the
     Zarr arrays in whole chunks of `chunk_rows` rows (the rows of a partial chunk wait for the next
     block), by one writer thread while the next block is read and filled.
Memory: two blocks of rows and one block of events (about 3x block_mib), the per-user arrays
(a few int64 a user) and the libraries, whatever the number of events.
Contiguous blocks rather than one global placement: a block is one sequential read. The price is
the part-filled last rows of each block, under one row a block: on a 10M-event Taobao-shaped log
(99k users, seq_len 4096, max_items 500) one block packs 3,593 rows (efficiency 0.99992), blocks of
256 MiB 3,594 rows in 3 blocks (0.99964), of 64 MiB 3,600 rows in 9 blocks (0.99798)
(benchmarks/bench_pack_scale.py). Rows are ordered block by block; with one block the store equals
packing every user at once. `pack_train` is the in-memory reference of the whole stage.
Rows are compressed with zstd level 1: the same ratio as zarr's default level on packed rows
at about half its CPU time, which dominates the stage.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from zarr.codecs import ZstdCodec

from lumctl import zarrio
from lumctl.ops.packing import assign_rows, empty_rows, fill_rows, pack_sequences, plan_blocks
from lumctl.progress import progress, say
from lumctl.specs import PackSpec, Spec
from lumctl.store import atomic_dir, is_up_to_date, join, require_store, store_hash, write_manifest

ROW_KEYS = ("type", "item", "cond", "segment", "pos", "loss_mask", "target", "user", "ts")
EVENT_KEYS = ("events/item", "events/cond", "events/timestamp")


def user_windows(offsets: np.ndarray, end: np.ndarray, max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(first event, count) of each user's most recent `max_items` events before position `end`."""
    end = np.asarray(end, np.int64)
    count = np.minimum(end, max_items)
    first = offsets[:-1] + end - count
    return first, count


def train_windows(users: dict[str, np.ndarray], p: PackSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept users [K], first [K], count [K]): the users with a window to pack, and their windows."""
    end = users.get("users/pretrain_end", users["users/split"][:, 0])    # the cutoff, else the train part
    first, count = user_windows(users["users/offsets"], end, p.max_items)
    kept = np.flatnonzero(count > 0)
    return kept, first[kept], count[kept]


def blocks(first: np.ndarray, count: np.ndarray, p: PackSpec, n_fields: int) -> np.ndarray:
    """Block bounds [B+1] over the kept users for `p.block_mib` (see the PackSpec field)."""
    budget = p.block_mib * 2 ** 20
    per_tok = 2 if p.conditions else 1
    row_bytes = 30 + 4 * n_fields                                        # ROW_DTYPES, cond [F]
    ev_bytes = 12 + 4 * n_fields                                         # item, cond [F], timestamp
    return plan_blocks(first, count, per_tok, max(1, int(budget // row_bytes)), max(1, int(budget // ev_bytes)))


def stats(count: np.ndarray, n_users: int, n_rows: int, p: PackSpec) -> dict:
    """The manifest counts of packing `count` [K] events of the kept users into n_rows rows."""
    per_tok = 2 if p.conditions else 1
    tokens = int(count.sum()) * per_tok
    longest = int(count.max()) * per_tok if len(count) else 0
    return {
        "rows": n_rows, "seq_len": p.seq_len, "users": n_users, "tokens": tokens,
        # with conditions every condition token is trained; item-only: every item but a user's last
        "loss_positions": int(count.sum()) if p.conditions else int((count - 1).sum()),
        "efficiency": round(tokens / max(1, n_rows * p.seq_len), 5),
        # per-user padding: every user padded to the longest (truncated) user
        "per_user_padding_efficiency": round(tokens / max(1, n_users * longest), 5),
        "per_user_padding_tokens": n_users * longest,
        "packed_tokens": n_rows * p.seq_len,
    }


def pack_train(data: dict[str, np.ndarray], p: PackSpec) -> tuple[dict[str, np.ndarray], dict]:
    """In-memory reference of `run`: every event in memory, each block packed by `pack_sequences`,
    rows concatenated block by block. (rows {key: [R, S, ...]}, manifest counts)."""
    kept, first, count = train_windows(data, p)
    cond = np.asarray(data["events/cond"])                                 # [E, F]
    bounds = blocks(first, count, p, cond.shape[1])
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = pack_sequences(data["events/item"], cond, first[a:b], count[a:b], p.seq_len, p.conditions,
                              p.strategy, data["events/timestamp"])
        rows["user"] = np.where(rows["user"] >= 0, kept[a:b][np.maximum(rows["user"], 0)], -1).astype(np.int32)
        parts.append(rows)
    if not parts:
        parts = [pack_sequences(data["events/item"], cond, first, count, p.seq_len, p.conditions, p.strategy)]
    rows = {k: np.concatenate([r[k] for r in parts]) for k in ROW_KEYS}
    return rows, {**stats(count, len(kept), len(rows["type"]), p), "blocks": len(bounds) - 1}


def plan(first: np.ndarray, count: np.ndarray, p: PackSpec, n_fields: int):
    """Pass 1, lengths only: (block bounds [B+1], row [K] within its block, start [K], block row offsets [B+1])."""
    bounds = blocks(first, count, p, n_fields)
    row, start = np.empty(len(count), np.int64), np.empty(len(count), np.int64)
    row0 = [0]
    for a, b in zip(bounds[:-1], bounds[1:]):
        row[a:b], start[a:b], n = assign_rows(count[a:b] * (2 if p.conditions else 1), p.seq_len, p.strategy)
        row0.append(row0[-1] + n)
    return bounds, row, start, np.asarray(row0, np.int64)


def run(spec: Spec, force: bool = False) -> Path:
    out = spec.store("pack")
    started = time.time()
    up = spec.store("tokenize")
    inputs = {"tokenize": store_hash(require_store(up, "tokenize"))}
    spec_hash = spec.section_hash("pack")
    if not force and is_up_to_date(out, spec_hash, inputs):
        say(f"pack: {out} is up to date")
        return out
    p, S, cr = spec.pack, spec.pack.seq_len, spec.pack.chunk_rows
    src = zarrio.open_read(join(up, "data.zarr"))
    users = {k: zarrio.get(src, k) for k in ("users/offsets", "users/split", "users/pretrain_end")
             if k.split("/")[1] in src["users"]}                        # [U+1], [U, 2], [U]: U-sized, read whole
    kept, first, count = train_windows(users, p)
    ev = {k: src[k] for k in EVENT_KEYS}                                 # lazy: read by slices below
    F = ev["events/cond"].shape[1]
    bounds, row, start, row0 = plan(first, count, p, F)
    R = int(row0[-1])
    counts = {**stats(count, len(kept), R, p), "blocks": len(bounds) - 1}

    with atomic_dir(out) as tmp:
        g = zarrio.create(tmp / "rows.zarr")
        # two sets of row buffers, reused block after block (one filled while the other is written)
        cap = int(np.diff(row0).max(initial=0)) + cr
        bufs = [empty_rows(cap, S, F) for _ in range(2 if len(bounds) > 2 else 1)]
        arrs = {k: g.create_array(k, shape=(R,) + bufs[0][k].shape[1:], dtype=bufs[0][k].dtype,
                                  chunks=(cr, S) + (max(1, F),) * (k == "cond"), compressors=[ZstdCodec(level=1)],
                                  overwrite=True) for k in ROW_KEYS}
        done, head = 0, None                          # rows handed to the writer; rows of a partial chunk

        def write(rows: dict, at: int, n: int) -> None:
            for k in ROW_KEYS:
                arrs[k][at:at + n] = rows[k][:n]

        # one writer thread: block i is compressed and written while block i+1 is read and filled
        with ThreadPoolExecutor(1) as pool, progress() as bar:
            task = bar.add_task("pack", total=len(bounds) - 1, info="")
            pending = None
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                e0, e1 = int(first[a]), int(first[b - 1] + count[b - 1])  # one slice covers the block's windows
                items, conds, ts = (ev[k][e0:e1] for k in EVENT_KEYS)  # [n], [n, F], [n]
                rows = fill_rows(items, conds, first[a:b] - e0, count[a:b], row[a:b], start[a:b],
                                 int(row0[i + 1] - row0[i]), S, p.conditions, ts, uid=kept[a:b], head=head,
                                 out=bufs[i % len(bufs)])
                del items, conds, ts
                n = len(rows["type"]) if b == bounds[-1] else len(rows["type"]) // cr * cr
                head = {k: rows[k][n:].copy() for k in ROW_KEYS}
                if pending is not None:
                    pending.result()                   # at most one block in flight
                pending = pool.submit(write, rows, done, n)
                del rows
                done += n
                bar.update(task, advance=1, info=f"{done:,}/{R:,} rows")
            if pending is not None:
                pending.result()
        assert done == R, (done, R)
        g.attrs.update({"seq_len": S, "conditions": p.conditions, "max_items": p.max_items})
        write_manifest(tmp, stage="pack", spec_hash=spec_hash, inputs=inputs, counts=counts, started=started)
    say(f"pack: {counts['users']:,} users -> {R:,} rows of {S} tokens in {counts['blocks']} blocks, "
        f"efficiency {counts['efficiency']:.2%} (per-user padding: {counts['per_user_padding_efficiency']:.2%}) "
        f"in {time.time() - started:.1f}s -> {out}")
    return out


def load(store: Path, lazy: tuple[str, ...] = ()) -> dict:
    """The packed rows as numpy arrays [R, S, ...]; the `lazy` ones stay Zarr arrays, read when
    indexed (`rows[k][idx]` reads only the chunks holding rows idx)."""
    require_store(store, "pack")
    g = zarrio.open_read(join(store, "rows.zarr"))  # a path or an fsspec URL
    return {k: g[k] if k in lazy else zarrio.get(g, k) for k in ROW_KEYS}
