"""Packing many users' token sequences into fixed-length rows, and the attention masks.

Each user contributes `n_tokens[u]` tokens (2 per event with conditions, 1 without). Users are
placed longest first into rows of `seq_len` tokens, best-fit (the fullest row that still fits)
or first-fit (the first row that fits). Every kernel has a `*_ref` twin in plain Python/NumPy.
"""

from __future__ import annotations

import numpy as np
from numba import njit

PAD, COND, ITEM = 0, 1, 2  # token types


# --------------------------------------------------------------------------- bin assignment
@njit(cache=True)
def _assign_best_fit(lengths, order, seq_len):
    """Best fit decreasing. Rows are kept in buckets by remaining capacity (linked lists), so a
    placement scans capacities from `length` upward: O(seq_len) worst case, O(1) typical."""
    n = len(lengths)
    row = np.empty(n, np.int64)
    start = np.empty(n, np.int64)
    head = np.full(seq_len + 1, -1, np.int64)      # head[c] = a row with remaining capacity c
    nxt = np.empty(n, np.int64)                    # next row in the same bucket
    used = np.empty(n, np.int64)                   # tokens used per row
    n_rows = 0
    for k in range(n):
        u = order[k]
        L = lengths[u]
        r = -1
        for c in range(L, seq_len + 1):
            if head[c] != -1:
                r = head[c]
                head[c] = nxt[r]
                break
        if r == -1:
            r = n_rows
            n_rows += 1
            used[r] = 0
        row[u] = r
        start[u] = used[r]
        used[r] += L
        c = seq_len - used[r]
        nxt[r] = head[c]
        head[c] = r
    return row, start, n_rows


@njit(cache=True)
def _assign_first_fit(lengths, order, seq_len):
    """First fit decreasing with a segment tree over rows' remaining capacity: O(log R) a user."""
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = np.zeros(2 * size, np.int64)  # max remaining capacity in each subtree; unopened rows = seq_len
    for i in range(size, 2 * size):
        tree[i] = seq_len
    for i in range(size - 1, 0, -1):
        tree[i] = max(tree[2 * i], tree[2 * i + 1])
    row = np.empty(n, np.int64)
    start = np.empty(n, np.int64)
    n_rows = 0
    for k in range(n):
        u = order[k]
        L = lengths[u]
        i = 1
        while i < size:  # leftmost leaf with capacity >= L
            i = 2 * i if tree[2 * i] >= L else 2 * i + 1
        r = i - size
        row[u] = r
        start[u] = seq_len - tree[i]
        tree[i] -= L
        i //= 2
        while i >= 1:
            tree[i] = max(tree[2 * i], tree[2 * i + 1])
            i //= 2
        if r + 1 > n_rows:
            n_rows = r + 1
    return row, start, n_rows


