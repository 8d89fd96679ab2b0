"""Step 2 (`lumctl query`): grouped queries == one query per pass, no leakage from a snapshot's
future, the grouped mask by hand and against its reference twin, the streamed ragged store equal
to a dense store answered one snapshot at a time, fuse's point-in-time join against a loop, the
item store written once per checkpoint, the stage through the CLI."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import invoke
from lumctl.attention import query_backend, query_dense_mask
from lumctl.models.lum import LUM, LUMConfig
from lumctl.ops.packing import (document_causal_mask, grouped_query_mask, grouped_query_mask_ref, pack_queries,
                                pack_queries_ref, top_values, top_values_ref)
from lumctl.specs import QuerySpec, load_spec, parse_spec
from lumctl.stages import query as q

CPU = torch.device("cpu")
COND_VOCAB = [5, 4]  # field a: <pad> <any> a0 a1 a2; field b: <pad> <any> b0 b1


def model(seed: int = 0, d: int = 32, **kw) -> LUM:
    """A LUM with larger-than-init weights, so attention is far from uniform and a wrong mask shows."""
    torch.manual_seed(seed)
    m = LUM(LUMConfig(n_items=30, cond_vocab=COND_VOCAB, d_model=d, n_layers=2, n_heads=2, d_ff=48, **kw))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def data_dict(n_events: list[int], seed: int = 0, ts_range: int = 6) -> dict:
    """A tokenize-store-like dict: users with events sorted by time, many same-second ties."""
    rng = np.random.default_rng(seed)
    E = sum(n_events)
    ts = np.concatenate([np.sort(rng.integers(0, ts_range * n, n)) for n in n_events]).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_events)]).astype(np.int64)
    n = np.asarray(n_events)
    return {"events/item": rng.integers(2, 30, E).astype(np.int32),
            "events/cond": np.stack([rng.integers(2, 5, E), rng.integers(2, 4, E)], 1).astype(np.int32),
            "events/timestamp": ts, "users/offsets": offsets,
            "users/split": np.stack([np.maximum(n - 2, 0), np.maximum(n - 1, 0)], 1).astype(np.int64),
            "vocab/user": np.array([f"u{u}" for u in range(len(n_events))]),
            "vocab/cond_a": np.array(["<pad>", "<any>", "a0", "a1", "a2"]),
            "vocab/cond_b": np.array(["<pad>", "<any>", "b0", "b1"])}


# ------------------------------------------------------------------------------ (c) mask and packing
def test_grouped_mask_by_hand():
    # doc 0: c i c i q q (positions 0 1 2 3 4 4);  doc 1: c i q;  one padding slot
    seg = np.array([[0, 0, 0, 0, 0, 0, 1, 1, 1, -1]], np.int32)
    isq = np.array([[0, 0, 0, 0, 1, 1, 0, 0, 1, 0]], bool)
    want = np.array([
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],   # query 1: the prefix and itself
        [1, 1, 1, 1, 0, 1, 0, 0, 0, 0],   # query 2: the prefix and itself, not query 1
        [0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],   # padding sees itself
    ], bool)
    np.testing.assert_array_equal(grouped_query_mask(seg, isq)[0], want)
    np.testing.assert_array_equal(grouped_query_mask_ref(seg, isq)[0], want)
    np.testing.assert_array_equal(query_dense_mask(torch.from_numpy(seg), torch.from_numpy(isq))[0].numpy(), want)
    # without query tokens it is the document-causal mask of pretraining
    np.testing.assert_array_equal(grouped_query_mask(seg, np.zeros_like(isq)), document_causal_mask(seg))


def test_pack_queries_by_hand():
    items = np.array([7, 8, 9], np.int32)
    conds = np.array([[2, 3], [3, 2], [4, 3]], np.int32)
    queries = np.array([[2, 1], [1, 3]], np.int32)
    r = pack_queries(items, conds, np.array([0, 2]), np.array([2, 1]), queries, seq_len=12)
    # both documents (6 and 4 tokens) share one row, longer first
    assert r["type"].shape == (1, 12)
    np.testing.assert_array_equal(r["type"][0], [1, 2, 1, 2, 1, 1, 1, 2, 1, 1, 0, 0])
    np.testing.assert_array_equal(r["item"][0], [0, 7, 0, 8, 0, 0, 0, 9, 0, 0, 0, 0])
    np.testing.assert_array_equal(r["pos"][0], [0, 1, 2, 3, 4, 4, 0, 1, 2, 2, 0, 0])
    np.testing.assert_array_equal(r["segment"][0], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1])
    np.testing.assert_array_equal(r["is_query"][0], [0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(r["cond"][0, [0, 2, 4, 5, 6, 8, 9]], [[2, 3], [3, 2], [2, 1], [1, 3], [4, 3], [2, 1], [1, 3]])
    np.testing.assert_array_equal(r["query_pos"], [[4, 5], [8, 9]])


@st.composite
def ragged(draw):
    D = draw(st.integers(1, 7))
    count = draw(st.lists(st.integers(0, 6), min_size=D, max_size=D))
    F = draw(st.integers(0, 2))
    N = draw(st.integers(1, 4))
    per_doc = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    seq_len = 2 * max(count) + N + draw(st.integers(0, 8))
    rng = np.random.default_rng(seed)
    E = sum(count) + 3
    first = np.array([rng.integers(0, E - c + 1) for c in count], np.int64)
    items = rng.integers(2, 50, E).astype(np.int32)
    conds = rng.integers(0, 6, (E, F)).astype(np.int32)
    queries = rng.integers(1, 6, (D, N, F) if per_doc else (N, F)).astype(np.int32)
    return items, conds, first, np.array(count, np.int64), queries, seq_len


@settings(max_examples=60, deadline=None)
@given(ragged())
def test_pack_queries_and_mask_match_reference(case):
    items, conds, first, count, queries, seq_len = case
    got = pack_queries(items, conds, first, count, queries, seq_len)
    want = pack_queries_ref(items, conds, first, count, queries, seq_len)
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_array_equal(grouped_query_mask(got["segment"], got["is_query"]),
                                  grouped_query_mask_ref(got["segment"], got["is_query"]))
    np.testing.assert_array_equal(query_dense_mask(torch.from_numpy(got["segment"]), torch.from_numpy(got["is_query"])).numpy(),
                                  grouped_query_mask_ref(got["segment"], got["is_query"]))


def test_query_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert query_backend("flex", cpu, 1024) == "sdpa"            # the CPU always runs sdpa
    assert query_backend("auto", cuda, 2048) == "sdpa"
    assert query_backend("auto", cuda, 4096) == "flex"
    assert query_backend("flex", cuda, 1024) == "flex"
    assert query_backend("sdpa", cuda, 4096) == "sdpa"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=40), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_top_values_match_reference(values, k, seed):
    values = np.array(values, np.int32)
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(values), 5)
    count = np.array([rng.integers(0, len(values) - f + 1) for f in first])
    np.testing.assert_array_equal(top_values(values, first, count, k), top_values_ref(values, first, count, k))


def test_top_values_by_hand():
    # counts: 4 x3, 5 x2 (last at 6), 3 x2 (last at 4), 1 ('<any>') ignored
    v = np.array([4, 3, 5, 4, 3, 4, 5, 1, 1], np.int32)
    np.testing.assert_array_equal(top_values(v, np.array([0, 0]), np.array([9, 2]), 3), [[4, 5, 3], [3, 4, 1]])


# ------------------------------------------------------------------------------ (a) grouped == per pass
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_grouped_queries_with_a_lowpass_branch_equal_one_query_per_pass(backend):
    """The low-pass branch reads the dense mask: a query token filters its user's prefix, never the other queries."""
    m = model(lowpass_bins=2, lowpass_window=6)
    d = data_dict([9, 4, 1, 13, 6], seed=1)
    first, count = d["users/offsets"][:-1], np.diff(d["users/offsets"])
    queries = np.array([[2, 1], [3, 2], [4, 3], [1, 1]], np.int32)
    kw = dict(seq_len=40, batch_rows=2, device=CPU, backend=backend)
    grouped = q.answer(m, d["events/item"], d["events/cond"], first, count, queries, grouped=True, **kw)
    single = q.answer(m, d["events/item"], d["events/cond"], first, count, queries, grouped=False, **kw)
    np.testing.assert_allclose(grouped, single, atol=1e-5, rtol=0)
    plain = q.answer(model(), d["events/item"], d["events/cond"], first, count, queries, grouped=True, **kw)
    assert np.abs(grouped - plain).max() > 1e-2  # the branch is on


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_grouped_queries_equal_one_query_per_pass(backend):
    m = model()
    d = data_dict([9, 4, 1, 13, 6], seed=1)
    first, count = d["users/offsets"][:-1], np.diff(d["users/offsets"])
    queries = np.array([[2, 1], [3, 2], [4, 3], [1, 1], [2, 3]], np.int32)               # N = 5
    kw = dict(seq_len=40, batch_rows=2, device=CPU, backend=backend)
    grouped = q.answer(m, d["events/item"], d["events/cond"], first, count, queries, grouped=True, **kw)
    single = q.answer(m, d["events/item"], d["events/cond"], first, count, queries, grouped=False, **kw)
    assert grouped.shape == (5, 5, 32)
    np.testing.assert_allclose(grouped, single, atol=1e-5, rtol=0)
    # ... and by hand: one user alone, its prefix plus a single query token, document-causal mask
    u, n = 3, 2
    ev = slice(first[u], first[u] + count[u])
    L = int(count[u])
    b = {"type": torch.tensor([[1, 2] * L + [1]], dtype=torch.int8),
         "item": torch.tensor([np.r_[np.stack([np.zeros(L), d["events/item"][ev]], 1).reshape(-1), 0]]).long(),
         "cond": torch.tensor(np.r_[np.stack([d["events/cond"][ev], np.zeros((L, 2))], 1).reshape(-1, 2),
                                    queries[n:n + 1]][None]).long(),
         "pos": torch.arange(2 * L + 1)[None]}
    with torch.no_grad():
        o = m(b, torch.ones(1, 2 * L + 1, 2 * L + 1, dtype=torch.bool).tril())[0, -1]
    np.testing.assert_allclose(grouped[u, n], o.numpy(), atol=1e-5, rtol=0)


