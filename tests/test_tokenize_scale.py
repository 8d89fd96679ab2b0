"""The out-of-core tokenize (`tokenize.build`, DuckDB) equals the in-memory reference (`tokenize_log`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lumctl import zarrio
from lumctl.errors import InputError
from lumctl.readers import read_log
from lumctl.specs import parse_spec
from lumctl.stages import tokenize

BEHAVIORS = np.array(["pv", "cart", "fav", "buy"])


def taobao_rows(rng: np.random.Generator, n: int, users: int, items: int, t_span: int) -> list[tuple]:
    """Random Taobao-format rows with ties, duplicates and a few far-off timestamps."""
    u = rng.integers(1, users + 1, n)
    i = rng.integers(1, items + 1, n)
    c = i % 7 + 100
    b = BEHAVIORS[rng.integers(0, 4, n)]
    t = 1_000 + rng.integers(0, t_span, n)
    far = rng.random(n) < 0.03
    t[far] = rng.choice([-5, 10**10], far.sum())
    rows = [(int(a), int(x), int(y), str(z), int(w)) for a, x, y, z, w in zip(u, i, c, b, t)]
    dup = rng.integers(0, n, n // 10)                      # exact copies somewhere later in the file
    for k in dup:
        rows.insert(int(rng.integers(k, n)), rows[k])
    return rows


def write_csv(path: Path, rows: list[tuple]) -> None:
    path.write_text("".join(",".join(map(str, r)) + "\n" for r in rows))


def spec_for(tmp: Path, tok: dict) -> object:
    return parse_spec({"experiment": "t", "store_root": str(tmp / "stores"), "tokenize": tok})


def assert_same(spec, tmp: Path) -> dict:
    ref, ref_counts = tokenize.tokenize_log(spec.tokenize, read_log(spec.tokenize, spec.store("synth")))
    work = tmp / "work"
    work.mkdir()
    counts, _ = tokenize.build(spec, work)
    g = zarrio.open_read(work / "data.zarr")
    for name, a in ref.items():
        b = zarrio.get(g, name)
        if a.dtype.kind == "U":
            b = np.array(b.tolist(), dtype=str)
        assert a.shape == b.shape, name
        assert a.dtype == b.dtype or a.dtype.kind == "U", name
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
    assert sorted(g["events"].array_keys()) == sorted(k.split("/")[1] for k in ref if k.startswith("events/"))
    assert counts == ref_counts
    return counts


SPLITS = [
    {"kind": "leave_one_out"},
    {"kind": "leave_one_out", "pretrain_fraction": 0.5},
    {"kind": "fraction", "train": 0.6, "valid": 0.2, "pretrain_quantile": 0.4},
    {"kind": "time", "valid_from": 1_000 + 60, "test_from": 1_000 + 80, "pretrain_before": 1_000 + 30},
    {"kind": "time", "valid_from": 1_000 + 50, "test_from": 1_000 + 90, "pretrain_quantile": 0.7},
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), n=st.integers(20, 400), split=st.sampled_from(SPLITS),
       duplicates=st.sampled_from(["drop", "keep"]), strict=st.booleans(), min_item=st.integers(1, 3),
       min_user=st.integers(1, 6), conditions=st.booleans())
def test_taobao_build_equals_reference(tmp_path_factory, seed, n, split, duplicates, strict, min_item, min_user,
                                       conditions):
    tmp = tmp_path_factory.mktemp("tb")
    rng = np.random.default_rng(seed)
    rows = taobao_rows(rng, n, users=int(rng.integers(2, 30)), items=int(rng.integers(2, 60)), t_span=100)
    write_csv(tmp / "log.csv", rows)
    tok = {"format": "taobao", "path": str(tmp / "log.csv"), "split": split, "duplicates": duplicates,
           "strict": strict, "time_range": [0, 10**9], "min_item_events": min_item, "min_user_events": min_user,
           "batch_events": 1024}
    if conditions:
        tok["conditions"] = [{"name": "behavior", "source": "column", "column": "behavior"},
                             {"name": "category", "source": "column", "column": "category"}]
    try:
        ref = tokenize.tokenize_log(spec_for(tmp, tok).tokenize, read_log(spec_for(tmp, tok).tokenize))
    except InputError:
        with pytest.raises(InputError):
            tokenize.build(spec_for(tmp, tok), tmp)
        return
    assert ref is not None
    assert_same(spec_for(tmp, tok), tmp)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), n=st.integers(30, 300), split=st.sampled_from(SPLITS))
def test_table_build_equals_reference(tmp_path_factory, seed, n, split):
    """String ids (some not integers: lexical vocabularies), a rating bucket and an item attribute."""
    tmp = tmp_path_factory.mktemp("tbl")
    rng = np.random.default_rng(seed)
    users = np.array([f"u{k}" if k % 3 else str(k) for k in range(12)])
    items = np.array([str(k) for k in range(25)])
    ev = pa.table({"uid": users[rng.integers(0, 12, n)], "iid": items[rng.integers(0, 25, n)],
                   "ts": 1_000 + rng.integers(0, 100, n), "stars": rng.integers(1, 6, n).astype(float)})
    pq.write_table(ev, tmp / "ev.parquet")
    pq.write_table(pa.table({"iid": items[::2], "kind": [f"k{k % 4}" for k in range(len(items[::2]))]}), tmp / "it.parquet")
    tok = {"format": "table", "path": str(tmp / "ev.parquet"), "items_path": str(tmp / "it.parquet"),
           "columns": {"user": "uid", "item": "iid", "timestamp": "ts", "rating": "stars"},
           "item_columns": {"item": "iid", "category": "kind"}, "split": split, "min_user_events": 3,
           "batch_events": 1024,
           "conditions": [{"name": "rating", "source": "bucket", "column": "rating", "edges": [2.5, 4.0]},
                          {"name": "kind", "source": "item_attr", "column": "category"}]}
    assert_same(spec_for(tmp, tok), tmp)


def test_hand_checked_duplicates_and_range(tmp_path):
    """Two copies of one event, one far-off timestamp: counted; the copy dropped; strict drops the outlier."""
    rows = [(1, 10, 5, "pv", 100), (1, 10, 5, "pv", 100), (1, 11, 5, "buy", 100), (1, 12, 5, "pv", 90),
            (1, 13, 5, "pv", 7), (2, 10, 5, "pv", 50), (2, 11, 5, "pv", 60), (2, 12, 5, "cart", 70)]
    write_csv(tmp_path / "log.csv", rows)
    tok = {"format": "taobao", "path": str(tmp_path / "log.csv"), "time_range": [50, 200], "min_user_events": 1}
    counts = assert_same(spec_for(tmp_path, tok), tmp_path)
    assert (counts["duplicate_events"], counts["out_of_range_events"], counts["events"]) == (1, 1, 7)
    (tmp_path / "work").rename(tmp_path / "w1")
    counts = assert_same(spec_for(tmp_path, {**tok, "strict": True}), tmp_path)
    assert counts["events"] == 6
    (tmp_path / "work").rename(tmp_path / "w2")
    counts = assert_same(spec_for(tmp_path, {**tok, "duplicates": "keep"}), tmp_path)
    assert (counts["duplicate_events"], counts["events"]) == (0, 8)


def big_log(path: Path, n: int, bad_line: int | None = None) -> None:
    rng = np.random.default_rng(0)
    u = np.sort(rng.integers(1, n // 50 + 2, n))
    lines = np.char.add(np.char.add(u.astype(str), ","), (rng.integers(1, 5000, n)).astype(str))
    lines = np.char.add(lines, ",7,pv,")
    lines = np.char.add(lines, (1_500_000_000 + rng.integers(0, 10**6, n)).astype(str))
    if bad_line is not None:
        lines[bad_line - 1] = "17,abc,7,pv,1500000000"
    path.write_text("\n".join(lines.tolist()) + "\n")


def test_malformed_row_mid_file_line_or_count(tmp_path):
    big_log(tmp_path / "log.csv", 200_000, bad_line=123_457)
    tok = {"format": "taobao", "path": str(tmp_path / "log.csv"), "min_user_events": 1}
    work = tmp_path / "a"
    work.mkdir()
    counts, _ = tokenize.build(spec_for(tmp_path, tok), work)
    assert counts["malformed_rows"] == 1 and counts["events"] + counts["duplicate_events"] == 199_999
    work = tmp_path / "b"
    work.mkdir()
    with pytest.raises(InputError, match=r"log\.csv:123457: field 'item': expected a number, got 'abc'"):
        tokenize.build(spec_for(tmp_path, {**tok, "strict": True}), work)


@pytest.mark.slow
def test_malformed_row_in_a_10m_row_file(tmp_path):
    big_log(tmp_path / "log.csv", 10_000_000, bad_line=5_000_001)
    tok = {"format": "taobao", "path": str(tmp_path / "log.csv"), "min_user_events": 1, "strict": True}
    with pytest.raises(InputError, match=r"log\.csv:5000001: "):
        tokenize.build(spec_for(tmp_path, tok), tmp_path)


def test_killed_tokenize_leaves_no_store_and_reruns(tmp_path):
    big_log(tmp_path / "log.csv", 1_500_000)
    spec = tmp_path / "s.toml"
    spec.write_text(f'experiment = "k"\nstore_root = "{tmp_path / "stores"}"\n'
                    f'[tokenize]\nformat = "taobao"\npath = "{tmp_path / "log.csv"}"\nmin_user_events = 1\n')
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-m", "lumctl", "tokenize", str(spec)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = tmp_path / "stores" / "k" / "tokenize"
    deadline = time.time() + 60
    while time.time() < deadline and not any((tmp_path / "stores" / "k").glob(".tokenize.tmp-*/work/events.duckdb")):
        time.sleep(0.05)
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (store / "manifest.json").exists()
    done = subprocess.run([sys.executable, "-m", "lumctl", "tokenize", str(spec)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (store / "manifest.json").exists()
    counts = json.loads((store / "manifest.json").read_text())["counts"]
    assert counts["events"] + counts["duplicate_events"] == 1_500_000
    assert zarrio.open_read(store / "data.zarr")["events/item"].shape == (counts["events"],)
