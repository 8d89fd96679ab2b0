"""Step 2 (`lumctl query`): grouped queries == one query per pass, no leakage from a snapshot's
future, the grouped mask by hand and against its reference twin, the stage through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import invoke
from lumctl.models.lum import LUM, LUMConfig
from lumctl.ops.packing import (document_causal_mask, grouped_query_mask, grouped_query_mask_ref, pack_queries,
                                pack_queries_ref, top_values, top_values_ref)
from lumctl.specs import QuerySpec, load_spec, parse_spec
from lumctl.stages import query as q

CPU = torch.device("cpu")
COND_VOCAB = [5, 4]  # field a: <pad> <any> a0 a1 a2; field b: <pad> <any> b0 b1


def model(seed: int = 0, d: int = 32) -> LUM:
    """A LUM with larger-than-init weights, so attention is far from uniform and a wrong mask shows."""
    torch.manual_seed(seed)
    m = LUM(LUMConfig(n_items=30, cond_vocab=COND_VOCAB, d_model=d, n_layers=2, n_heads=2, d_ff=48))
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


def test_snapshots_never_split_same_second_events():
    d = data_dict([6, 5], seed=0)
    d["events/timestamp"] = np.array([1, 2, 3, 3, 3, 4,   10, 11, 12, 12, 12], np.int64)
    d["users/split"] = np.array([[4, 5], [3, 4]])
    cut, valid, names = q.snapshots(d, np.arange(2), spec_q(snapshot="split"))
    assert names == ["valid", "test"]
    # user 0: the valid event (index 4, t=3) ties with events 2, 3 -> the prefix stops before them
    # user 1: valid at index 3 (t=12) ties with index 2 -> prefix [10, 11]; test at index 4 also t=12
    np.testing.assert_array_equal(cut, [[2, 5], [2, 2]])
    cut, valid, names = q.snapshots(d, np.arange(2), spec_q(snapshot="every_n_events", every_n_events=3))
    # every 3 events: user 0 nominal 3, 6 -> 3 extends over the t=3 tie to 5; user 1 nominal 3 -> 5
    np.testing.assert_array_equal(cut, [[5, 6], [5, 0]])
    np.testing.assert_array_equal(valid, [[True, True], [True, False]])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 25), min_size=1, max_size=6), st.integers(0, 10**6),
       st.sampled_from(["split", 1, 2, 5]))
def test_snapshot_prefix_is_exactly_the_events_up_to_its_timestamp(n_events, seed, snap):
    d = data_dict(n_events, seed=seed, ts_range=2)
    qs = spec_q(snapshot="split") if snap == "split" else spec_q(snapshot="every_n_events", every_n_events=snap)
    cut, valid, _ = q.snapshots(d, np.arange(len(n_events)), qs)
    ts, off = d["events/timestamp"], d["users/offsets"]
    for u in range(len(n_events)):
        t_u = ts[off[u]:off[u + 1]]
        for j in np.flatnonzero(valid[u]):
            c = cut[u, j]
            assert c == (t_u <= t_u[c - 1]).sum()               # every event stamped <= T, nothing later
            if snap == "split" and (h := d["users/split"][u, j]) < len(t_u):
                assert t_u[c - 1] < t_u[h]                      # strictly before the first valid / test event


def _answers(m, d, qs, users=None):
    users = np.arange(len(d["users/offsets"]) - 1) if users is None else users
    return q.compute(m, d, qs, ["a", "b"], users, max_items=50, seq_len=64, device=CPU)


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
    assert g["user_emb"].shape == (U, 2, N, dm) and g["user_emb"].dtype == np.float16
    assert g["snapshot_valid"].shape == g["snapshot_ts"].shape == g["snapshot_pos"].shape == (U, 2)
    assert g["item_emb"].shape == (cfg["model"]["n_items"], dm)
    assert list(g["conditions"][...]) == ["scenario=s0,category=top1", "scenario=s0,category=top2",
                                          "scenario=s1,category=top1", "scenario=s1,category=top2"]
    valid = g["snapshot_valid"][...]
    emb = g["user_emb"][...]
    assert valid.all() and np.isfinite(emb).all()              # synth users have >= 5 events
    assert (g["snapshot_pos"][:, 1] >= g["snapshot_pos"][:, 0]).all()
    t = pq.read_table(out / "latest.parquet")
    assert t.num_rows == U and t.column("scenario=s0,category=top1").type.list_size == dm
    assert t.column("snapshot").to_pylist() == ["test"] * U
    np.testing.assert_array_equal(np.stack(t.column("scenario=s1,category=top2").to_numpy(zero_copy_only=False)),
                                  emb[:, 1, 3].astype(np.float32))
    assert len(t.column("resolved")[0].as_py()) == N
    # a rerun is a no-op; --users limits the run (a new input, so it rebuilds)
    r = invoke("query", path)
    assert r.exit_code == 0 and "query: " in r.stderr and "is up to date" in r.stderr, r.output
    r = invoke("query", path, "--users", "0-4,9")
    assert r.exit_code == 0 and "up to date" not in r.stderr, r.output
    g = zarr.open_group(str(out / "answers.zarr"), mode="r")
    assert g["user_emb"].shape[0] == 6 and list(g["user_index"][...]) == [0, 1, 2, 3, 4, 9]
    # same answers; other row neighbours may flip a float16 rounding (bf16 autocast on CUDA: more)
    tol = 2e-2 if torch.cuda.is_available() else 2e-3
    np.testing.assert_allclose(g["user_emb"][...].astype(np.float32), emb[[0, 1, 2, 3, 4, 9]].astype(np.float32),
                               atol=tol, rtol=tol)
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