def test_the_mask_matters():
    """Guard for the test above: if query tokens saw each other, the answers would differ."""
    m = model()
    d = data_dict([9, 6], seed=2)
    first, count = d["users/offsets"][:-1], np.diff(d["users/offsets"])
    queries = np.array([[2, 1], [3, 2], [4, 3]], np.int32)
    rows = pack_queries(d["events/item"], d["events/cond"], first, count, queries, 32)
    b = {k: torch.from_numpy(rows[k]).long() for k in ("type", "item", "cond", "pos")}
    with torch.no_grad():
        good = m(b, torch.from_numpy(grouped_query_mask(rows["segment"], rows["is_query"])))
        leaky = m(b, torch.from_numpy(document_causal_mask(rows["segment"])))
    at = (rows["row"][:, None], rows["query_pos"])
    assert (good[at] - leaky[at]).abs().max() > 1e-2


# ------------------------------------------------------------------------------ snapshots, leakage
def spec_q(**kw) -> QuerySpec:
    return QuerySpec(**kw)


def dense_snapshots(d: dict, users: np.ndarray, qs: QuerySpec) -> tuple[np.ndarray, np.ndarray]:
    """Reference twin of snapshot_cuts, the rule written out per user with Python loops:
    (cut [U, T] events in each snapshot's prefix, valid [U, T])."""
    ts, off = d["events/timestamp"], d["users/offsets"]
    per_user = []
    for u in users:
        t_u = ts[off[u]:off[u + 1]]
        if qs.snapshot == "split":
            cuts = []
            for h in d["users/split"][u]:
                cuts.append(int((t_u < t_u[h]).sum()) if h < len(t_u) else int(h))   # strictly before the held-out
        else:
            cuts = []
            for k in range(qs.every_n_events, len(t_u) + 1, qs.every_n_events):
                c = int((t_u <= t_u[k - 1]).sum())                                   # all events of that second
                if not cuts or cuts[-1] != c:
                    cuts.append(c)
        per_user.append(cuts)
    T = max([len(c) for c in per_user] + [1])
    cut = np.zeros((len(users), T), np.int64)
    for i, c in enumerate(per_user):
        cut[i, :len(c)] = c
    return cut, cut > 0


