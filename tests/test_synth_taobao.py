"""`[synth] kind = "taobao"`: a Taobao UserBehavior-shaped CSV. Determinism, independence of
chunk_rows, the exact file format, the marginals it promises, the untouched scenarios generator,
spec validation, and `lumctl synth` + `lumctl tokenize` end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pytest

from helpers import invoke, spec_in
from lumctl.errors import InputError
from lumctl.specs import SynthSpec, parse_spec
from lumctl.synth import END, START, generate, synth_hash, write_taobao

COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]


def write(tmp_path, name="UserBehavior.csv", **kw):
    path = tmp_path / name
    counts = write_taobao(SynthSpec(kind="taobao", **kw), path)
    return path, counts


def read(path) -> dict[str, np.ndarray]:
    types = {c: pa.int64() for c in COLUMNS if c != "behavior_type"} | {"behavior_type": pa.string()}
    t = pcsv.read_csv(path, read_options=pcsv.ReadOptions(column_names=COLUMNS),
                      convert_options=pcsv.ConvertOptions(column_types=types))
    return {c: t[c].to_numpy(zero_copy_only=False) for c in COLUMNS}


@pytest.fixture(scope="module")
def log200k(tmp_path_factory):
    path, counts = write(tmp_path_factory.mktemp("taobao"), rows=200_000, seed=7)
    return read(path), counts


# ------------------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_whatever_chunk_rows(tmp_path):
    a, _ = write(tmp_path, "a.csv", rows=60_000, seed=3, chunk_rows=10_000)
    b, _ = write(tmp_path, "b.csv", rows=60_000, seed=3, chunk_rows=4_000_000)
    c, _ = write(tmp_path, "c.csv", rows=60_000, seed=3, chunk_rows=23_456)
    d, _ = write(tmp_path, "d.csv", rows=60_000, seed=4)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    assert a.read_bytes() != d.read_bytes()


@pytest.mark.parametrize("kw", [dict(rows=1), dict(rows=7), dict(rows=1000), dict(rows=12_345, users=5000),
                                dict(rows=30_000, users=3, items=50, categories=50)])
def test_exact_row_count_and_manifest_counts(tmp_path, kw):
    path, counts = write(tmp_path, **kw)
    cols = read(path)
    assert len(cols["user_id"]) == counts["rows"] == kw["rows"]
    assert counts["users"] == len(np.unique(cols["user_id"])) == SynthSpec(kind="taobao", **kw).users
    assert counts["items"] == len(np.unique(cols["item_id"]))
    assert counts["categories"] == len(np.unique(cols["category_id"]))
    assert counts["bytes"] == path.stat().st_size


def test_format_is_the_real_files(tmp_path):
    path, _ = write(tmp_path, rows=5000)
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and len(lines) == 5001  # newline-terminated, no header
    for line in lines[:-1]:
        f = line.split(",")
        assert len(f) == 5, line
        assert f[3] in ("pv", "cart", "fav", "buy"), line
        assert all(x.isdigit() for x in (f[0], f[1], f[2], f[4])), line
    assert int(lines[0].split(",")[4]) >= 10**9  # unix seconds


# ------------------------------------------------------------------------------ marginals
def test_behaviour_shares(log200k):
    b = log200k[0]["behavior_type"]
    for name, share in {"pv": 89.5, "cart": 5.5, "fav": 2.9, "buy": 2.0}.items():
        assert abs(100 * np.mean(b == name) - share) < 0.5, name


def test_timestamps_in_the_nine_days_but_rare_outliers(log200k):
    ts = log200k[0]["timestamp"]
    out = (ts < START) | (ts > END)
    assert out.sum() <= 20  # expected 2 at 1e-5
    assert START == 1511539200 and END == 1512316799
    day = (ts[~out] - START) // 86_400
    per_day = np.bincount(day, minlength=9)
    assert per_day.min() > 0 and per_day[7:].mean() > per_day[:7].mean()  # the last two days are busier
    hour = (ts[~out] - START) // 3600 % 24  # local (UTC+8) hour
    per_hour = np.bincount(hour, minlength=24)
    assert per_hour[2:6].mean() < 0.5 * per_hour[19:23].mean()  # quiet nights, busy evenings


def test_outliers_exist_at_scale_and_lie_far_outside(tmp_path):
    path, _ = write(tmp_path, rows=1_000_000, seed=1)
    ts = read(path)["timestamp"]
    out = ts[(ts < START) | (ts > END)]
    assert 1 <= len(out) <= 40  # ~10 expected
    assert np.all((out <= START - 86_400) | (out >= END + 86_400))


def test_users_contiguous_and_time_ordered(log200k):
    c, counts = log200k
    u, ts = c["user_id"], c["timestamp"]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    assert len(starts) == len(np.unique(u)) == counts["users"]  # one block per user
    ok = (ts >= START) & (ts <= END)
    same_user = u[1:] == u[:-1]
    both_ok = ok[1:] & ok[:-1]
    assert np.all(np.diff(ts)[same_user & both_ok] >= 0)  # in time order within a user (outliers aside)


def test_heavy_tails(log200k):
    c, counts = log200k
    _, per_user = np.unique(c["user_id"], return_counts=True)
    assert per_user.min() >= 1 and 30 <= np.median(per_user) <= 100 and per_user.max() >= 10 * np.median(per_user)
    assert np.mean((per_user >= 10) & (per_user <= 300)) > 0.8
    _, per_item = np.unique(c["item_id"], return_counts=True)
    top = np.sort(per_item)[::-1][: max(1, len(per_item) // 100)]
    assert top.sum() / per_item.sum() >= 0.15  # top 1 % of items hold >= 15 % of rows
    assert np.mean(per_item == 1) > 0.05       # and many items are seen once
    _, per_cat = np.unique(c["category_id"], return_counts=True)
    assert per_cat.max() >= 20 * np.median(per_cat)


def test_one_category_per_item_and_scrambled_ids(log200k):
    c, _ = log200k
    pairs = np.unique(np.stack([c["item_id"], c["category_id"]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]  # each item has exactly one category
    in_file_order = c["user_id"][_blocks(c["user_id"])[0]]
    assert in_file_order.max() > len(in_file_order)      # raw ids, not 0..users-1
    assert not np.all(np.diff(in_file_order) > 0)         # and not in id order
    assert c["item_id"].max() > len(np.unique(c["item_id"]))


def test_tastes_make_conditions_informative(log200k):
    """Most of a user's rows are in a few categories, and cart/fav/buy are likelier there."""
    c, _ = log200k
    u, cat, acted = c["user_id"], c["category_id"], c["behavior_type"] != "pv"
    top_share, in_top, in_rest = [], [], []
    for s, e in zip(*_blocks(u)):
        cats, inv, n = np.unique(cat[s:e], return_inverse=True, return_counts=True)
        if e - s < 50:
            continue
        top = np.isin(inv, np.argsort(-n, kind="stable")[:4])
        top_share.append(top.mean())
        in_top.append(acted[s:e][top])
        in_rest.append(acted[s:e][~top])
    assert np.mean(top_share) > 0.6
    assert np.concatenate(in_top).mean() > 1.5 * np.concatenate(in_rest).mean()