def assign_rows(lengths: np.ndarray, seq_len: int, strategy: str = "best_fit") -> tuple[np.ndarray, np.ndarray, int]:
    """lengths [U] tokens per user -> (row [U], start [U], n_rows). Longest first, ties by user index."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and (lengths.max() > seq_len or lengths.min() < 1):
        raise ValueError(f"every user needs 1..{seq_len} tokens (got {lengths.min()}..{lengths.max()})")
    order = np.argsort(-lengths, kind="stable")
    fn = _assign_best_fit if strategy == "best_fit" else _assign_first_fit
    return fn(lengths, order, seq_len)


def assign_rows_ref(lengths, seq_len, strategy="best_fit"):
    """Reference twin of `assign_rows` in plain Python (same placements)."""
    lengths = [int(x) for x in lengths]
    order = sorted(range(len(lengths)), key=lambda u: (-lengths[u], u))
    used: list[int] = []
    row, start = [0] * len(lengths), [0] * len(lengths)
    # best fit ties: the most recently filled row of that capacity (the bucket stack's top)
    stamp: list[int] = []
    for k, u in enumerate(order):
        L = lengths[u]
        fits = [r for r in range(len(used)) if seq_len - used[r] >= L]
        if not fits:
            used.append(0); stamp.append(-1)
            r = len(used) - 1
        elif strategy == "first_fit":
            r = fits[0]
        else:
            best = min(seq_len - used[r] for r in fits)
            r = max((r for r in fits if seq_len - used[r] == best), key=lambda r: stamp[r])
        row[u], start[u] = r, used[r]
        used[r] += L
        stamp[r] = k
    return np.array(row, np.int64), np.array(start, np.int64), len(used)


# --------------------------------------------------------------------------- filling rows
@njit(cache=True, nogil=True)
def _fill(items, conds, times, first, count, row, start, uid, with_cond, typ, item, cond, seg, pos, loss, target,
          user, ts):
    """Write the tokens of user u (events first[u] : first[u]+count[u]) at row[u], start[u] of the
    output arrays (already holding padding), user id uid[u]."""
    n_fields = conds.shape[1]
    slot = np.zeros(typ.shape[0], np.int32)  # next segment number per row, in placement order
    order = np.argsort(start)  # segments numbered left to right within each row
    for k in range(len(order)):
        u = order[k]
        r = row[u]
        s = slot[r]
        slot[r] += 1
        t = start[u]
        n = count[u]
        for e in range(n):
            ev = first[u] + e
            if with_cond:
                p = t + 2 * e
                typ[r, p] = 1
                for f in range(n_fields):
                    cond[r, p, f] = conds[ev, f]
                loss[r, p] = True
                target[r, p] = items[ev]
                typ[r, p + 1] = 2
                item[r, p + 1] = items[ev]
                for q in range(2):
                    ts[r, p + q] = times[ev]
                    seg[r, p + q] = s
                    pos[r, p + q] = 2 * e + q
                    user[r, p + q] = uid[u]
            else:
                p = t + e
                typ[r, p] = 2
                item[r, p] = items[ev]
                ts[r, p] = times[ev]
                seg[r, p] = s
                pos[r, p] = e
                user[r, p] = uid[u]
                if e + 1 < n:
                    loss[r, p] = True
                    target[r, p] = items[ev + 1]


PAD_VALUES = {"type": PAD, "item": 0, "cond": 0, "segment": -1, "pos": 0, "loss_mask": False, "target": 0,
              "user": -1, "ts": 0}   # what a padding position holds in each row array


def empty_rows(n_rows: int, seq_len: int, n_fields: int) -> dict[str, np.ndarray]:
    """n_rows rows of padding: arrays [n_rows, S] (cond [n_rows, S, F]) as in docs/CONTRACTS.md."""
    dtypes = {"type": np.int8, "item": np.int32, "cond": np.int32, "segment": np.int32, "pos": np.int32,
              "loss_mask": np.bool_, "target": np.int32, "user": np.int32, "ts": np.int64}
    return {k: np.full((n_rows, seq_len) + ((n_fields,) if k == "cond" else ()), PAD_VALUES[k], d)
            for k, d in dtypes.items()}


def pack_sequences(items: np.ndarray, conds: np.ndarray, first: np.ndarray, count: np.ndarray, seq_len: int,
                   conditions: bool = True, strategy: str = "best_fit", times: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pack users' events into rows.

    items [E] item ids, conds [E, F] condition ids, first [U] / count [U] each user's events
    (already truncated to the part to pack), times [E] event timestamps (optional). Returns arrays [R, S] (cond: [R, S, F]) as in
    docs/CONTRACTS.md, plus `row` and `start` per user ([U]).
    """
    count = np.asarray(count, np.int64)
    row, start, n_rows = assign_rows(count * (2 if conditions else 1), seq_len, strategy)
    out = fill_rows(items, conds, first, count, row, start, n_rows, seq_len, conditions, times)
    return {**out, "row": row, "start": start}