def ragged_cuts(d: dict, users: np.ndarray, qs: QuerySpec):
    src = q.Source(d)
    split = src.per_user("users/split", users) if qs.snapshot == "split" else None
    return q.snapshot_cuts(src.local_offsets(users), src.events("events/timestamp", users), split, qs)


def densify(count: np.ndarray, slot: np.ndarray, values: np.ndarray, T: int, fill) -> np.ndarray:
    """Ragged rows (count per user, slot per row) -> [U, T, ...] with `fill` where a user has no snapshot."""
    out = np.full((len(count), T, *values.shape[1:]), fill, values.dtype)
    out[np.repeat(np.arange(len(count)), count), slot] = values
    return out


def test_snapshots_never_split_same_second_events():
    d = data_dict([6, 5], seed=0)
    d["events/timestamp"] = np.array([1, 2, 3, 3, 3, 4,   10, 11, 12, 12, 12], np.int64)
    d["users/split"] = np.array([[4, 5], [3, 4]])
    count, cut, slot = ragged_cuts(d, np.arange(2), spec_q(snapshot="split"))
    assert q.snapshot_names(spec_q(snapshot="split"), 2) == ["valid", "test"]
    # user 0: the valid event (index 4, t=3) ties with events 2, 3 -> the prefix stops before them
    # user 1: valid at index 3 (t=12) ties with index 2 -> prefix [10, 11]; test at index 4 also t=12
    assert count.tolist() == [2, 2] and cut.tolist() == [2, 5, 2, 2] and slot.tolist() == [0, 1, 0, 1]
    count, cut, slot = ragged_cuts(d, np.arange(2), spec_q(snapshot="every_n_events", every_n_events=3))
    # every 3 events: user 0 nominal 3, 6 -> 3 extends over the t=3 tie to 5; user 1 nominal 3 -> 5
    assert count.tolist() == [2, 1] and cut.tolist() == [5, 6, 5] and slot.tolist() == [0, 1, 0]
    # a user whose valid prefix is empty has only its test snapshot (slot 1)
    d["users/split"] = np.array([[0, 5], [3, 4]])
    count, cut, slot = ragged_cuts(d, np.arange(2), spec_q(snapshot="split"))
    assert count.tolist() == [1, 2] and cut.tolist() == [5, 2, 2] and slot.tolist() == [1, 0, 1]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 25), min_size=1, max_size=6), st.integers(0, 10**6),
       st.sampled_from(["split", 1, 2, 5]))
