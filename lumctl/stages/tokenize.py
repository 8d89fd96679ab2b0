"""Stage `tokenize`: raw behaviour log -> Zarr store of vocabularies, features, sequences, splits.

Store layout (`stores/<experiment>/tokenize/data.zarr`):
  events/user      int32 [E]     user index (0..U-1), events grouped by user, time ordered
  events/item      int32 [E]     item vocab id (0 = pad, 1 = unknown, items from 2)
  events/timestamp int64 [E]
  events/rating    float32 [E]   (when the log has ratings; NaN otherwise absent)
  events/cond      int32 [E, F]  one id per condition field (0 = pad, 1 = unknown/"any")
  users/offsets    int64 [U+1]   events of user u are offsets[u]:offsets[u+1]
  users/split      int64 [U, 2]  (train_end, valid_end) within the user's events:
                                 train = [0, train_end), valid = [train_end, valid_end), test = rest
  users/pretrain_end int64 [U]   (only with a cutoff: [tokenize.split] pretrain_before/_quantile, a global
                                 T0, or pretrain_fraction, per user) the user's train events before the
                                 cutoff = [0, pretrain_end): what the LUM pretrains on; [pretrain_end,
                                 train_end) are the DLRM's train samples
  users/<attr>     int32 [U]     profile attributes, vocab in vocab/user_<attr>
  items/popularity int32 [I]     2 + log2 bucket of training-event count
  items/genres     uint8 [I, G]  multi-hot (when known); items/category int32 [I] (when known)
  vocab/item, vocab/user, vocab/cond_<field>, vocab/genres, vocab/category   strings
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lumctl import eventdb, zarrio
from lumctl.errors import InputError
from lumctl.progress import progress, say
from lumctl.readers import RawLog, read_log
from lumctl.specs import Spec, TokenizeSpec
from lumctl.store import atomic_dir, input_files_hashes, is_up_to_date, join, require_store, store_hash, write_manifest

USER_ATTRS = ("gender", "age", "occupation")


def _sorted_vocab(values: np.ndarray) -> np.ndarray:
    """Distinct raw ids in a stable order: numeric order when all ids are integers, else lexical."""
    uniq = np.unique(values.astype(str))
    try:
        return uniq[np.argsort(uniq.astype(np.int64), kind="stable")]
    except ValueError:
        return uniq


def _encode(values: np.ndarray, vocab: np.ndarray, offset: int) -> np.ndarray:
    """Map raw values to ids offset.. via sorted lookup; values not in vocab -> 1 (unknown)."""
    order = np.argsort(vocab)
    sv = vocab[order]
    pos = np.searchsorted(sv, values)
    pos = np.clip(pos, 0, max(len(sv) - 1, 0))
    hit = (sv[pos] == values) if len(sv) else np.zeros(len(values), bool)
    return np.where(hit, order[pos] + offset, 1).astype(np.int32)


def _col(t: pa.Table, name: str, where: str) -> np.ndarray:
    if name not in t.column_names:
        raise InputError(where, f"column '{name}' not in the log (has {t.column_names})")
    return t[name].to_numpy(zero_copy_only=False)


def first_value(attr: pa.ChunkedArray) -> pa.ChunkedArray:
    """An item attribute as one value per item: the first of a list ("" for an empty list)."""
    if pa.types.is_list(attr.type):
        return pc.list_element(pc.if_else(pc.greater(pc.list_value_length(attr), 0), attr,
                                          pa.scalar([""], attr.type)), 0)
    return attr


def _condition_codes(spec: TokenizeSpec, log: RawLog, item_raw: np.ndarray, where: str) -> tuple[np.ndarray, dict]:
    """[E, F] condition ids and {field: vocab} for every configured condition field."""
    ev = log.events
    codes = np.zeros((ev.num_rows, len(spec.conditions)), np.int32)
    vocabs = {}
    for f, c in enumerate(spec.conditions):
        if c.source == "bucket":
            x = _col(ev, c.column, f"{where}: [tokenize].conditions.{f}.column").astype(np.float64)
            codes[:, f] = 2 + np.searchsorted(np.asarray(c.edges), x, side="right")
            vocab = np.asarray(c.bucket_labels())
        elif c.source == "column":
            x = _col(ev, c.column, f"{where}: [tokenize].conditions.{f}.column").astype(str)
            vocab = _sorted_vocab(x)
            codes[:, f] = _encode(x, vocab, 2)
        else:  # item_attr: the item's attribute (first value of a list such as genres)
            if log.items is None or c.column not in log.items.column_names:
                have = log.items.column_names if log.items is not None else []
                raise InputError(f"{where}: [tokenize].conditions.{f}.column",
                                 f"item attribute '{c.column}' not available (item attributes: {have})")
            attr = first_value(log.items[c.column])
            attr_items = log.items["item"].to_numpy(zero_copy_only=False).astype(str)
            attr_vals = attr.to_numpy(zero_copy_only=False).astype(str)
            vocab = _sorted_vocab(attr_vals[attr_vals != ""])
            per_item = dict(zip(attr_items, attr_vals))
            uniq, inv = np.unique(item_raw, return_inverse=True)
            x = np.array([per_item.get(i, "") for i in uniq], dtype=object)[inv].astype(str)
            codes[:, f] = _encode(x, vocab, 2)
        vocabs[c.name] = np.concatenate([["<pad>", "<any>"], vocab]).astype(str)
    return codes, vocabs


def _split_points(spec: TokenizeSpec, offsets: np.ndarray, ts: np.ndarray) -> np.ndarray:
    n = np.diff(offsets)
    s = spec.split
    if s.kind == "leave_one_out":
        # users with < 3 events (min_user_events < 3) keep no training events, not negative ones
        return np.stack([np.maximum(n - 2, 0), np.maximum(n - 1, 0)], axis=1).astype(np.int64)
    if s.kind == "fraction":
        tr = np.maximum(1, np.floor(n * s.train)).astype(np.int64)
        va = np.maximum(tr, np.floor(n * (s.train + s.valid))).astype(np.int64)
        return np.stack([tr, va], axis=1)
    users = np.repeat(np.arange(len(n)), n)
    before_valid = np.bincount(users, weights=ts < s.valid_from, minlength=len(n)).astype(np.int64)
    before_test = np.bincount(users, weights=ts < s.test_from, minlength=len(n)).astype(np.int64)
    return np.stack([before_valid, before_test], axis=1)


def pretrain_cutoff(spec: TokenizeSpec, offsets: np.ndarray, ts: np.ndarray, split: np.ndarray) -> int | None:
    """T0 of a leak-free LUM: [tokenize.split] pretrain_before, or the pretrain_quantile of the train
    events' timestamps (lower interpolation, so T0 is a real timestamp); None without a cutoff."""
    s = spec.split
    if s.pretrain_before is not None:
        return int(s.pretrain_before)
    if s.pretrain_quantile is None:
        return None
    user = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    train = np.arange(len(ts)) - offsets[user] < split[user, 0]
    return int(np.quantile(ts[train], s.pretrain_quantile, method="lower")) if train.any() else None


