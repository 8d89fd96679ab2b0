"""pack_sequences / assign_rows / document_causal_mask / plan_blocks: hand-checked examples and properties;
the streamed `lumctl pack` against its in-memory reference."""

from __future__ import annotations

import math
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lumctl.ops.packing import (
    assign_rows,
    assign_rows_ref,
    document_causal_mask,
    document_causal_mask_ref,
    pack_sequences,
    pack_sequences_ref,
    plan_blocks,
)
from lumctl import zarrio
from lumctl.specs import PackSpec, parse_spec
from lumctl.stages import pack
from lumctl.store import atomic_dir, read_manifest, write_manifest

KEYS = ("type", "item", "cond", "segment", "pos", "loss_mask", "target", "user", "ts")

# three users: u0 has events 0..2, u1 events 3..4, u2 event 5
ITEMS = np.array([10, 11, 12, 20, 21, 30], np.int32)
CONDS = np.array([[3], [4], [5], [6], [7], [8]], np.int32)
FIRST = np.array([0, 3, 5])
COUNT = np.array([3, 2, 1])
TIMES = np.array([100, 101, 102, 200, 201, 300], np.int64)


def _check_equal(out: dict, expected: dict) -> None:
    for k, v in expected.items():
        np.testing.assert_array_equal(out[k], np.asarray(v), err_msg=k)


# ------------------------------------------------------------------------------ hand examples
@pytest.mark.parametrize("strategy", ["best_fit", "first_fit"])
def test_pack_with_conditions_by_hand(strategy):
    # lengths 6, 4, 2 tokens in rows of 8: u0 -> row 0 (2 left), u1 -> new row 1, u2 -> row 0 at 6
    out = pack_sequences(ITEMS, CONDS, FIRST, COUNT, seq_len=8, conditions=True, strategy=strategy, times=TIMES)
    _check_equal(out, {
        "row": [0, 1, 0],
        "start": [0, 0, 6],
        "type": [[1, 2, 1, 2, 1, 2, 1, 2],
                 [1, 2, 1, 2, 0, 0, 0, 0]],
        "item": [[0, 10, 0, 11, 0, 12, 0, 30],
                 [0, 20, 0, 21, 0, 0, 0, 0]],
        "cond": [[[3], [0], [4], [0], [5], [0], [8], [0]],
                 [[6], [0], [7], [0], [0], [0], [0], [0]]],
        "segment": [[0, 0, 0, 0, 0, 0, 1, 1],
                    [0, 0, 0, 0, -1, -1, -1, -1]],
        "pos": [[0, 1, 2, 3, 4, 5, 0, 1],
                [0, 1, 2, 3, 0, 0, 0, 0]],
        "loss_mask": [[1, 0, 1, 0, 1, 0, 1, 0],
                      [1, 0, 1, 0, 0, 0, 0, 0]],
        "target": [[10, 0, 11, 0, 12, 0, 30, 0],
                   [20, 0, 21, 0, 0, 0, 0, 0]],
        "user": [[0, 0, 0, 0, 0, 0, 2, 2],
                 [1, 1, 1, 1, -1, -1, -1, -1]],
        # both tokens of an event carry its timestamp
        "ts": [[100, 100, 101, 101, 102, 102, 300, 300],
               [200, 200, 201, 201, 0, 0, 0, 0]],
    })
    assert out["type"].dtype == np.int8 and out["loss_mask"].dtype == np.bool_
    assert out["cond"].shape == (2, 8, 1) and out["ts"].dtype == np.int64
    # without times, ts is all zeros
    no_times = pack_sequences(ITEMS, CONDS, FIRST, COUNT, seq_len=8, conditions=True, strategy=strategy)
    assert (no_times["ts"] == 0).all()


