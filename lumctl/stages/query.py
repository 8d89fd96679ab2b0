"""Stage `query` (Step 2): grouped conditional queries of a pretrained LUM -> point-in-time feature store.

For every user and snapshot, the snapshot's prefix `c_1 i_1 ... c_L i_L` is followed by all N
query conditions `c_q1 ... c_qN` in one sequence ("grouped query"): the query tokens share
position 2L and see the whole prefix and themselves, never each other (lumctl.ops.packing
`grouped_query_mask`, attention `query_block_mask` on CUDA), so the prefix is computed once and
answer n equals the output of a pass with the single query c_qn. The answer o_q is the encoder
output at the query's condition token (what the loss trained).

Point in time. A snapshot is stamped with the timestamp T of its last event and its prefix is
exactly the user's events with timestamp <= T, so it can never depend on a later event; a
consumer joins a sample at time t to the latest snapshot with T < t. Events sharing a timestamp
are never split:
  - snapshot = "split": the snapshot for the valid (test) part holds the events strictly before
    the first valid (test) event's timestamp. Events stamped at that same second are left out
    (they are not "before" the held-out event), so the held-out event is never in its prefix.
  - snapshot = "every_n_events": the snapshot after a user's K-th, 2K-th ... event also holds the
    later events stamped at the same second as that event; snapshots that come out equal are kept once.
A snapshot with an empty prefix does not exist (no row).
The model reads the snapshot's most recent `max_items - 1` events (as pretrain's evaluation);
`top_k` conditions count over the whole prefix.

Output (`stores/<experiment>/query/`):
  answers.zarr/    ragged by snapshot, no padding: the snapshots of answers row u (the user
                   user_index[u]) are rows snap_offsets[u]:snap_offsets[u+1] of every snap/ array,
                   oldest first
    users/snap_offsets int64 [U+1]
    snap/emb        float16|32 [S, N, d]  o_q of query n at the snapshot
    snap/ts         int64 [S]        timestamp of the snapshot's last event
    snap/pos        int64 [S]        events in the snapshot's prefix (>= 1)
    snap/slot       int32 [S]        the snapshot's name: attrs snapshot_names[slot] ("valid" / "test";
                                     "s<j>" = the user's j-th snapshot)
    snap/query_cond int32 [S, N, F]  condition ids each query asked (top_k ranks resolve per snapshot)
    conditions      str   [N]        query names, e.g. "rating=high,genre=top1"
    user_index      int64 [U]        tokenize-store user index;  user_id str [U] raw user id
    attrs: queries (per query: field -> value, or "top<r>"), condition_fields, snapshot, snapshot_names,
           checkpoint, checkpoint_hash, items (the item store, relative to this folder), model (config)
  latest.parquet   one row per user with a snapshot, its latest one: user_id, user_index, snapshot,
                   snapshot_ts, snapshot_pos, one fixed-size list<float16|32>[d] column per query (the
                   store's dtype; named as in `conditions`), and `resolved` (list<string>, the asked
                   conditions) with top_k.
                   The table an online KV store loads.
  manifest.json    inputs: tokenize store hash, checkpoint file hashes, user selection

Item embeddings depend on the checkpoint only, so they live in a store of their own, written once
per checkpoint (and dtype) and reused by every query of it (other users, other queries, --force):
`stores/<experiment>/query-items/<checkpoint hash[:16]>-<dtype>/`
    item_emb.zarr/  item_emb float16|32 [I, d] e^i = model.item_table() of every item vocab id (0 pad,
                    1 unknown);  item_id str [I]
    items.parquet   item_id (the raw id) and emb (fixed-size list<float16|32>[d], the store's dtype) of every real item
                    (vocab ids >= 2), written with item_emb.zarr by `write_items`
    manifest.json

Streaming. A counting pass reads the selected users' timestamps in blocks and counts their
snapshots, so snap_offsets, every array's shape and the packed row length are known before the
first answer. The snapshot rows are then answered in batches of `batch_snapshots` rows (whole
chunks of the snap/ arrays): a batch reads only the events of the users it touches (Zarr slices),
answers them, writes its rows and appends its users' latest snapshots to latest.parquet. Three
batches are in flight: a thread reads the next one while the device answers this one and another
thread writes the last one. Memory is bounded by three batches (plus a few int64 per user), not
by the number of users or events; the manifest's counts say how long the device waited on reads
and writes (read_wait_s, write_wait_s).
Each batch writes its rows and then a marker. In one process the writer thread also appends the
batch's latest rows to latest.parquet as it goes (batches are written in order), so the file is
complete when the last batch is; the manifest is written last and the folder renamed into place.
The folder, `.query.partial-<key>` beside the store, is named by the work (spec, inputs, code): a run
that was killed or interrupted leaves its finished batches there, and the next run of the same work
answers only the batches without a marker (a run of other work removes it); the latest rows of the
finished batches are read back from the stored answers. Under torchrun each rank takes a contiguous
run of the batches, so ranks write disjoint whole chunks of one store; rank 0 creates the arrays
first and, once every rank is done, writes latest.parquet from the stored answers. One process is
the same code with one rank.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Callable

import numpy as np
import torch

from lumctl import dist, zarrio
from lumctl.attention import query_backend, query_block_mask, query_dense_mask
from lumctl.errors import InputError
from lumctl.ops.packing import grouped_query_mask, pack_queries, top_values
from lumctl.progress import progress, say
from lumctl.specs import QuerySpec, Spec
from lumctl.stages import tokenize
from lumctl.stages.pretrain import load_model, resolve_device
from lumctl.store import (
    atomic_dir,
    code_identity,
    hash_file,
    hash_obj,
    is_up_to_date,
    join,
    read_manifest,
    replace_dir,
    require_checkpoint,
    resumable_dir,
    require_store,
    store_hash,
    write_manifest,
)
from lumctl.store import join  # noqa: E402  (fsspec-aware path join)

BATCH_KEYS = {"type": torch.int8, "item": torch.long, "cond": torch.long, "pos": torch.int32}


# ------------------------------------------------------------------------------------ queries
@dataclass
class Queries:
    names: list[str]            # [N] e.g. "rating=high,genre=top1"; "<any>" for the all-'<any>' query
    asked: list[dict[str, str]]  # [N] field -> vocabulary value or "top<r>"
    fixed: np.ndarray           # [N, F] condition ids; 1 ('<any>') where unnamed or top_k
    rank: np.ndarray            # [N, F] top_k rank (0-based) of field f, -1 where not a top_k field
    top_k: dict[int, int]       # field index -> k

    def resolve(self, cond: np.ndarray, first: np.ndarray, count: np.ndarray) -> np.ndarray:
        """[N, F] shared queries, or [D, N, F] when top_k fields resolve per document from the
        events first[d] : first[d]+count[d] of `cond` [E, F]."""
        if not self.top_k:
            return self.fixed
        q = np.repeat(self.fixed[None], len(count), 0)                       # (D, N, F)
        for f, k in self.top_k.items():
            top = top_values(np.ascontiguousarray(cond[:, f]), first, count, k)  # (D, k)
            n_idx = np.flatnonzero(self.rank[:, f] >= 0)
            q[:, n_idx, f] = top[:, self.rank[n_idx, f]]
        return q


def build_queries(qs: QuerySpec, cond_names: list[str], vocabs: dict[str, list[str]]) -> Queries:
    """The cartesian product of `conditions` (or one all-'<any>'), `each` and `top_k` (in that order)."""
    def field(f: str, key: str) -> int:
        if f not in cond_names:
            raise InputError(f"[query].{key}", f"unknown condition field '{f}' (the checkpoint's fields: {cond_names})")
        return cond_names.index(f)

    factors: list[list[tuple[dict, dict, str]]] = []   # per factor: options (field -> id, field -> rank, name)
    base = []
    for i, c in enumerate(qs.conditions or [{}]):
        ids, parts = {}, []
        for f, v in c.items():
            fi = field(f, f"conditions.{i}")
            if v not in vocabs[f][1:]:
                raise InputError(f"[query].conditions.{i}.{f}", f"unknown value '{v}' (values: {vocabs[f][1:]})")
            ids[fi] = vocabs[f].index(v)
            if v != "<any>":
                parts.append(f"{f}={v}")
        base.append((ids, {}, ",".join(parts)))
    factors.append(base)
    for f in qs.each:
        fi = field(f, "each")
        if len(vocabs[f]) <= 2:
            raise InputError("[query].each", f"field '{f}' has no values")
        factors.append([({fi: v}, {}, f"{f}={vocabs[f][v]}") for v in range(2, len(vocabs[f]))])
    for f, k in qs.top_k.items():
        fi = field(f, "top_k")
        factors.append([({}, {fi: r}, f"{f}=top{r + 1}") for r in range(k)])
    F = len(cond_names)
    names, asked, fixed, rank = [], [], [], []
    for combo in itertools.product(*factors):
        ids, ranks, parts = {}, {}, []
        for i_, r_, name in combo:
            ids.update(i_); ranks.update(r_)
            if name:
                parts.append(name)
        row = np.ones(F, np.int32)
        rk = np.full(F, -1, np.int64)
        for fi, v in ids.items():
            row[fi] = v
        for fi, r in ranks.items():
            rk[fi] = r
        names.append(",".join(parts) or "<any>")
        asked.append({cond_names[fi]: vocabs[cond_names[fi]][v] for fi, v in ids.items()}
                     | {cond_names[fi]: f"top{r + 1}" for fi, r in ranks.items()})
        fixed.append(row); rank.append(rk)
    return Queries(names, asked, np.stack(fixed), np.stack(rank),
                   {cond_names.index(f): k for f, k in qs.top_k.items()})


# ------------------------------------------------------------------------------------ snapshots
def parse_users(text: str | None, n_users: int) -> np.ndarray:
    """'0-99', '1,5,7' or a mix ('0-9,20') -> sorted unique tokenize-store user indices."""
    if text is None or not text.strip():
        return np.arange(n_users, dtype=np.int64)
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise InputError("--users", f"expected indices such as 0-99 or 1,5,7 (got {part!r})") from None
        if a > b or a < 0 or b >= n_users:
            raise InputError("--users", f"{part} is not a range of user indices in 0-{n_users - 1}")
        out.append(np.arange(a, b + 1, dtype=np.int64))
    return np.unique(np.concatenate(out))


def users_label(users: np.ndarray, n_users: int) -> str:
    """Canonical text of a selection ('all' or ranges), so '0-9,10-99' and '0-99' are the same input."""
    if len(users) == n_users:
        return "all"
    breaks = np.flatnonzero(np.diff(users) != 1)
    starts, ends = np.r_[users[:1], users[breaks + 1]], np.r_[users[breaks], users[-1:]]
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends))


def snapshot_cuts(offsets: np.ndarray, ts: np.ndarray, split: np.ndarray | None,
                  qs: QuerySpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The snapshots of a block of users whose events are ts[offsets[b]:offsets[b+1]] (time ordered;
    offsets [B+1] from 0): (count [B] snapshots per user, cut [S] events in each snapshot's prefix,
    slot [S] index of its name), rows by user, then oldest first. split [B, 2]: the block's
    users/split (snapshot = "split"). A prefix is exactly the user's events with timestamp <= its last one's."""
    B = len(offsets) - 1
    off, n = offsets[:-1], np.diff(offsets)
    if len(ts) == 0:
        return np.zeros(B, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    tie_first, tie_last = tokenize.tie_groups(offsets, ts)
    if qs.snapshot == "split":
        b = np.asarray(split, np.int64)                                     # (B, 2) first valid / first test event
        g = np.minimum(off[:, None] + b, len(ts) - 1)
        cut = np.where(b < n[:, None], tie_first[g] - off[:, None], b)      # drop events tied with the held-out one
        valid = cut > 0
        return valid.sum(1), cut[valid], np.nonzero(valid)[1].astype(np.int32)
    K = qs.every_n_events
    m = n // K                                                              # nominal snapshots per user
    u_rep = np.repeat(np.arange(B), m)
    j = np.arange(len(u_rep)) - np.repeat(np.cumsum(m) - m, m)
    cut = tie_last[off[u_rep] + (j + 1) * K - 1] - off[u_rep] + 1          # extend over same-second events
    keep = np.ones(len(cut), bool)
    keep[1:] = (u_rep[1:] != u_rep[:-1]) | (cut[1:] != cut[:-1])
    u_rep, cut = u_rep[keep], cut[keep]
    count = np.bincount(u_rep, minlength=B).astype(np.int64)
    slot = (np.arange(len(cut)) - np.repeat(np.cumsum(count) - count, count)).astype(np.int32)
    return count, cut.astype(np.int64), slot


def snapshot_names(qs: QuerySpec, T: int) -> list[str]:
    """Names of the snapshot slots; T = the most snapshots of one user (every_n_events)."""
    return ["valid", "test"] if qs.snapshot == "split" else [f"s{t}" for t in range(max(T, 1))]


# ------------------------------------------------------------------------------------ reading
def _read(arr, starts: np.ndarray, stops: np.ndarray, gap: int = 1 << 16) -> np.ndarray:
    """arr[starts[k]:stops[k]] for ranges in order, concatenated. Ranges less than `gap` elements
    apart are read as one slice and cut in memory (one Zarr read per group, not per user)."""
    if not len(starts):
        return np.asarray(arr[0:0])
    brk = np.flatnonzero(starts[1:] - stops[:-1] > gap) + 1
    parts = []
    for a, b in zip(np.r_[0, brk], np.r_[brk, len(starts)]):
        lo, hi = int(starts[a]), int(stops[b - 1])
        buf = np.asarray(arr[lo:hi])
        n = stops[a:b] - starts[a:b]
        if n.sum() == hi - lo:                                              # touching ranges: the slice itself
            parts.append(buf)
            continue
        parts.append(buf[np.repeat(starts[a:b] - lo - (np.cumsum(n) - n), n) + np.arange(n.sum())])
    return np.concatenate(parts)


class Source:
    """A tokenize store's arrays read lazily by user: Zarr slices of the users asked for. Any mapping
    of array path -> sliceable array works (a Zarr group, or a dict of numpy arrays in tests)."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.offsets = np.asarray(arrays["users/offsets"][:], np.int64)   # [U+1]

    def __getitem__(self, name: str):
        return self.arrays[name]

    def per_user(self, name: str, users: np.ndarray) -> np.ndarray:
        """users/<name> or vocab/user at the sorted user indices `users`."""
        return _read(self.arrays[name], users, users + 1)

    def events(self, name: str, users: np.ndarray) -> np.ndarray:
        """events/<name> of the sorted users `users`, concatenated (their offsets: `local_offsets`)."""
        return _read(self.arrays[name], self.offsets[users], self.offsets[users + 1])

    def local_offsets(self, users: np.ndarray) -> np.ndarray:
        return np.r_[0, np.cumsum(self.offsets[users + 1] - self.offsets[users])].astype(np.int64)


def _blocks(weight: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """[a, b) ranges of consecutive entries whose weights add up to <= budget (at least one entry each)."""
    c = np.cumsum(weight)
    out, a = [], 0
    while a < len(weight):
        b = max(a + 1, int(np.searchsorted(c, (c[a - 1] if a else 0) + budget, "right")))
        out.append((a, b))
        a = b
    return out


COUNT_EVENTS = 1 << 22  # timestamps per block of the counting pass (32 MiB)
CutFn = Callable[[np.ndarray, np.ndarray, np.ndarray, "np.ndarray | None"], tuple[np.ndarray, np.ndarray, np.ndarray]]


def rule_cuts(qs: QuerySpec) -> CutFn:
    """The snapshots of the spec as a function of (users, offsets, ts, split) -> snapshot_cuts."""
    return lambda users, offsets, ts, split: snapshot_cuts(offsets, ts, split, qs)


@dataclass
class Plan:
    users: np.ndarray          # [U] tokenize-store user indices, sorted
    snap_offsets: np.ndarray   # [U+1] snapshots of users[u] are rows snap_offsets[u]:snap_offsets[u+1]
    longest: int               # events in the longest prefix
    T: int                     # most snapshots of one user


def plan(src: Source, users: np.ndarray, qs: QuerySpec, cuts: CutFn) -> Plan:
    """The counting pass: every selected user's number of snapshots, from its timestamps (read in blocks)."""
    n = src.offsets[users + 1] - src.offsets[users]
    count = np.zeros(len(users), np.int64)
    longest = 0
    for a, b in _blocks(n, COUNT_EVENTS):
        u = users[a:b]
        split = src.per_user("users/split", u) if qs.snapshot == "split" else None
        c, cut, _ = cuts(u, src.local_offsets(u), src.events("events/timestamp", u), split)
        count[a:b] = c
        longest = max(longest, int(cut.max(initial=0)))
    return Plan(users, np.r_[0, np.cumsum(count)].astype(np.int64), longest, int(count.max(initial=0)))

# ------------------------------------------------------------------------------------ model passes
def step_tensors(rows: dict[str, np.ndarray], idx: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """The model inputs (BATCH_KEYS) of packed rows `idx` of `pack_queries`' rows, on `device`: each (B, S[, F])."""
    return {key: torch.from_numpy(np.ascontiguousarray(rows[key][idx])).to(dt).to(device) for key, dt in BATCH_KEYS.items()}


@torch.no_grad()
def answer(model, items: np.ndarray, conds: np.ndarray, first: np.ndarray, count: np.ndarray, queries: np.ndarray,
           seq_len: int, batch_rows: int, device: torch.device, grouped: bool = True, backend: str | None = None,
           autocast: bool = False, show: bool = False) -> np.ndarray:
    """Outputs o_q [D, N, d] (float32) of every document's N queries ([N, F] or [D, N, F]).
    grouped: one sequence per document (prefix once + N query tokens); otherwise one sequence
    per (document, query) with its own copy of the prefix (the baseline of the benchmark).
    backend: 'flex' (BlockMask) or 'sdpa' (dense mask: Numba on the CPU, made on the device on CUDA);
    default `query_backend('auto', device, seq_len)`."""
    D = len(count)
    q = np.asarray(queries, np.int32)
    N = q.shape[-2]
    if not grouped:  # D*N documents of one query each
        qd = np.broadcast_to(q, (D, N, q.shape[-1])) if q.ndim == 2 else q
        first, count = np.repeat(first, N), np.repeat(count, N)
        q = np.ascontiguousarray(qd).reshape(D * N, 1, q.shape[-1])
    rows = pack_queries(items, conds, first, count, q, seq_len)
    backend = backend or query_backend("auto", device, seq_len)
    if getattr(model.config, "lowpass_bins", 0):  # the low-pass branch reads the dense mask (grouped queries)
        backend = "sdpa"
    R = len(rows["type"])
    d_model = model.norm.weight.shape[0]
    out = torch.empty(len(count), q.shape[-2], d_model, device=device)          # (D', N', d)
    order = np.argsort(rows["row"], kind="stable")
    bounds = np.searchsorted(rows["row"][order], np.arange(0, R + batch_rows, batch_rows))
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else (
        lambda: torch.autocast(device.type, enabled=False))
    was_training = model.training
    model.eval()
    def prepare(r0: int) -> tuple[dict, object]:
        """The device tensors and the attention mask of the rows r0 : r0 + batch_rows."""
        idx = np.arange(r0, min(R, r0 + batch_rows))
        if backend == "flex" and len(idx) < batch_rows:  # one shape for the compiled kernels: pad with copies
            idx = np.concatenate([idx, np.full(batch_rows - len(idx), idx[-1])])
        b = step_tensors(rows, idx, device)
        if backend == "flex" or device.type == "cuda":   # the mask made on the device from the segments
            make = query_block_mask if backend == "flex" else query_dense_mask
            mask = make(torch.from_numpy(rows["segment"][idx]).to(device), torch.from_numpy(rows["is_query"][idx]).to(device))
        else:                                            # CPU: the Numba mask
            mask = torch.from_numpy(grouped_query_mask(rows["segment"][idx], rows["is_query"][idx])).to(device)
        return b, mask

    def steps():
        """prepare() of every step, made by a thread while the model runs (as pretrain's batches)."""
        q: Queue = Queue(maxsize=3)

        def work():
            try:
                for r0 in range(0, R, batch_rows):
                    q.put(prepare(r0))
            except BaseException as e:  # raised again in the caller
                q.put(e)
            q.put(None)
        threading.Thread(target=work, daemon=True).start()
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    with progress() as bar, ctx():
        task = bar.add_task("query", total=(R + batch_rows - 1) // batch_rows, info="", visible=show)
        for k, (b, mask) in enumerate(steps()):
            r0 = k * batch_rows
            o = model(b, mask)                                                     # (B, S, d)
            docs = order[bounds[k]:bounds[k + 1]]                                  # documents in these rows
            r_i = torch.as_tensor(rows["row"][docs] - r0, device=device)[:, None]  # (n, 1)
            c_i = torch.as_tensor(rows["query_pos"][docs], device=device)          # (n, N')
            out[torch.as_tensor(docs, device=device)] = o[r_i, c_i].float()        # (n, N', d)
            bar.update(task, advance=1)
    model.train(was_training)
    return out.reshape(D, N, d_model).cpu().numpy()


# ------------------------------------------------------------------------------------ writing
def _str(a: np.ndarray) -> np.ndarray:
    """Strings as a fixed-width numpy array (zarr 3 reads them back as StringDType)."""
    return np.asarray(np.asarray(a).tolist(), dtype=str)


LATEST_KEYS = ("user_id", "snapshot", "resolved")  # the string columns of latest.parquet (dictionary encoded)


def arrow_float(dtype: str):
    """The Arrow type of stored embeddings: half floats stay half floats in parquet."""
    import pyarrow as pa
    return pa.float16() if np.dtype(dtype) == np.float16 else pa.float32()


def latest_schema(names: list[str], d: int, top_k: bool, meta: dict[str, str], dtype: str = "float32"):
    import pyarrow as pa
    fields = [("user_id", pa.string()), ("user_index", pa.int64()), ("snapshot", pa.string()),
              ("snapshot_ts", pa.int64()), ("snapshot_pos", pa.int64())]
    fields += [(n, pa.list_(arrow_float(dtype), d)) for n in names]
    if top_k:
        fields.append(("resolved", pa.list_(pa.string())))
    return pa.schema(fields, metadata=meta)


def latest_options(schema) -> dict:
    """Parquet writer options of latest.parquet: dictionaries for the string keys; snappy and statistics for
    ids and names; neither for the embedding columns (dense floats that barely compress, min / max of no use)."""
    import pyarrow as pa
    emb = {f.name for f in schema if pa.types.is_fixed_size_list(f.type)}
    return {"use_dictionary": list(LATEST_KEYS), "compression": {f.name: "none" if f.name in emb else "snappy" for f in schema},
            "write_statistics": [f.name for f in schema if f.name not in emb]}


def latest_table(schema, user_ids: np.ndarray, users: np.ndarray, snap: list[str], ts: np.ndarray, pos: np.ndarray,
                 emb: np.ndarray, qcond: np.ndarray, cond_names: list[str], vocabs: dict):
    """Rows of latest.parquet: per user its latest snapshot (emb [U', N, d], qcond [U', N, F])."""
    import pyarrow as pa
    d = emb.shape[-1]
    cols = [pa.array(_str(user_ids), pa.string()), pa.array(users.astype(np.int64)), pa.array(snap, pa.string()),
            pa.array(ts.astype(np.int64)), pa.array(pos.astype(np.int64))]
    for n in range(emb.shape[1]):
        value = schema.field(5 + n).type.value_type
        cols.append(pa.FixedSizeListArray.from_arrays(pa.array(emb[:, n].astype(value.to_pandas_dtype()).reshape(-1)), d))
    if "resolved" in schema.names:
        cols.append(pa.array([[",".join(f"{f}={vocabs[f][v]}" for f, v in zip(cond_names, row) if v != 1) or "<any>"
                               for row in per_user] for per_user in qcond], pa.list_(pa.string())))
    return pa.Table.from_arrays(cols, schema=schema)


def write_answers(path: Path, src: Source, model, qs: QuerySpec, cond_names: list[str], users: np.ndarray,
                  max_items: int, seq_len: int, device: torch.device, attrs: dict | None = None,
                  cuts: CutFn | None = None, show: bool = False) -> dict:
    """Answer `users` (sorted tokenize-store indices) at their snapshots into the Zarr group `path`
    (answers.zarr) and latest.parquet beside it, batch by batch; every rank of a torchrun job calls
    this with the same arguments and `path` (rank 0 creates it). Returns the counts of the manifest.
    cuts: the snapshots (default: the spec's rule, `snapshot_cuts`)."""
    import pyarrow.parquet as pq
    rank, world = dist.rank(), dist.world()
    cuts = cuts or rule_cuts(qs)
    vocabs = {n: [str(v) for v in np.asarray(src[f"vocab/cond_{n}"][:])] for n in cond_names}
    queries = build_queries(qs, cond_names, vocabs)
    N, F = len(queries.names), len(cond_names)
    p = plan(src, users, qs, cuts)
    so, U, S = p.snap_offsets, len(users), int(p.snap_offsets[-1])
    need = 2 * min(p.longest, max_items - 1) + N
    if qs.seq_len is not None and qs.seq_len < need:
        raise InputError("[query].seq_len", f"must be >= {need} tokens to hold the longest prefix "
                         f"(2 x {min(p.longest, max_items - 1)} events) and {N} queries (got {qs.seq_len})")
    seq_len = qs.seq_len or max(seq_len, need)
    dtype = np.dtype(qs.dtype)
    d = int(model.norm.weight.shape[0])
    names = snapshot_names(qs, p.T)
    chunk = max(1, min(qs.batch_snapshots, (8 << 20) // (N * d * dtype.itemsize)))  # rows per chunk (<= 8 MiB of emb)
    step = qs.batch_snapshots // chunk * chunk                            # rows per batch: whole chunks
    batches = [(r0, min(S, r0 + step)) for r0 in range(0, S, step)]
    path = Path(path)
    done_dir = path.parent / ".batches-done"                              # removed once complete
    latest_tmp = path.parent / ".latest.parquet.tmp"                      # latest.parquet while it is written
    if dist.is_main() and not (done_dir / "created").is_file():   # a fresh start (or one cut before this point)
        for f in (path, done_dir):
            shutil.rmtree(f, ignore_errors=True)
        g = zarrio.create(path)
        for name, shape, dt in (("snap/emb", (S, N, d), dtype), ("snap/ts", (S,), np.int64), ("snap/pos", (S,), np.int64),
                                ("snap/slot", (S,), np.int32), ("snap/query_cond", (S, N, F), np.int32)):
            # the answers are dense floats that barely compress: stored raw, which spares the writer's CPU
            g.create_array(name, shape=shape, dtype=dt, chunks=(chunk, *shape[1:]), fill_value=0,
                           **({"compressors": None} if name == "snap/emb" else {}))
        zarrio.put(g, "users/snap_offsets", so)
        zarrio.put(g, "user_index", users.astype(np.int64))
        zarrio.put(g, "conditions", np.array(queries.names, dtype=str))
        ids = g.create_array("user_id", shape=(U,), dtype=str, chunks=(max(1, min(U, 1 << 16)),))
        for a in range(0, U, 1 << 16):
            ids[a:a + (1 << 16)] = _str(src.per_user("vocab/user", users[a:a + (1 << 16)]))
        g.attrs.update({"queries": queries.asked, "condition_fields": cond_names, "snapshot": qs.snapshot,
                        "every_n_events": qs.every_n_events, "snapshot_names": names, "max_items": max_items,
                        "seq_len": seq_len, **(attrs or {})})
        done_dir.mkdir()
        (done_dir / "created").write_text("")
    dist.barrier()
    done = {int(f.name[1:]) for f in done_dir.glob("b*")}                # batches an interrupted run finished
    mine = [i for i in np.array_split(np.arange(len(batches)), world)[rank] if i not in done]
    if done and dist.is_main():
        say(f"query: continuing an interrupted run: {len(done)} of {len(batches)} batches were written")
    g = zarrio.open_write(path)
    arr = {k: g[f"snap/{k}"] for k in ("emb", "ts", "pos", "slot", "query_cond")}
    meta = {"lumctl.queries": json.dumps(queries.asked), "lumctl.condition_fields": json.dumps(cond_names)}
    schema = latest_schema(queries.names, d, bool(queries.top_k), meta, qs.dtype)

    def read(r0: int, r1: int) -> dict:
        """The inputs of snapshot rows [r0, r1): only the events of the users holding them (Zarr slices)."""
        ua = int(np.searchsorted(so, r0, "right")) - 1                    # users [ua, ub) hold rows [r0, r1)
        ub = int(np.searchsorted(so, r1, "left"))
        keep = np.diff(so[ua:ub + 1]) > 0                                  # (users without snapshots: not read)
        u = users[ua:ub][keep]
        lo = src.local_offsets(u)
        ts = src.events("events/timestamp", u)
        split = src.per_user("users/split", u) if qs.snapshot == "split" else None
        count, cut, slot = cuts(u, lo, ts, split)
        if not np.array_equal(count, np.diff(so[ua:ub + 1])[keep]):
            raise RuntimeError(f"{path}: snapshots of users {u[0]}-{u[-1]} changed since they were counted")
        take = slice(r0 - int(so[ua]), r1 - int(so[ua]))
        row_user = np.repeat(np.arange(len(u)), count)[take]              # (D,) local user of each row
        cut, slot = cut[take], slot[take]
        off = lo[row_user]
        n_in = np.minimum(cut, max_items - 1)
        cond = src.events("events/cond", u)
        last = so[ua + 1:ub + 1][keep] - 1                                 # each user's latest row
        has = (last >= r0) & (last < r1)
        return {"r0": r0, "r1": r1, "u": u, "cut": cut, "slot": slot, "n_in": n_in, "first": off + cut - n_in,
                "cond": cond, "items": src.events("events/item", u), "qcond": queries.resolve(cond, off, cut),  # (N, F) | (D, N, F)
                "snap_ts": ts[off + cut - 1], "has": has, "latest_row": last[has] - r0,
                "user_id": np.asarray(g["user_id"][ua:ub])[keep][has]}   # (this store's copy: small chunks)

    last_row = so[1:][np.diff(so) > 0] - 1                               # latest snapshot row of each user with one
    last_user = np.flatnonzero(np.diff(so) > 0)                           # (its index in `users`)

    def stored_latest(r0: int, r1: int):
        """latest.parquet rows of the users whose latest snapshot is in rows [r0, r1), read back from the store."""
        a, b = np.searchsorted(last_row, [r0, r1])
        rows, u = last_row[a:b] - r0, last_user[a:b]
        slot = np.asarray(arr["slot"][r0:r1])[rows]
        return latest_table(schema, np.asarray(g["user_id"][int(u[0]):int(u[-1]) + 1])[u - u[0]] if len(u) else u,
                            users[u], [names[s_] for s_ in slot], np.asarray(arr["ts"][r0:r1])[rows],
                            np.asarray(arr["pos"][r0:r1])[rows], np.asarray(arr["emb"][r0:r1])[rows],
                            np.asarray(arr["query_cond"][r0:r1])[rows], cond_names, vocabs)

    # one process writes latest.parquet as its batches finish (in order); under torchrun rank 0 writes it at the end
    stream = world == 1 and done == set(range(len(done)))
    latest = pq.ParquetWriter(latest_tmp, schema, **latest_options(schema)) if stream else None
    for k in sorted(done) if stream else ():
        latest.write_table(stored_latest(*batches[k]))

    def write(k: int, b: dict, emb: np.ndarray) -> None:
        """Batch k: rows [r0, r1) of every snap/ array, its users' latest rows appended to latest.parquet (one
        process), then its marker (holding its token count): a batch with a marker is never answered again."""
        r0, r1, i = b["r0"], b["r1"], b["latest_row"]
        qcond = np.broadcast_to(b["qcond"], (r1 - r0, N, F))
        for key, v in (("emb", emb), ("ts", b["snap_ts"]), ("pos", b["cut"]), ("slot", b["slot"]), ("query_cond", qcond)):
            arr[key][r0:r1] = v
        if latest is not None:
            latest.write_table(latest_table(schema, b["user_id"], b["u"][b["has"]], [names[s_] for s_ in b["slot"][i]],
                                            b["snap_ts"][i], b["cut"][i], emb[i], qcond[i], cond_names, vocabs))
        (done_dir / f"b{k:06d}").write_text(str(int(2 * b["n_in"].sum() + N * len(b["cut"]))))

    # three stages in flight: the next batch is read, this one answered on the device, the last one written
    secs = {"read": 0.0, "answer": 0.0, "write": 0.0}   # waiting on reads, answering, waiting on writes
    cuda = device.type == "cuda"
    backend = query_backend(qs.attention, device, seq_len)
    started, answered = time.time(), 0
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer, progress() as bar:
        task = bar.add_task("query", total=len(mine), info="", visible=show)
        nxt = reader.submit(read, *batches[mine[0]]) if mine else None
        written = None
        for j, k in enumerate(mine):
            t = time.time()
            b = nxt.result()
            secs["read"] += time.time() - t
            nxt = reader.submit(read, *batches[mine[j + 1]]) if j + 1 < len(mine) else None
            t = time.time()
            emb = answer(model, b["items"], b["cond"], b["first"], b["n_in"], b["qcond"], seq_len, qs.batch_rows,
                         device, backend=backend, autocast=cuda).astype(dtype)   # (D, N, d)
            secs["answer"] += time.time() - t
            t = time.time()
            if written is not None:
                written.result()                                           # at most one batch being written
            secs["write"] += time.time() - t
            written = writer.submit(write, k, b, emb)
            answered += b["r1"] - b["r0"]
            bar.update(task, advance=1, info=f"{answered:,} snapshots, {answered / max(1e-9, time.time() - started):,.0f}/s; "
                       f"answering {secs['answer']:.0f} s, waiting {secs['read']:.0f} s on reads and {secs['write']:.0f} s on writes")
        if written is not None:
            t = time.time()
            written.result()
            secs["write"] += time.time() - t
    if latest is not None:
        latest.close()
    dist.barrier()
    tokens = 0
    if dist.is_main():  # latest.parquet in batch (= user) order; the token count of every batch
        if latest is None:
            with pq.ParquetWriter(latest_tmp, schema, **latest_options(schema)) as w:
                for r0, r1 in batches:
                    w.write_table(stored_latest(r0, r1))
        os.replace(latest_tmp, path.parent / "latest.parquet")
        tokens = sum(int((done_dir / f"b{k:06d}").read_text()) for k in range(len(batches)))
        shutil.rmtree(done_dir)
    return {"users": U, "snapshots": S, "max_snapshots": p.T, "queries": N, "d": d,
            "users_with_snapshots": int((np.diff(so) > 0).sum()), "tokens": tokens, "seq_len": seq_len,
            "timing": {"loop_s": round(time.time() - started, 2), "read_wait_s": round(secs["read"], 2),
                       "answer_s": round(secs["answer"], 2), "write_wait_s": round(secs["write"], 2),
                       "batches": len(batches), "batches_answered": len(mine)}}


# ------------------------------------------------------------------------------------ item embeddings
def items_dir(spec: Spec, checkpoint_hash: str, dtype: str) -> Path:
    """The item store of a checkpoint: stores/<experiment>/query-items/<checkpoint hash[:16]>-<dtype>."""
    return spec.store("query-items") / f"{checkpoint_hash[:16]}-{dtype}"


@torch.no_grad()
def write_items(path: Path, model, src: Source, dtype: str, checkpoint: str, checkpoint_hash: str,
                block: int = 1 << 16) -> bool:
    """Write the item store of a checkpoint unless it is there already; True when it was written.
    One pass, block by block: item_emb.zarr (every vocab id) and items.parquet (item_id, the raw id, and
    emb, fixed-size list<float16|32>[d], of every real item: vocab ids >= 2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    m = read_manifest(path)
    if m is not None and m.get("inputs") == {"checkpoint": checkpoint_hash} and m.get("dtype") == dtype:
        return False
    started = time.time()
    I, d = int(model.config.n_items), int(model.norm.weight.shape[0])
    dev = model.norm.weight.device
    value, tdt = arrow_float(dtype), getattr(torch, np.dtype(dtype).name)   # cast on the device
    schema = pa.schema([("item_id", pa.string()), ("emb", pa.list_(value, d))])
    vocab = src["vocab/item"]
    if vocab.shape[0] != I:
        raise InputError(checkpoint, f"checkpoint has {I} items, the tokenize store {vocab.shape[0]}")
    step = max(block, int(getattr(vocab, "chunks", (block,))[0]))   # ids a whole stored chunk at a time
    with atomic_dir(path) as tmp:
        g = zarrio.create(tmp / "item_emb.zarr")
        emb = g.create_array("item_emb", shape=(I, d), dtype=dtype, chunks=(min(I, block), d),
                             compressors=None)                              # dense floats: stored raw
        ids = g.create_array("item_id", shape=(I,), dtype=str, chunks=(min(I, block),))
        # raw ids are unique and embeddings dense floats: no dictionaries, no compression or statistics of the floats
        with pq.ParquetWriter(tmp / "items.parquet", schema, compression={"item_id": "snappy", "emb": "none"},
                              use_dictionary=False, write_statistics=["item_id"]) as w:
            for a in range(0, I, step):
                names = _str(vocab[a:a + step])
                ids[a:a + step] = names
                for c in range(a, min(I, a + step), block):
                    e = min(I, a + step, c + block)                # within this chunk of ids
                    x = model.item_table(torch.arange(c, e, device=dev)).to(tdt).cpu().numpy()   # (e-c, d)
                    emb[c:e] = x
                    real = slice(max(0, 2 - c), e - c)                      # vocab ids 0, 1: padding, unknown
                    w.write_table(pa.Table.from_arrays(
                        [pa.array(names[c - a:e - a][real], pa.string()),
                         pa.FixedSizeListArray.from_arrays(pa.array(x[real].reshape(-1)), d)], schema=schema))
        write_manifest(tmp, stage="query-items", spec_hash=dtype, inputs={"checkpoint": checkpoint_hash},
                       counts={"items": I, "d": d}, started=started, extra={"checkpoint": checkpoint, "dtype": dtype})
    return True


# ------------------------------------------------------------------------------------ run
def checkpoint_dir(spec: Spec) -> Path:
    p = Path(spec.query.checkpoint)
    path = p if p.is_absolute() else spec.store("pretrain") / p
    return require_checkpoint(path, "no checkpoint here (config.json + model.pt); run `lumctl pretrain` first "
                              "or set [query].checkpoint")


def run(spec: Spec, force: bool = False, users: str | None = None) -> Path:
    qs = spec.query
    if qs is None:
        raise InputError("[query]", "section missing; nothing to query")
    out = spec.store("query")
    started = time.time()
    tok_store = spec.input_store("tokenize")  # a path or an fsspec URL
    tok_manifest = require_store(tok_store, "tokenize")
    ckpt = checkpoint_dir(spec)
    n_users = int(zarrio.open_read(join(tok_store, "data.zarr"))["users/offsets"].shape[0]) - 1  # from the array
    user_idx = parse_users(users, n_users)
    inputs = {"tokenize": store_hash(tok_manifest),
              "checkpoint": hash_obj({f: hash_file(ckpt / f) for f in ("config.json", "model.pt")}),
              "users": users_label(user_idx, n_users)}
    spec_hash = spec.section_hash("query")
    if not force and is_up_to_date(out, spec_hash, inputs):
        say(f"query: {out} is up to date")
        return out

    device = dist.init(resolve_device(qs.device, "[query].device"))  # torchrun: joins the process group
    model, cfg = load_model(ckpt, device)
    if cfg.get("kind") != "lum" or not cfg.get("conditions"):
        raise InputError(str(ckpt), "query needs a LUM checkpoint trained with condition tokens "
                         f"(got kind = {cfg.get('kind')!r}, conditions = {cfg.get('conditions')})")
    if cfg.get("inputs", {}).get("tokenize") != inputs["tokenize"]:
        raise InputError(str(ckpt), f"checkpoint was trained on another tokenize store than {tok_store}; "
                         "rerun `lumctl pretrain` (or point [query].checkpoint at a matching one)")
    model.eval()
    src = Source(zarrio.open_read(join(tok_store, "data.zarr")))
    cond_names = list(cfg["condition_fields"])
    max_items = qs.max_items or int(cfg["max_items"])
    items = items_dir(spec, inputs["checkpoint"], qs.dtype)
    if dist.is_main():
        wrote = write_items(items, model, src, qs.dtype, str(ckpt), inputs["checkpoint"])
        say(f"query: item embeddings {'written to' if wrote else 'reused from'} {items}")
    tmp = None
    if dist.is_main():  # an interrupted run of the same work (spec, inputs, code) is continued, not redone
        tmp = resumable_dir(out, hash_obj({"spec": spec_hash, "inputs": inputs, "code": code_identity()["hash"]}))
    tmp = Path(dist.broadcast_object(str(tmp) if tmp else None))
    attrs = {"checkpoint": str(ckpt), "checkpoint_hash": inputs["checkpoint"], "model": cfg["model"],
             "items": os.path.relpath(items, out)}
    try:
        counts = write_answers(tmp / "answers.zarr", src, model, qs, cond_names, user_idx, max_items,
                               int(cfg["seq_len"]), device, attrs=attrs, show=True)
    except Exception:  # an error: nothing to continue (a kill or Ctrl-C leaves the finished batches)
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_main():
        timing = counts.pop("timing")  # this rank's seconds: the device's work and its waits on reads and writes
        counts.update(items=int(model.config.n_items), device=device.type, ranks=dist.world())
        write_manifest(tmp, stage="query", spec_hash=spec_hash, inputs=inputs, counts=counts, started=started,
                       extra={"checkpoint": str(ckpt), "items": str(items), "timing": timing})
        replace_dir(tmp, out)
        say(f"query: answering loop {timing['loop_s']}s: {timing['answer_s']}s packing and answering, "
            f"{timing['read_wait_s']}s waiting on reads, {timing['write_wait_s']}s on writes")
    dist.barrier()
    took = time.time() - started
    rate = (f"{counts['users'] / took:,.0f} users/s" if dist.world() > 1 or timing["batches_answered"] == timing["batches"]
            else f"{timing['batches_answered']} of {timing['batches']} batches answered in this run")
    say(f"query: {counts['users']:,} users, {counts['snapshots']:,} snapshots x {counts['queries']} queries "
        f"(d={counts['d']}) on {dist.world()} rank(s) in {took:.1f}s ({rate}) -> {out}")
    return out


def read_answers(store: Path) -> dict[str, np.ndarray]:
    """Every array of a query store (answers.zarr and its item store) as numpy, keyed as in the store."""
    g = zarrio.open_read(Path(store) / "answers.zarr")
    out = {k: zarrio.get(g, k) for k in ("users/snap_offsets", "snap/emb", "snap/ts", "snap/pos", "snap/slot",
                                         "snap/query_cond", "conditions", "user_index", "user_id")}
    if "items" in g.attrs:
        items = zarrio.open_read(Path(store) / g.attrs["items"] / "item_emb.zarr")
        out.update({k: zarrio.get(items, k) for k in ("item_emb", "item_id")})
    return out


def compute(model, data: dict, qs: QuerySpec, cond_names: list[str], users: np.ndarray, max_items: int,
            seq_len: int, device: torch.device, cuts: CutFn | None = None) -> dict:
    """The answers of `users` in memory (read_answers' keys, item_emb float32): write_answers into a
    temporary folder and read it back. For experiments on small logs; `cuts` replaces the spec's snapshots."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        write_answers(Path(tmp) / "answers.zarr", Source(data), model, qs, cond_names, np.asarray(users, np.int64),
                      max_items, seq_len, device, cuts=cuts)
        out = read_answers(Path(tmp))
    with torch.no_grad():
        out["item_emb"] = model.item_table(None).float().cpu().numpy()               # (I, d)
    return out