def fill_rows(items: np.ndarray, conds: np.ndarray, first: np.ndarray, count: np.ndarray, row: np.ndarray,
              start: np.ndarray, n_rows: int, seq_len: int, conditions: bool = True, times: np.ndarray | None = None,
              uid: np.ndarray | None = None, head: dict[str, np.ndarray] | None = None,
              out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The rows of users already placed by `assign_rows` (row [U], start [U], n_rows): arrays
    [n_rows, S] (cond [n_rows, S, F]) as in docs/CONTRACTS.md. `user` holds uid[u] (default u, the
    index into first/count). `head` (arrays [H, S, ...]) is copied above the new rows: [H + n_rows, S].
    `out` (arrays of at least H + n_rows rows, as `empty_rows`) is reused instead of new arrays."""
    conds = np.ascontiguousarray(conds, np.int32)
    conds = conds if conds.ndim == 2 else conds.reshape(len(items), -1)   # [E, F]
    times = np.zeros(len(items), np.int64) if times is None else np.asarray(times, np.int64)
    uid = np.arange(len(count), dtype=np.int32) if uid is None else np.asarray(uid, np.int32)
    h = 0 if head is None else len(head["type"])
    if out is None:
        out = empty_rows(h + n_rows, seq_len, conds.shape[1])
    else:
        out = {k: v[:h + n_rows] for k, v in out.items()}
        for k, v in out.items():
            v[h:] = PAD_VALUES[k]
    if h:
        for k, v in head.items():
            out[k][:h] = v
    _fill(np.asarray(items, np.int32), conds, times, np.asarray(first, np.int64), np.asarray(count, np.int64),
          np.asarray(row, np.int64) + h, np.asarray(start, np.int64), uid, conditions, *out.values())
    return out


def plan_blocks(first: np.ndarray, count: np.ndarray, tokens_per_event: int, max_tokens: int,
                max_events: int) -> np.ndarray:
    """Cut users 0..U-1 (in order; user u packs events first[u] : first[u]+count[u], windows in
    increasing order) into contiguous blocks -> bounds [B+1] (block b = users bounds[b]:bounds[b+1]).

    A block grows while its tokens stay <= max_tokens and the events it spans (first event of its
    first user to the last event of its last user, what one slice read returns) stay <= max_events;
    every block holds at least one user, so a block over either limit is a single user."""
    first, count = np.asarray(first, np.int64), np.asarray(count, np.int64)
    if len(count) == 0:
        return np.zeros(1, np.int64)
    tok_end = np.cumsum(count * tokens_per_event)       # tokens of users 0..u
    ev_end = first + count                              # non-decreasing
    bounds = [0]
    a = 0
    while a < len(count):
        before = tok_end[a - 1] if a else 0
        b = min(np.searchsorted(tok_end, before + max_tokens, side="right"),
                np.searchsorted(ev_end, first[a] + max_events, side="right"))
        a = max(a + 1, int(b))
        bounds.append(a)
    return np.asarray(bounds, np.int64)


def pack_sequences_ref(items, conds, first, count, seq_len, conditions=True, strategy="best_fit", times=None):
    """Reference twin of `pack_sequences` in plain Python/NumPy."""
    items = np.asarray(items)
    times = np.zeros(len(items), np.int64) if times is None else np.asarray(times)
    conds = np.asarray(conds).reshape(len(items), -1)
    lengths = [int(c) * (2 if conditions else 1) for c in count]
    row, start, R = assign_rows_ref(lengths, seq_len, strategy)
    F = conds.shape[1]
    out = {"type": np.zeros((R, seq_len), np.int8), "item": np.zeros((R, seq_len), np.int32),
           "cond": np.zeros((R, seq_len, F), np.int32), "segment": np.full((R, seq_len), -1, np.int32),
           "pos": np.zeros((R, seq_len), np.int32), "loss_mask": np.zeros((R, seq_len), bool),
           "target": np.zeros((R, seq_len), np.int32), "user": np.full((R, seq_len), -1, np.int32),
           "ts": np.zeros((R, seq_len), np.int64)}
    for r in range(R):
        users = sorted((u for u in range(len(count)) if row[u] == r), key=lambda u: start[u])
        for s, u in enumerate(users):
            evs = list(range(first[u], first[u] + count[u]))
            toks = []
            for e, ev in enumerate(evs):
                nxt = items[evs[e + 1]] if e + 1 < len(evs) else 0
                if conditions:
                    toks.append((COND, 0, conds[ev], True, items[ev], times[ev]))
                    toks.append((ITEM, items[ev], np.zeros(F), False, 0, times[ev]))
                else:
                    toks.append((ITEM, items[ev], np.zeros(F), e + 1 < len(evs), nxt, times[ev]))
            for p, (t, it, c, lm, tg, tm) in enumerate(toks):
                j = start[u] + p
                out["type"][r, j], out["item"][r, j], out["cond"][r, j] = t, it, c
                out["segment"][r, j], out["pos"][r, j], out["loss_mask"][r, j] = s, p, lm
                out["target"][r, j], out["user"][r, j], out["ts"][r, j] = tg, u, tm
    out["row"], out["start"] = row, start
    return out


# --------------------------------------------------------------------------- masks
@njit(cache=True)
def document_causal_mask(segment):
    """segment [B, S] -> bool [B, S, S]: query i may attend key j iff same user and j <= i.
    Padding positions attend only themselves (keeps softmax finite; their outputs are unused)."""
    B, S = segment.shape
    mask = np.zeros((B, S, S), np.bool_)
    for b in range(B):
        for i in range(S):
            si = segment[b, i]
            if si < 0:
                mask[b, i, i] = True
                continue
            j = i
            while j >= 0 and segment[b, j] == si:
                mask[b, i, j] = True
                j -= 1
    return mask


def document_causal_mask_ref(segment: np.ndarray) -> np.ndarray:
    segment = np.asarray(segment)
    S = segment.shape[1]
    same = segment[:, :, None] == segment[:, None, :]
    causal = np.tril(np.ones((S, S), bool))[None]
    real = (segment >= 0)[:, :, None]
    return (same & causal & real) | (~real & np.eye(S, dtype=bool)[None])


# --------------------------------------------------------------------------- grouped queries
@njit(cache=True)
def _fill_queries(items, conds, first, count, queries, row, start, n_rows, seq_len):
    """Document d = prefix events first[d] : first[d]+count[d] as (condition, item) pairs, then
    the N query condition tokens queries[d or 0] ([N, F]), all at position 2*count[d]."""
    n_fields = conds.shape[1]
    n_q = queries.shape[1]
    per_doc = queries.shape[0] > 1
    typ = np.zeros((n_rows, seq_len), np.int8)
    item = np.zeros((n_rows, seq_len), np.int32)
    cond = np.zeros((n_rows, seq_len, n_fields), np.int32)
    seg = np.full((n_rows, seq_len), -1, np.int32)
    pos = np.zeros((n_rows, seq_len), np.int32)
    is_query = np.zeros((n_rows, seq_len), np.bool_)
    doc = np.full((n_rows, seq_len), -1, np.int32)
    query_pos = np.zeros((len(count), n_q), np.int64)
    slot = np.zeros(n_rows, np.int32)
    order = np.argsort(start)  # segments numbered left to right within each row
    for k in range(len(order)):
        d = order[k]
        r = row[d]
        s = slot[r]
        slot[r] += 1
        t = start[d]
        n = count[d]
        for e in range(n):
            ev = first[d] + e
            p = t + 2 * e
            typ[r, p] = 1
            for f in range(n_fields):
                cond[r, p, f] = conds[ev, f]
            typ[r, p + 1] = 2
            item[r, p + 1] = items[ev]
            for q in range(2):
                seg[r, p + q] = s
                pos[r, p + q] = 2 * e + q
                doc[r, p + q] = d
        qd = d if per_doc else 0
        for q in range(n_q):
            p = t + 2 * n + q
            typ[r, p] = 1
            for f in range(n_fields):
                cond[r, p, f] = queries[qd, q, f]
            seg[r, p] = s
            pos[r, p] = 2 * n          # every query sits right after the prefix
            is_query[r, p] = True
            doc[r, p] = d
            query_pos[d, q] = p
    return typ, item, cond, seg, pos, is_query, doc, query_pos


def _query_array(queries, n_docs: int, n_fields: int) -> np.ndarray:
    q = np.asarray(queries, np.int32)
    if q.ndim == 2:
        q = q[None]
    if q.ndim != 3 or q.shape[0] not in (1, n_docs) or q.shape[2] != n_fields or q.shape[1] < 1:
        raise ValueError(f"queries must be [N, {n_fields}] or [{n_docs}, N, {n_fields}] with N >= 1 (got {np.shape(queries)})")
    return np.ascontiguousarray(q)


def pack_queries(items: np.ndarray, conds: np.ndarray, first: np.ndarray, count: np.ndarray, queries: np.ndarray,
                 seq_len: int, strategy: str = "best_fit") -> dict[str, np.ndarray]:
    """Pack grouped-query documents into rows (Step 2).

    Document d (one user at one snapshot) is its prefix events first[d] : first[d]+count[d]
    (`c_1 i_1 ... c_L i_L`, as pack_sequences with conditions) followed by N query condition
    tokens `c_q1 ... c_qN` from queries [N, F] (shared) or [D, N, F] (per document); every query
    token has position 2*count[d] and type 1. Returns [R, S] arrays type, item, cond ([R, S, F]),
    segment, pos, is_query, doc (document index, -1 at padding), and per document row [D],
    start [D], query_pos [D, N] (the column of each query token in its row).
    """
    count = np.asarray(count, np.int64)
    conds = np.ascontiguousarray(conds, np.int32).reshape(len(items), -1)
    q = _query_array(queries, len(count), conds.shape[1])
    row, start, n_rows = assign_rows(2 * count + q.shape[1], seq_len, strategy)
    typ, item, cond, seg, pos, is_query, doc, query_pos = _fill_queries(
        np.asarray(items, np.int32), conds, np.asarray(first, np.int64), count, q, row, start, n_rows, seq_len)
    return {"type": typ, "item": item, "cond": cond, "segment": seg, "pos": pos, "is_query": is_query,
            "doc": doc, "row": row, "start": start, "query_pos": query_pos}


def pack_queries_ref(items, conds, first, count, queries, seq_len, strategy="best_fit"):
    """Reference twin of `pack_queries` in plain Python/NumPy."""
    items = np.asarray(items)
    conds = np.asarray(conds).reshape(len(items), -1)
    F = conds.shape[1]
    q = np.asarray(queries)
    q = q[None] if q.ndim == 2 else q
    N = q.shape[1]
    row, start, R = assign_rows_ref([2 * int(c) + N for c in count], seq_len, strategy)
    out = {"type": np.zeros((R, seq_len), np.int8), "item": np.zeros((R, seq_len), np.int32),
           "cond": np.zeros((R, seq_len, F), np.int32), "segment": np.full((R, seq_len), -1, np.int32),
           "pos": np.zeros((R, seq_len), np.int32), "is_query": np.zeros((R, seq_len), bool),
           "doc": np.full((R, seq_len), -1, np.int32)}
    query_pos = np.zeros((len(count), N), np.int64)
    for r in range(R):
        docs = sorted((d for d in range(len(count)) if row[d] == r), key=lambda d: start[d])
        for s, d in enumerate(docs):
            toks = []
            for e in range(int(count[d])):
                ev = first[d] + e
                toks.append((COND, 0, conds[ev], 2 * e, False))
                toks.append((ITEM, items[ev], np.zeros(F), 2 * e + 1, False))
            for n in range(N):
                toks.append((COND, 0, q[d if len(q) > 1 else 0, n], 2 * int(count[d]), True))
            for p, (t, it, c, ps, isq) in enumerate(toks):
                j = start[d] + p
                out["type"][r, j], out["item"][r, j], out["cond"][r, j] = t, it, c
                out["segment"][r, j], out["pos"][r, j], out["is_query"][r, j], out["doc"][r, j] = s, ps, isq, d
            query_pos[d] = start[d] + 2 * int(count[d]) + np.arange(N)
    out["row"], out["start"], out["query_pos"] = row, start, query_pos
    return out


@njit(cache=True)
def grouped_query_mask(segment, is_query):
    """segment, is_query [B, S] -> bool [B, S, S]. Key j is visible from token i iff same
    document, j <= i and j is not a query token, and every token sees itself: prefix tokens are
    document-causal, a query token sees its whole prefix and itself but no other query.
    Padding positions attend only themselves."""
    B, S = segment.shape
    mask = np.zeros((B, S, S), np.bool_)
    for b in range(B):
        for i in range(S):
            mask[b, i, i] = True
            si = segment[b, i]
            if si < 0:
                continue
            j = i - 1
            while j >= 0 and segment[b, j] == si:
                if not is_query[b, j]:
                    mask[b, i, j] = True
                j -= 1
    return mask


def grouped_query_mask_ref(segment: np.ndarray, is_query: np.ndarray) -> np.ndarray:
    segment, is_query = np.asarray(segment), np.asarray(is_query, bool)
    S = segment.shape[1]
    same = segment[:, :, None] == segment[:, None, :]
    causal = np.tril(np.ones((S, S), bool))[None]
    real = (segment >= 0)[:, :, None]
    eye = np.eye(S, dtype=bool)[None]
    return (same & causal & real & ~is_query[:, None, :]) | eye


@njit(cache=True)
def top_values(values, first, count, k):
    """values [E] ids of one condition field; per document d the k most frequent ids >= 2 among
    values[first[d] : first[d]+count[d]], most frequent first, ties: the most recent occurrence
    first. [D, k] int32, 1 ('<any>') where a document has fewer than k distinct ids."""
    D = len(count)
    out = np.ones((D, k), np.int32)
    V = 2
    for e in range(len(values)):
        V = max(V, values[e] + 1)
    cnt = np.zeros(V, np.int64)
    last = np.full(V, -1, np.int64)
    seen = np.empty(V, np.int64)
    for d in range(D):
        n_seen = 0
        for e in range(first[d], first[d] + count[d]):
            v = values[e]
            if v < 2:
                continue
            if cnt[v] == 0:
                seen[n_seen] = v
                n_seen += 1
            cnt[v] += 1
            last[v] = e
        for r in range(min(k, n_seen)):
            best = -1
            for m in range(n_seen):
                v = seen[m]
                if cnt[v] > 0 and (best < 0 or cnt[v] > cnt[best] or (cnt[v] == cnt[best] and last[v] > last[best])):
                    best = v
            out[d, r] = best
            cnt[best] = -cnt[best]  # taken (restored to 0 below)
        for m in range(n_seen):
            cnt[seen[m]] = 0
            last[seen[m]] = -1
    return out


def top_values_ref(values, first, count, k):
    """Reference twin of `top_values`."""
    out = np.ones((len(count), k), np.int32)
    for d in range(len(count)):
        stats: dict[int, list[int]] = {}
        for e in range(int(first[d]), int(first[d]) + int(count[d])):
            v = int(values[e])
            if v >= 2:
                c, _ = stats.get(v, [0, -1])
                stats[v] = [c + 1, e]
        ranked = sorted(stats, key=lambda v: (-stats[v][0], -stats[v][1]))[:k]
        out[d, :len(ranked)] = ranked
    return out