@pytest.mark.parametrize("strategy", ["best_fit", "first_fit"])
def test_pack_item_only_by_hand(strategy):
    # lengths 3, 2, 1 tokens in rows of 4: u0 -> row 0 (1 left), u1 -> row 1, u2 -> row 0 at 3
    out = pack_sequences(ITEMS, CONDS, FIRST, COUNT, seq_len=4, conditions=False, strategy=strategy, times=TIMES)
    _check_equal(out, {
        "row": [0, 1, 0],
        "start": [0, 0, 3],
        "type": [[2, 2, 2, 2],
                 [2, 2, 0, 0]],
        "item": [[10, 11, 12, 30],
                 [20, 21, 0, 0]],
        "cond": np.zeros((2, 4, 1)),
        "segment": [[0, 0, 0, 1],
                    [0, 0, -1, -1]],
        "pos": [[0, 1, 2, 0],
                [0, 1, 0, 0]],
        # an item position is trained when another item of the same user follows it
        "loss_mask": [[1, 1, 0, 0],
                      [1, 0, 0, 0]],
        "target": [[11, 12, 0, 0],
                   [21, 0, 0, 0]],
        "user": [[0, 0, 0, 2],
                 [1, 1, -1, -1]],
        "ts": [[100, 101, 102, 300],
               [200, 201, 0, 0]],
    })


def test_pack_uses_the_given_window_of_events():
    # u0 packs events 1..2 only (a truncated window); u1 events 4..4
    out = pack_sequences(ITEMS, CONDS, np.array([1, 4]), np.array([2, 1]), seq_len=4, conditions=False)
    _check_equal(out, {"item": [[11, 12, 21, 0]], "target": [[12, 0, 0, 0]], "loss_mask": [[1, 0, 0, 0]],
                       "segment": [[0, 0, 1, -1]], "user": [[0, 0, 1, -1]]})


def test_best_fit_and_first_fit_differ_by_hand():
    # rows of 10; lengths 6, 6, 3, 2. After u0 -> row 0 and u1 -> row 1 both rows have 4 left.
    # first fit: u2 -> row 0 (the first that fits), u3 -> row 1.
    # best fit: a tie on capacity goes to the most recently filled row: u2 -> row 1, u3 -> row 0.
    lengths = np.array([6, 6, 3, 2])
    row, start, n = assign_rows(lengths, 10, "first_fit")
    assert n == 2 and row.tolist() == [0, 1, 0, 1] and start.tolist() == [0, 0, 6, 6]
    row, start, n = assign_rows(lengths, 10, "best_fit")
    assert n == 2 and row.tolist() == [0, 1, 1, 0] and start.tolist() == [0, 0, 6, 6]
    # rows of 12, lengths 7, 7, 3, 2, 2: best fit puts u3 in row 1 (2 left) although row 0 (5 left)
    # comes first; first fit fills row 0 first
    lengths = np.array([7, 7, 3, 2, 2])
    row, start, n = assign_rows(lengths, 12, "best_fit")
    assert n == 2 and row.tolist() == [0, 1, 1, 1, 0] and start.tolist() == [0, 0, 7, 10, 7]
    row, start, n = assign_rows(lengths, 12, "first_fit")
    assert n == 2 and row.tolist() == [0, 1, 0, 0, 1] and start.tolist() == [0, 0, 7, 10, 7]


def test_assign_rows_rejects_users_longer_than_a_row():
    with pytest.raises(ValueError, match="1..8 tokens"):
        assign_rows(np.array([3, 9]), 8)
    with pytest.raises(ValueError):
        pack_sequences(ITEMS, CONDS, FIRST, COUNT, seq_len=5, conditions=True)  # u0 needs 6


def test_pack_no_users():
    out = pack_sequences(ITEMS, CONDS, np.array([], np.int64), np.array([], np.int64), seq_len=8)
    assert out["type"].shape == (0, 8) and out["cond"].shape == (0, 8, 1)


