"""Leak-free LUM: with a global cutoff T0 ([tokenize.split] pretrain_before / pretrain_quantile) the packed
pretrain rows hold only train events before T0, the DLRM trains on the train events at/after T0, and
nothing at/after T0 (nor any valid/test event) can change what the LUM trains on."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lumctl.ops.packing import ITEM
from lumctl.readers import RawLog
from lumctl.specs import PackSpec, TokenizeSpec, parse_spec
from lumctl.stages import fuse, pack, tokenize


def raw_log(seed: int = 0, users: int = 30) -> pa.Table:
    """Users whose activity windows overlap in time (some before, some across, some after T0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        n = int(rng.integers(5, 25))
        start = int(rng.integers(0, 1000))
        ts = np.sort(start + rng.integers(0, 400, n))                   # ties happen
        for t in ts:
            rows.append((f"u{u}", f"i{rng.integers(0, 20)}", int(t), float(rng.integers(1, 6))))
    u, i, t, r = zip(*rows)
    return pa.table({"user": list(u), "item": list(i), "timestamp": pa.array(t, pa.int64()),
                     "rating": pa.array(r, pa.float32())})


def tok_spec(**split) -> TokenizeSpec:
    return TokenizeSpec(format="table", path="x", columns={"user": "user", "item": "item", "timestamp": "timestamp"},
                        conditions=[{"name": "rating", "source": "bucket", "column": "rating", "edges": [3, 4]}],
                        split={"kind": "fraction", "train": 0.7, "valid": 0.15, **split})


def events_of(data: dict, keep: np.ndarray) -> list[tuple]:
    """(user, timestamp, item) of the events in `keep`, sorted."""
    return sorted(zip(data["events/user"][keep].tolist(), data["events/timestamp"][keep].tolist(),
                      data["events/item"][keep].tolist()))


def packed_events(rows: dict) -> list[tuple]:
    it = rows["type"] == ITEM
    return sorted(zip(rows["user"][it].tolist(), rows["ts"][it].tolist(), rows["item"][it].tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pretrain_rows_hold_exactly_the_train_events_before_the_cutoff(seed):
    data, counts = tokenize.tokenize_log(tok_spec(pretrain_quantile=0.5), RawLog(raw_log(seed)))
    t0 = counts["pretrain_before"]
    rows, _ = pack.pack_train(data, PackSpec(seq_len=64, max_items=30))
    ts = data["events/timestamp"]
    assert (rows["ts"][rows["type"] > 0] < t0).all()                     # no token at/after T0
    s = fuse.samples(data)
    # what was packed is exactly the train events before T0; the DLRM trains on the train events at/after T0
    assert packed_events(rows) == events_of(data, (s["split"] == -1))
    user, off = data["events/user"], data["users/offsets"]
    train = np.arange(len(ts)) - off[user] < data["users/split"][user, 0]
    np.testing.assert_array_equal(s["split"] == -1, train & (ts < t0))
    assert (ts[s["split"] == 0] >= t0).all() and (s["split"] == 0).any() and (s["split"] == -1).any()
    assert counts["pretrain_events"] + counts["fuse_train_events"] == counts["train_events"]


def test_events_at_or_after_the_cutoff_do_not_change_what_the_lum_trains_on():
    log = raw_log(3)
    spec = tok_spec(pretrain_before=700)
    data, _ = tokenize.tokenize_log(spec, RawLog(log))
    rows, _ = pack.pack_train(data, PackSpec(seq_len=64, max_items=30))
    # change every event at/after T0 and every valid/test event: other items, other ratings
    s = fuse.samples(data)
    late = (data["events/timestamp"] >= 700) | (s["split"] > 0)
    assert late.any() and (~late).any()
    user_raw = np.asarray(data["vocab/user"])[data["events/user"]]
    item_raw = np.asarray(data["vocab/item"])[data["events/item"]]
    rng = np.random.default_rng(0)
    item_raw = np.where(late, rng.permutation(item_raw), item_raw)        # the same item vocabulary
    rating = np.where(late, rng.integers(1, 6, len(late)), data["events/rating"]).astype(np.float32)
    changed = pa.table({"user": user_raw, "item": item_raw, "timestamp": data["events/timestamp"], "rating": rating})
    data2, _ = tokenize.tokenize_log(spec, RawLog(changed))
    assert not np.array_equal(data2["events/item"], data["events/item"])
    rows2, _ = pack.pack_train(data2, PackSpec(seq_len=64, max_items=30))
    for k in rows:
        np.testing.assert_array_equal(rows2[k], rows[k], err_msg=k)
    np.testing.assert_array_equal(data2["items/popularity"], data["items/popularity"])  # an LUM item feature


def test_no_cutoff_keeps_the_old_store_and_samples():
    data, counts = tokenize.tokenize_log(tok_spec(), RawLog(raw_log(0)))
    assert "users/pretrain_end" not in data and "pretrain_before" not in counts
    assert (fuse.samples(data)["split"] >= 0).all()


def test_cutoff_spec_errors():
    base = {"experiment": "x", "tokenize": {"format": "movielens-1m", "path": "p"}}
    with pytest.raises(Exception, match="give one of .* not pretrain_before and pretrain_quantile"):
        parse_spec({**base, "tokenize": {**base["tokenize"], "split": {"pretrain_before": 5, "pretrain_quantile": 0.5}}})
    with pytest.raises(Exception, match=r"\[tokenize\].split.pretrain_quantile"):
        parse_spec({**base, "tokenize": {**base["tokenize"], "split": {"pretrain_quantile": 1.5}}})
    with pytest.raises(Exception, match="not pretrain_quantile and pretrain_fraction"):
        parse_spec({**base, "tokenize": {**base["tokenize"], "split": {"pretrain_quantile": 0.5, "pretrain_fraction": 0.5}}})


# ---------------------------------------------------------------------------------------- per-user cutoff
def test_pretrain_fraction_ends_by_hand():
    """Two users, train_end 6 and 5, fraction 0.5 -> cuts at 3 and 2; user 0's events 2 and 3 share a
    timestamp, so its cut moves back to 2 (the LUM never sees a same-second event of a DLRM sample)."""
    ts = np.array([1, 2, 5, 5, 6, 7, 8, 9,  10, 11, 12, 13, 14, 15])
    offsets = np.array([0, 8, 14])
    split = np.array([[6, 7], [5, 6]])
    np.testing.assert_array_equal(tokenize.pretrain_fraction_ends(offsets, ts, split, 0.5), [2, 2])
    np.testing.assert_array_equal(tokenize.pretrain_fraction_ends(offsets, ts, split, 0.1), [0, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pretrain_fraction_gives_every_user_a_pretrained_prefix_before_its_dlrm_samples(seed):
    data, counts = tokenize.tokenize_log(tok_spec(pretrain_fraction=0.5), RawLog(raw_log(seed)))
    assert "pretrain_before" not in counts
    rows, _ = pack.pack_train(data, PackSpec(seq_len=64, max_items=30))
    s = fuse.samples(data)
    assert packed_events(rows) == events_of(data, s["split"] == -1)
    ts, user = data["events/timestamp"], s["user"]
    for u in range(len(data["users/offsets"]) - 1):
        lum, dlrm = ts[(user == u) & (s["split"] == -1)], ts[(user == u) & (s["split"] == 0)]
        assert len(dlrm) > 0
        if len(lum):
            assert lum.max() < dlrm.min()                               # strictly earlier, per user
    te = data["users/split"][:, 0]
    assert (data["users/pretrain_end"] <= np.floor(te * 0.5)).all()
    assert counts["pretrain_events"] == (s["split"] == -1).sum() > 0