def _blocks(u):
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    return starts, np.r_[starts[1:], len(u)]


# ------------------------------------------------------------------------------ the scenarios kind
def _hash(t: pa.Table) -> str:
    d = hashlib.sha256()
    for c in t.column_names:
        d.update(c.encode())
        d.update(repr(t[c].to_pylist()).encode())
    return d.hexdigest()[:16]


def test_scenarios_generator_unchanged():
    """Values recorded from the generator before kind = "taobao" existed."""
    s = SynthSpec(users=30, items=80, categories=5, seed=3)
    assert (s.kind, s.users, s.items, s.categories) == ("scenarios", 30, 80, 5)
    events, items = generate(s)
    assert events.num_rows == 2310
    assert events.slice(0, 2).to_pylist() == [
        {"user": "1", "item": "13", "timestamp": 1606359733, "scenario": "s1", "rating": 4.0},
        {"user": "1", "item": "32", "timestamp": 1606568755, "scenario": "s2", "rating": 3.0}]
    assert (_hash(events), _hash(items)) == ("29ebe970a52031b3", "599b71927850ae09")
    d = SynthSpec()
    assert (d.users, d.items, d.categories) == (2000, 1000, 20)


def test_scenarios_stores_keep_their_hash():
    """The scenarios kind hashes only its own fields (pinned values), so its stores stay up to date."""
    assert synth_hash(SynthSpec()) == "414943c6791a22e91f38e75feea70f3c564b2c4cb8e4c0ce7e90436612413eeb"
    assert synth_hash(SynthSpec(users=30, seed=2, tastes=3)) == (
        "811be37ea4d860c0dedd9ec480e3512fe659679199eb3fae119347666bf71c30")


def test_taobao_hash_ignores_chunk_rows_only():
    h = synth_hash(SynthSpec(kind="taobao", rows=1000))
    assert h == synth_hash(SynthSpec(kind="taobao", rows=1000, chunk_rows=50_000))
    assert h != synth_hash(SynthSpec(kind="taobao", rows=1001))
    assert h != synth_hash(SynthSpec(kind="taobao", rows=1000, seed=1))
    assert h != synth_hash(SynthSpec(kind="taobao", rows=1000, users=3))


