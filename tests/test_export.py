"""`lumctl export`: a sample table with the LUM answers joined point in time, streamed to parquet."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import invoke

from lumctl import zarrio
from lumctl.stages.fuse import load_answers
from lumctl.specs import load_spec
from lumctl.stages import tokenize

QUERY = """
[query]
each = ["scenario"]
snapshot = "every_n_events"
every_n_events = 4
dtype = "float32"
"""


@pytest.fixture(scope="module")
def lum(tmp_path_factory):
    """A tiny experiment run up to query, and a sample table of its events plus unseen ids."""
    from conftest import TINY
    tmp = tmp_path_factory.mktemp("export")
    path = tmp / "tiny.toml"
    path.write_text(TINY.format(root=tmp / "stores", steps=4, every=4, ckpt=4, conditions="true") + QUERY)
    r = invoke("run", path)
    assert r.exit_code == 0, r.output
    spec = load_spec(path)
    data = tokenize.load(spec.store("tokenize"))
    u, i, ts = data["events/user"], data["events/item"], data["events/timestamp"]
    vu, vi = np.array(data["vocab/user"].tolist()), np.array(data["vocab/item"].tolist())
    table = pa.table({"user_id": np.r_[vu[u], ["nobody"]],
                      "item_id": np.r_[vi[i][:-1], ["no-such-item", "x"]],
                      "timestamp": np.r_[ts, ts[-1]], "label": np.r_[np.arange(len(u)) % 2, 0],
                      "ctx": np.r_[np.arange(len(u)), -1]})
    pq.write_table(table, tmp / "samples.parquet")
    return path, spec, tmp, table


def test_export_joins_point_in_time(lum):
    path, spec, tmp, table = lum
    r = invoke("export", path, "--samples", tmp / "samples.parquet", "--out", tmp / "out.parquet")
    assert r.exit_code == 0, r.output
    out = pq.read_table(tmp / "out.parquet")
    ans = load_answers(spec.store("query"))                             # ragged: a user's snapshot rows
    emb, sts, so = ans["snap/emb"], ans["snap/ts"], ans["users/snap_offsets"]
    uidx, item_emb = ans["user_index"], ans["item_emb"]
    N, D = emb.shape[1], emb.shape[2]
    assert out.num_rows == table.num_rows
    for c in table.column_names:                                       # the table itself, raw ids preserved
        assert out[c].equals(table[c]), c
    names = json.loads(out.schema.metadata[b"lumctl.queries"])
    assert len(names) == N and out.schema.field("o_q1").metadata[b"query"].decode() == names[0]
    for k in (b"lumctl.checkpoint", b"lumctl.query_store", b"lumctl.snapshot_rule"):
        assert out.schema.metadata[k]
    data = tokenize.load(spec.store("tokenize"))
    users = [str(x) for x in data["vocab/user"].tolist()]
    items = [str(x) for x in data["vocab/item"].tolist()]
    row_of = {int(x): k for k, x in enumerate(uidx)}
    o = {n: out[f"o_q{n + 1}"].to_pylist() for n in range(N)}
    sim = {n: out[f"sim_q{n + 1}"].to_pylist() for n in range(N)}
    e = out["e_item"].to_pylist()
    d = table.to_pydict()
    checked = 0
    for r_ in range(0, table.num_rows, 7):                              # naive loop over snapshots
        uid, iid, t = d["user_id"][r_], d["item_id"][r_], d["timestamp"][r_]
        known_i = iid in items[2:]
        assert (e[r_] is None) == (not known_i)
        if known_i:
            np.testing.assert_allclose(e[r_], item_emb[items.index(iid)], rtol=1e-6)
        if uid not in users:
            assert o[0][r_] is None and sim[0][r_] is None
            continue
        row = row_of[users.index(uid)]
        before = [k for k in range(so[row], so[row + 1]) if sts[k] < t]
        if not before:
            assert o[0][r_] is None
            continue
        k = max(before, key=lambda k: sts[k])
        for n in range(N):
            np.testing.assert_allclose(o[n][r_], emb[k, n], rtol=1e-6)
            if known_i:
                a, b = emb[k, n], item_emb[items.index(iid)]
                assert sim[n][r_] == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-5)
        checked += 1
    assert checked > 5
    man = json.loads((tmp / "out.manifest.json").read_text())
    assert man["counts"]["unseen_user_rows"] == 1 and man["counts"]["unseen_item_rows"] == 2
    assert man["query_store"] == out.schema.metadata[b"lumctl.query_store"].decode()
    it = pq.read_table(tmp / "out_items.parquet")
    assert it["item_id"].to_pylist() == items[2:] and it.schema.metadata[b"lumctl.checkpoint"]
    np.testing.assert_allclose(np.array(it["e"].to_pylist()), item_emb[2:], rtol=1e-6)


def test_export_in_small_batches_writes_the_same_file(lum, tmp_path):
    path, spec, tmp, table = lum
    r = invoke("export", path, "--samples", tmp / "samples.parquet", "--out", tmp_path / "a.parquet")
    assert r.exit_code == 0, r.output
    text = path.read_text()
    small = tmp_path / "small.toml"
    small.write_text(text + '\n[fuse]\nsamples = { path = "unused", batch_rows = 7 }\n')
    csv = tmp_path / "s.csv"
    import pyarrow.csv as pcsv
    pcsv.write_csv(table, csv)
    r = invoke("export", small, "--samples", csv, "--out", tmp_path / "b.parquet")
    assert r.exit_code == 0, r.output
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert pq.ParquetFile(tmp_path / "b.parquet").metadata.num_row_groups > 1
    for c in ("lum_snapshot_ts", "o_q1", "e_item", "sim_q1"):
        assert a[c].equals(b[c]), c
    assert b["user_id"].to_pylist() == [str(x) for x in table["user_id"].to_pylist()]


def test_export_bad_table_is_one_line(lum, tmp_path):
    path, spec, tmp, table = lum
    (tmp_path / "bad.csv").write_text("user_id,item_id\n1,2\n")
    r = invoke("export", path, "--samples", tmp_path / "bad.csv", "--out", tmp_path / "o.parquet")
    assert r.exit_code == 2 and "column 'timestamp': missing" in r.stderr and not (tmp_path / "o.parquet").exists()


def test_export_help_does_not_import_torch():
    import os
    import subprocess
    import sys

    from helpers import REPO
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom lumctl.cli import app\n"
            "r = CliRunner().invoke(app, ['export', '--help'])\nassert r.exit_code == 0 and '--samples' in r.output\n"
            "assert 'torch' not in sys.modules and 'numba' not in sys.modules\nprint('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