def test_snapshot_cuts_match_the_rule_by_loop(n_events, seed, snap):
    d = data_dict(n_events, seed=seed, ts_range=2)
    qs = spec_q(snapshot="split") if snap == "split" else spec_q(snapshot="every_n_events", every_n_events=snap)
    users = np.arange(len(n_events))
    want_cut, want_valid = dense_snapshots(d, users, qs)
    count, cut, slot = ragged_cuts(d, users, qs)
    T = want_cut.shape[1]
    np.testing.assert_array_equal(count, want_valid.sum(1))
    np.testing.assert_array_equal(densify(count, slot, cut, T, 0), want_cut)
    ts, off = d["events/timestamp"], d["users/offsets"]
    for u, c in zip(np.repeat(users, count), cut):
        t_u = ts[off[u]:off[u + 1]]
        assert c == (t_u <= t_u[c - 1]).sum()                   # every event stamped <= T, nothing later


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=12, unique=True), st.sampled_from([0, 1, 5, 1000]))
def test_read_of_ranges_equals_the_slices(cuts, gap):
    cuts = sorted(cuts)[: len(cuts) // 2 * 2]
    starts, stops = np.array(cuts[0::2], np.int64), np.array(cuts[1::2], np.int64)
    x = np.arange(200) * 3
    want = np.concatenate([x[a:b] for a, b in zip(starts, stops)] + [x[:0]])
    np.testing.assert_array_equal(q._read(x, starts, stops, gap), want)


def dense_reference(m, d: dict, qs: QuerySpec, users: np.ndarray, max_items: int) -> dict:
    """The dense store [U, T, ...] of the old layout, each snapshot answered alone (one document per
    pass) from dense_snapshots: the reference of the streamed ragged store."""
    cut, valid = dense_snapshots(d, users, qs)
    vocabs = {f: [str(v) for v in d[f"vocab/cond_{f}"]] for f in ("a", "b")}
    queries = q.build_queries(qs, ["a", "b"], vocabs)
    U, T = cut.shape
    N = len(queries.names)
    emb = np.full((U, T, N, 32), np.nan, np.float32)
    qc = np.zeros((U, T, N, 2), np.int32)
    ts = np.full((U, T), -1, np.int64)
    off = d["users/offsets"]
    for i, u in enumerate(users):
        for t in np.flatnonzero(valid[i]):
            c = int(cut[i, t])
            n = min(c, max_items - 1)
            first = np.array([off[u] + c - n])
            qq = queries.resolve(d["events/cond"], np.array([off[u]]), np.array([c]))
            qq = qq if qq.ndim == 2 else qq[0]
            emb[i, t] = q.answer(m, d["events/item"], d["events/cond"], first, np.array([n]), qq, 2 * n + N, 1, CPU)[0]
            qc[i, t] = qq
            ts[i, t] = d["events/timestamp"][off[u] + c - 1]
    return {"user_emb": emb, "snapshot_valid": valid, "snapshot_ts": ts, "snapshot_pos": np.where(valid, cut, 0),
            "query_cond": qc}


def as_dense(r: dict, T: int | None = None) -> dict:
    """A ragged store (read_answers) in the old dense layout [U, T, ...]."""
    count = np.diff(r["users/snap_offsets"])
    T = T or int(r["snap/slot"].max(initial=0)) + 1
    out = {"user_emb": densify(count, r["snap/slot"], r["snap/emb"].astype(np.float32), T, np.nan),
           "snapshot_valid": densify(count, r["snap/slot"], np.ones(len(r["snap/ts"]), bool), T, False),
           "snapshot_ts": densify(count, r["snap/slot"], r["snap/ts"], T, -1),
           "snapshot_pos": densify(count, r["snap/slot"], r["snap/pos"], T, 0),
           "query_cond": densify(count, r["snap/slot"], r["snap/query_cond"], T, 0)}
    return out


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(0, 16), min_size=1, max_size=5), st.integers(0, 10**6),
       st.sampled_from(["split", 2, 3, 5]), st.integers(1, 7), st.booleans(), st.integers(0, 31))