def test_document_causal_mask_by_hand():
    segment = np.array([[0, 0, 1, 1, 1, -1],
                        [0, 0, 0, 0, 0, 0]], np.int32)
    expected_0 = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding attends only itself
    ], bool)
    expected_1 = np.tril(np.ones((6, 6), bool))
    mask = document_causal_mask(segment)
    assert mask.dtype == np.bool_ and mask.shape == (2, 6, 6)
    np.testing.assert_array_equal(mask[0], expected_0)
    np.testing.assert_array_equal(mask[1], expected_1)
    np.testing.assert_array_equal(document_causal_mask_ref(segment), mask)


# ------------------------------------------------------------------------------ properties
@st.composite
def packing_cases(draw, max_users=12, max_events=12):
    counts = draw(st.lists(st.integers(1, max_events), min_size=1, max_size=max_users))
    conditions = draw(st.booleans())
    per_tok = 2 if conditions else 1
    longest = max(counts) * per_tok
    seq_len = draw(st.integers(longest, longest + 3 * max_events))
    gaps = draw(st.lists(st.integers(0, 3), min_size=len(counts), max_size=len(counts)))
    first = np.cumsum([0] + [c + g for c, g in zip(counts, gaps)])[:-1]  # windows with gaps between
    n_events = int(first[-1] + counts[-1] + 2)
    n_fields = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    items = rng.integers(2, 1000, n_events).astype(np.int32)
    conds = rng.integers(2, 50, (n_events, n_fields)).astype(np.int32)
    times = np.sort(rng.integers(1, 2**40, n_events)).astype(np.int64)
    strategy = draw(st.sampled_from(["best_fit", "first_fit"]))
    return (items, conds, np.asarray(first, np.int64), np.asarray(counts, np.int64), seq_len, conditions, strategy,
            times)


def _check_packing(items, conds, first, count, seq_len, conditions, out, times):
    per_tok = 2 if conditions else 1
    lengths = count * per_tok
    R = out["type"].shape[0]
    assert all(out[k].shape[:2] == (R, seq_len) for k in KEYS)
    row, start = out["row"], out["start"]

    # no row over length, rows non-overlapping, no empty row
    assert (start >= 0).all() and (start + lengths <= seq_len).all()
    for r in range(R):
        users = np.flatnonzero(row == r)
        assert len(users) > 0, "an empty row"
        spans = sorted((start[u], start[u] + lengths[u]) for u in users)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans
    assert R >= math.ceil(lengths.sum() / seq_len)

    # padding is padding everywhere
    pad = out["type"] == 0
    np.testing.assert_array_equal(pad, out["user"] == -1)
    np.testing.assert_array_equal(pad, out["segment"] == -1)
    assert not out["loss_mask"][pad].any()
    assert (out["item"][pad] == 0).all() and (out["target"][pad] == 0).all() and (out["cond"][pad] == 0).all()
    assert (out["pos"][pad] == 0).all() and (out["ts"][pad] == 0).all()
    assert int((~pad).sum()) == int(lengths.sum())  # every event token exactly once in total

    for u in range(len(count)):
        r, s, L = row[u], start[u], lengths[u]
        where = np.argwhere(out["user"] == u)
        # all of u's tokens, and only those, lie in one contiguous span of its row
        assert len(where) == L and (where[:, 0] == r).all()
        np.testing.assert_array_equal(where[:, 1], np.arange(s, s + L))
        span = slice(s, s + L)
        ev = np.arange(first[u], first[u] + count[u])
        np.testing.assert_array_equal(out["pos"][r, span], np.arange(L))  # restart at 0, step 1
        assert len(set(out["segment"][r, span].tolist())) == 1
        typ, item, cond = out["type"][r, span], out["item"][r, span], out["cond"][r, span]
        loss, target = out["loss_mask"][r, span], out["target"][r, span]
        np.testing.assert_array_equal(out["ts"][r, span], np.repeat(times[ev], 2 if conditions else 1))
        if conditions:
            np.testing.assert_array_equal(typ, np.tile([1, 2], count[u]))
            np.testing.assert_array_equal(item[1::2], items[ev])       # order kept
            np.testing.assert_array_equal(item[0::2], 0)
            np.testing.assert_array_equal(cond[0::2], conds[ev])
            np.testing.assert_array_equal(cond[1::2], 0)
            np.testing.assert_array_equal(loss, np.tile([True, False], count[u]))
            np.testing.assert_array_equal(target[0::2], items[ev])     # a condition retrieves its item
            np.testing.assert_array_equal(target[1::2], 0)
        else:
            np.testing.assert_array_equal(typ, 2)
            np.testing.assert_array_equal(item, items[ev])
            np.testing.assert_array_equal(cond, 0)
            np.testing.assert_array_equal(loss, np.arange(L) < L - 1)
            np.testing.assert_array_equal(target, np.append(items[ev][1:], 0))

    # segments are numbered 0.. left to right within each row; same segment <=> same user
    for r in range(R):
        users = sorted(np.flatnonzero(row == r), key=lambda u: start[u])
        for k, u in enumerate(users):
            assert (out["segment"][r, start[u]:start[u] + lengths[u]] == k).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packing_cases())
