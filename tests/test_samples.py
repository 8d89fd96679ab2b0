"""Sample tables for fuse ([fuse.samples]), the behaviour CTR protocol and the vectorised GAUC."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lumctl.metrics import auc, gauc


# ------------------------------------------------------------------------------ GAUC
def gauc_loop(user, label, score) -> float:
    """Reference twin: a Python loop over users, each user's AUC by pair counting."""
    user, label, score = np.asarray(user), np.asarray(label).astype(bool), np.asarray(score, float)
    num = den = 0.0
    for u in np.unique(user):
        m = user == u
        pos, neg = score[m & label], score[m & ~label]
        if len(pos) and len(neg):
            d = pos[:, None] - neg[None, :]
            num += m.sum() * ((d > 0).mean() + 0.5 * (d == 0).mean())
            den += m.sum()
    return num / den if den else float("nan")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.integers(0, 3)), min_size=0, max_size=60))
def test_gauc_matches_the_per_user_loop(rows):
    user = np.array([r[0] for r in rows], np.int64)
    y = np.array([r[1] for r in rows], bool)
    s = np.array([r[2] for r in rows], float)
    want, got = gauc_loop(user, y, s), gauc(user, y, s)
    assert (np.isnan(want) and np.isnan(got)) or got == pytest.approx(want, abs=1e-12)


def test_gauc_of_one_user_is_its_auc():
    y, s = [1, 0, 1, 0, 0], [0.9, 0.1, 0.4, 0.4, 0.8]
    assert gauc(np.zeros(5), y, s) == pytest.approx(auc(y, s))


# ------------------------------------------------------------------------------ sample tables
import json  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from helpers import invoke  # noqa: E402
from test_fuse import answers, data_dict, ragged  # noqa: E402

from lumctl.samples import history_bounds, read_samples  # noqa: E402
from lumctl.specs import FuseSpec, SamplesSpec, load_spec  # noqa: E402
from lumctl.stages import fuse as f  # noqa: E402


def store_dict() -> dict:
    d = data_dict()
    d["vocab/user"] = np.array(["10", "11", "12"])
    return d


def derived_table(data: dict) -> pa.Table:
    """The derived rating protocol's samples written as a sample table (raw ids as the vocabularies say)."""
    s = f.samples(data)
    return pa.table({"uid": data["vocab/user"][s["user"]], "iid": data["vocab/item"][s["item"]],
                     "t": s["ts"], "y": s["label"].astype(np.int64),
                     "part": np.array(["train", "valid", "test"])[s["split"]]})


SS = dict(user="uid", item="iid", timestamp="t", label="y", split_column="part")


@pytest.mark.parametrize("backbone", ["din", "sim", "hstu"])
def test_a_table_of_the_derived_samples_gives_the_same_features(tmp_path, backbone):
    data, ans = store_dict(), ragged(answers(data_dict()))
    pq.write_table(derived_table(data), tmp_path / "s.parquet")
    ss = SamplesSpec(path=str(tmp_path / "s.parquet"), **SS)
    table = read_samples(ss, data)
    fs = FuseSpec(backbone=backbone, lum="direct+match", history_len=6, sim_search_len=8)
    want = f.Features(data, fs, ans)
    got = f.Features(data, fs, ans, table.arrays)
    idx = np.arange(len(want.s["item"]))
    a, b = want.numpy(idx), got.numpy(idx)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    for k in ("user", "item", "label", "split", "hist_end", "user_start", "ts"):
        np.testing.assert_array_equal(table.arrays[k], want.s[k], err_msg=k)
    assert table.counts["unseen_user_rows"] == 0 and table.counts["unseen_item_rows"] == 0


def test_history_bounds_by_hand():
    data = {"users/offsets": np.array([0, 3, 5]), "events/timestamp": np.array([5, 7, 7, 1, 9]),
            "events/user": np.array([0, 0, 0, 1, 1])}
    start, end = history_bounds(data, np.array([0, 0, 0, 1, 1, -1]), np.array([5, 6, 8, 9, 10, 100]))
    assert start.tolist() == [0, 0, 0, 3, 3, 0]
    assert end.tolist() == [0, 1, 3, 4, 5, 0]            # strictly before; unseen user: empty


