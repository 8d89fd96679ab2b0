"""The shipped specs on the real datasets in ../shared/data (skipped when the folder is absent).

Each test loads the shipped spec TOML and overrides only `store_root` (into tmp_path); the data
path comes from the spec's own `${LUMCTL_DATA:-...}`, with LUMCTL_DATA set to the data folder.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import DATA, REPO
from lumctl.spec_io import load_toml
from lumctl.specs import parse_spec
from lumctl.stages import pack, tokenize
from lumctl.store import read_manifest

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} not found")]

ML1M_FULL = any((DATA / "ml-1m" / n).is_file() for n in ("ratings.dat", "ratings.dat.gz"))

# users, items, events, as documented in shared/data/README.md
EXPECTED = {
    # the partial ratings file covers users 1-2999; the full file (when put beside it) all 6,040
    "ml-1m": (6040, 3706, 1_000_209) if ML1M_FULL else (2999, 3615, 487_650),
    "ml-100k": (943, 1682, 100_000),
    "beauty": (22_363, 12_101, 198_502),
}


def shipped_spec(name: str, tmp_path, monkeypatch, **pack_over):
    monkeypatch.setenv("LUMCTL_DATA", str(DATA))
    data = load_toml(REPO / "specs" / f"{name}.toml")  # `extends` recipes merged in
    data["store_root"] = str(tmp_path / "stores")
    if pack_over:
        data["pack"] = {**data.get("pack", {}), **pack_over}
    spec = parse_spec(data, f"specs/{name}.toml")
    assert spec.tokenize.path.startswith(str(DATA))
    return spec


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tokenize_counts(name, tmp_path, monkeypatch):
    spec = shipped_spec(name, tmp_path, monkeypatch)
    m = read_manifest(tokenize.run(spec))
    c = m["counts"]
    assert (c["users"], c["items"], c["events"]) == EXPECTED[name]
    assert c["malformed_rows"] == 0 and c["dropped_events"] == 0
    # leave-one-out: one valid and one test event per user
    assert c["valid_events"] == c["test_events"] == c["users"]
    assert c["train_events"] == c["events"] - 2 * c["users"]


def test_ml1m_store_contents(tmp_path, monkeypatch):
    spec = shipped_spec("ml-1m", tmp_path, monkeypatch)
    store = tokenize.run(spec)
    m = read_manifest(store)
    rfile = "ratings.dat" if ML1M_FULL else "ratings.users-1-2999.dat.gz"
    assert any(f.endswith(rfile) for f in m["files"])
    d = tokenize.load(store)
    assert list(d["vocab/cond_rating"]) == ["<pad>", "<any>", "low", "mid", "high"]
    assert len(d["vocab/genres"]) == 18 and "Film-Noir" in d["vocab/genres"]
    assert "Musical" in d["vocab/cond_genre"]
    assert d["users/gender"].shape == (EXPECTED["ml-1m"][0],)
    # the latin-1 movies file was read: item "73" (Misérables, Les) is Drama|Musical
    vocab = list(d["vocab/item"])
    genres = d["items/genres"][vocab.index("73")]
    assert sorted(d["vocab/genres"][genres.astype(bool)]) == ["Drama", "Musical"]
    first = d["users/offsets"][0], d["users/offsets"][1]
    assert d["vocab/user"][0] == "1" and first[1] - first[0] == 53  # user 1 has 53 ratings
    if not ML1M_FULL:
        np.testing.assert_array_equal(np.bincount(d["events/cond"][:, 0], minlength=5)[2:],
                                      [27_472 + 53_838, 127_216, 170_579 + 108_545])


def test_ml1m_pack_efficiency(tmp_path, monkeypatch):
    spec = shipped_spec("ml-1m", tmp_path, monkeypatch, seq_len=4096)
    tokenize.run(spec)
    m = read_manifest(pack.run(spec))
    c = m["counts"]
    assert c["seq_len"] == 4096 and c["users"] == EXPECTED["ml-1m"][0]
    assert c["efficiency"] >= 0.95
    assert c["efficiency"] > c["per_user_padding_efficiency"]
    assert c["rows"] * 4096 == c["packed_tokens"]


def test_amazon_json_real_file():
    from lumctl.readers import read_amazon_json
    path = DATA / "amazon" / "raw-5core" / "Musical_Instruments.json.gz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    log = read_amazon_json(path, strict=True)
    ev = log.events
    assert ev.num_rows == 10_261 and log.malformed == 0
    assert len(set(ev["user"].to_pylist())) == 1_429 and len(set(ev["item"].to_pylist())) == 900


def test_seq_pairs_real_file():
    from lumctl.readers import read_seq_pairs
    path = DATA / "amazon" / "sasrec" / "Video.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    log = read_seq_pairs(path, strict=True)
    ev = log.events
    assert ev.num_rows == 287_107
    assert len(set(ev["user"].to_pylist())) == 31_013 and len(set(ev["item"].to_pylist())) == 23_715


def test_same_data_at_another_path_is_up_to_date(tmp_path, monkeypatch):
    """The tokenize store knows its inputs by content: ML-100K reached through another path (links to the
    same files) with an unrelated file added to the folder leaves the store up to date."""
    spec = shipped_spec("ml-100k", tmp_path, monkeypatch)
    store = tokenize.run(spec)
    before = read_manifest(store)
    assert set(before["inputs"]) == {"u.data", "u.item", "u.user"}
    other = tmp_path / "elsewhere"
    (other / "ml-100k").mkdir(parents=True)
    for f in (DATA / "ml-100k").iterdir():                                  # the same files, linked
        (other / "ml-100k" / f.name).symlink_to(f)
    (other / "ml-100k" / "notes.txt").write_text("not an input")           # and an unrelated one
    monkeypatch.setenv("LUMCTL_DATA", str(other))
    data = load_toml(REPO / "specs" / "ml-100k.toml")
    moved = parse_spec({**data, "store_root": str(tmp_path / "stores")}, "specs/ml-100k.toml")
    assert moved.tokenize.path.startswith(str(other))
    tokenize.run(moved)
    assert read_manifest(store)["created"] == before["created"]  # not rewritten
