"""Stage `pack`: each user's training events -> packed rows of `seq_len` tokens (Numba).

Store layout (`stores/<experiment>/pack/rows.zarr`), arrays as in docs/CONTRACTS.md:
  type int8 [R, S], item int32 [R, S], cond int32 [R, S, F], segment int32 [R, S],
  pos int32 [R, S], loss_mask bool [R, S], target int32 [R, S], user int32 [R, S],
  ts int64 [R, S] (the event's timestamp, for models with time features such as HSTU)
The training part of each user (events before its split's train_end), most recent
`max_items` kept. With a cutoff ([tokenize.split] pretrain_fraction / pretrain_before / pretrain_quantile)
only each user's train events before it (users/pretrain_end): the LUM never trains on the DLRM's samples.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lumctl import zarrio
from lumctl.ops.packing import pack_sequences
from lumctl.progress import say
from lumctl.specs import PackSpec, Spec
from lumctl.stages import tokenize
from lumctl.store import atomic_dir, is_up_to_date, join, require_store, store_hash, write_manifest

ROW_KEYS = ("type", "item", "cond", "segment", "pos", "loss_mask", "target", "user", "ts")


def user_windows(offsets: np.ndarray, end: np.ndarray, max_items: int) -> tuple[np.ndarray, np.ndarray]:
    """(first event, count) of each user's most recent `max_items` events before position `end`."""
    end = np.asarray(end, np.int64)
    count = np.minimum(end, max_items)
    first = offsets[:-1] + end - count
    return first, count


def pack_train(data: dict[str, np.ndarray], p: PackSpec) -> tuple[dict[str, np.ndarray], dict]:
    offsets, split = data["users/offsets"], data["users/split"]
    end = data.get("users/pretrain_end", split[:, 0])                 # the cutoff, else the train part
    first, count = user_windows(offsets, end, p.max_items)
    keep = count > 0
    users = np.flatnonzero(keep)
    rows = pack_sequences(data["events/item"], data["events/cond"], first[keep], count[keep], p.seq_len,
                          p.conditions, p.strategy, data["events/timestamp"])
    real_user = np.where(rows["user"] >= 0, users[np.maximum(rows["user"], 0)], -1).astype(np.int32)
    rows["user"] = real_user
    tokens = int((rows["type"] > 0).sum())
    per_tok = 2 if p.conditions else 1
    longest = int(count.max()) * per_tok
    stats = {
        "rows": int(rows["type"].shape[0]), "seq_len": p.seq_len, "users": int(keep.sum()), "tokens": tokens,
        "loss_positions": int(rows["loss_mask"].sum()),
        "efficiency": round(tokens / max(1, rows["type"].size), 5),
        # per-user padding: every user padded to the longest (truncated) user
        "per_user_padding_efficiency": round(tokens / max(1, int(keep.sum()) * longest), 5),
        "per_user_padding_tokens": int(keep.sum()) * longest,
        "packed_tokens": int(rows["type"].size),
    }
    return {k: rows[k] for k in ROW_KEYS}, stats


def run(spec: Spec, force: bool = False) -> Path:
    out = spec.store("pack")
    started = time.time()
    up = spec.store("tokenize")
    inputs = {"tokenize": store_hash(require_store(up, "tokenize"))}
    spec_hash = spec.section_hash("pack")
    if not force and is_up_to_date(out, spec_hash, inputs):
        say(f"pack: {out} is up to date")
        return out
    data = tokenize.load(up)
    rows, stats = pack_train(data, spec.pack)
    with atomic_dir(out) as tmp:
        g = zarrio.create(tmp / "rows.zarr")
        for k, a in rows.items():
            zarrio.put(g, k, a, chunk_rows=spec.pack.chunk_rows)
        g.attrs.update({"seq_len": spec.pack.seq_len, "conditions": spec.pack.conditions,
                        "max_items": spec.pack.max_items})
        write_manifest(tmp, stage="pack", spec_hash=spec_hash, inputs=inputs, counts=stats, started=started)
    say(f"pack: {stats['users']:,} users -> {stats['rows']:,} rows of {spec.pack.seq_len} tokens, "
        f"efficiency {stats['efficiency']:.2%} (per-user padding: {stats['per_user_padding_efficiency']:.2%}) "
        f"in {time.time() - started:.1f}s -> {out}")
    return out


def load(store: Path, lazy: tuple[str, ...] = ()) -> dict:
    """The packed rows as numpy arrays [R, S, ...]; the `lazy` ones stay Zarr arrays, read when
    indexed (`rows[k][idx]` reads only the chunks holding rows idx)."""
    require_store(store, "pack")
    g = zarrio.open_read(join(store, "rows.zarr"))  # a path or an fsspec URL
    return {k: g[k] if k in lazy else zarrio.get(g, k) for k in ROW_KEYS}