def test_pack_properties_and_reference_twin(case):
    items, conds, first, count, seq_len, conditions, strategy, times = case
    out = pack_sequences(items, conds, first, count, seq_len, conditions, strategy, times)
    _check_packing(items, conds, first, count, seq_len, conditions, out, times)
    ref = pack_sequences_ref(items, conds, first, count, seq_len, conditions, strategy, times)
    assert set(ref) == set(out)
    for k in out:
        np.testing.assert_array_equal(out[k], ref[k], err_msg=k)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=0, max_size=60), st.integers(0, 40),
       st.sampled_from(["best_fit", "first_fit"]))
def test_assign_rows_matches_reference(lengths, extra, strategy):
    seq_len = max(lengths, default=1) + extra
    row, start, n = assign_rows(np.array(lengths, np.int64), seq_len, strategy)
    row_ref, start_ref, n_ref = assign_rows_ref(lengths, seq_len, strategy)
    assert n == n_ref
    np.testing.assert_array_equal(row, row_ref)
    np.testing.assert_array_equal(start, start_ref)
    # neither strategy can beat the volume bound (best fit is NOT always <= first fit in rows)
    assert n >= math.ceil(sum(lengths) / seq_len)


@settings(max_examples=100, deadline=None)
@given(packing_cases(max_users=8, max_events=8))
def test_both_strategies_pack_everything(case):
    items, conds, first, count, seq_len, conditions, _, _ = case
    total = int(count.sum()) * (2 if conditions else 1)
    for strategy in ("best_fit", "first_fit"):
        out = pack_sequences(items, conds, first, count, seq_len, conditions, strategy)
        assert out["type"].shape[0] >= math.ceil(total / seq_len)
        assert int((out["type"] > 0).sum()) == total


@settings(max_examples=100, deadline=None)
@given(packing_cases(max_users=8, max_events=6))
def test_mask_is_same_user_and_causal(case):
    items, conds, first, count, seq_len, conditions, strategy, _ = case
    out = pack_sequences(items, conds, first, count, seq_len, conditions, strategy)
    mask = document_causal_mask(out["segment"])
    user = out["user"]
    S = seq_len
    real = user >= 0
    same_user = (user[:, :, None] == user[:, None, :]) & real[:, :, None] & real[:, None, :]
    causal = np.arange(S)[None, :] <= np.arange(S)[:, None]   # key j <= query i
    rule = (same_user & causal[None]) | (~real[:, :, None] & np.eye(S, dtype=bool)[None])
    np.testing.assert_array_equal(mask, rule)
    np.testing.assert_array_equal(mask, document_causal_mask_ref(out["segment"]))
    # every real query attends to itself and to its user's first token
    for r, i in np.argwhere(real):
        assert mask[r, i, i] and mask[r, i, i - out["pos"][r, i]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=6), min_size=1, max_size=3),
       st.integers(0, 4))
