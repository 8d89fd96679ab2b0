"""Readers of raw behaviour logs (pyarrow). Each returns a `RawLog` with standard columns.

events: user (string), item (string), timestamp (int64), rating (float64, optional) and any
        other columns the format has (behavior, category, scenario ...), in file order.
items:  item (string) plus attributes (genres: list<string>, category: string, title ...) or None.
users:  user (string) plus profile attributes or None.

Malformed rows (too few/many fields, a non-numeric number) are counted and skipped; with
`strict = True` the first one raises an InputError naming the file and line.
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lumctl.errors import InputError

ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western"]


@dataclass
class RawLog:
    events: pa.Table
    items: pa.Table | None = None
    users: pa.Table | None = None
    malformed: int = 0
    files: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------ helpers
def _open_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(str(path), "file not found")
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise InputError(str(path), f"not a valid gzip file ({e})") from None
    return data


def _check_utf8(path: Path, data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"{path}:{line}", f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "is the encoding right for this format?") from None


def _physical_line(data: bytes, row_number: int) -> int:
    """File line of pyarrow's row `row_number` (1-based): pyarrow skips empty lines when numbering."""
    seen = 0
    for line_no, line in enumerate(data.split(b"\n"), start=1):
        if line not in (b"", b"\r"):
            seen += 1
            if seen == row_number:
                return line_no
    return row_number


def _read_delimited(path: Path, names: list[str], *, delimiter: str, strict: bool, header: bool = False,
                    encoding: str = "utf8", data: bytes | None = None,
                    numeric: dict[str, str] | None = None) -> tuple[pa.Table, int]:
    """Read a delimited text file as strings, then convert `numeric` columns ({name: 'int'|'float'}).
    Returns (table, malformed_rows)."""
    if data is None:
        data = _open_bytes(path)
    if encoding == "utf8":
        _check_utf8(path, data)
    if not data.strip():
        raise InputError(str(path), "empty file: no events")
    bad = {"n": 0, "first": None}

    def on_invalid(row):
        bad["n"] += 1
        if bad["first"] is None:
            bad["first"] = (row.number, row.expected_columns, row.actual_columns)
        return "error" if strict else "skip"

    read_opts = pacsv.ReadOptions(column_names=None if header else names, encoding=encoding,
                                  use_threads=not strict, skip_rows=0, block_size=1 << 24)
    parse_opts = pacsv.ParseOptions(delimiter=delimiter, quote_char=False if delimiter in "\t:" else '"',
                                    invalid_row_handler=on_invalid)
    conv = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False,
                                quoted_strings_can_be_null=False, null_values=[])
    try:
        table = pacsv.read_csv(pa.BufferReader(data), read_options=read_opts, parse_options=parse_opts,
                               convert_options=conv)
    except pa.ArrowInvalid as e:
        if bad["first"] is not None:
            num, exp, act = bad["first"]
            where = f"{path}:{_physical_line(data, num)}" if num is not None else str(path)
            raise InputError(where, f"expected {exp} fields, got {act}") from None
        raise InputError(str(path), f"cannot parse: {str(e).splitlines()[0]}") from None
    if header:
        missing = [n for n in names if n not in table.column_names]
        if missing:
            raise InputError(str(path), f"header lacks column(s) {missing} (has {table.column_names})")
        table = table.select(names)
    malformed = bad["n"]
    for name, kind in (numeric or {}).items():
        col = table[name]
        pattern = r"^\s*[-+]?\d+\s*$" if kind == "int" else r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
        ok = pc.match_substring_regex(col, pattern)
        n_bad = len(ok) - pc.sum(ok).as_py() if len(ok) else 0
        if n_bad:
            first = int(np.flatnonzero(~ok.to_numpy(zero_copy_only=False))[0])
            if strict:
                line = _physical_line(data, first + 1 + (1 if header else 0))
                raise InputError(f"{path}:{line}", f"field '{name}': expected a number, got {col[first].as_py()!r}")
            table = table.filter(ok)
            malformed += n_bad
        typ = pa.int64() if kind == "int" else pa.float64()
        table = table.set_column(table.column_names.index(name), name, pc.cast(pc.utf8_trim_whitespace(table[name]), typ))
    return table, malformed


def _need_dir(path: Path) -> Path:
    if not path.exists():
        raise InputError(str(path), "data folder not found")
    if not path.is_dir():
        raise InputError(str(path), "expected a folder for this format")
    return path


def _finish(events: pa.Table, path: Path, **kw) -> RawLog:
    if events.num_rows == 0:
        raise InputError(str(path), "no valid events in the log")
    return RawLog(events=events, **kw)


