"""Labelled sample tables ([fuse.samples]): read in batches, validate, map raw ids, encode features.

A sample table is CSV (gzip accepted) or parquet, one file or a folder, local or an fsspec URL. It is
read by pyarrow.dataset, fragment by fragment and `batch_rows` rows at a time; every column becomes
an Arrow or NumPy array per batch (no Python object per row). A bad table stops with one line naming
the file, the column and the problem: a missing column, a label that is not 0/1, an unparseable
timestamp, a column of the wrong type, an empty table.

Raw ids map through the tokenize vocabularies (vocab/user, vocab/item): an unseen user is -1 (no
history, no LUM answers, unknown profile), an unseen item the unknown id 1; both are counted.
A sample's history is its user's events in the tokenize store with a timestamp strictly before the
sample's (`history_bounds`), as in the derived protocol.

Features (fuse): categorical columns -> ids (0 pad, 1 unknown or null, 2.. the train rows' values in
sorted order); multi-valued -> [S, max_values] ids the same way; numeric -> float32 normalised by the
train rows' statistics (none, standard, log), missing values 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.dataset as ds

from lumctl.errors import InputError
from lumctl.specs import SamplesSpec

PARTS = {"train": 0, "valid": 1, "test": 2, "0": 0, "1": 1, "2": 2}


# ------------------------------------------------------------------------------------ reading
def open_dataset(path: str, ss: SamplesSpec) -> ds.Dataset:
    """The table at `path` (file or folder, local or fsspec URL) as a pyarrow dataset."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise InputError(path, "sample table not found")
    files = sorted(f for f in fs.find(root) if not f.rsplit("/", 1)[-1].startswith((".", "_"))) \
        if fs.isdir(root) else [root]
    if not files:
        raise InputError(path, "the sample table is empty (no files)")
    kind = ss.format
    if kind == "auto":
        kind = "parquet" if files[0].endswith((".parquet", ".pq")) else "csv"
    if kind == "csv":  # every declared column as text; parse_batch checks and converts it
        cols = [ss.user, ss.item, ss.timestamp, ss.label, *ss.feature_columns()] + \
            ([ss.split_column] if ss.split_column else [])
        fmt = ds.CsvFileFormat(parse_options=pcsv.ParseOptions(delimiter=ss.delimiter),
                               convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in cols}))
    else:
        fmt = ds.ParquetFileFormat()
    try:
        return ds.dataset(files, filesystem=PyFileSystem(FSSpecHandler(fs)), format=fmt)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(path, f"cannot read the sample table: {e}") from None


def sample_table_hash(path: str) -> str:
    """Identity of a sample table: content hashes of local files, size and modification/etag of remote ones."""
    import fsspec

    from lumctl.store import hash_file, hash_obj
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise InputError(path, "sample table not found")
    files = sorted(fs.find(root)) if fs.isdir(root) else [root]
    if "file" in fs.protocol:
        return hash_obj({f: hash_file(f) for f in files})
    return hash_obj({f: {k: v for k, v in fs.info(f).items() if k in ("size", "mtime", "ETag", "etag", "LastModified")}
                     for f in files})


def required_columns(ss: SamplesSpec, label: bool) -> list[str]:
    return [ss.user, ss.item, ss.timestamp] + ([ss.label] if label else []) + ss.feature_columns() + \
        ([ss.split_column] if ss.split_column else [])


def iter_batches(dset: ds.Dataset, ss: SamplesSpec, columns: list[str],
                 read_all: bool = False) -> Iterator[tuple[str, pa.RecordBatch]]:
    """(file, batch) of `columns` (every column with read_all), file by file; a missing column is an error
    naming the file."""
    for frag in dset.get_fragments():
        try:
            have = frag.physical_schema.names
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(frag.path, f"cannot read: {e}") from None
        missing = [c for c in columns if c not in have]
        if missing:
            raise InputError(frag.path, f"column '{missing[0]}': missing (columns: {have})")
        try:
            for b in frag.to_batches(columns=None if read_all else columns, batch_size=ss.batch_rows):
                if b.num_rows:
                    yield frag.path, b
        except pa.ArrowInvalid as e:
            raise InputError(frag.path, f"cannot read: {e}") from None


def _bad_value(err: Exception) -> str:
    m = re.search(r"'(.*?)'", str(err))
    return m.group(1) if m else str(err)