def test_mask_on_arbitrary_segments_matches_reference(rows, pad):
    # rows of contiguous segments 0, 1, 2 ... of the given lengths, then `pad` padding positions
    S = max(sum(r) for r in rows) + pad
    seg = np.full((len(rows), S), -1, np.int32)
    for b, lens in enumerate(rows):
        seg[b, :sum(lens)] = np.repeat(np.arange(len(lens)), lens)
    np.testing.assert_array_equal(document_causal_mask(seg), document_causal_mask_ref(seg))


# ------------------------------------------------------------------------------ streaming stage (lumctl pack)
def test_plan_blocks_by_hand():
    # users' windows (first, count): tokens 2 per event; spans measured from a block's first event
    first, count = np.array([0, 5, 6, 20, 30]), np.array([3, 1, 4, 2, 10])
    # tokens 6, 2, 8, 4, 20; at most 10 tokens: [0, 1] (8), [2] (8), [3] (4 + 20 > 10), [4] (20, alone)
    np.testing.assert_array_equal(plan_blocks(first, count, 2, 10, 100), [0, 2, 3, 4, 5])
    # at most 12 events spanned: [0, 1, 2] spans 0..10, [3] spans 20..22 (+ user 4 would span 20..40)
    np.testing.assert_array_equal(plan_blocks(first, count, 2, 100, 12), [0, 3, 4, 5])
    np.testing.assert_array_equal(plan_blocks(first, count, 2, 100, 100), [0, 5])
    np.testing.assert_array_equal(plan_blocks([], [], 2, 10, 10), [0])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 9)), min_size=1, max_size=30),
       st.integers(1, 40), st.integers(1, 40))
def test_plan_blocks_cover_users_within_budget(users, max_tokens, max_events):
    gap, count = np.array(users).T
    first = np.cumsum(gap + np.append(0, count[:-1]))
    bounds = plan_blocks(first, count, 2, max_tokens, max_events)
    assert bounds[0] == 0 and bounds[-1] == len(count) and (np.diff(bounds) > 0).all()
    for a, b in zip(bounds[:-1], bounds[1:]):
        over = 2 * count[a:b].sum() > max_tokens or first[b - 1] + count[b - 1] - first[a] > max_events
        assert not over or b - a == 1                        # only a single user may exceed the budget
        if b < len(count):                                   # greedy: the next user would not have fit
            assert 2 * count[a:b + 1].sum() > max_tokens or first[b] + count[b] - first[a] > max_events


def write_tokenize_store(root: Path, offsets, split, pretrain_end, items, conds, times, chunk: int = 7) -> Path:
    """A complete tokenize store holding what `pack` reads, events in chunks of `chunk`."""
    store = root / "t" / "tokenize"
    with atomic_dir(store) as tmp:
        g = zarrio.create(tmp / "data.zarr")
        zarrio.put(g, "users/offsets", offsets)
        zarrio.put(g, "users/split", split)
        if pretrain_end is not None:
            zarrio.put(g, "users/pretrain_end", pretrain_end)
        for k, a in (("events/item", items), ("events/cond", conds), ("events/timestamp", times)):
            zarrio.put(g, k, a, chunk_rows=chunk)
        write_manifest(tmp, stage="tokenize", spec_hash="x", inputs={}, counts={})
    return store