def test_unseen_ids_and_features(tmp_path):
    data = store_dict()
    csv = tmp_path / "s.csv.gz"
    import gzip
    with gzip.open(csv, "wt") as fh:
        fh.write("uid,iid,t,y,part,city,price,tags\n"
                 "10,3,5,1,train,a,1.0,x|y\n"
                 "99,3,6,0,train,b,3.0,y\n"          # unseen user
                 "11,777,7,1,valid,a,,z\n"           # unseen item, missing price
                 "12,4,2021-01-01T00:00:00,0,test,c,5.0,\n")
    ss = SamplesSpec(path=str(csv), categorical=["city"], numeric={"price": "standard"}, multi_valued={"tags": "|"},
                     max_values=3, **SS)
    t = read_samples(ss, data)
    a = t.arrays
    assert a["user"].tolist() == [0, -1, 1, 2] and a["item"].tolist() == [3, 3, 1, 4]
    assert a["ts"][3] == 1609459200
    assert t.counts["unseen_user_rows"] == 1 and t.counts["unseen_item_rows"] == 1
    assert a["extra_cat"][:, 0].tolist() == [2, 3, 2, 1]          # train vocab a, b; c unseen in train -> 1
    np.testing.assert_allclose(a["extra_num"][:, 0], [-1, 1, 0, 3])  # mean 2, std 1 of the train rows; missing 0
    assert a["extra_multi"][:, 0].tolist() == [[2, 3, 0], [3, 0, 0], [1, 0, 0], [0, 0, 0]]  # x, y; z unknown
    assert t.cat_vocab == [4] and t.multi_vocab == [4]
    assert a["group"][1] == 3 and a["user_start"][1] == a["hist_end"][1] == 0
    fs = FuseSpec(backbone="din", history_len=4, lum="direct", samples=ss)
    b = f.Features(data, fs, ragged(answers(data_dict())), a).numpy(np.arange(4))
    assert b["lum_missing"][1] == 1 and b["user_attr"][1].tolist() == [1] and not b["hist_mask"][1].any()


# ------------------------------------------------------------------------------ the stage, bad tables
SAMPLES_FUSE = """
[fuse]
backbone = "din"
lum = "none"
history_len = 10
d_emb = 8
mlp = [16, 8]
batch_size = 64
epochs = 2
samples = {{ path = "{path}", user = "uid", item = "iid", timestamp = "t", label = "y", split_column = "part"{more} }}
"""


@pytest.fixture
def tokenized(tiny_spec, tmp_path):
    """A tiny tokenize store and a function writing a spec whose [fuse] reads a given sample table."""
    path = tiny_spec()
    for verb in ("synth", "tokenize"):
        r = invoke(verb, path)
        assert r.exit_code == 0, r.output
    base = path.read_text()

    def with_samples(table_path, more=""):
        path.write_text(base + SAMPLES_FUSE.format(path=table_path, more=more))
        return path
    return path, with_samples


def tiny_table(path) -> pa.Table:
    from lumctl.stages import tokenize
    data = tokenize.load(load_spec(path).store("tokenize"))
    rng = np.random.default_rng(0)
    s = f.samples({**data, "events/rating": rng.integers(1, 6, len(data["events/item"])).astype(np.float32)})
    n = len(s["item"])
    return pa.table({"uid": data["vocab/user"][s["user"]], "iid": data["vocab/item"][s["item"]], "t": s["ts"],
                     "y": s["label"].astype(np.int64), "part": np.array(["train", "valid", "test"])[s["split"]],
                     "hour": rng.integers(0, 24, n).astype(str), "price": rng.gamma(2.0, 10.0, n)})