def test_streamed_ragged_store_equals_the_dense_one_answered_per_snapshot(n_events, seed, snap, batch, top_k, pick):
    import pyarrow.parquet as pq
    m = model(seed=seed % 7)
    d = data_dict(n_events, seed=seed, ts_range=2)
    kw = {"snapshot": "split"} if snap == "split" else {"snapshot": "every_n_events", "every_n_events": snap}
    qs = spec_q(each=["a"], top_k={"b": 2} if top_k else {}, batch_snapshots=batch, dtype="float32", **kw)
    users = np.array([u for u in range(len(n_events)) if (pick >> u) & 1 or u == 0], np.int64)   # a selection
    with tempfile.TemporaryDirectory() as tmp:
        counts = q.write_answers(Path(tmp) / "answers.zarr", q.Source(d), m, qs, ["a", "b"], users, max_items=6,
                                 seq_len=16, device=CPU)
        r = q.read_answers(Path(tmp))
        latest = pq.read_table(Path(tmp) / "latest.parquet")
    want = dense_reference(m, d, qs, users, max_items=6)
    T = want["snapshot_valid"].shape[1]
    got = as_dense(r, T)
    assert counts["snapshots"] == len(r["snap/ts"]) == want["snapshot_valid"].sum()
    np.testing.assert_array_equal(r["user_index"], users)
    assert list(r["user_id"]) == [f"u{u}" for u in users]
    for k in ("snapshot_valid", "snapshot_ts", "snapshot_pos", "query_cond"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    np.testing.assert_allclose(got["user_emb"], want["user_emb"], atol=1e-5, rtol=0)
    # latest.parquet: per user with a snapshot, its last one
    has = want["snapshot_valid"].any(1)
    last = T - 1 - np.argmax(want["snapshot_valid"][:, ::-1], 1)
    u = np.flatnonzero(has)
    assert latest.column("user_index").to_pylist() == users[u].tolist()
    assert latest.column("user_id").to_pylist() == [f"u{x}" for x in users[u]]
    names = q.snapshot_names(qs, T)
    assert latest.column("snapshot").to_pylist() == [names[t] for t in last[u]]
    np.testing.assert_array_equal(latest.column("snapshot_ts").to_numpy(), want["snapshot_ts"][u, last[u]])
    np.testing.assert_array_equal(latest.column("snapshot_pos").to_numpy(), want["snapshot_pos"][u, last[u]])
    for n, name in enumerate(q.build_queries(qs, ["a", "b"], {f: list(d[f"vocab/cond_{f}"]) for f in "ab"}).names):
        col = np.array(latest.column(name).to_pylist(), np.float32).reshape(len(u), 32)
        np.testing.assert_allclose(col, want["user_emb"][u, last[u], n], atol=1e-5, rtol=0)
    assert ("resolved" in latest.column_names) == top_k


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 30), max_size=6), min_size=1, max_size=6), st.integers(0, 10**6))
def test_point_in_time_join_equals_a_loop(snap_ts, seed):
    """fuse.join_snapshots (vectorised, chunked) == for each sample, the user's last snapshot with T < t."""
    from lumctl.stages import fuse
    per_user = [sorted(x) for x in snap_ts]                    # a user's rows are oldest first (ties kept)
    rng = np.random.default_rng(seed)
    n_users = len(per_user) + 2                                 # two users without rows in the store
    users = np.sort(rng.choice(n_users, len(per_user), replace=False))
    so = np.r_[0, np.cumsum([len(x) for x in per_user])]
    ans = {"users/snap_offsets": so, "snap/ts": np.array(sum(per_user, []), np.int64), "user_index": users}
    user, t = rng.integers(0, n_users, 300), rng.integers(-1, 33, 300)
    row, has = fuse.join_snapshots(ans, user, t, n_users, chunk=7)
    for k in range(len(user)):
        want = None
        if user[k] in users:
            i = int(np.flatnonzero(users == user[k])[0])
            for j, T in enumerate(per_user[i]):
                if T < t[k]:
                    want = so[i] + j
        assert has[k] == (want is not None), k
        if want is not None:
            assert row[k] == want, k


