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
The model reads the snapshot's most recent `max_items - 1` events (as pretrain's evaluation);
`top_k` conditions count over the whole prefix.

Output (`stores/<experiment>/query/`):
  answers.zarr/
    user_emb       float16|32 [U, T, N, d]  o_q of query n at user u's snapshot t (NaN where invalid)
    snapshot_valid bool  [U, T]      the user has snapshot t (a non-empty prefix)
    snapshot_ts    int64 [U, T]      timestamp of the snapshot's last event (-1 where invalid)
    snapshot_pos   int64 [U, T]      events in the snapshot's prefix (0 where invalid)
    query_cond     int32 [U, T, N, F] condition ids each query asked (top_k ranks resolve per user)
    conditions     str   [N]         query names, e.g. "rating=high,genre=top1"
    user_index     int64 [U]         tokenize-store user index;  user_id str [U] raw user id
    item_emb       float16|32 [I, d] e^i = model.item_table() of every item vocab id (0 pad, 1 unknown)
    item_id        str   [I]
    attrs: queries (per query: field -> value, or "top<r>"), condition_fields, snapshot, snapshot_names,
           checkpoint, model (config)
  latest.parquet   one row per user with a valid snapshot, its latest one: user_id, user_index, snapshot,
                   snapshot_ts, snapshot_pos, one fixed-size list<float32>[d] column per query (named
                   as in `conditions`), and `resolved` (list<string>, the asked conditions) with top_k.
                   The table an online KV store loads.
  manifest.json    inputs: tokenize store hash, checkpoint file hashes, user selection

Under torchrun each rank answers a contiguous range of users whose rows are whole Zarr chunks of
the user-indexed arrays, so ranks write disjoint chunks of one store; rank 0 creates the arrays in
a temporary folder first and, once every rank has written, writes latest.parquet (from the ranks'
parts), the manifest last, and renames the folder into place (`write_distributed`).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lumctl import dist, zarrio
from lumctl.errors import InputError
from lumctl.ops.packing import grouped_query_mask, pack_queries, top_values
from lumctl.progress import progress, say
from lumctl.specs import QuerySpec, Spec
from lumctl.stages import tokenize
from lumctl.stages.pretrain import load_model, resolve_device
from lumctl.store import (
    atomic_dir,
    fresh_dir_beside,
    hash_file,
    hash_obj,
    is_up_to_date,
    replace_dir,
    require_checkpoint,
    require_store,
)
from lumctl.store import join, store_hash, write_manifest

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
        return np.arange(n_users)
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise InputError("--users", f"expected indices such as 0-99 or 1,5,7 (got {part!r})") from None
        if a > b or a < 0 or b >= n_users:
            raise InputError("--users", f"{part} is not a range of user indices in 0-{n_users - 1}")
        out.update(range(a, b + 1))
    return np.array(sorted(out), np.int64)


def users_label(users: np.ndarray, n_users: int) -> str:
    """Canonical text of a selection ('all' or ranges), so '0-9,10-99' and '0-99' are the same input."""
    if len(users) == n_users:
        return "all"
    breaks = np.flatnonzero(np.diff(users) != 1)
    starts, ends = np.r_[users[:1], users[breaks + 1]], np.r_[users[breaks], users[-1:]]
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends))