def test_fuse_trains_on_a_sample_table(tokenized, tmp_path):
    path, with_samples = tokenized
    t = tiny_table(path)
    t = t.append_column("tags", pa.array(["a|b", "b", None, "c|a|b"] * (len(t) // 4) + ["a"] * (len(t) % 4)))
    pq.write_table(t, tmp_path / "t.parquet")
    with_samples(tmp_path / "t.parquet", ', categorical = ["hour"], numeric = { price = "log" }, '
                 'multi_valued = { tags = "|" }')
    r = invoke("fuse", path)
    assert r.exit_code == 0, r.output
    out = load_spec(path).store("fuse")
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["test"]["auc"]["mean"] <= 1 and m["samples"]["rows"] == len(t)
    cfg = json.loads((out / "final" / "config.json").read_text())["model"]
    assert cfg["extra_cat"] == [26] and cfg["extra_multi"] == [5] and cfg["extra_numeric"] == 1
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["sample_table"]["unseen_user_rows"] == 0
    r = invoke("fuse", path)
    assert r.exit_code == 0 and "is up to date" in r.stderr


def bad(tokenized, tmp_path, table: pa.Table | str, want: str, more: str = "", name: str = "bad.csv"):
    path, with_samples = tokenized
    p = tmp_path / name
    if isinstance(table, str):
        p.write_text(table)
    else:
        pq.write_table(table, p)
    with_samples(p, more)
    r = invoke("fuse", path)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(p) in lines[0] and want in lines[0], r.stderr


HEAD = "uid,iid,t,y,part\n"


def test_bad_table_missing_column(tokenized, tmp_path):
    bad(tokenized, tmp_path, "uid,iid,t,part\n1,2,3,train\n", "column 'y': missing")


def test_bad_table_label_not_0_1(tokenized, tmp_path):
    bad(tokenized, tmp_path, HEAD + "1,2,3,1,train\n1,2,4,2,valid\n", "column 'y': the label must be 0 or 1 (got 2)")


def test_bad_table_unparseable_timestamp(tokenized, tmp_path):
    bad(tokenized, tmp_path, HEAD + "1,2,3,1,train\n1,2,yesterday,0,valid\n",
        "column 't': unparseable timestamp 'yesterday'")


def test_bad_table_wrong_type(tokenized, tmp_path):
    t = pa.table({"uid": ["1"], "iid": ["2"], "t": [3], "y": [1], "part": ["train"], "price": ["cheap"]})
    bad(tokenized, tmp_path, t, "column 'price': wrong type for a numeric feature (got 'cheap')",
        more=', numeric = { price = "none" }', name="bad.parquet")
    t = pa.table({"uid": [1.5], "iid": ["2"], "t": [3], "y": [1], "part": ["train"]})
    bad(tokenized, tmp_path, t, "column 'uid': wrong type double for ids", name="bad2.parquet")


def test_bad_table_empty(tokenized, tmp_path):
    bad(tokenized, tmp_path, HEAD, "the sample table is empty")


# ------------------------------------------------------------------------------ behaviour protocol (Taobao)
def test_behavior_samples_by_hand():
    # user 0: pv 2, pv 3, buy 2, pv 4 (train) | cart 3 (valid) | pv 5 (test);  user 1: pv 2, fav 2 | pv 3 | pv 2
    beh = {"pv": 2, "cart": 3, "fav": 4, "buy": 5}
    ev = [(0, 2, "pv"), (0, 3, "pv"), (0, 2, "buy"), (0, 4, "pv"), (0, 3, "cart"), (0, 5, "pv"),
          (1, 2, "pv"), (1, 2, "fav"), (1, 3, "pv"), (1, 2, "pv")]
    data = {"events/user": np.array([e[0] for e in ev], np.int32), "events/item": np.array([e[1] for e in ev], np.int32),
            "events/timestamp": np.array([1, 2, 3, 4, 5, 6, 1, 2, 3, 4], np.int64),
            "events/cond": np.array([[beh[e[2]]] for e in ev], np.int32),
            "vocab/cond_behavior": np.array(["<pad>", "<unk>", "pv", "cart", "fav", "buy"]),
            "users/offsets": np.array([0, 6, 10]), "users/split": np.array([[4, 5], [2, 3]])}
    s = f.samples(data, FuseSpec(protocol="behavior"), ["behavior"])
    assert s["event"].tolist() == [0, 1, 3, 4, 5, 6, 8, 9]
    assert s["item"].tolist() == [2, 3, 4, 3, 5, 2, 3, 2]
    assert s["label"].tolist() == [1, 0, 0, 1, 0, 1, 0, 0]
    assert s["split"].tolist() == [0, 0, 0, 1, 2, 0, 1, 2]
    assert s["hist_end"].tolist() == [0, 1, 3, 4, 5, 6, 8, 9]
    with pytest.raises(Exception, match="not a \\[tokenize\\] condition field"):
        f.samples(data, FuseSpec(protocol="behavior", behavior_field="kind"), ["behavior"])


def test_behavior_protocol_on_a_taobao_csv(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        t = 1511600000 + int(rng.integers(0, 3600))
        for _ in range(int(rng.integers(8, 25))):
            t += int(rng.integers(1, 600))
            item = int(rng.integers(1, 30))
            b = rng.choice(["pv", "cart", "fav", "buy"], p=[0.7, 0.1, 0.1, 0.1]) if item % 3 else "pv"
            rows.append(f"{100 + u},{item},{item % 5},{b},{t}")
    (tmp_path / "UserBehavior.csv").write_text("\n".join(rows) + "\n")
    from helpers import spec_in
    path = spec_in(tmp_path, {
        "experiment": "tb", "tokenize": {"format": "taobao", "path": str(tmp_path / "UserBehavior.csv"),
                                         "conditions": [{"name": "behavior", "source": "column", "column": "behavior"}],
                                         "split": {"kind": "fraction", "train": 0.6, "valid": 0.2,
                                                   "pretrain_fraction": 0.3}},
        "fuse": {"backbone": "din", "protocol": "behavior", "history_len": 8, "d_emb": 8, "mlp": [16, 8],
                 "batch_size": 32, "epochs": 2}})
    for verb in ("tokenize", "fuse"):
        r = invoke(verb, path)
        assert r.exit_code == 0, r.output
    m = json.loads((load_spec(path).store("fuse") / "metrics.json").read_text())
    assert m["samples"] == {"protocol": "behavior"} and 0 <= m["test"]["auc"]["mean"] <= 1
    assert 0 < m["seeds"][0]["test"]["pos_rate"] < 1


def test_a_sample_table_at_an_fsspec_url(tmp_path):
    import fsspec
    data = store_dict()
    fs = fsspec.filesystem("memory")
    with fs.open("memory://samples/part-0.parquet", "wb") as fh:
        pq.write_table(derived_table(data), fh)
    with fs.open("memory://samples/part-1.parquet", "wb") as fh:
        pq.write_table(derived_table(data).slice(0, 5), fh)
    t = read_samples(SamplesSpec(path="memory://samples", **SS), data)
    assert t.counts["rows"] == len(f.samples(data)["item"]) + 5 and len(t.files) == 2


def test_sim_hard_search_per_batch_equals_the_cached_one():
    data, ans = data_dict(), ragged(answers(data_dict()))
    idx = np.arange(len(data["events/item"]))
    kw = dict(backbone="sim", lum="direct", history_len=6, sim_search_len=8)
    cached = f.Features(data, FuseSpec(**kw), ans)
    per_batch = f.Features(data, FuseSpec(cache_mib=0, **kw), ans)
    assert cached.sim_hist is not None and per_batch.sim_hist is None
    a, b = cached.numpy(idx), per_batch.numpy(idx)
    for k in ("sim_hist", "sim_mask"):
        np.testing.assert_array_equal(a[k], b[k])


def test_fuse_spec_hash_ignores_the_cache_and_unset_new_keys():
    base = f.fuse_spec_hash(FuseSpec())
    assert f.fuse_spec_hash(FuseSpec(cache_mib=1)) == base
    assert f.fuse_spec_hash(FuseSpec(protocol="behavior")) != base
    assert f.fuse_spec_hash(FuseSpec(samples=SamplesSpec(path="x.csv", split_column="s"))) != base


# ------------------------------------------------------------------------------ examples/ml1m_samples.py
@pytest.mark.slow
@pytest.mark.skipif(not (__import__("helpers").DATA / "ml-1m").is_dir(), reason="no ML-1M data")
def test_ml1m_samples_example_writes_the_builtin_samples(tmp_path, monkeypatch):
    import subprocess
    import sys

    from helpers import DATA, REPO
    monkeypatch.setenv("LUMCTL_DATA", str(DATA))
    r = subprocess.run([sys.executable, "examples/ml1m_samples.py", "specs/ml-1m-ctr.toml", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    t = pq.read_table(tmp_path / "ml1m_samples.parquet")
    spec = load_spec(tmp_path / "samples.toml")
    assert spec.fuse.samples.path == str(tmp_path / "ml1m_samples.parquet") and spec.fuse.lum == "none"
    assert load_spec(tmp_path / "builtin.toml").fuse.samples is None
    from lumctl.readers import read_log
    from lumctl.stages.tokenize import tokenize_log
    data, _ = tokenize_log(spec.tokenize, read_log(spec.tokenize))
    s = f.samples(data)
    keep = s["split"] >= 0
    assert t.num_rows == keep.sum()
    np.testing.assert_array_equal(t["label"].to_numpy(), s["label"][keep])
    table = read_samples(spec.fuse.samples, data)
    for k in ("user", "item", "ts", "split", "hist_end"):
        np.testing.assert_array_equal(table.arrays[k], s[k][keep], err_msg=k)
    # the feature columns: users.dat and movies.dat by raw id (user 1: F, age 1, occupation 10; Toy Story)
    u1 = t.filter(pc.equal(t["user_id"], "1")).select(["gender", "age", "occupation"]).to_pylist()
    assert u1 and all(r == {"gender": "F", "age": "1", "occupation": "10"} for r in u1)
    toy = t.filter(pc.equal(t["item_id"], "1")).select(["year", "genres"]).to_pylist()
    assert toy and all(r == {"year": 1995, "genres": "Animation|Children's|Comedy"} for r in toy)
    assert all(t[c].null_count == 0 for c in ("gender", "age", "occupation", "year", "genres"))
    # specs/ml-1m-ctr-samples.toml declares them: 3 categorical, year standardised on the train rows, genres
    ss = load_spec(REPO / "specs" / "ml-1m-ctr-samples.toml").fuse.samples.model_copy(
        update={"path": str(tmp_path / "ml1m_samples.parquet")})
    feats = read_samples(ss, data)
    assert feats.arrays["extra_cat"].shape == (t.num_rows, 3) and feats.cat_vocab == [2 + 2, 7 + 2, 21 + 2]
    train = feats.arrays["split"] == 0
    year = feats.arrays["extra_num"][:, 0]
    assert abs(year[train].mean()) < 1e-3 and abs(year[train].std() - 1) < 1e-3
    first = np.flatnonzero(t["item_id"].to_numpy(zero_copy_only=False) == "1")[0]
    assert (feats.arrays["extra_multi"][first, 0] > 0).sum() == 3      # Animation, Children's, Comedy