def pretrain_ends(offsets: np.ndarray, ts: np.ndarray, split: np.ndarray, t0: int) -> np.ndarray:
    """[U] per user, its train events before T0 = [0, pretrain_end) (events are time ordered)."""
    user = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    before = np.bincount(user, weights=ts < t0, minlength=len(offsets) - 1).astype(np.int64)
    return np.minimum(before, split[:, 0])


def tie_groups(offsets: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per event: index of the first and of the last event of the same user with the same timestamp."""
    E = len(ts)
    idx = np.arange(E)
    starts = np.zeros(E, bool)
    starts[offsets[:-1][offsets[:-1] < E]] = True
    starts[1:] |= ts[1:] != ts[:-1]
    ends = np.zeros(E, bool)
    ends[offsets[1:][offsets[1:] > 0] - 1] = True
    ends[:-1] |= ts[1:] != ts[:-1]
    first = np.maximum.accumulate(np.where(starts, idx, 0)) if E else idx
    last = np.minimum.accumulate(np.where(ends, idx, E)[::-1])[::-1] if E else idx
    return first, last


def pretrain_fraction_ends(offsets: np.ndarray, ts: np.ndarray, split: np.ndarray, frac: float) -> np.ndarray:
    """[U] per-user cutoff: the first floor(frac * train_end) train events, moved back to the start of
    their timestamp group, so every pretrain event is strictly earlier than the user's first DLRM sample."""
    end = np.floor(split[:, 0] * frac).astype(np.int64)
    first, _ = tie_groups(offsets, ts)
    ok = end > 0                                                      # (frac < 1: end < train_end)
    cut = np.where(ok, offsets[:-1] + end, 0)                         # first DLRM sample of each user
    return np.where(ok, first[cut] - offsets[:-1], 0)


def hygiene(spec: TokenizeSpec, ev: pa.Table) -> tuple[np.ndarray, dict]:
    """[E] events kept by the data-hygiene rules (duplicates, time_range) and their counts."""
    ts = ev["timestamp"].to_numpy(zero_copy_only=False).astype(np.int64)
    keep = np.ones(len(ts), bool)
    counts = {"out_of_range_events": 0, "duplicate_events": 0}
    if spec.time_range is not None:
        out = (ts < spec.time_range[0]) | (ts > spec.time_range[1])
        counts["out_of_range_events"] = int(out.sum())
        if spec.strict:
            keep &= ~out
    if spec.duplicates == "drop" and len(ts):
        u, i = _codes(ev["user"]), _codes(ev["item"])
        order = np.lexsort((np.arange(len(ts)), ts, i, u))      # copies adjacent, the first in file order first
        same = (u[order][1:] == u[order][:-1]) & (i[order][1:] == i[order][:-1]) & (ts[order][1:] == ts[order][:-1])
        dup = np.zeros(len(ts), bool)
        dup[order[1:][same]] = True
        counts["duplicate_events"] = int((dup & keep).sum())
        keep &= ~dup
    return keep, counts


def _codes(col: pa.ChunkedArray) -> np.ndarray:
    """Dense integer codes of a column's values (equal values, equal codes)."""
    return np.unique(col.to_numpy(zero_copy_only=False).astype(str), return_inverse=True)[1]


def item_tables(items: pa.Table | None, item_vocab: np.ndarray, I: int) -> dict[str, np.ndarray]:
    """items/genres, items/category and their vocabularies from an item attribute table (small)."""
    out: dict[str, np.ndarray] = {}
    if items is None:
        return out
    raw_ids = items["item"].to_numpy(zero_copy_only=False).astype(str)
    rows = _encode(raw_ids, item_vocab, 2)
    known = rows >= 2
    if "genres" in items.column_names:
        lists = items["genres"].to_pylist()
        gv = np.array(sorted({g for gs in lists for g in (gs or []) if g}), dtype=str)
        gi = {g: k for k, g in enumerate(gv)}
        mh = np.zeros((I, len(gv)), np.uint8)
        for r, gs, ok in zip(rows, lists, known):
            if ok:
                for g in gs or []:
                    if g:
                        mh[r, gi[g]] = 1
        out["items/genres"], out["vocab/genres"] = mh, gv
    if "category" in items.column_names:
        cats = items["category"].to_numpy(zero_copy_only=False).astype(str)
        cv = _sorted_vocab(cats)
        cat = np.zeros(I, np.int32)
        cat[2:] = 1
        cat[rows[known]] = _encode(cats[known], cv, 2)
        out["items/category"], out["vocab/category"] = cat, np.concatenate([["<pad>", "<unk>"], cv]).astype(str)
    return out


def user_tables(users: pa.Table | None, user_vocab: np.ndarray, U: int) -> dict[str, np.ndarray]:
    """users/<attr> and vocab/user_<attr> from a user profile table (small)."""
    out: dict[str, np.ndarray] = {}
    if users is None:
        return out
    raw_ids = users["user"].to_numpy(zero_copy_only=False).astype(str)
    rows = _encode(raw_ids, user_vocab, 2) - 2  # -1 for users without events
    for attr in USER_ATTRS:
        if attr in users.column_names:
            vals = users[attr].to_numpy(zero_copy_only=False).astype(str)
            av = _sorted_vocab(vals)
            col = np.ones(U, np.int32)
            ok = rows >= 0
            col[rows[ok]] = _encode(vals[ok], av, 2)
            out[f"users/{attr}"], out[f"vocab/user_{attr}"] = col, np.concatenate([["<pad>", "<unk>"], av]).astype(str)
    return out


def user_block(spec: TokenizeSpec, offsets: np.ndarray, ts: np.ndarray, t0: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Split points [U, 2] and the LUM cutoff [U] (or None) of whole users: offsets [U+1] index ts [E].
    Per user only, so a log processed in blocks of users gives the same result as in one piece."""
    split = _split_points(spec, offsets, ts)
    if t0 is not None:
        return split, pretrain_ends(offsets, ts, split, t0)
    if spec.split.pretrain_fraction is not None:
        return split, pretrain_fraction_ends(offsets, ts, split, spec.split.pretrain_fraction)
    return split, None


def train_item_counts(offsets: np.ndarray, item: np.ndarray, end: np.ndarray, I: int) -> np.ndarray:
    """[I] per item, its events among the first end[u] events of their user (the training events)."""
    n = np.diff(offsets)
    pos = np.arange(len(item)) - np.repeat(offsets[:-1], n)
    return np.bincount(item[pos < np.repeat(end, n)], minlength=I)


def popularity(counts: np.ndarray, buckets: int) -> np.ndarray:
    """[I] 2 + log2 bucket of each item's training-event count (0 for pad and unknown)."""
    I = len(counts)
    return np.where(np.arange(I) >= 2, 2 + np.minimum(buckets - 1, np.floor(np.log2(1 + counts)).astype(np.int32)),
                    0).astype(np.int32)


def summary(offsets: np.ndarray, split: np.ndarray, pe: np.ndarray | None, t0: int | None) -> dict:
    n = np.diff(offsets)
    out = {
        "events_per_user": {"min": int(n.min()), "mean": round(float(n.mean()), 2), "max": int(n.max())},
        "train_events": int(split[:, 0].sum()), "valid_events": int((split[:, 1] - split[:, 0]).sum()),
        "test_events": int((n - split[:, 1]).sum()),
    }
    if pe is not None:
        out.update({"pretrain_events": int(pe.sum()), "fuse_train_events": int((split[:, 0] - pe).sum())})
        if t0 is not None:
            out["pretrain_before"] = t0
    return out


def tokenize_log(spec: TokenizeSpec, log: RawLog, where: str = "[tokenize]") -> tuple[dict[str, np.ndarray], dict]:
    """The in-memory reference: raw log -> {array path: array}, counts. `run` computes the same out of
    core (`build`); tests hold the two equal."""
    hyg, hyg_counts = hygiene(spec, log.events)
    ev = log.events.filter(pa.array(hyg)) if not hyg.all() else log.events
    user_raw = ev["user"].to_numpy(zero_copy_only=False).astype(str)
    item_raw = ev["item"].to_numpy(zero_copy_only=False).astype(str)
    ts = ev["timestamp"].to_numpy(zero_copy_only=False).astype(np.int64)
    cond, cond_vocabs = _condition_codes(spec, RawLog(ev, log.items, log.users), item_raw, where)
    rating = ev["rating"].to_numpy(zero_copy_only=False).astype(np.float32) if "rating" in ev.column_names else None

    # one filtering pass: items, then users
    keep = np.ones(len(user_raw), bool)
    if spec.min_item_events > 1:
        _, inv, cnt = np.unique(item_raw, return_inverse=True, return_counts=True)
        keep &= cnt[inv] >= spec.min_item_events
    _, inv, cnt = np.unique(user_raw[keep], return_inverse=True, return_counts=True)
    k_idx = np.flatnonzero(keep)
    keep[k_idx[cnt[inv] < spec.min_user_events]] = False
    if not keep.any():
        raise InputError(where, f"no user has >= min_user_events = {spec.min_user_events} events")
    user_raw, item_raw, ts, cond = user_raw[keep], item_raw[keep], ts[keep], cond[keep]
    rating = rating[keep] if rating is not None else None

    user_vocab = _sorted_vocab(user_raw)
    item_vocab = _sorted_vocab(item_raw)
    user = _encode(user_raw, user_vocab, 0)
    item = _encode(item_raw, item_vocab, 2)
    order = np.lexsort((np.arange(len(user)), ts, user))  # by user, then time, ties in file order
    user, item, ts, cond = user[order], item[order], ts[order], cond[order]
    rating = rating[order] if rating is not None else None
    U, I = len(user_vocab), len(item_vocab) + 2
    offsets = np.zeros(U + 1, np.int64)
    offsets[1:] = np.cumsum(np.bincount(user, minlength=U))
    t0 = pretrain_cutoff(spec, offsets, ts, _split_points(spec, offsets, ts))
    split, pe = user_block(spec, offsets, ts, t0)

    out: dict[str, np.ndarray] = {
        "events/user": user, "events/item": item, "events/timestamp": ts, "events/cond": cond,
        "users/offsets": offsets, "users/split": split,
        "vocab/user": user_vocab, "vocab/item": np.concatenate([["<pad>", "<unk>"], item_vocab]).astype(str),
    }
    if pe is not None:
        out["users/pretrain_end"] = pe
    if rating is not None:
        out["events/rating"] = rating
    for name, v in cond_vocabs.items():
        out[f"vocab/cond_{name}"] = v

    # item features: popularity from training events only (no leakage from valid/test); with a
    # cutoff from the LUM's pretrain events only (the LUM reads it)
    out["items/popularity"] = popularity(train_item_counts(offsets, item, split[:, 0] if pe is None else pe, I),
                                         spec.popularity_buckets)
    out.update(item_tables(log.items, item_vocab, I))
    if log.items is None and "category" in ev.column_names:  # Taobao: the category is an event column
        cats = ev["category"].to_numpy(zero_copy_only=False).astype(str)[keep][order]
        cv = _sorted_vocab(cats)
        cat = np.ones(I, np.int32)
        cat[0] = 0
        cat[item] = _encode(cats, cv, 2)
        out["items/category"], out["vocab/category"] = cat, np.concatenate([["<pad>", "<unk>"], cv]).astype(str)
    out.update(user_tables(log.users, user_vocab, U))

    counts_out = {
        "users": int(U), "items": int(I - 2), "events": int(len(user)), "malformed_rows": int(log.malformed),
        "dropped_events": int((~keep).sum()), **hyg_counts, "condition_fields": [c.name for c in spec.conditions],
        **summary(offsets, split, pe, t0),
    }
    return out, counts_out


def input_hashes(spec: Spec) -> dict[str, str]:
    """The raw log's identity by content: {file name relative to the data path: sha256}. Moving the data
    elsewhere or adding a file the reader does not read leaves it unchanged."""
    t = spec.tokenize
    if t.format == "synth":
        return {"synth": store_hash(require_store(spec.store("synth"), "synth"))}
    return input_files_hashes(_raw_files(t), Path(t.path), Path(t.items_path) if t.items_path else None)


# the files a folder format's reader may read (lumctl.readers); other files in the folder are not inputs
READ_BY_FORMAT = {
    "movielens-1m": ("ratings*.dat", "ratings*.dat.gz", "movies.dat", "users.dat"),
    "movielens-100k": ("u.data", "u.item", "u.user"),
    "movielens-csv": ("ratings.csv", "ratings.csv.gz", "movies.csv"),
}


def _raw_files(t: TokenizeSpec) -> list[Path]:
    p = Path(t.path)
    if not p.exists():
        raise InputError(str(p), "data path not found")
    if p.is_dir() and t.format in READ_BY_FORMAT:
        files = sorted({f for pat in READ_BY_FORMAT[t.format] for f in p.glob(pat) if f.is_file()})
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    if t.items_path:
        files.append(Path(t.items_path))
    return files


TAOBAO_COLUMNS = {"user": "BIGINT", "item": "BIGINT", "category": "BIGINT", "behavior": "VARCHAR", "timestamp": "BIGINT"}


def build(spec: Spec, tmp: Path, where: str = "[tokenize]") -> tuple[dict, list[Path]]:
    """The out-of-core tokenize: the raw log into DuckDB (a database in `tmp`), the relational work
    there, then the sorted events streamed in batches of whole users into `tmp/data.zarr`. Equals
    `tokenize_log` (tests). Memory: DuckDB's `memory_gb`, one batch of events, arrays of users and items."""
    t = spec.tokenize
    con = eventdb.connect(tmp, t.memory_gb, t.threads)
    log = None
    if t.format == "taobao":  # the scale path: DuckDB reads the file (ids are integers; a non-integer is malformed)
        path = Path(t.path)
        malformed = eventdb.load_csv(con, path, TAOBAO_COLUMNS, strict=t.strict)
        files = [path]
    else:  # the small formats: their reader, then the same relational work
        log = read_log(t, spec.store("synth"))
        eventdb.load_arrow(con, log.events)
        malformed, files = log.malformed, log.files
    counts: dict = {"malformed_rows": int(malformed)}
    cols = set(eventdb.numpy_column(con, "SELECT column_name FROM information_schema.columns WHERE table_name = 'raw'"))

    # hygiene: events outside time_range (counted; dropped with strict), duplicates (the first in file order
    # stays); `ev` is what remains, with its file order `ord`
    loaded = int(eventdb.scalar(con, "SELECT count(*) FROM raw"))
    counts["out_of_range_events"] = counts["duplicate_events"] = deleted = 0
    if t.time_range is not None:
        outside = f"timestamp NOT BETWEEN {int(t.time_range[0])} AND {int(t.time_range[1])}"
        counts["out_of_range_events"] = int(eventdb.scalar(con, f"SELECT count(*) FROM raw WHERE {outside}"))
        if t.strict:
            con.execute(f"DELETE FROM raw WHERE {outside}")
            deleted += counts["out_of_range_events"]
    if t.duplicates == "drop":
        eventdb.copies(con, "raw")
        counts["duplicate_events"] = int(eventdb.scalar(con, "SELECT count(*) FROM copies"))
        con.execute("DELETE FROM raw WHERE rowid IN (SELECT id FROM copies)")
        deleted += counts["duplicate_events"]
    con.execute("CREATE VIEW ev AS SELECT rowid AS ord, * FROM raw")   # deleting rows moves no rowid

    # condition codes (vocabularies over every event, as the reference): one SQL expression per field
    cond_sql, joins, cond_vocabs = [], [], {}
    for f, c in enumerate(t.conditions):
        field = f"{where}: [tokenize].conditions.{f}.column"
        if c.source in ("column", "bucket") and c.column not in cols:
            raise InputError(field, f"column '{c.column}' not in the log (has {sorted(cols)})")
        if c.source == "bucket":
            x = f'CAST(e."{c.column}" AS DOUBLE)'
            cond_sql.append("2" + "".join(f" + CAST({x} >= {float(edge)!r} AS INTEGER)" for edge in c.edges))
            vocab = np.asarray(c.bucket_labels())
        elif c.source == "column":
            eventdb.make_vocab(con, f"cond{f}", "ev", c.column, 2)
            joins.append(f'LEFT JOIN "cond{f}" c{f} ON e."{c.column}" = c{f}.value')
            cond_sql.append(f"coalesce(c{f}.code, 1)")
            vocab = eventdb.vocab_strings(con, f"cond{f}")
        else:  # item_attr: the item's attribute (first value of a list such as genres), from the item table
            items = log.items if log is not None else None
            if items is None or c.column not in items.column_names:
                have = items.column_names if items is not None else []
                raise InputError(field, f"item attribute '{c.column}' not available (item attributes: {have})")
            attr = first_value(items[c.column])
            eventdb.load_arrow(con, pa.table({"item": pc.cast(items["item"], pa.string()),
                                              "attr": pc.cast(attr, pa.string())}), f"attr{f}")
            # one attribute per item, the last row's (as a dict built from the table)
            con.execute(f"CREATE TABLE attr{f}_one AS SELECT item, arg_max(attr, rowid) AS attr FROM attr{f} GROUP BY item")
            eventdb.make_vocab(con, f"cond{f}", f"(SELECT attr FROM attr{f} WHERE attr <> '')", "attr", 2)
            joins.append(f"LEFT JOIN attr{f}_one a{f} ON CAST(e.item AS VARCHAR) = a{f}.item "
                         f'LEFT JOIN "cond{f}" c{f} ON a{f}.attr = c{f}.value')
            cond_sql.append(f"coalesce(c{f}.code, 1)")
            vocab = eventdb.vocab_strings(con, f"cond{f}")
        cond_vocabs[c.name] = np.concatenate([["<pad>", "<any>"], vocab]).astype(str)

    # filters: items with < min_item_events events, then users with < min_user_events of the rest
    item_ok = ""
    if t.min_item_events > 1:
        con.execute(f"CREATE TABLE item_ok AS SELECT item FROM ev GROUP BY item HAVING count(*) >= {t.min_item_events}")
        item_ok = "SEMI JOIN item_ok USING (item)"
    con.execute(f"""CREATE TABLE user_n AS SELECT user, count(*) AS n FROM ev {item_ok}
                    GROUP BY user HAVING count(*) >= {t.min_user_events}""")
    U = eventdb.make_vocab(con, "users", "user_n", "user", 0)
    if U == 0:
        raise InputError(where, f"no user has >= min_user_events = {t.min_user_events} events")
    taobao_cat = (log is None or log.items is None) and "category" in cols   # Taobao: category is an event column
    # the kept events' distinct items (with their categories): one pass gives both vocabularies
    con.execute(f"""CREATE TABLE kept_items AS SELECT DISTINCT item{', category' if taobao_cat else ''}
                    FROM ev {item_ok} SEMI JOIN user_n USING (user)""")
    I = eventdb.make_vocab(con, "items", "kept_items", "item", 2) + 2
    if taobao_cat:
        eventdb.make_vocab(con, "categories", "kept_items", "category", 2)
    n = eventdb.numpy_column(con, "SELECT n FROM user_n JOIN users ON user = value ORDER BY code").astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    E = int(offsets[-1])
    counts.update({"users": U, "items": I - 2, "events": E, "dropped_events": int(loaded - deleted - E)})
    t0 = None
    if t.split.pretrain_before is not None:
        t0 = int(t.split.pretrain_before)
    elif t.split.pretrain_quantile is not None:
        t0 = _quantile_cutoff(con, t, offsets)

    F = len(t.conditions)
    has_rating = "rating" in cols
    select = ["u.code AS user", "i.code AS item", "e.timestamp AS ts"]
    select += [f"CAST({x} AS INTEGER) AS cond{f}" for f, x in enumerate(cond_sql)]
    select += ["CAST(e.rating AS FLOAT) AS rating"] if has_rating else []
    select += ["k.code AS category"] if taobao_cat else []
    joins += ["JOIN categories k ON e.category = k.value"] if taobao_cat else []
    sql = (f"SELECT {', '.join(select)} FROM ev e JOIN users u ON e.user = u.value JOIN items i ON e.item = i.value "
           f"{' '.join(joins)} ORDER BY u.code, e.timestamp, e.ord")   # ties in file order

    g = zarrio.create(tmp / "data.zarr")
    out = {"events/user": zarrio.Appender(g, "events/user", (E,), np.int32),
           "events/item": zarrio.Appender(g, "events/item", (E,), np.int32),
           "events/timestamp": zarrio.Appender(g, "events/timestamp", (E,), np.int64),
           "events/cond": zarrio.Appender(g, "events/cond", (E, F), np.int32)}
    if has_rating:
        out["events/rating"] = zarrio.Appender(g, "events/rating", (E,), np.float32)
    split = np.zeros((U, 2), np.int64)
    pe = np.zeros(U, np.int64) if (t0 is not None or t.split.pretrain_fraction is not None) else None
    item_counts = np.zeros(I, np.int64)
    cat = None
    if taobao_cat:
        cat = np.ones(I, np.int32)
        cat[0] = 0

    carry: dict[str, np.ndarray] = {}
    done = 0                                            # users written
    with progress() as bar:
        task = bar.add_task("tokenize", total=E, info="")
        for batch in eventdb.stream(con, sql, t.batch_events):
            new = {k: batch.column(k).to_numpy(zero_copy_only=False) for k in batch.schema.names}
            block = {k: np.concatenate([carry[k], v]) for k, v in new.items()} if carry else new
            end = offsets[done] + len(block["user"])
            upto = int(np.searchsorted(offsets, end, side="right")) - 1   # users whole in this block
            m = int(offsets[upto] - offsets[done])
            carry = {k: v[m:] for k, v in block.items()}
            if upto > done:
                _write_users({k: v[:m] for k, v in block.items()}, done, upto, offsets, t, t0, out, split, pe,
                             item_counts, cat)
                done = upto
            bar.update(task, advance=m)
    if done != U:
        raise RuntimeError(f"tokenize: streamed {done} of {U} users")
    for a in out.values():
        a.close()

    user_vocab, item_vocab = eventdb.vocab_strings(con, "users"), eventdb.vocab_strings(con, "items")
    arrays: dict[str, np.ndarray] = {
        "users/offsets": offsets, "users/split": split,
        "vocab/user": user_vocab, "vocab/item": np.concatenate([["<pad>", "<unk>"], item_vocab]).astype(str),
        "items/popularity": popularity(item_counts, t.popularity_buckets),
    }
    if pe is not None:
        arrays["users/pretrain_end"] = pe
    for name, v in cond_vocabs.items():
        arrays[f"vocab/cond_{name}"] = v
    if taobao_cat:
        arrays["items/category"] = cat
        arrays["vocab/category"] = np.concatenate([["<pad>", "<unk>"], eventdb.vocab_strings(con, "categories")]).astype(str)
    con.close()
    arrays.update(item_tables(log.items if log else None, item_vocab, I))
    arrays.update(user_tables(log.users if log else None, user_vocab, U))
    for name, a in arrays.items():
        zarrio.put(g, name, a)
    counts["condition_fields"] = [c.name for c in t.conditions]
    counts.update(summary(offsets, split, pe, t0))
    return counts, files


def _write_users(ev: dict[str, np.ndarray], u0: int, u1: int, offsets: np.ndarray, t: TokenizeSpec, t0: int | None,
                 out: dict, split: np.ndarray, pe: np.ndarray | None, item_counts: np.ndarray,
                 cat: np.ndarray | None) -> None:
    """Users u0..u1-1, whole and sorted: their events to the store; their split points, cutoffs, item counts."""
    local = offsets[u0:u1 + 1] - offsets[u0]
    ts = ev["ts"]
    sp, p = user_block(t, local, ts, t0)
    split[u0:u1] = sp
    if pe is not None:
        pe[u0:u1] = p
    item_counts += train_item_counts(local, ev["item"], sp[:, 0] if p is None else p, len(item_counts))
    if cat is not None:
        cat[ev["item"]] = ev["category"]          # the item's last event in sorted order, as the reference
    F = out["events/cond"].arr.shape[1]
    out["events/user"].write(ev["user"])
    out["events/item"].write(ev["item"])
    out["events/timestamp"].write(ts)
    out["events/cond"].write(np.stack([ev[f"cond{f}"] for f in range(F)], axis=1) if F else np.zeros((len(ts), 0), np.int32))
    if "events/rating" in out:
        out["events/rating"].write(ev["rating"])


def _quantile_cutoff(con, t: TokenizeSpec, offsets: np.ndarray) -> int | None:
    """T0 = the pretrain_quantile of the train events' timestamps (lower interpolation), in SQL. The train
    events are each user's first train_end events in (timestamp, file order); with a time split, exactly
    those before valid_from."""
    kept = "FROM ev e JOIN users u ON e.user = u.value JOIN items i ON e.item = i.value"
    if t.split.kind == "time":
        train = f"SELECT e.timestamp AS ts {kept} WHERE e.timestamp < {int(t.split.valid_from)}"
    else:  # leave_one_out / fraction: train_end depends on the user's event count only
        split = _split_points(t, offsets, np.zeros(0, np.int64))
        eventdb.load_arrow(con, pa.table({"code": np.arange(len(split), dtype=np.int32), "n": split[:, 0]}), "train_end")
        ranked = (f"SELECT e.timestamp AS ts, u.code, "
                  f"row_number() OVER (PARTITION BY u.code ORDER BY e.timestamp, e.ord) AS r {kept}")
        train = f"SELECT s.ts FROM ({ranked}) s JOIN train_end USING (code) WHERE s.r <= train_end.n"
    k = int(eventdb.scalar(con, f"SELECT count(*) FROM ({train})"))
    if k == 0:
        return None
    idx = int(np.floor(t.split.pretrain_quantile * (k - 1)))
    return int(eventdb.scalar(con, f"SELECT ts FROM ({train}) ORDER BY ts LIMIT 1 OFFSET {idx}"))


def run(spec: Spec, force: bool = False) -> Path:
    out = spec.store("tokenize")
    started = time.time()
    inputs = input_hashes(spec)
    spec_hash = spec.section_hash("tokenize")
    if not force and is_up_to_date(out, spec_hash, inputs):
        say(f"tokenize: {out} is up to date")
        return out
    with atomic_dir(out) as tmp:
        work = tmp / "work"      # the engine's database and spill files, removed before the store is published
        work.mkdir()
        counts, files = build(spec, work)
        (work / "data.zarr").rename(tmp / "data.zarr")
        shutil.rmtree(work)
        g = zarrio.open_write(tmp / "data.zarr")
        g.attrs["conditions"] = [c.model_dump() for c in spec.tokenize.conditions]
        g.attrs["split"] = spec.tokenize.split.model_dump()
        write_manifest(tmp, stage="tokenize", spec_hash=spec_hash, inputs=inputs, counts=counts, started=started,
                       extra={"files": [str(f) for f in files]})
    c = counts
    say(f"tokenize: {c['users']:,} users, {c['items']:,} items, {c['events']:,} events "
        f"({c['malformed_rows']:,} malformed rows skipped, {c['duplicate_events']:,} duplicates dropped, "
        f"{c['dropped_events']:,} events filtered) in {time.time() - started:.1f}s -> {out}")
    return out


def load(store: Path) -> dict[str, np.ndarray]:
    """Every array of a tokenize store, as numpy, keyed by path."""
    require_store(store, "tokenize")
    g = zarrio.open_read(join(store, "data.zarr"))  # a path or an fsspec URL
    return zarrio.load_groups(g, ("events", "users", "items", "vocab"))