@st.composite
def tokenize_logs(draw):
    """A ragged log as a tokenize store's arrays: users with 0..12 events, a split and maybe a cutoff."""
    n = np.array(draw(st.lists(st.integers(0, 12), min_size=1, max_size=25)), np.int64)
    offsets = np.append(0, np.cumsum(n))
    E, F = int(offsets[-1]), draw(st.integers(0, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    train_end = rng.integers(0, n + 1)
    split = np.stack([train_end, np.minimum(n, train_end + 1)], 1)
    pretrain_end = rng.integers(0, train_end + 1) if draw(st.booleans()) else None
    items = rng.integers(2, 50, E).astype(np.int32)
    conds = rng.integers(2, 9, (E, F)).astype(np.int32)
    times = np.sort(rng.integers(0, 10 ** 9, E)).astype(np.int64)
    return offsets, split, pretrain_end, items, conds, times


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokenize_logs(), st.integers(1, 8), st.booleans(), st.sampled_from(["best_fit", "first_fit"]),
       st.sampled_from([1e-5, 2e-4, 1e-3, 256.0]), st.integers(1, 5))
def test_streamed_pack_equals_in_memory_reference(log, max_items, conditions, strategy, block_mib, chunk_rows):
    """`lumctl pack` (slice reads, blocks, chunk appends) writes byte-equal arrays to `pack_train`
    (every event in memory, each block by pack_sequences) and to pack_sequences_ref per block;
    block_mib from one user per block to one block for the whole log."""
    offsets, split, pretrain_end, items, conds, times = log
    if not conditions:  # a spec's item-only rows need 2 events per user to hold a trained position
        max_items = max(2, max_items)
    p = PackSpec(seq_len=2 * max_items + 3, max_items=max_items, conditions=conditions, strategy=strategy,
                 block_mib=block_mib, chunk_rows=chunk_rows)
    with tempfile.TemporaryDirectory() as d:
        write_tokenize_store(Path(d), offsets, split, pretrain_end, items, conds, times)
        spec = parse_spec({"experiment": "t", "store_root": d, "tokenize": {"format": "taobao", "path": "x"},
                           "pack": p.model_dump()})
        out = pack.run(spec)
        got, counts = pack.load(out), read_manifest(out)["counts"]
        again = pack.run(spec)                               # up to date: not rewritten
        assert read_manifest(again)["created"] == read_manifest(out)["created"]
    data = {"users/offsets": offsets, "users/split": split, "events/item": items, "events/cond": conds,
            "events/timestamp": times, **({"users/pretrain_end": pretrain_end} if pretrain_end is not None else {})}
    ref, ref_counts = pack.pack_train(data, p)
    assert counts == ref_counts
    for k in pack.ROW_KEYS:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    # the reference, block by block, against the plain Python twin
    kept, first, count = pack.train_windows(data, p)
    bounds = pack.blocks(first, count, p, conds.shape[1])
    assert counts["blocks"] == len(bounds) - 1
    r0 = 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        twin = pack_sequences_ref(items, conds, first[a:b], count[a:b], p.seq_len, conditions, strategy, times)
        n = len(twin["type"])
        for k in pack.ROW_KEYS:
            expect = np.where(twin["user"] >= 0, kept[a:b][twin["user"]], -1) if k == "user" else twin[k]
            np.testing.assert_array_equal(ref[k][r0:r0 + n], expect, err_msg=k)
        r0 += n
    assert r0 == len(ref["type"])


def test_streamed_pack_memory_does_not_grow_with_the_log(tmp_path):
    """Peak Python-traced memory of `lumctl pack` with 0.1 MiB blocks stays far below the rows and
    events of the whole log (what packing everything at once holds)."""
    rng = np.random.default_rng(0)
    n = rng.integers(5, 60, 4000)
    offsets = np.append(0, np.cumsum(n))
    E = int(offsets[-1])
    write_tokenize_store(tmp_path, offsets, np.stack([n, n], 1), None, rng.integers(2, 10 ** 6, E).astype(np.int32),
                         rng.integers(2, 9, (E, 2)).astype(np.int32), np.arange(E, dtype=np.int64), chunk=4096)
    spec = parse_spec({"experiment": "t", "store_root": str(tmp_path), "tokenize": {"format": "taobao", "path": "x"},
                       "pack": {"seq_len": 128, "max_items": 50, "block_mib": 0.1, "chunk_rows": 16}})
    pack_sequences(ITEMS, CONDS, FIRST, COUNT, seq_len=8, times=TIMES)   # load the compiled kernels first
    tracemalloc.start()
    out = pack.run(spec)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    counts = read_manifest(out)["counts"]
    whole = counts["packed_tokens"] * 38 + E * 20           # every row and event in memory at once
    assert counts["blocks"] > 50 and whole > 10 * 2 ** 20
    assert peak < whole / 6, (peak, whole)
