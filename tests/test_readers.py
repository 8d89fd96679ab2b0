"""Readers of every raw log format, on tiny files written into tmp_path."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lumctl.errors import InputError
from lumctl.readers import (
    read_amazon_csv,
    read_amazon_json,
    read_log,
    read_movielens_100k,
    read_movielens_1m,
    read_movielens_csv,
    read_seq_lines,
    read_seq_pairs,
    read_table,
    read_taobao,
)
from lumctl.specs import TokenizeSpec


def col(t: pa.Table, name: str) -> list:
    return t[name].to_pylist()


# ------------------------------------------------------------------------------ MovieLens-1M
ML1M_RATINGS = "1::1193::5::978300760\n1::661::3::978302109\n2::73::4::978298413\n"
ML1M_MOVIES = ("1::Toy Story (1995)::Animation|Children's|Comedy\n"
               "73::Misérables, Les (1995)::Drama|Musical\n"
               "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
               "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n")
ML1M_USERS = "1::F::1::10::48067\n2::M::56::16::70072\n"


def ml1m(tmp_path: Path, ratings: str = ML1M_RATINGS, name: str = "ratings.dat") -> Path:
    d = tmp_path / "ml-1m"
    d.mkdir(exist_ok=True)
    (d / "movies.dat").write_bytes(ML1M_MOVIES.encode("latin-1"))
    (d / "users.dat").write_bytes(ML1M_USERS.encode("latin-1"))
    data = ratings.encode()
    (d / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return d


def test_movielens_1m(tmp_path):
    d = ml1m(tmp_path)
    log = read_movielens_1m(d, strict=False)
    ev = log.events
    assert col(ev, "user") == ["1", "1", "2"]
    assert col(ev, "item") == ["1193", "661", "73"]
    assert col(ev, "rating") == [5.0, 3.0, 4.0]
    assert col(ev, "timestamp") == [978300760, 978302109, 978298413]
    assert ev.schema.field("timestamp").type == pa.int64() and ev.schema.field("rating").type == pa.float64()
    titles = dict(zip(col(log.items, "item"), col(log.items, "title")))
    assert titles["73"] == "Misérables, Les (1995)"  # latin-1 decoded
    genres = dict(zip(col(log.items, "item"), col(log.items, "genres")))
    assert genres["1"] == ["Animation", "Children's", "Comedy"]
    assert col(log.users, "gender") == ["F", "M"] and col(log.users, "age") == ["1", "56"]
    assert col(log.users, "zip") == ["48067", "70072"]
    assert log.malformed == 0
    assert log.files == [d / "ratings.dat", d / "movies.dat", d / "users.dat"]


def test_movielens_1m_prefers_full_ratings_over_partial(tmp_path):
    d = ml1m(tmp_path)
    (d / "ratings.users-1-2999.dat.gz").write_bytes(gzip.compress(b"9::1::1::1\n"))
    log = read_movielens_1m(d, strict=False)
    assert log.files[0] == d / "ratings.dat"
    assert col(log.events, "user") == ["1", "1", "2"]


def test_movielens_1m_falls_back_to_partial_gz(tmp_path):
    d = ml1m(tmp_path, name="ratings.users-1-2999.dat.gz")
    log = read_movielens_1m(d, strict=False)
    assert log.files[0] == d / "ratings.users-1-2999.dat.gz"
    assert log.events.num_rows == 3


def test_movielens_1m_prefers_ratings_dat_gz_over_partial(tmp_path):
    d = ml1m(tmp_path, name="ratings.users-1-2999.dat.gz", ratings="9::1::1::1\n")
    (d / "ratings.dat.gz").write_bytes(gzip.compress(ML1M_RATINGS.encode()))
    log = read_movielens_1m(d, strict=False)
    assert log.files[0] == d / "ratings.dat.gz" and log.events.num_rows == 3


def test_movielens_1m_needs_a_folder_with_ratings(tmp_path):
    with pytest.raises(InputError, match="data folder not found"):
        read_movielens_1m(tmp_path / "nope", strict=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"ratings\.dat: file not found"):
        read_movielens_1m(tmp_path / "empty", strict=False)
    f = tmp_path / "file.dat"
    f.write_text("x")
    with pytest.raises(InputError, match="expected a folder"):
        read_movielens_1m(f, strict=False)


def test_movielens_1m_bad_gzip(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "ratings.dat.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=r"ratings\.dat\.gz: not a valid gzip file"):
        read_movielens_1m(d, strict=False)


# ------------------------------------------------------------------------------ MovieLens-100K
def ml100k(tmp_path: Path, data: str = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t543\t5\t881250950\n") -> Path:
    d = tmp_path / "ml-100k"
    d.mkdir()
    (d / "u.data").write_text(data)
    flags_242 = ["0"] * 19
    flags_242[3] = flags_242[4] = flags_242[5] = "1"     # Animation, Children's, Comedy
    flags_543 = ["0"] * 19
    flags_543[8] = flags_543[12] = "1"                  # Drama, Musical
    rows = [
        ["242", "Kolya (1996)", "24-Jan-1997", "", "http://us.imdb.com/M/title-exact?Kolya%20(1996)"] + flags_242,
        ["302", "L.A. Confidential (1997)", "01-Jan-1997", "", "http://x"] + ["0"] * 19,
        ["543", "Misérables, Les (1995)", "01-Jan-1995", "", "http://x"] + flags_543,
    ]
    (d / "u.item").write_bytes("".join("|".join(r) + "\n" for r in rows).encode("latin-1"))
    (d / "u.user").write_text("196|49|M|writer|55105\n186|39|F|executive|00000\n")
    return d


def test_movielens_100k(tmp_path):
    d = ml100k(tmp_path)
    log = read_movielens_100k(d, strict=False)
    ev = log.events
    assert col(ev, "user") == ["196", "186", "196"] and col(ev, "item") == ["242", "302", "543"]
    assert col(ev, "rating") == [3.0, 3.0, 5.0] and col(ev, "timestamp")[0] == 881250949
    items = {r["item"]: r for r in log.items.to_pylist()}
    assert len(log.items.column_names) == 3  # item, title, genres
    assert items["242"]["genres"] == ["Animation", "Children's", "Comedy"]
    assert items["302"]["genres"] == []
    assert items["543"]["genres"] == ["Drama", "Musical"] and items["543"]["title"] == "Misérables, Les (1995)"
    users = log.users.to_pylist()
    assert users[0] == {"user": "196", "age": "49", "gender": "M", "occupation": "writer", "zip": "55105"}
    assert users[1]["zip"] == "00000"  # zip codes stay strings


# ------------------------------------------------------------------------------ MovieLens CSV
def test_movielens_csv(tmp_path):
    d = tmp_path / "ml-20m"
    d.mkdir()
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,4.0,1112484676\n")
    (d / "movies.csv").write_text('movieId,title,genres\n2,"Jumanji, The (1995)",Adventure|Children|Fantasy\n'
                                  '29,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama\n')
    log = read_movielens_csv(d, strict=False)
    assert log.events.column_names == ["user", "item", "rating", "timestamp"]
    assert col(log.events, "rating") == [3.5, 4.0] and col(log.events, "item") == ["2", "29"]
    assert col(log.items, "title")[0] == "Jumanji, The (1995)"
    assert col(log.items, "title")[1].startswith("City of Lost Children, The (Cité")
    assert col(log.items, "genres")[0] == ["Adventure", "Children", "Fantasy"]


def test_movielens_csv_header_must_have_columns(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "ratings.csv").write_text("user,movie,rating,timestamp\n1,2,3.5,1\n")
    with pytest.raises(InputError, match=r"ratings\.csv: header lacks column"):
        read_movielens_csv(d, strict=False)


# ------------------------------------------------------------------------------ Amazon
def amazon_json(tmp_path: Path, extra: list[str] = ()) -> Path:
    rows = [{"reviewerID": "A2IBPI20UZIR0U", "asin": "1384719342", "overall": 5.0, "unixReviewTime": 1393545600,
             "reviewText": "Not much to write about here, but it does exactly what it's supposed to."},
            {"reviewerID": "A14VAT5EAX3D9S", "asin": "1384719342", "overall": 3.0, "unixReviewTime": 1363392000}]
    lines = [json.dumps(r) for r in rows] + list(extra)
    p = tmp_path / "reviews.json.gz"
    p.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    return p


def test_amazon_json(tmp_path):
    log = read_amazon_json(amazon_json(tmp_path), strict=False)
    assert col(log.events, "user") == ["A2IBPI20UZIR0U", "A14VAT5EAX3D9S"]
    assert col(log.events, "item") == ["1384719342"] * 2
    assert col(log.events, "rating") == [5.0, 3.0] and col(log.events, "timestamp") == [1393545600, 1363392000]


def test_amazon_json_plain_file(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('{"reviewerID": "u", "asin": "i", "overall": 4, "unixReviewTime": 7}\n')
    assert read_amazon_json(p, strict=False).events.num_rows == 1


def test_amazon_csv(tmp_path):
    p = tmp_path / "ratings_Books.csv"
    p.write_text("AH2L9G3DQHHAJ,0000000116,4.0,1019865600\nA2IIIDRK3PRRZY,0000000116,1.0,1395619200\n")
    log = read_amazon_csv(p, strict=False)
    assert col(log.events, "user") == ["AH2L9G3DQHHAJ", "A2IIIDRK3PRRZY"]
    assert col(log.events, "item") == ["0000000116"] * 2  # leading zeros kept: ids are strings
    assert col(log.events, "rating") == [4.0, 1.0]


# ------------------------------------------------------------------------------ sequences
def test_seq_lines(tmp_path):
    p = tmp_path / "Beauty.txt"
    p.write_text("1 2 3 4\n2 5 6\n\n3 7 2 8 9\n")
    log = read_seq_lines(p, strict=False)
    assert col(log.events, "user") == ["1"] * 3 + ["2"] * 2 + ["3"] * 4
    assert col(log.events, "item") == ["2", "3", "4", "5", "6", "7", "2", "8", "9"]
    assert col(log.events, "timestamp") == [0, 1, 2, 0, 1, 0, 1, 2, 3]  # positions
    assert "rating" not in log.events.column_names


def test_seq_pairs(tmp_path):
    p = tmp_path / "Video.txt"
    p.write_text("1 10\n1 11\n2 10\n2 12\n2 13\n")
    log = read_seq_pairs(p, strict=False)
    assert col(log.events, "user") == ["1", "1", "2", "2", "2"]
    assert col(log.events, "item") == ["10", "11", "10", "12", "13"]
    assert col(log.events, "timestamp") == [0, 1, 2, 3, 4]  # line order


def test_taobao(tmp_path):
    p = tmp_path / "UserBehavior.csv"
    p.write_text("1,2268318,2520377,pv,1511544070\n1,2333346,2520771,buy,1511561733\n")
    log = read_taobao(p, strict=False)
    assert col(log.events, "behavior") == ["pv", "buy"]
    assert col(log.events, "category") == ["2520377", "2520771"]
    assert col(log.events, "timestamp") == [1511544070, 1511561733]


# ------------------------------------------------------------------------------ table
TABLE_MAP = {"user": "uid", "item": "iid", "timestamp": "when", "rating": "stars"}


def test_table_csv_with_header_and_mapping(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("when,uid,iid,stars,extra\n100,u1,i1,4.5,x\n200,u1,i2,3,y\n150,u2,i1,1,z\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,cat\ni1,c1\ni2,c2\n")
    log = read_table(p, False, TABLE_MAP, str(items), {"item": "item_id", "category": "cat"})
    ev = log.events
    assert set(ev.column_names) == {"user", "item", "timestamp", "rating"}
    assert col(ev, "user") == ["u1", "u1", "u2"] and col(ev, "timestamp") == [100, 200, 150]
    assert col(ev, "rating") == [4.5, 3.0, 1.0]
    assert col(log.items, "item") == ["i1", "i2"] and col(log.items, "category") == ["c1", "c2"]
    assert log.files == [p, items]


def test_table_parquet_with_mapping(tmp_path):
    p = tmp_path / "log.parquet"
    pq.write_table(pa.table({"uid": [7, 7, 8], "iid": [1, 2, 1], "when": pa.array([3, 4, 5], pa.int32()),
                             "stars": [1.0, 2.0, 3.0]}), p)
    log = read_table(p, False, TABLE_MAP)
    ev = log.events
    assert col(ev, "user") == ["7", "7", "8"] and col(ev, "item") == ["1", "2", "1"]  # ids become strings
    assert ev.schema.field("timestamp").type == pa.int64() and col(ev, "timestamp") == [3, 4, 5]
    with pytest.raises(InputError, match=r"log\.parquet: columns \['nope'\] not in the file"):
        read_table(p, False, {**TABLE_MAP, "user": "nope"})


def test_table_through_read_log(tmp_path):
    p = tmp_path / "log.tsv"
    p.write_text("u\ti\tt\na\tx\t1\n")
    spec = TokenizeSpec(format="table", path=str(p), delimiter="\t",
                        columns={"user": "u", "item": "i", "timestamp": "t"})
    assert read_log(spec).events.to_pylist() == [{"user": "a", "item": "x", "timestamp": 1}]


def test_table_headerless_csv_is_refused(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("a,x,1\n")
    with pytest.raises(InputError, match="headerless CSV"):
        read_table(p, False, {"user": "u", "item": "i", "timestamp": "t"}, header=False)


def test_read_log_dispatch_and_missing_path(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("1 2 3\n")
    assert read_log(TokenizeSpec(format="seq-lines", path=str(p))).events.num_rows == 2
    with pytest.raises(InputError, match="data path not found"):
        read_log(TokenizeSpec(format="seq-lines", path=str(tmp_path / "none.txt")))


# ------------------------------------------------------------------------------ malformed rows
def _ml1m_dir(tmp_path, text):
    return ml1m(tmp_path, ratings=text)


def _ml100k_dir(tmp_path, text):
    return ml100k(tmp_path, data=text)


def _file(name):
    def make(tmp_path, text):
        p = tmp_path / name
        p.write_text(text)
        return p
    return make


def _csv_dir(tmp_path, text):
    d = tmp_path / "ml-csv"
    d.mkdir()
    (d / "ratings.csv").write_text(text)
    return d


def _json_gz(tmp_path, text):
    p = tmp_path / "r.json.gz"
    p.write_bytes(gzip.compress(text.encode()))
    return p


def _table(tmp_path, text):
    p = tmp_path / "t.csv"
    p.write_text(text)
    return p


J = '{"reviewerID": "u%d", "asin": "i", "overall": 5.0, "unixReviewTime": 1}'

# (reader, writer of the file, text, bad line number, good rows, malformed rows, message pattern)
MALFORMED = [
    pytest.param(read_movielens_1m, _ml1m_dir, "1::1::5::1\n1::2::5\n1::3::4::3\n", 2, 2, 1,
                 r"ratings\.dat:2: expected 4 fields, got 3", id="ml1m-few-fields"),
    pytest.param(read_movielens_1m, _ml1m_dir, "1::1::5::1\n1::2::5::2\n1::3::four::3\n", 3, 2, 1,
                 r"ratings\.dat:3: field 'rating': expected a number, got 'four'", id="ml1m-not-a-number"),
    pytest.param(read_movielens_100k, _ml100k_dir, "1\t1\t5\t1\n1\t2\t5\t2\t9\n1\t3\t4\t3\n", 2, 2, 1,
                 r"u\.data:2: expected 4 fields, got 5", id="ml100k-many-fields"),
    pytest.param(read_movielens_csv, _csv_dir, "userId,movieId,rating,timestamp\n1,1,5,1\n1,2,5,x\n", 3, 1, 1,
                 r"ratings\.csv:3: field 'timestamp': expected a number, got 'x'", id="mlcsv-not-a-number"),
    pytest.param(read_amazon_csv, _file("a.csv"), "u,i,5.0,1\nu,i,5.0\nu,j,4.0,2\n", 2, 2, 1,
                 r"a\.csv:2: expected 4 fields, got 3", id="amazon-csv-few-fields"),
    pytest.param(read_amazon_json, _json_gz, f"{J % 1}\n{{broken\n{J % 3}\n", 2, 2, 1,
                 r"r\.json\.gz:2: malformed review", id="amazon-json-broken"),
    pytest.param(read_amazon_json, _json_gz, f'{J % 1}\n{J % 2}\n{{"reviewerID": "u", "overall": 1}}\n', 3, 2, 1,
                 r"r\.json\.gz:3: malformed review \(KeyError", id="amazon-json-missing-key"),
    pytest.param(read_seq_lines, _file("s.txt"), "1 2 3\n7\n2 4 5\n", 2, 4, 1,
                 r"s\.txt:2: expected a user and at least one item", id="seq-lines-one-field"),
    pytest.param(read_seq_pairs, _file("p.txt"), "1 2\n1 3\n1\n2 4\n", 3, 3, 1,
                 r"p\.txt:3: expected 2 fields, got 1", id="seq-pairs-few-fields"),
    pytest.param(read_taobao, _file("t.csv"), "1,2,3,pv,10\n1,2,3,pv\n1,4,3,buy,12\n", 2, 2, 1,
                 r"t\.csv:2: expected 5 fields, got 4", id="taobao-few-fields"),
    pytest.param(lambda p, strict: read_table(p, strict, {"user": "u", "item": "i", "timestamp": "t"}),
                 _table, "u,i,t\na,x,1\nb,y,z\n", 3, 1, 1,
                 r"t\.csv:3: field 't': expected a number, got 'z'", id="table-not-a-number"),
]


@pytest.mark.parametrize("reader, make, text, line, good, bad, pattern", MALFORMED)
def test_malformed_rows_skipped_or_strict(tmp_path, reader, make, text, line, good, bad, pattern):
    path = make(tmp_path, text)
    log = reader(path, strict=False)
    assert log.events.num_rows == good
    assert log.malformed == bad
    with pytest.raises(InputError, match=pattern) as e:
        reader(path, strict=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert f":{line}: " in msg


def test_strict_line_numbers_count_blank_lines(tmp_path):
    # pyarrow numbers rows without the empty lines; the error must still name the file's line
    p = tmp_path / "p.txt"
    p.write_text("1 2\n\n1 3\n\n\n1 4 5\n2 4\n")
    with pytest.raises(InputError, match=r"p\.txt:6: expected 2 fields, got 3"):
        read_seq_pairs(p, strict=True)
    p = tmp_path / "a.csv"
    p.write_text("u,i,5,1\n\nu,i,5,x\n")
    with pytest.raises(InputError, match=r"a\.csv:3: field 'timestamp'"):
        read_amazon_csv(p, strict=True)
    assert read_seq_pairs(tmp_path / "p.txt", strict=False).malformed == 1


def test_many_malformed_rows_are_all_counted(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("".join(f"u{k},i,5,{k}\n" if k % 3 else f"u{k},i\n" for k in range(30)))
    log = read_amazon_csv(p, strict=False)
    assert log.malformed == 10 and log.events.num_rows == 20


@pytest.mark.parametrize("reader, name", [(read_seq_lines, "s.txt"), (read_seq_pairs, "p.txt"),
                                          (read_amazon_csv, "a.csv"), (read_amazon_json, "r.json")])
def test_non_utf8_is_an_input_error(tmp_path, reader, name):
    p = tmp_path / name
    p.write_bytes(b"1 2 3\n2 \xff 4\n")
    with pytest.raises(InputError, match=rf"{name}:2: not UTF-8 text \(byte 0xff"):
        reader(p, strict=False)


@pytest.mark.parametrize("reader", [read_seq_lines, read_seq_pairs, read_amazon_csv, read_amazon_json, read_taobao])
def test_empty_file_is_an_input_error(tmp_path, reader):
    p = tmp_path / "empty.txt"
    p.write_text("\n")
    with pytest.raises(InputError, match=r"empty\.txt: (empty file|no valid events)"):
        reader(p, strict=False)


def test_all_rows_malformed_is_an_input_error(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("1\n2\n")
    with pytest.raises(InputError, match=r"p\.txt: no valid events in the log"):
        read_seq_lines(p, strict=False)
