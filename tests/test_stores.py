"""Stores: synth -> tokenize -> pack on a tiny synthetic log; up-to-date checks, rebuilds, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from helpers import invoke, spec_in, tiny
from lumctl import synth
from lumctl.errors import InputError
from lumctl.specs import load_spec
from lumctl.stages import pack, tokenize
from lumctl.store import MANIFEST, atomic_dir, is_up_to_date, read_manifest, require_store, store_hash

STAGES = ("synth", "tokenize", "pack")


def build(spec_path: Path, *stages: str, force: bool = False) -> None:
    for stage in stages or STAGES:
        args = [stage, spec_path] + (["--force"] if force else [])
        r = invoke(*args)
        assert r.exit_code == 0, r.output


def stamp(store: Path) -> tuple[int, int]:
    """(inode of the store folder, mtime of its manifest): both change when the store is rewritten."""
    return os.stat(store).st_ino, os.stat(store / MANIFEST).st_mtime_ns


def stamps(spec_path: Path) -> dict[str, tuple[int, int]]:
    s = load_spec(spec_path)
    return {stage: stamp(s.store(stage)) for stage in STAGES}


@pytest.fixture
def built(tmp_path):
    p = tiny(tmp_path)
    build(p)
    return p


# ------------------------------------------------------------------------------ pipeline
def test_pipeline_outputs(built):
    s = load_spec(built)
    for stage in STAGES:
        m = require_store(s.store(stage), stage)
        assert m["complete"] is True and m["stage"] == stage
    tm = read_manifest(s.store("tokenize"))
    assert tm["counts"]["users"] == 50 and tm["counts"]["condition_fields"] == ["scenario", "category"]
    assert tm["counts"]["items"] <= 40 and tm["counts"]["malformed_rows"] == 0

    data = tokenize.load(s.store("tokenize"))
    off, split = data["users/offsets"], data["users/split"]
    assert off[0] == 0 and off[-1] == len(data["events/item"]) == tm["counts"]["events"]
    n = np.diff(off)
    np.testing.assert_array_equal(split, np.stack([n - 2, n - 1], 1))  # leave-one-out
    assert (np.diff(data["events/user"]) >= 0).all()
    for u in range(len(n)):  # time ordered within each user
        assert (np.diff(data["events/timestamp"][off[u]:off[u + 1]]) >= 0).all()
    assert data["events/cond"].shape == (off[-1], 2) and (data["events/cond"] >= 2).all()
    assert data["events/item"].min() >= 2
    assert data["items/category"].shape[0] == len(data["vocab/item"])

    rows = pack.load(s.store("pack"))
    pm = read_manifest(s.store("pack"))
    R = pm["counts"]["rows"]
    assert rows["type"].shape == (R, 64) and rows["cond"].shape == (R, 64, 2)
    assert pm["counts"]["efficiency"] == pytest.approx((rows["type"] > 0).sum() / rows["type"].size, abs=1e-5)
    # each user's item tokens are its most recent <= max_items training events, in order
    for u in range(len(n)):
        sel = (rows["user"] == u) & (rows["type"] == 2)
        end = off[u] + split[u, 0]
        want = data["events/item"][max(off[u], end - 20):end]
        np.testing.assert_array_equal(rows["item"][sel], want)
        np.testing.assert_array_equal(rows["ts"][sel], data["events/timestamp"][max(off[u], end - 20):end])
    assert pm["inputs"] == {"tokenize": store_hash(tm)}


def test_second_run_is_up_to_date(built):
    before = stamps(built)
    for stage in STAGES:
        r = invoke(stage, built)
        assert r.exit_code == 0 and f"{stage}: " in r.stderr and "is up to date" in r.stderr, r.output
    assert stamps(built) == before


def test_changing_raw_input_rebuilds(tmp_path, built):
    before = stamps(built)
    changed = tiny(tmp_path, synth={"seed": 4})  # the raw log of the synth format
    build(changed)
    after = stamps(changed)
    assert all(after[s] != before[s] for s in STAGES)


def test_changing_pack_section_rebuilds_only_pack(tmp_path, built):
    before = stamps(built)
    changed = tiny(tmp_path, pack={"seq_len": 128})
    build(changed)
    after = stamps(changed)
    assert after["synth"] == before["synth"] and after["tokenize"] == before["tokenize"]
    assert after["pack"] != before["pack"]
    assert read_manifest(load_spec(changed).store("pack"))["counts"]["seq_len"] == 128


def test_changing_tokenize_section_rebuilds_tokenize_and_pack(tmp_path, built):
    before = stamps(built)
    changed = tiny(tmp_path, tokenize={"min_user_events": 6})
    build(changed)
    after = stamps(changed)
    assert after["synth"] == before["synth"]
    assert after["tokenize"] != before["tokenize"] and after["pack"] != before["pack"]


def test_force_rebuilds(built):
    before = stamps(built)
    build(built, force=True)
    after = stamps(built)
    assert all(after[s] != before[s] for s in STAGES)


def test_raw_file_change_rebuilds(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("1 2 3 4 5\n2 3 4 5\n3 2 4 5 6\n")
    p = spec_in(tmp_path, {"experiment": "f", "tokenize": {"format": "seq-lines", "path": str(log)},
                           "pack": {"seq_len": 16, "max_items": 8}})
    build(p, "tokenize", "pack")
    s = load_spec(p)
    before = {st: stamp(s.store(st)) for st in ("tokenize", "pack")}
    build(p, "tokenize", "pack")
    assert {st: stamp(s.store(st)) for st in ("tokenize", "pack")} == before
    log.write_text("1 2 3 4 5\n2 3 4 5\n3 2 4 5 7\n")  # same size, other content
    r = invoke("tokenize", p)
    assert r.exit_code == 0 and "up to date" not in r.stderr
    assert stamp(s.store("tokenize")) != before["tokenize"]
    assert "up to date" not in invoke("pack", p).stderr
    assert stamp(s.store("pack")) != before["pack"]


# ------------------------------------------------------------------------------ incomplete stores
def test_leftover_tmp_dir_is_never_accepted(built):
    s = load_spec(built)
    parent = s.store("pack").parent
    leftover = parent / ".pack.tmp-123-abcd"
    (leftover / "rows.zarr").mkdir(parents=True)
    (leftover / "rows.zarr" / "zarr.json").write_text('{"partial": ')
    with pytest.raises(InputError, match="no complete pack store here"):
        require_store(leftover, "pack")
    # the real store is still the accepted one, and a forced rebuild ignores the leftover
    build(built, "pack", force=True)
    assert require_store(s.store("pack"), "pack")["stage"] == "pack"
    assert pack.load(s.store("pack"))["type"].shape[1] == 64


@pytest.mark.parametrize("manifest", [None, "", '{"stage": "pack", "complete": ', '{"stage": "pack", "complete": false}',
                                      '{"stage": "pack"}', "[1, 2]"])
def test_store_without_complete_manifest_is_rejected(tmp_path, manifest):
    store = tmp_path / "pack"
    (store / "rows.zarr").mkdir(parents=True)
    if manifest is not None:
        (store / MANIFEST).write_text(manifest)
    assert read_manifest(store) is None
    with pytest.raises(InputError) as e:
        require_store(store, "pack")
    assert str(e.value) == f"{store}: no complete pack store here (run `lumctl pack` first)"
    assert not is_up_to_date(store, "anything", {})


def test_incomplete_upstream_blocks_downstream_and_gets_rebuilt(built):
    s = load_spec(built)
    (s.store("tokenize") / MANIFEST).unlink()  # as if the manifest was never written
    r = invoke("pack", built)
    assert r.exit_code == 2 and "no complete tokenize store here" in r.stderr
    r = invoke("tokenize", built)  # not "up to date": the incomplete store is rebuilt
    assert r.exit_code == 0 and "up to date" not in r.stderr
    assert require_store(s.store("tokenize"), "tokenize")


def test_stage_failing_mid_write_keeps_old_store(built, monkeypatch):
    s = load_spec(built)
    store = s.store("pack")
    before = stamp(store)
    manifest_before = (store / MANIFEST).read_text()
    rows_before = pack.load(store)

    def boom(*a, **k):
        raise RuntimeError("killed mid-write")
    monkeypatch.setattr(pack, "write_manifest", boom)  # arrays written, manifest not
    with pytest.raises(RuntimeError, match="killed mid-write"):
        pack.run(s, force=True)
    assert stamp(store) == before and (store / MANIFEST).read_text() == manifest_before
    rows_after = pack.load(store)
    assert all(np.array_equal(rows_before[k], rows_after[k]) for k in rows_before)
    assert sorted(p.name for p in store.parent.iterdir()) == ["pack", "synth", "tokenize"]  # no leftovers


def test_cli_reports_internal_failure_with_exit_1(built, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(pack, "write_manifest", boom)
    r = invoke("pack", built, "--force")
    assert r.exit_code == 1 and r.stderr.strip() == "internal error: RuntimeError: disk on fire"
    assert require_store(load_spec(built).store("pack"), "pack")


# ------------------------------------------------------------------------------ atomic_dir
def test_atomic_dir_success_replaces_old(tmp_path):
    target = tmp_path / "st" / "pack"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".pack.tmp-")
        (tmp / "a.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("new")
        assert (target / "a.txt").read_text() == "old"  # readers still see the old store
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["pack"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_failure_removes_tmp_and_keeps_old(tmp_path, exc):
    target = tmp_path / "pack"
    with atomic_dir(target) as tmp:
        (tmp / "data").write_text("v1")
    seen = {}
    with pytest.raises(exc):
        with atomic_dir(target) as tmp:
            seen["tmp"] = tmp
            (tmp / "data").write_text("v2 partial")
            raise exc()
    assert not seen["tmp"].exists()
    assert (target / "data").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["pack"]


def test_atomic_dir_failure_without_old_store_leaves_nothing(tmp_path):
    target = tmp_path / "pack"
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("partial")
            raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_synth_is_deterministic(tmp_path):
    s = load_spec(tiny(tmp_path))
    e1, i1 = synth.generate(s.synth)
    e2, i2 = synth.generate(s.synth)
    assert e1.equals(e2) and i1.equals(i2)
    assert e1.num_rows == read_manifest(synth.run(s))["counts"]["events"]
    n = np.bincount(np.asarray(e1["user"].to_pylist(), int))[1:]
    assert n.min() >= 4 and n.max() <= 25 and len(n) == 50
    assert json.loads((s.store("synth") / MANIFEST).read_text())["counts"]["users"] == 50


def test_leave_one_out_never_gives_negative_split_points():
    # min_user_events < 3: users with 1-2 events keep no training events rather than negative counts
    import pyarrow as pa

    from lumctl.readers import RawLog
    from lumctl.specs import TokenizeSpec
    ev = pa.table({"user": ["a", "b", "b", "c", "c", "c"], "item": ["1", "2", "3", "1", "2", "3"],
                   "timestamp": pa.array([1, 1, 2, 1, 2, 3], pa.int64())})
    arrays, counts = tokenize.tokenize_log(TokenizeSpec(format="seq-lines", path="x", min_user_events=1), RawLog(ev))
    np.testing.assert_array_equal(arrays["users/split"], [[0, 0], [0, 1], [1, 2]])
    assert (counts["train_events"], counts["valid_events"], counts["test_events"]) == (1, 2, 3)
    assert counts["train_events"] + counts["valid_events"] + counts["test_events"] == counts["events"]


# ------------------------------------------------------------------------------------ fsspec URLs
def test_copied_store_reads_the_same_from_a_url(built):
    import uuid

    from lumctl.store import copy_store
    src = load_spec(built).store("tokenize")
    url = f"memory://lumctl-{uuid.uuid4().hex[:8]}/tiny/tokenize"
    copy_store(src, url)
    assert read_manifest(url) == read_manifest(src)
    assert store_hash(require_store(url, "tokenize")) == store_hash(read_manifest(src))
    a, b = tokenize.load(url), tokenize.load(src)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_url_store_commit_protocol(built, monkeypatch):
    """An object store has no rename: the manifest, written last, is the commit marker."""
    import uuid

    import fsspec

    from lumctl import store as st
    spec = load_spec(built)
    root = f"memory://lumctl-{uuid.uuid4().hex[:8]}"
    url = f"{root}/tiny/pack"
    st.copy_store(spec.store("tokenize"), url)               # an old store with other arrays at the same place
    mem = fsspec.filesystem("memory")
    stale = [f for f in mem.find(url.replace("memory://", "/")) if "/events/" in f]
    assert stale

    def fail(*a, **k):
        raise OSError("connection lost")
    monkeypatch.setattr(st.shutil, "copyfileobj", fail)     # a copy that dies after removing the old manifest
    with pytest.raises(OSError):
        st.copy_store(spec.store("pack"), url)
    assert read_manifest(url) is None                        # neither the old nor a half-new store is accepted
    with pytest.raises(InputError, match="no complete pack store"):
        require_store(url, "pack")
    monkeypatch.undo()
    st.copy_store(spec.store("pack"), url)
    assert read_manifest(url) == read_manifest(spec.store("pack"))
    assert not any(mem.exists(f) for f in stale)             # no stale chunk of the old store survives
    rows = pack.load(url)
    assert all(np.array_equal(rows[k], v) for k, v in pack.load(spec.store("pack")).items())