# ------------------------------------------------------------------------------ spec
def test_taobao_defaults_follow_rows():
    s = SynthSpec(kind="taobao", rows=100_000_000)
    assert (s.users, s.items, s.categories) == (986_193, 5_000_000, 9439)
    s = SynthSpec(kind="taobao", rows=1000)
    assert (s.users, s.items, s.categories) == (10, 50, 30)  # 9439 * sqrt(1e-5) = 29.8
    assert SynthSpec(kind="taobao", rows=400).categories == 20  # the floor (9439 * sqrt(4e-6) = 18.9)
    assert SynthSpec(kind="taobao", rows=1).categories == 2  # never more categories than items


@pytest.mark.parametrize("synth, msg", [
    ({"kind": "taobao"}, "[synth]: rows is required for kind = 'taobao'"),
    ({"kind": "taobao", "rows": 10, "tastes": 3}, "[synth]: tastes only applies to kind = 'scenarios'"),
    ({"rows": 10}, "[synth]: rows only applies to kind = 'taobao'"),
    ({"kind": "taobao", "rows": 10, "users": 11}, "[synth]: users must be <= rows"),
    ({"kind": "taobao", "rows": 10, "chunk_rows": 5}, "[synth].chunk_rows: must be > or equal to 10000"),
    ({"kind": "tmall", "rows": 10}, "[synth].kind: must be 'scenarios' or 'taobao'"),
    ({"kind": "taobao", "rows": 10, "typo": 1}, "[synth].typo: unknown key"),
])
def test_bad_synth_sections_are_one_line(synth, msg):
    with pytest.raises(InputError) as e:
        parse_spec({"experiment": "x", "synth": synth, "tokenize": {"format": "taobao", "path": "x.csv"}}, "s.toml")
    assert str(e.value).startswith(f"s.toml: {msg}"), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw", [{}, {"users": 30}, {"kind": "taobao", "rows": 5000}, {"kind": "taobao", "rows": 5000, "items": 900}])
def test_a_resolved_synth_section_reads_back(kw):
    """Stores record the resolved spec (every field); reading it back gives the same section."""
    s = SynthSpec(**kw)
    assert SynthSpec.model_validate(s.model_dump(mode="json")) == s
    assert parse_spec({"experiment": "x", "synth": s.model_dump(mode="json"),
                       "tokenize": {"format": "taobao", "path": "x.csv"}}).synth == s


def test_format_synth_does_not_read_a_taobao_log():
    with pytest.raises(InputError, match="read it with tokenize.format = 'taobao'"):
        parse_spec({"experiment": "x", "synth": {"kind": "taobao", "rows": 10}, "tokenize": {"format": "synth"}})


# ------------------------------------------------------------------------------ end to end
def test_synth_then_tokenize_through_the_cli(tmp_path):
    csv = tmp_path / "stores" / "tb" / "synth" / "UserBehavior.csv"
    spec = spec_in(tmp_path, {
        "experiment": "tb",
        "synth": {"kind": "taobao", "rows": 20_000, "seed": 5, "chunk_rows": 10_000},
        "tokenize": {"format": "taobao", "path": str(csv), "min_user_events": 5,
                     "conditions": [{"name": "behavior", "source": "column", "column": "behavior"},
                                    {"name": "category", "source": "column", "column": "category"}],
                     "split": {"kind": "time", "valid_from": 1512144000, "test_from": 1512230400}},
        "pack": {"seq_len": 256, "max_items": 100}})
    r = invoke("synth", spec)
    assert r.exit_code == 0, r.output
    synth_manifest = json.loads((csv.parent / "manifest.json").read_text())
    assert synth_manifest["counts"]["rows"] == 20_000
    r = invoke("tokenize", spec)
    assert r.exit_code == 0, r.output
    tok = json.loads((tmp_path / "stores" / "tb" / "tokenize" / "manifest.json").read_text())["counts"]
    c = read(csv)
    rows = np.stack([c["user_id"], c["item_id"], c["timestamp"]])
    if "duplicate_events" in tok:  # copies of (user, item, timestamp) go before the user filter
        distinct = np.unique(rows, axis=1)
        assert tok["duplicate_events"] == rows.shape[1] - distinct.shape[1]
        rows = distinct
    _, per_user = np.unique(rows[0], return_counts=True)
    assert tok["users"] == (per_user >= 5).sum()
    assert tok["events"] == per_user[per_user >= 5].sum()
    assert tok["events"] + tok["dropped_events"] + tok.get("duplicate_events", 0) == 20_000
    assert tok["malformed_rows"] == 0
    spec.write_text(spec.read_text().replace('chunk_rows = 10000', 'chunk_rows = 20000'))
    assert 'chunk_rows = 20000' in spec.read_text()
    r = invoke("synth", spec)
    assert r.exit_code == 0 and "up to date" in r.output  # chunk_rows does not change the log