def _answers(m, d, qs, users=None):
    users = np.arange(len(d["users/offsets"]) - 1) if users is None else users
    return as_dense(q.compute(m, d, qs, ["a", "b"], users, max_items=50, seq_len=64, device=CPU))


@pytest.mark.parametrize("snap", ["split", "every_n_events"])
def test_no_leakage_from_events_after_a_snapshot(snap):
    m = model(seed=3)
    d = data_dict([14, 9, 20, 7], seed=4)
    kw = {"snapshot": "split"} if snap == "split" else {"snapshot": "every_n_events", "every_n_events": 3}
    qs = spec_q(each=["a"], top_k={"b": 2}, **kw)
    before = _answers(m, d, qs)
    assert before["user_emb"].shape[2] == 3 * 2
    # user 2's future: everything after its first valid snapshot's timestamp changes (items, conditions);
    # with every_n_events it also gets 6 more events at the end (split points would move under leave-one-out)
    u = 2
    T0 = before["snapshot_ts"][u, 0]
    off = d["users/offsets"]
    d2 = {k: v.copy() for k, v in d.items()}
    later = np.flatnonzero(d["events/timestamp"][off[u]:off[u + 1]] > T0) + off[u]
    assert len(later) >= 2                                     # at least the valid and the test event
    rng = np.random.default_rng(9)
    d2["events/item"][later] = rng.integers(2, 30, len(later))
    d2["events/cond"][later] = np.stack([rng.integers(2, 5, len(later)), rng.integers(2, 4, len(later))], 1)
    if snap == "every_n_events":
        extra = 6
        at = off[u + 1]
        t_new = d["events/timestamp"][at - 1] + 1 + np.arange(extra)
        for k, v in (("events/item", rng.integers(2, 30, extra)), ("events/timestamp", t_new),
                     ("events/cond", np.stack([rng.integers(2, 5, extra), rng.integers(2, 4, extra)], 1))):
            d2[k] = np.insert(d2[k], at, v.astype(d2[k].dtype), axis=0)
        d2["users/offsets"][u + 1:] += extra
    after = _answers(m, d2, qs)
    T = before["snapshot_valid"].shape[1]
    unchanged = before["snapshot_valid"].copy()                # other users' snapshots and user 2's up to T0
    unchanged[u] &= before["snapshot_ts"][u] <= T0
    assert unchanged[u].sum() >= 1
    for k in ("snapshot_ts", "snapshot_pos", "query_cond"):
        np.testing.assert_array_equal(after[k][:, :T][unchanged], before[k][unchanged], err_msg=k)
    np.testing.assert_allclose(after["user_emb"][:, :T][unchanged], before["user_emb"][unchanged], atol=1e-5, rtol=0)
    # the change is visible where it should be: a later snapshot of user 2 differs
    changed = before["snapshot_valid"][u] & (before["snapshot_ts"][u] > T0)
    if changed.any():
        assert not np.allclose(after["user_emb"][u, :T][changed], before["user_emb"][u][changed], atol=1e-4)