def _int_column(a: pa.Array, file: str, col: str, what: str, want: str = "must be whole numbers") -> np.ndarray:
    """Integers (int, bool, whole floats or text) -> int64; the first bad value is an error."""
    t = a.type
    if a.null_count:
        raise InputError(file, f"column '{col}': {what} is missing in {a.null_count} row(s)")
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return a.cast(pa.int64()).to_numpy()
    if pa.types.is_floating(t):
        x = a.to_numpy()
        bad = x != np.round(x)
        if bad.any():
            raise InputError(file, f"column '{col}': {what} {want} (got {x[bad][0]})")
        return x.astype(np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        a = pc.utf8_trim_whitespace(a)
        try:
            return pc.cast(a, pa.int64()).to_numpy()
        except pa.ArrowInvalid:
            pass
        try:  # "1.0"
            return _int_column(pc.cast(a, pa.float64()), file, col, what, want)
        except pa.ArrowInvalid as e:
            raise InputError(file, f"column '{col}': {what} {want} (got '{_bad_value(e)}')") from None
    raise InputError(file, f"column '{col}': wrong type {t} for {what} (want integers)")


def parse_label(a: pa.Array, file: str, col: str) -> np.ndarray:
    y = _int_column(a, file, col, "the label", "must be 0 or 1")
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise InputError(file, f"column '{col}': the label must be 0 or 1 (got {y[bad][0]})")
    return y.astype(np.float32)


def parse_timestamp(a: pa.Array, file: str, col: str) -> np.ndarray:
    """int64 seconds from integers, timestamp / date types or text (integer seconds or ISO 8601)."""
    t = a.type
    if a.null_count:
        raise InputError(file, f"column '{col}': unparseable timestamp (missing in {a.null_count} row(s))")
    if pa.types.is_integer(t):
        return a.cast(pa.int64()).to_numpy()
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return pc.cast(a.cast(pa.timestamp("s", tz=getattr(t, "tz", None))), pa.int64()).to_numpy()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        a = pc.utf8_trim_whitespace(a)
        is_int = pc.match_substring_regex(a, r"^[+-]?\d+$")
        out = pc.cast(pc.if_else(is_int, a, pa.scalar(None, pa.string())), pa.int64())
        if pc.all(is_int).as_py():
            return out.to_numpy()
        iso = pc.if_else(is_int, pa.scalar(None, pa.string()), a)
        err = None
        for tz in (None, "UTC"):  # naive ISO 8601, then with a zone offset
            try:
                secs = pc.cast(pc.cast(iso, pa.timestamp("s", tz=tz)), pa.int64())
                return pc.if_else(is_int, out, secs).to_numpy()
            except pa.ArrowInvalid as e:
                err = e
        raise InputError(file, f"column '{col}': unparseable timestamp '{_bad_value(err)}' "
                         "(want integer seconds or ISO 8601)")
    raise InputError(file, f"column '{col}': wrong type {t} for a timestamp (want integer seconds, a timestamp "
                     "or ISO 8601 text)")


def parse_numeric(a: pa.Array, file: str, col: str) -> np.ndarray:
    t = a.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        a = pc.if_else(pc.equal(pc.utf8_trim_whitespace(a), ""), pa.scalar(None, t), a)  # empty = missing
        try:
            a = pc.cast(a, pa.float64())
        except pa.ArrowInvalid as e:
            raise InputError(file, f"column '{col}': wrong type for a numeric feature (got '{_bad_value(e)}')") from None
    elif not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise InputError(file, f"column '{col}': wrong type {t} for a numeric feature")
    return a.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN


def parse_ids(a: pa.Array, file: str, col: str) -> pa.Array:
    """Raw ids as text (integers and text accepted; nulls are an error)."""
    t = a.type
    if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise InputError(file, f"column '{col}': wrong type {t} for ids (want integers or text)")
    if a.null_count:
        raise InputError(file, f"column '{col}': id missing in {a.null_count} row(s)")
    return pc.utf8_trim_whitespace(a.cast(pa.string())) if not pa.types.is_integer(t) else a.cast(pa.string())


def parse_split(a: pa.Array, file: str, col: str) -> np.ndarray:
    s = pc.utf8_lower(pc.utf8_trim_whitespace(a.cast(pa.string())))
    code = pc.index_in(s, value_set=pa.array(list(PARTS)))
    if code.null_count:
        bad = pc.filter(s, pc.is_null(code))[0]
        raise InputError(file, f"column '{col}': split must be train/valid/test or 0/1/2 (got '{bad}')")
    return np.asarray(list(PARTS.values()), np.int8)[code.to_numpy()]


def parse_text(a: pa.Array, file: str, col: str) -> pa.Array:
    t = a.type
    if pa.types.is_list(t) or pa.types.is_nested(t) or pa.types.is_binary(t):
        raise InputError(file, f"column '{col}': wrong type {t} for a categorical feature")
    return a.cast(pa.string())


def parse_multi(a: pa.Array, file: str, col: str, delimiter: str) -> pa.Array:
    """A list<string> array of the values of each row (text split at the delimiter, or a list column)."""
    t = a.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return a.cast(pa.list_(pa.string()))
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise InputError(file, f"column '{col}': wrong type {t} for a multi-valued feature (want text or a list)")
    return pc.split_pattern(a.cast(pa.string()), delimiter)


# ------------------------------------------------------------------------------------ ids
class IdMap:
    """Raw id text -> index in a tokenize vocabulary (`offset` leading special entries skipped); -1 unseen.
    Integer ids look up by binary search on their integer values; other ids by pyarrow's hash lookup."""

    def __init__(self, vocab: np.ndarray, offset: int = 0):
        self.offset = offset
        v = np.asarray(vocab[offset:])                                   # str or numpy StringDType
        self.ints = None
        try:
            iv = v.astype(np.int64)
            if np.all(np.diff(iv) > 0) and np.array_equal(iv.astype(v.dtype), v):
                self.ints = iv
        except (ValueError, OverflowError):
            pass
        self.values = pa.array(v) if self.ints is None else None

    def __call__(self, ids: pa.Array) -> np.ndarray:
        if self.ints is not None:
            try:
                x = pc.cast(ids, pa.int64()).to_numpy()
            except pa.ArrowInvalid:
                x = None
            if x is not None:
                if not len(self.ints):
                    return np.full(len(x), -1, np.int64)
                k = np.clip(np.searchsorted(self.ints, x), 0, len(self.ints) - 1)
                return np.where(self.ints[k] == x, k + self.offset, -1).astype(np.int64)
            values = pa.array(self.ints.astype(str))
        else:
            values = self.values
        k = pc.index_in(ids, value_set=values)
        return np.where(pc.is_null(k).to_numpy(zero_copy_only=False), -1,
                        k.fill_null(0).to_numpy().astype(np.int64) + self.offset)


def history_bounds(data: dict, user: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: (user_start, hist_end), the tokenize-store events of its user with timestamp < ts are
    [user_start, hist_end); unseen users (-1) get an empty range. Events are grouped by user and time
    ordered, so one binary search on the key (user, rank of the timestamp) finds each end."""
    offsets, ev_ts = data["users/offsets"], data["events/timestamp"]
    ev_user = data["events/user"].astype(np.int64)
    uniq = np.unique(ev_ts)
    width = len(uniq) + 1
    key_ev = ev_user * width + np.searchsorted(uniq, ev_ts)                  # ascending
    u = np.maximum(user, 0)
    end = np.searchsorted(key_ev, u * width + np.searchsorted(uniq, ts, "left"), "left")
    start = offsets[u]
    seen = user >= 0
    return np.where(seen, start, 0).astype(np.int64), np.where(seen, end, 0).astype(np.int64)


# ------------------------------------------------------------------------------------ features
def _vocab(train_values: pa.Array) -> pa.Array:
    v = pc.unique(train_values.drop_null())
    return v.take(pc.array_sort_indices(v))


def encode_categorical(values: pa.ChunkedArray, train: np.ndarray) -> tuple[np.ndarray, int]:
    """[S] ids (0 pad, 1 unknown/null, 2.. the train rows' values, sorted), vocabulary size."""
    a = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    vocab = _vocab(a.filter(pa.array(train)))
    k = pc.index_in(a, value_set=vocab)
    return (k.fill_null(-1).to_numpy().astype(np.int64) + 2).clip(1).astype(np.int32), len(vocab) + 2


def encode_multi(values: pa.ChunkedArray, train: np.ndarray, K: int) -> tuple[np.ndarray, int]:
    """[S, K] ids of each row's first K values (0 pad), vocabulary size."""
    a = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    a = pc.if_else(pc.is_null(a), pa.scalar([], a.type), a)                     # null rows: no values
    offs = a.offsets.to_numpy().astype(np.int64) - a.offsets[0].as_py()
    flat = a.flatten()
    n = np.diff(offs)
    row_train = np.repeat(train, n)
    flat = pc.if_else(pc.equal(flat, ""), pa.scalar(None, pa.string()), flat)   # "a||b": no empty value
    vocab = _vocab(flat.filter(pa.array(row_train)))
    code = pc.index_in(flat, value_set=vocab).fill_null(-1).to_numpy().astype(np.int64) + 2   # [V] 1 = unknown
    code = np.where(pc.is_null(flat).to_numpy(zero_copy_only=False), 0, code)
    idx = offs[:-1, None] + np.arange(K)                                          # (S, K)
    ok = idx < offs[1:, None]
    return np.where(ok, code[np.minimum(idx, max(len(code) - 1, 0))] if len(code) else 0, 0).astype(np.int32), \
        len(vocab) + 2


def normalise(x: np.ndarray, how: str, train: np.ndarray) -> np.ndarray:
    """float32 [S]: none, standard ((x - mean) / std of train rows) or log (sign(x) log1p|x|); NaN -> 0."""
    if how == "log":
        x = np.sign(x) * np.log1p(np.abs(x))
    elif how == "standard":
        t = x[train & np.isfinite(x)]
        mean, std = (float(t.mean()), float(t.std())) if len(t) else (0.0, 1.0)
        x = (x - mean) / (std if std > 0 else 1.0)
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


# ------------------------------------------------------------------------------------ fuse samples
@dataclass
class SampleTable:
    arrays: dict[str, np.ndarray]                       # user, item, ts, label, split, event, group, extra_*
    counts: dict = field(default_factory=dict)
    cat_vocab: list[int] = field(default_factory=list)
    multi_vocab: list[int] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def read_samples(ss: SamplesSpec, data: dict) -> SampleTable:
    """The whole sample table for fuse: ids mapped, split, label, features encoded, history bounds."""
    if not ss.split_column and ss.valid_from is None:
        raise InputError("[fuse.samples]", "the split needs split_column or valid_from and test_from")
    dset = open_dataset(ss.path, ss)
    cols = required_columns(ss, label=True)
    users, items = IdMap(data["vocab/user"]), IdMap(data["vocab/item"], offset=2)
    parts: dict[str, list] = {k: [] for k in ("user", "item", "ts", "label", "split")}
    unseen_raw, raw_cat, raw_multi, num = [], {c: [] for c in ss.categorical}, {c: [] for c in ss.multi_valued}, \
        {c: [] for c in ss.numeric}
    for file, b in iter_batches(dset, ss, cols):
        uraw = parse_ids(b.column(ss.user), file, ss.user)
        u = users(uraw)
        i = items(parse_ids(b.column(ss.item), file, ss.item))
        ts = parse_timestamp(b.column(ss.timestamp), file, ss.timestamp)
        parts["user"].append(u)
        parts["item"].append(np.where(i < 0, 1, i))
        parts["ts"].append(ts)
        parts["label"].append(parse_label(b.column(ss.label), file, ss.label))
        if ss.split_column:
            parts["split"].append(parse_split(b.column(ss.split_column), file, ss.split_column))
        else:
            parts["split"].append(np.where(ts < ss.valid_from, 0, np.where(ts < ss.test_from, 1, 2)).astype(np.int8))
        unseen_raw.append(uraw.filter(pa.array(u < 0)))
        for c in ss.categorical:
            raw_cat[c].append(parse_text(b.column(c), file, c))
        for c, d in ss.multi_valued.items():
            raw_multi[c].append(parse_multi(b.column(c), file, c, d))
        for c in ss.numeric:
            num[c].append(parse_numeric(b.column(c), file, c))
    if not parts["user"]:
        raise InputError(ss.path, "the sample table is empty (no rows)")
    a = {k: np.concatenate(v) for k, v in parts.items()}
    S = len(a["user"])
    a["event"] = np.arange(S, dtype=np.int64)                                  # the row of the table
    # GAUC groups: tokenize users by index, unseen users by their raw id after them
    U = len(data["users/offsets"]) - 1
    group = a["user"].copy()
    if (group < 0).any():
        codes = pc.dictionary_encode(pa.concat_arrays(unseen_raw)).indices.to_numpy()
        group[group < 0] = U + codes
    a["group"] = group
    a["user_start"], a["hist_end"] = history_bounds(data, a["user"], a["ts"])
    train = a["split"] == 0
    st = SampleTable(a, files=[f.path for f in dset.get_fragments()])
    if ss.categorical:
        enc = [encode_categorical(pa.chunked_array(raw_cat[c]), train) for c in ss.categorical]
        a["extra_cat"] = np.stack([e[0] for e in enc], 1)                     # (S, C)
        st.cat_vocab = [e[1] for e in enc]
    if ss.multi_valued:
        enc = [encode_multi(pa.chunked_array(raw_multi[c]), train, ss.max_values) for c in ss.multi_valued]
        a["extra_multi"] = np.stack([e[0] for e in enc], 1)                   # (S, M, K)
        st.multi_vocab = [e[1] for e in enc]
    if ss.numeric:
        a["extra_num"] = np.stack([normalise(np.concatenate(num[c]), how, train)
                                   for c, how in ss.numeric.items()], 1)      # (S, R)
    st.counts = {"rows": S, "train": int(train.sum()), "valid": int((a["split"] == 1).sum()),
                 "test": int((a["split"] == 2).sum()), "unseen_user_rows": int((a["user"] < 0).sum()),
                 "unseen_users": int(len(np.unique(group[a["user"] < 0]))),
                 "unseen_item_rows": int((a["item"] == 1).sum()),
                 "positive_rate": float(a["label"].mean())}
    for k in ("train", "valid", "test"):
        if not st.counts[k]:
            raise InputError(ss.path, f"no {k} rows (split: " + (f"column '{ss.split_column}'" if ss.split_column
                             else f"valid_from = {ss.valid_from}, test_from = {ss.test_from}") + ")")
    return st