# ------------------------------------------------------------------------------------ formats
def read_movielens_1m(path: Path, strict: bool) -> RawLog:
    """MovieLens-1M `.dat` files (`::` separated, latin-1). Prefers a full ratings.dat[.gz]."""
    d = _need_dir(path)
    candidates = [d / "ratings.dat", d / "ratings.dat.gz", *sorted(d.glob("ratings*.dat.gz")), *sorted(d.glob("ratings*.dat"))]
    rfile = next((c for c in candidates if c.is_file()), None)
    if rfile is None:
        raise InputError(str(d / "ratings.dat"), "file not found (nor ratings*.dat.gz)")
    raw = _open_bytes(rfile).replace(b"::", b"\t")
    events, bad = _read_delimited(rfile, ["user", "item", "rating", "timestamp"], delimiter="\t", strict=strict,
                                  data=raw, numeric={"rating": "float", "timestamp": "int"})
    files = [rfile]
    items = users = None
    mfile = d / "movies.dat"
    if mfile.is_file():
        m, _ = _read_delimited(mfile, ["item", "title", "genres"], delimiter="\t", strict=strict,
                               encoding="latin1", data=_open_bytes(mfile).replace(b"::", b"\t"))
        items = m.set_column(2, "genres", pc.split_pattern(m["genres"], "|"))
        files.append(mfile)
    ufile = d / "users.dat"
    if ufile.is_file():
        users, _ = _read_delimited(ufile, ["user", "gender", "age", "occupation", "zip"], delimiter="\t",
                                   strict=strict, encoding="latin1", data=_open_bytes(ufile).replace(b"::", b"\t"))
        files.append(ufile)
    return _finish(events, rfile, items=items, users=users, malformed=bad, files=files)


def read_movielens_100k(path: Path, strict: bool) -> RawLog:
    """MovieLens-100K: u.data (tab), u.item and u.user ('|', latin-1)."""
    d = _need_dir(path)
    dfile = d / "u.data"
    events, bad = _read_delimited(dfile, ["user", "item", "rating", "timestamp"], delimiter="\t", strict=strict,
                                  numeric={"rating": "float", "timestamp": "int"})
    files = [dfile]
    items = users = None
    ifile = d / "u.item"
    if ifile.is_file():
        names = ["item", "title", "release", "video_release", "url"] + [f"g{k}" for k in range(19)]
        m, _ = _read_delimited(ifile, names, delimiter="|", strict=strict, encoding="latin1")
        flags = np.stack([m[f"g{k}"].to_numpy(zero_copy_only=False) == "1" for k in range(19)], axis=1)
        genres = [[ML100K_GENRES[k] for k in np.flatnonzero(row)] for row in flags]
        items = pa.table({"item": m["item"], "title": m["title"], "genres": pa.array(genres, pa.list_(pa.string()))})
        files.append(ifile)
    ufile = d / "u.user"
    if ufile.is_file():
        users, _ = _read_delimited(ufile, ["user", "age", "gender", "occupation", "zip"], delimiter="|",
                                   strict=strict, encoding="latin1")
        files.append(ufile)
    return _finish(events, dfile, items=items, users=users, malformed=bad, files=files)


def read_movielens_csv(path: Path, strict: bool) -> RawLog:
    """MovieLens-20M/25M: ratings.csv (userId,movieId,rating,timestamp) and movies.csv."""
    d = _need_dir(path)
    rfile = next((c for c in (d / "ratings.csv", d / "ratings.csv.gz") if c.is_file()), d / "ratings.csv")
    events, bad = _read_delimited(rfile, ["userId", "movieId", "rating", "timestamp"], delimiter=",", header=True,
                                  strict=strict, numeric={"rating": "float", "timestamp": "int"})
    events = events.rename_columns(["user", "item", "rating", "timestamp"])
    files = [rfile]
    items = None
    mfile = d / "movies.csv"
    if mfile.is_file():
        m, _ = _read_delimited(mfile, ["movieId", "title", "genres"], delimiter=",", header=True, strict=strict)
        items = pa.table({"item": m["movieId"], "title": m["title"], "genres": pc.split_pattern(m["genres"], "|")})
        files.append(mfile)
    return _finish(events, rfile, items=items, malformed=bad, files=files)