def snapshots(data: dict, users: np.ndarray, qs: QuerySpec) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(cut [U, T] = events in each snapshot's prefix, valid [U, T], snapshot names [T]).
    The prefix of a snapshot is exactly the user's events with timestamp <= its last event's."""
    offsets, ts = data["users/offsets"], data["events/timestamp"]
    off = offsets[users]
    n = offsets[users + 1] - off
    tie_first, tie_last = tokenize.tie_groups(offsets, ts)
    if qs.snapshot == "split":
        b = data["users/split"][users].astype(np.int64)                     # (U, 2) first valid / first test event
        g = np.minimum(off[:, None] + b, len(ts) - 1)
        cut = np.where(b < n[:, None], tie_first[g] - off[:, None], b)      # drop events tied with the held-out one
        return cut, cut > 0, ["valid", "test"]
    K = qs.every_n_events
    m = n // K                                                              # nominal snapshots per user
    u_rep = np.repeat(np.arange(len(users)), m)
    j = np.arange(len(u_rep)) - np.repeat(np.cumsum(m) - m, m)
    cut = tie_last[off[u_rep] + (j + 1) * K - 1] - off[u_rep] + 1          # extend over same-second events
    keep = np.ones(len(cut), bool)
    keep[1:] = (u_rep[1:] != u_rep[:-1]) | (cut[1:] != cut[:-1])
    u_rep, cut = u_rep[keep], cut[keep]
    slot = np.arange(len(u_rep)) - np.searchsorted(u_rep, u_rep, "left")
    T = int(slot.max()) + 1 if len(slot) else 1
    out = np.zeros((len(users), T), np.int64)
    out[u_rep, slot] = cut
    return out, out > 0, [f"s{t}" for t in range(T)]


# ------------------------------------------------------------------------------------ model passes
@torch.no_grad()
def answer(model, items: np.ndarray, conds: np.ndarray, first: np.ndarray, count: np.ndarray, queries: np.ndarray,
           seq_len: int, batch_rows: int, device: torch.device, grouped: bool = True, backend: str | None = None,
           autocast: bool = False, show: bool = False) -> np.ndarray:
    """Outputs o_q [D, N, d] (float32) of every document's N queries ([N, F] or [D, N, F]).
    grouped: one sequence per document (prefix once + N query tokens); otherwise one sequence
    per (document, query) with its own copy of the prefix (the baseline of the benchmark).
    backend: 'flex' (BlockMask) or 'sdpa' (dense Numba mask); default flex on CUDA."""
    D = len(count)
    q = np.asarray(queries, np.int32)
    N = q.shape[-2]
    if not grouped:  # D*N documents of one query each
        qd = np.broadcast_to(q, (D, N, q.shape[-1])) if q.ndim == 2 else q
        first, count = np.repeat(first, N), np.repeat(count, N)
        q = np.ascontiguousarray(qd).reshape(D * N, 1, q.shape[-1])
    rows = pack_queries(items, conds, first, count, q, seq_len)
    backend = backend or ("flex" if device.type == "cuda" else "sdpa")
    R = len(rows["type"])
    d_model = model.norm.weight.shape[0]
    out = torch.empty(len(count), q.shape[-2], d_model, device=device)          # (D', N', d)
    order = np.argsort(rows["row"], kind="stable")
    bounds = np.searchsorted(rows["row"][order], np.arange(0, R + batch_rows, batch_rows))
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else (
        lambda: torch.autocast(device.type, enabled=False))
    was_training = model.training
    model.eval()
    with progress() as bar, ctx():
        task = bar.add_task("query", total=(R + batch_rows - 1) // batch_rows, info="", visible=show)
        for k, r0 in enumerate(range(0, R, batch_rows)):
            idx = slice(r0, min(R, r0 + batch_rows))
            b = {key: torch.from_numpy(np.ascontiguousarray(rows[key][idx])).to(dt).to(device) for key, dt in BATCH_KEYS.items()}
            if backend == "flex":
                from lumctl.attention import query_block_mask
                mask = query_block_mask(torch.from_numpy(rows["segment"][idx]).to(device),
                                        torch.from_numpy(rows["is_query"][idx]).to(device))
            else:
                mask = torch.from_numpy(grouped_query_mask(rows["segment"][idx], rows["is_query"][idx])).to(device)
            o = model(b, mask)                                                     # (B, S, d)
            docs = order[bounds[k]:bounds[k + 1]]                                  # documents in these rows
            r_i = torch.as_tensor(rows["row"][docs] - r0, device=device)[:, None]  # (n, 1)
            c_i = torch.as_tensor(rows["query_pos"][docs], device=device)          # (n, N')
            out[torch.as_tensor(docs, device=device)] = o[r_i, c_i].float()        # (n, N', d)
            bar.update(task, advance=1)
    model.train(was_training)
    return out.reshape(D, N, d_model).cpu().numpy()


# ------------------------------------------------------------------------------------ one run
def compute(model, data: dict, qs: QuerySpec, cond_names: list[str], users: np.ndarray, max_items: int,
            seq_len: int, device: torch.device, show: bool = False) -> dict:
    """Everything the store holds, as numpy (no writing): the answers of `users` at their snapshots."""
    vocabs = {n: [str(v) for v in data[f"vocab/cond_{n}"]] for n in cond_names}
    queries = build_queries(qs, cond_names, vocabs)
    N = len(queries.names)
    cut, valid, snap_names = snapshots(data, users, qs)
    U, T = cut.shape
    du, dt = np.nonzero(valid)                                                    # documents: (user, snapshot)
    off = data["users/offsets"][users[du]]
    pcut = cut[du, dt]
    count = np.minimum(pcut, max_items - 1)
    first = off + pcut - count
    cond = data["events/cond"]
    qcond = queries.resolve(cond, off, pcut)                                       # (N, F) or (D, N, F)
    need = 2 * int(count.max(initial=0)) + N
    if qs.seq_len is not None and qs.seq_len < need:
        raise InputError("[query].seq_len", f"must be >= {need} tokens to hold the longest prefix "
                         f"(2 x {int(count.max())} events) and {N} queries (got {qs.seq_len})")
    S = qs.seq_len or max(seq_len, need)
    cuda = device.type == "cuda"
    emb = answer(model, data["events/item"], cond, first, count, qcond, S, qs.batch_rows, device,
                 autocast=cuda, show=show) if len(count) else np.zeros((0, N, model.norm.weight.shape[0]), np.float32)
    d = emb.shape[-1]
    user_emb = np.full((U, T, N, d), np.nan, np.float32)
    user_emb[du, dt] = emb
    F = len(cond_names)
    query_cond = np.zeros((U, T, N, F), np.int32)
    query_cond[du, dt] = qcond
    ts = data["events/timestamp"]
    snap_ts = np.full((U, T), -1, np.int64)
    snap_ts[du, dt] = ts[off + pcut - 1]
    with torch.no_grad():
        item_emb = model.item_table(None).float().cpu().numpy()                  # (I, d)
    return {"user_emb": user_emb, "snapshot_valid": valid, "snapshot_ts": snap_ts,
            "snapshot_pos": np.where(valid, cut, 0), "query_cond": query_cond, "item_emb": item_emb,
            "conditions": np.array(queries.names, dtype=str), "queries": queries, "snapshot_names": snap_names,
            "seq_len": S, "rows_tokens": int(2 * count.sum() + N * len(count))}


# ------------------------------------------------------------------------------------ run
def checkpoint_dir(spec: Spec) -> Path:
    p = Path(spec.query.checkpoint)
    path = p if p.is_absolute() else spec.store("pretrain") / p
    return require_checkpoint(path, "no checkpoint here (config.json + model.pt); run `lumctl pretrain` first "
                              "or set [query].checkpoint")


def _str(a: np.ndarray) -> np.ndarray:
    """Strings as a fixed-width numpy array (zarr 3 reads them back as StringDType)."""
    return np.asarray(np.asarray(a).tolist(), dtype=str)


def latest_table(res: dict, users: np.ndarray, user_ids: np.ndarray, cond_names: list[str], vocabs: dict):
    """The latest valid snapshot of each user as an Arrow table (one fixed-size list column per query).
    `users` [U] tokenize-store indices of the rows of `res`; `user_ids` the raw ids of all users."""
    import pyarrow as pa
    valid = res["snapshot_valid"]
    has = valid.any(1)
    T = valid.shape[1]
    last = T - 1 - np.argmax(valid[:, ::-1], 1)                                   # latest valid slot per user
    u = np.flatnonzero(has)
    t = last[u]
    emb = res["user_emb"][u, t].astype(np.float32)                                # (U', N, d)
    cols = {"user_id": pa.array(_str(user_ids[users[u]])), "user_index": pa.array(users[u].astype(np.int64)),
            "snapshot": pa.array([res["snapshot_names"][i] for i in t]),
            "snapshot_ts": pa.array(res["snapshot_ts"][u, t]), "snapshot_pos": pa.array(res["snapshot_pos"][u, t])}
    d = emb.shape[-1]
    for n, name in enumerate(res["conditions"]):
        cols[str(name)] = pa.FixedSizeListArray.from_arrays(pa.array(emb[:, n].reshape(-1)), d)
    if res["queries"].top_k:
        qc = res["query_cond"][u, t]                                              # (U', N, F)
        cols["resolved"] = pa.array([[",".join(f"{f}={vocabs[f][v]}" for f, v in zip(cond_names, row) if v != 1) or "<any>"
                                      for row in per_user] for per_user in qc], pa.list_(pa.string()))
    meta = {"lumctl.queries": json.dumps(res["queries"].asked), "lumctl.condition_fields": json.dumps(cond_names)}
    return pa.table(cols).replace_schema_metadata(meta)


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
    data = tokenize.load(tok_store)
    cond_names = list(cfg["condition_fields"])
    max_items = qs.max_items or int(cfg["max_items"])
    if dist.world() > 1:
        return write_distributed(out, model, data, qs, cfg, ckpt, cond_names, user_idx, max_items, device,
                                 spec_hash, inputs, started)
    res = compute(model, data, qs, cond_names, user_idx, max_items, int(cfg["seq_len"]), device, show=True)
    dtype = np.dtype(qs.dtype)
    res["user_emb"] = res["user_emb"].astype(dtype)  # latest.parquet holds the same (rounded) values
    U, T, N, d = res["user_emb"].shape
    vocabs = {n: [str(v) for v in data[f"vocab/cond_{n}"]] for n in cond_names}
    with atomic_dir(out) as tmp:
        g = zarrio.create(tmp / "answers.zarr")  # (write_distributed writes the same arrays and attrs)
        zarrio.put(g, "user_emb", res["user_emb"])
        for k in ("snapshot_valid", "snapshot_ts", "snapshot_pos", "query_cond", "conditions"):
            zarrio.put(g, k, res[k])
        zarrio.put(g, "user_index", user_idx)
        zarrio.put(g, "user_id", _str(data["vocab/user"][user_idx]))
        zarrio.put(g, "item_emb", res["item_emb"].astype(dtype))
        zarrio.put(g, "item_id", _str(data["vocab/item"]))
        g.attrs.update({"queries": res["queries"].asked, "condition_fields": cond_names,
                        "snapshot": qs.snapshot, "every_n_events": qs.every_n_events,
                        "snapshot_names": res["snapshot_names"], "checkpoint": str(ckpt), "model": cfg["model"],
                        "max_items": max_items, "seq_len": res["seq_len"]})
        import pyarrow.parquet as pq
        pq.write_table(latest_table(res, user_idx, data["vocab/user"], cond_names, vocabs), tmp / "latest.parquet")
        counts = {"users": U, "snapshots": T, "queries": N, "d": d, "items": int(res["item_emb"].shape[0]),
                  "valid_snapshots": int(res["snapshot_valid"].sum()), "tokens": res["rows_tokens"],
                  "seq_len": res["seq_len"], "device": device.type}
        write_manifest(tmp, stage="query", spec_hash=spec_hash, inputs=inputs, counts=counts, started=started,
                       extra={"checkpoint": str(ckpt)})
    say(f"query: {U:,} users x {T} snapshots x {N} queries ({counts['valid_snapshots']:,} snapshots, "
        f"d={d}) in {time.time() - started:.1f}s -> {out}")
    return out


# ------------------------------------------------------------------------------------ torchrun
USER_ARRAYS = ("user_emb", "snapshot_valid", "snapshot_ts", "snapshot_pos", "query_cond", "user_index", "user_id")


def write_distributed(out: Path, model, data: dict, qs: QuerySpec, cfg: dict, ckpt: Path, cond_names: list[str],
                      users: np.ndarray, max_items: int, device: torch.device, spec_hash: str, inputs: dict,
                      started: float) -> Path:
    """The store `run` writes, with the users shared between the ranks of a torchrun job.

    Every rank first finds, for all users (cheap NumPy), the number of snapshot slots T and the
    packed row length S, so all ranks pack alike; then answers its own users (rows
    [u0, u1) of every user-indexed array, whole chunks of `chunk` users) and writes them."""
    rank, world = dist.rank(), dist.world()
    U = len(users)
    vocabs = {n: [str(v) for v in data[f"vocab/cond_{n}"]] for n in cond_names}
    N = len(build_queries(qs, cond_names, vocabs).names)
    cut, _, snap_names = snapshots(data, users, qs)
    T = cut.shape[1]
    need = 2 * min(int(cut.max(initial=0)), max_items - 1) + N
    if qs.seq_len is not None and qs.seq_len < need:  # compute() would refuse on one rank only
        raise InputError("[query].seq_len", f"must be >= {need} tokens to hold the longest prefix and {N} queries "
                         f"(got {qs.seq_len})")
    seq_len = max(int(cfg["seq_len"]), need)
    dtype = np.dtype(qs.dtype)
    d = int(cfg["model"]["d_model"])
    chunk = max(1, min(-(-U // world), (8 << 20) // max(1, T * N * d * dtype.itemsize)))  # users per chunk
    chunks = np.array_split(np.arange(-(-U // chunk)), world)[rank]
    u0, u1 = (int(chunks[0]) * chunk, min(U, (int(chunks[-1]) + 1) * chunk)) if len(chunks) else (0, 0)

    tmp = None
    if dist.is_main():  # the arrays, in a temporary folder beside `out`
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = fresh_dir_beside(out)
        g = zarrio.create(tmp / "answers.zarr")
        F = len(cond_names)
        for name, shape, dt, fill in (("user_emb", (U, T, N, d), dtype, np.nan), ("snapshot_valid", (U, T), bool, False),
                                      ("snapshot_ts", (U, T), np.int64, -1), ("snapshot_pos", (U, T), np.int64, 0),
                                      ("query_cond", (U, T, N, F), np.int32, 0), ("user_index", (U,), np.int64, 0)):
            g.create_array(name, shape=shape, dtype=dt, chunks=(chunk, *shape[1:]), fill_value=fill)
        g.create_array("user_id", shape=(U,), dtype=str, chunks=(chunk,))
        with torch.no_grad():
            zarrio.put(g, "item_emb", model.item_table(None).float().cpu().numpy().astype(dtype))
        zarrio.put(g, "item_id", _str(data["vocab/item"]))
    tmp = Path(dist.broadcast_object(str(tmp) if tmp else None))

    counts = {"valid_snapshots": 0, "tokens": 0}
    if u1 > u0:
        mine = users[u0:u1]
        res = compute(model, data, qs, cond_names, mine, max_items, seq_len, device, show=True)
        t = res["snapshot_valid"].shape[1]                                              # T of these users, <= T
        g = zarrio.open_write(tmp / "answers.zarr")
        g["user_emb"][u0:u1, :t] = res["user_emb"].astype(dtype)
        for k in ("snapshot_valid", "snapshot_ts", "snapshot_pos", "query_cond"):
            g[k][u0:u1, :t] = res[k]
        g["user_index"][u0:u1] = mine
        g["user_id"][u0:u1] = _str(data["vocab/user"][mine])
        res["user_emb"] = res["user_emb"].astype(dtype)
        res["snapshot_names"] = snap_names
        import pyarrow.parquet as pq
        pq.write_table(latest_table(res, mine, data["vocab/user"], cond_names, vocabs), tmp / f"latest.part-{rank:05d}.parquet")
        counts = {"valid_snapshots": int(res["snapshot_valid"].sum()), "tokens": res["rows_tokens"]}
        conditions, asked = res["conditions"], res["queries"].asked
    counts = {k: int(dist.all_reduce_sum(v)) for k, v in counts.items()}
    dist.barrier()
    if not dist.is_main():
        dist.barrier()
        return out

    import pyarrow.parquet as pq
    parts = sorted(tmp.glob("latest.part-*.parquet"))
    with pq.ParquetWriter(tmp / "latest.parquet", pq.read_schema(parts[0])) as w:
        for part in parts:
            w.write_table(pq.read_table(part))
            part.unlink()
    g = zarrio.open_write(tmp / "answers.zarr")
    zarrio.put(g, "conditions", conditions)  # rank 0 always holds users: it owns the first chunk
    g.attrs.update({"queries": asked, "condition_fields": cond_names, "snapshot": qs.snapshot,
                    "every_n_events": qs.every_n_events, "snapshot_names": snap_names, "checkpoint": str(ckpt),
                    "model": cfg["model"], "max_items": max_items, "seq_len": seq_len})
    counts = {"users": U, "snapshots": T, "queries": N, "d": d, "items": int(g["item_emb"].shape[0]),
              **counts, "seq_len": seq_len, "device": device.type}
    write_manifest(tmp, stage="query", spec_hash=spec_hash, inputs=inputs, counts=counts, started=started,
                   extra={"checkpoint": str(ckpt)})
    replace_dir(tmp, out)
    dist.barrier()
    say(f"query: {U:,} users x {T} snapshots x {N} queries on {world} ranks ({counts['valid_snapshots']:,} "
        f"snapshots, d={d}) in {time.time() - started:.1f}s -> {out}")
    return out