def test_query_list_is_the_product_of_conditions_each_and_top_k():
    vocabs = {"a": ["<pad>", "<any>", "a0", "a1", "a2"], "b": ["<pad>", "<any>", "b0", "b1"]}
    qq = q.build_queries(spec_q(each=["a"], top_k={"b": 2}), ["a", "b"], vocabs)
    assert qq.names == ["a=a0,b=top1", "a=a0,b=top2", "a=a1,b=top1", "a=a1,b=top2", "a=a2,b=top1", "a=a2,b=top2"]
    np.testing.assert_array_equal(qq.fixed[:, 0], [2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(qq.rank[:, 1], [0, 1, 0, 1, 0, 1])
    qq = q.build_queries(spec_q(conditions=[{"b": "b1"}, {}]), ["a", "b"], vocabs)
    assert qq.names == ["b=b1", "<any>"] and qq.fixed.tolist() == [[1, 3], [1, 1]]
    from lumctl.errors import InputError
    with pytest.raises(InputError, match=r"\[query\].each: unknown condition field 'c'"):
        q.build_queries(spec_q(each=["c"]), ["a", "b"], vocabs)
    with pytest.raises(InputError, match=r"\[query\].conditions.0.b: unknown value 'b9'"):
        q.build_queries(spec_q(conditions=[{"b": "b9"}]), ["a", "b"], vocabs)


@pytest.mark.parametrize("section, message", [
    ({"snapshot": "every_n_events"}, "snapshot = 'every_n_events' and every_n_events = K go together"),
    ({"every_n_events": 5}, "snapshot = 'every_n_events' and every_n_events = K go together"),
    ({"each": ["a"], "top_k": {"a": 2}}, "a field is either in each or in top_k, not both (got ['a'])"),
    ({"top_k": {"a": 0}}, "[query].top_k.a: must be > 0 (got 0)"),
    ({"dtype": "bf16"}, "[query].dtype: must be 'float16' or 'float32' (got 'bf16')"),
])
def test_query_spec_errors(section, message):
    from lumctl.errors import InputError
    with pytest.raises(InputError) as e:
        parse_spec({"experiment": "x", "tokenize": {"format": "seq-lines", "path": "a"}, "query": section}, "x.toml")
    assert message in str(e.value)


def test_parse_users():
    np.testing.assert_array_equal(q.parse_users("0-3, 7,5", 10), [0, 1, 2, 3, 5, 7])
    assert q.users_label(q.parse_users("0-2,3-9", 10), 10) == "all"
    assert q.users_label(q.parse_users("0-2,4,6-7", 10), 10) == "0-2,4,6-7"
    from lumctl.errors import InputError
    with pytest.raises(InputError, match="not a range of user indices in 0-9"):
        q.parse_users("5-12", 10)


# ------------------------------------------------------------------------------ (d) the stage via the CLI
QUERY = """
[query]
each = ["scenario"]
top_k = {{ category = 2 }}
dtype = "{dtype}"
batch_rows = 4
"""


def test_query_stage_end_to_end(tiny_spec):
    import pyarrow.parquet as pq
    import zarr
    path = tiny_spec(steps=4, every=4, ckpt=4)
    path.write_text(path.read_text() + QUERY.format(dtype="float16"))
    r = invoke("run", path)                                     # synth, tokenize, pack, pretrain, query
    assert r.exit_code == 0, r.output
    spec = load_spec(path)
    out = spec.store("query")
    g = zarr.open_group(str(out / "answers.zarr"), mode="r")
    U = json.loads((spec.store("tokenize") / "manifest.json").read_text())["counts"]["users"]
    N = 2 * 2                                                   # 2 scenarios x the user's top-2 categories
    cfg = json.loads((spec.store("pretrain") / "final" / "config.json").read_text())
    dm = cfg["model"]["d_model"]
    so = g["users/snap_offsets"][...]
    assert so.shape == (U + 1,) and (np.diff(so) == 2).all()    # synth users have >= 5 events: both snapshots
    S = int(so[-1])
    assert g["snap/emb"].shape == (S, N, dm) and g["snap/emb"].dtype == np.float16
    assert g["snap/ts"].shape == g["snap/pos"].shape == g["snap/slot"].shape == (S,)
    assert list(g["snap/slot"][...]) == [0, 1] * U and g.attrs["snapshot_names"] == ["valid", "test"]
    assert list(g["conditions"][...]) == ["scenario=s0,category=top1", "scenario=s0,category=top2",
                                          "scenario=s1,category=top1", "scenario=s1,category=top2"]
    emb = g["snap/emb"][...]
    assert np.isfinite(emb).all()
    pos = g["snap/pos"][...]
    assert (pos[1::2] >= pos[0::2]).all() and (pos > 0).all()
    # the item store of the checkpoint, beside the query store, and its parquet export
    items = (out / g.attrs["items"]).resolve()
    assert items.parent == spec.store("query-items").resolve()
    ig = zarr.open_group(str(items / "item_emb.zarr"), mode="r")
    assert ig["item_emb"].shape == (cfg["model"]["n_items"], dm) and ig["item_emb"].dtype == np.float16
    it = pq.read_table(items / "items.parquet")
    assert it.column_names == ["item_id", "emb"] and it.num_rows == cfg["model"]["n_items"] - 2
    assert it.column("item_id").to_pylist() == list(ig["item_id"][2:])
    np.testing.assert_array_equal(np.stack(it.column("emb").to_numpy(zero_copy_only=False)),
                                  ig["item_emb"][2:].astype(np.float32))
    written = (items / "manifest.json").stat().st_mtime_ns
    t = pq.read_table(out / "latest.parquet")
    assert t.num_rows == U and t.column("scenario=s0,category=top1").type.list_size == dm
    assert t.column("snapshot").to_pylist() == ["test"] * U
    np.testing.assert_array_equal(np.stack(t.column("scenario=s1,category=top2").to_numpy(zero_copy_only=False)),
                                  emb[1::2, 3].astype(np.float32))
    assert len(t.column("resolved")[0].as_py()) == N
    # a rerun is a no-op; --users limits the run (a new input, so it rebuilds)
    r = invoke("query", path)
    assert r.exit_code == 0 and "query: " in r.stderr and "is up to date" in r.stderr, r.output
    r = invoke("query", path, "--users", "0-4,9")
    assert r.exit_code == 0 and "is up to date" not in r.stderr and "item embeddings reused" in r.stderr, r.output
    g = zarr.open_group(str(out / "answers.zarr"), mode="r")
    assert list(g["user_index"][...]) == [0, 1, 2, 3, 4, 9] and g["snap/emb"].shape[0] == 12
    # same answers; other row neighbours may flip a float16 rounding (bf16 autocast on CUDA: more)
    tol = 2e-2 if torch.cuda.is_available() else 2e-3
    rows = np.r_[0:10, 18:20]                                   # the snapshots of users 0-4 and 9
    np.testing.assert_allclose(g["snap/emb"][...].astype(np.float32), emb[rows].astype(np.float32), atol=tol, rtol=tol)
    # ... and the item store of the same checkpoint was reused, not rewritten (also with --force)
    r = invoke("query", path, "--users", "0-4", "--force")
    assert r.exit_code == 0 and "item embeddings reused" in r.stderr, r.output
    assert (items / "manifest.json").stat().st_mtime_ns == written
    assert len(list(spec.store("query-items").iterdir())) == 1
    r = invoke("query", path, "--users", "0-999")
    assert r.exit_code == 2 and "--users" in r.stderr


def test_query_without_section_or_checkpoint(tiny_spec):
    path = tiny_spec(steps=2, every=2, ckpt=2)
    r = invoke("query", path)
    assert r.exit_code == 2 and "[query]: section missing" in r.stderr
    path.write_text(path.read_text() + QUERY.format(dtype="float32"))
    r = invoke("query", path)
    assert r.exit_code == 2 and "no complete tokenize store" in r.stderr, r.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_queries_on_cuda_flex_match_cpu_sdpa():
    m = model(d=64)
    d = data_dict([90, 40, 7, 130, 60, 3], seed=5)
    first, count = d["users/offsets"][:-1], np.diff(d["users/offsets"])
    queries = np.array([[a, b] for a in range(1, 5) for b in range(1, 4)], np.int32)    # N = 12
    cpu = q.answer(m, d["events/item"], d["events/cond"], first, count, queries, 384, 2, CPU, backend="sdpa")
    dev = torch.device("cuda")
    mc = m.to(dev)
    for grouped in (True, False):
        got = q.answer(mc, d["events/item"], d["events/cond"], first, count, queries, 384, 2, dev, grouped=grouped)
        rel = np.linalg.norm(got - cpu) / np.linalg.norm(cpu)
        assert rel < 1e-3, (grouped, rel)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_item_store_in_blocks(tmp_path, dtype):
    """write_items over several blocks and stored vocabulary chunks: item_emb.zarr holds every vocab id's
    e^i, items.parquet the real items (ids >= 2) with the same values, in order."""
    import pyarrow.parquet as pq
    import zarr
    from lumctl import zarrio
    I, d = 37, 6
    g = zarrio.create(tmp_path / "tok.zarr")
    zarrio.put(g, "users/offsets", np.arange(3, dtype=np.int64))
    vocab = np.array(["<pad>", "<unk>"] + [f"item{i}" for i in range(I - 2)])
    g.create_array("vocab/item", shape=(I,), dtype=str, chunks=(10,))[...] = vocab   # chunks of 10 ids
    torch.manual_seed(0)
    table = torch.randn(I, d)

    class Model:
        config = type("C", (), {"n_items": I})
        norm = torch.nn.LayerNorm(d)

        def item_table(self, ids):
            return table[ids]

    src = q.Source(zarrio.open_read(tmp_path / "tok.zarr"))
    assert q.write_items(tmp_path / "items", Model(), src, dtype, "ckpt", "h", block=8)
    assert not q.write_items(tmp_path / "items", Model(), src, dtype, "ckpt", "h", block=8)   # reused
    ig = zarr.open_group(str(tmp_path / "items" / "item_emb.zarr"), mode="r")
    want = table.numpy().astype(dtype)
    np.testing.assert_array_equal(ig["item_emb"][...], want)
    assert list(ig["item_id"][...]) == list(vocab)
    it = pq.read_table(tmp_path / "items" / "items.parquet")
    assert it.column("item_id").to_pylist() == list(vocab[2:])
    np.testing.assert_array_equal(np.stack(it.column("emb").to_numpy(zero_copy_only=False)), want[2:])