def read_amazon_json(path: Path, strict: bool) -> RawLog:
    """Amazon raw review JSON lines (optionally .gz): reviewerID, asin, overall, unixReviewTime."""
    data = _open_bytes(path)
    _check_utf8(path, data)
    if not data.strip():
        raise InputError(str(path), "empty file: no events")
    users, items, ratings, times = [], [], [], []
    bad = 0
    for n, line in enumerate(io.BytesIO(data), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            u, i, y, t = str(r["reviewerID"]), str(r["asin"]), float(r["overall"]), int(r["unixReviewTime"])
        except (ValueError, KeyError, TypeError) as e:
            if strict:
                raise InputError(f"{path}:{n}", f"malformed review ({type(e).__name__}: {e}); expected reviewerID, asin, overall, unixReviewTime") from None
            bad += 1
            continue
        users.append(u); items.append(i); ratings.append(y); times.append(t)
    events = pa.table({"user": pa.array(users, pa.string()), "item": pa.array(items, pa.string()),
                       "rating": pa.array(ratings, pa.float64()), "timestamp": pa.array(times, pa.int64())})
    return _finish(events, path, malformed=bad, files=[path])


def read_amazon_csv(path: Path, strict: bool) -> RawLog:
    """Amazon ratings-only CSV: user,item,rating,timestamp (no header)."""
    events, bad = _read_delimited(path, ["user", "item", "rating", "timestamp"], delimiter=",", strict=strict,
                                  numeric={"rating": "float", "timestamp": "int"})
    return _finish(events, path, malformed=bad, files=[path])


def read_seq_lines(path: Path, strict: bool) -> RawLog:
    """S3-Rec sequences: `user item item ...` per line, in time order. Timestamps are positions."""
    data = _open_bytes(path)
    _check_utf8(path, data)
    users, items, times = [], [], []
    bad = 0
    for n, line in enumerate(data.decode().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            if strict:
                raise InputError(f"{path}:{n}", "expected a user and at least one item, got 1 field")
            bad += 1
            continue
        users.extend([parts[0]] * (len(parts) - 1))
        items.extend(parts[1:])
        times.extend(range(len(parts) - 1))
    events = pa.table({"user": pa.array(users, pa.string()), "item": pa.array(items, pa.string()),
                       "timestamp": pa.array(times, pa.int64())})
    return _finish(events, path, malformed=bad, files=[path])


def read_seq_pairs(path: Path, strict: bool) -> RawLog:
    """SASRec/BERT4Rec: `user item` per line, grouped by user, time ordered. Timestamp = line."""
    events, bad = _read_delimited(path, ["user", "item"], delimiter=" ", strict=strict)
    events = events.append_column("timestamp", pa.array(np.arange(events.num_rows, dtype=np.int64)))
    return _finish(events, path, malformed=bad, files=[path])


def read_taobao(path: Path, strict: bool) -> RawLog:
    """Taobao UserBehavior CSV: user_id,item_id,category_id,behavior_type,timestamp (no header)."""
    events, bad = _read_delimited(path, ["user", "item", "category", "behavior", "timestamp"], delimiter=",",
                                  strict=strict, numeric={"timestamp": "int"})
    return _finish(events, path, malformed=bad, files=[path])


def _read_table_file(path: Path, mapping: dict[str, str], required: set[str], delimiter: str, header: bool,
                     strict: bool, numeric: dict[str, str]) -> tuple[pa.Table, int]:
    if not path.is_file():
        raise InputError(str(path), "file not found")
    if path.suffix in (".parquet", ".pq"):
        t = pq.read_table(path)
        missing = [c for c in mapping.values() if c not in t.column_names]
        if missing:
            raise InputError(str(path), f"columns {missing} not in the file (has {t.column_names})")
        bad = 0
    else:
        if not header:
            raise InputError(str(path), "headerless CSV needs the parquet form or a named format")
        cols = list(dict.fromkeys(mapping.values()))
        t, bad = _read_delimited(path, cols, delimiter=delimiter, header=True, strict=strict,
                                 numeric={mapping[k]: v for k, v in numeric.items() if k in mapping})
    inverse = {v: k for k, v in mapping.items()}
    t = t.rename_columns([inverse.get(c, c) for c in t.column_names])
    for k in {"user", "item"} & required:
        t = t.set_column(t.column_names.index(k), k, pc.cast(t[k], pa.string()))
    return t, bad


def read_table(path: Path, strict: bool, columns: dict[str, str], items_path: str = "",
               item_columns: dict[str, str] | None = None, delimiter: str = ",", header: bool = True) -> RawLog:
    """Any CSV/parquet with a column mapping {standard name: file column}."""
    events, bad = _read_table_file(path, columns, {"user", "item"}, delimiter, header, strict,
                                   {"timestamp": "int", "rating": "float"})
    events = events.set_column(events.column_names.index("timestamp"), "timestamp", pc.cast(events["timestamp"], pa.int64()))
    items = None
    files = [path]
    if items_path:
        ip = Path(items_path)
        items, _ = _read_table_file(ip, item_columns or {"item": "item"}, {"item"}, delimiter, header, strict, {})
        files.append(ip)
    return _finish(events, path, items=items, malformed=bad, files=files)


def read_log(spec, synth_dir: Path | None = None) -> RawLog:
    """Dispatch on `spec.format` (a TokenizeSpec)."""
    path = Path(spec.path) if spec.path else None
    fmt = spec.format
    if fmt == "synth":
        return read_table(synth_dir / "events.parquet", spec.strict, {"user": "user", "item": "item", "timestamp": "timestamp"},
                          str(synth_dir / "items.parquet"), {"item": "item"})
    if fmt == "table":
        return read_table(path, spec.strict, spec.columns, spec.items_path, spec.item_columns, spec.delimiter, spec.header)
    readers = {
        "movielens-1m": read_movielens_1m, "movielens-100k": read_movielens_100k, "movielens-csv": read_movielens_csv,
        "amazon-json": read_amazon_json, "amazon-csv": read_amazon_csv, "seq-lines": read_seq_lines,
        "seq-pairs": read_seq_pairs, "taobao": read_taobao,
    }
    if not path.exists():
        raise InputError(str(path), "data path not found")
    return readers[fmt](path, spec.strict)
