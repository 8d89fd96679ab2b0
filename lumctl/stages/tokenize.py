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

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lumctl import zarrio
from lumctl.errors import InputError
from lumctl.progress import say
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
            attr = log.items[c.column]
            if pa.types.is_list(attr.type):
                attr = pc.list_element(pc.if_else(pc.greater(pc.list_value_length(attr), 0), attr,
                                                  pa.scalar([""], attr.type)), 0)
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


def tokenize_log(spec: TokenizeSpec, log: RawLog, where: str = "[tokenize]") -> tuple[dict[str, np.ndarray], dict]:
    """Pure function: raw log -> {array path: array}, counts. Everything the store holds."""
    ev = log.events
    user_raw = ev["user"].to_numpy(zero_copy_only=False).astype(str)
    item_raw = ev["item"].to_numpy(zero_copy_only=False).astype(str)
    ts = ev["timestamp"].to_numpy(zero_copy_only=False).astype(np.int64)
    cond, cond_vocabs = _condition_codes(spec, log, item_raw, where)
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
    split = _split_points(spec, offsets, ts)
    t0 = pretrain_cutoff(spec, offsets, ts, split)

    out: dict[str, np.ndarray] = {
        "events/user": user, "events/item": item, "events/timestamp": ts, "events/cond": cond,
        "users/offsets": offsets, "users/split": split,
        "vocab/user": user_vocab, "vocab/item": np.concatenate([["<pad>", "<unk>"], item_vocab]).astype(str),
    }
    if t0 is not None:
        out["users/pretrain_end"] = pretrain_ends(offsets, ts, split, t0)
    elif spec.split.pretrain_fraction is not None:
        out["users/pretrain_end"] = pretrain_fraction_ends(offsets, ts, split, spec.split.pretrain_fraction)
    if rating is not None:
        out["events/rating"] = rating
    for name, v in cond_vocabs.items():
        out[f"vocab/cond_{name}"] = v

    # item features: popularity from training events only (no leakage from valid/test); with a
    # cutoff T0 from the LUM's pretrain events only (the LUM reads it)
    pos_in_user = np.arange(len(user)) - offsets[user]
    train = pos_in_user < out.get("users/pretrain_end", split[:, 0])[user]
    counts = np.bincount(item[train], minlength=I)
    out["items/popularity"] = np.where(np.arange(I) >= 2, 2 + np.minimum(spec.popularity_buckets - 1,
                                       np.floor(np.log2(1 + counts)).astype(np.int32)), 0).astype(np.int32)
    if log.items is not None:
        raw_ids = log.items["item"].to_numpy(zero_copy_only=False).astype(str)
        rows = _encode(raw_ids, item_vocab, 2)
        known = rows >= 2
        if "genres" in log.items.column_names:
            lists = log.items["genres"].to_pylist()
            gv = np.array(sorted({g for gs in lists for g in (gs or []) if g}), dtype=str)
            gi = {g: k for k, g in enumerate(gv)}
            mh = np.zeros((I, len(gv)), np.uint8)
            for r, gs, ok in zip(rows, lists, known):
                if ok:
                    for g in gs or []:
                        if g:
                            mh[r, gi[g]] = 1
            out["items/genres"], out["vocab/genres"] = mh, gv
        if "category" in log.items.column_names:
            cv = _sorted_vocab(log.items["category"].to_numpy(zero_copy_only=False).astype(str))
            cat = np.zeros(I, np.int32)
            cat[2:] = 1
            cat[rows[known]] = _encode(log.items["category"].to_numpy(zero_copy_only=False).astype(str)[known], cv, 2)
            out["items/category"], out["vocab/category"] = cat, np.concatenate([["<pad>", "<unk>"], cv]).astype(str)
    elif "category" in log.events.column_names:  # Taobao: the category is an event column
        cats = log.events["category"].to_numpy(zero_copy_only=False).astype(str)[keep][order]
        cv = _sorted_vocab(cats)
        cat = np.ones(I, np.int32)
        cat[0] = 0
        cat[item] = _encode(cats, cv, 2)
        out["items/category"], out["vocab/category"] = cat, np.concatenate([["<pad>", "<unk>"], cv]).astype(str)
    if log.users is not None:
        raw_ids = log.users["user"].to_numpy(zero_copy_only=False).astype(str)
        rows = _encode(raw_ids, user_vocab, 2) - 2  # -1 for users without events
        for attr in USER_ATTRS:
            if attr in log.users.column_names:
                vals = log.users[attr].to_numpy(zero_copy_only=False).astype(str)
                av = _sorted_vocab(vals)
                col = np.ones(U, np.int32)
                ok = rows >= 0
                col[rows[ok]] = _encode(vals[ok], av, 2)
                out[f"users/{attr}"], out[f"vocab/user_{attr}"] = col, np.concatenate([["<pad>", "<unk>"], av]).astype(str)

    n = np.diff(offsets)
    counts_out = {
        "users": int(U), "items": int(I - 2), "events": int(len(user)), "malformed_rows": int(log.malformed),
        "dropped_events": int((~keep).sum()), "condition_fields": [c.name for c in spec.conditions],
        "events_per_user": {"min": int(n.min()), "mean": round(float(n.mean()), 2), "max": int(n.max())},
        "train_events": int(split[:, 0].sum()), "valid_events": int((split[:, 1] - split[:, 0]).sum()),
        "test_events": int((n - split[:, 1]).sum()),
    }
    if "users/pretrain_end" in out:
        pe = out["users/pretrain_end"]
        counts_out.update({"pretrain_events": int(pe.sum()), "fuse_train_events": int((split[:, 0] - pe).sum())})
        if t0 is not None:
            counts_out["pretrain_before"] = t0
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


def run(spec: Spec, force: bool = False) -> Path:
    out = spec.store("tokenize")
    started = time.time()
    inputs = input_hashes(spec)
    spec_hash = spec.section_hash("tokenize")
    if not force and is_up_to_date(out, spec_hash, inputs):
        say(f"tokenize: {out} is up to date")
        return out
    log = read_log(spec.tokenize, spec.store("synth"))
    arrays, counts = tokenize_log(spec.tokenize, log)
    with atomic_dir(out) as tmp:
        g = zarrio.create(tmp / "data.zarr")
        for name, a in arrays.items():
            zarrio.put(g, name, a)
        g.attrs["conditions"] = [c.model_dump() for c in spec.tokenize.conditions]
        g.attrs["split"] = spec.tokenize.split.model_dump()
        write_manifest(tmp, stage="tokenize", spec_hash=spec_hash, inputs=inputs, counts=counts, started=started,
                       extra={"files": [str(f) for f in log.files]})
    c = counts
    say(f"tokenize: {c['users']:,} users, {c['items']:,} items, {c['events']:,} events "
        f"({c['malformed_rows']:,} malformed rows skipped, {c['dropped_events']:,} events filtered) "
        f"in {time.time() - started:.1f}s -> {out}")
    return out


def load(store: Path) -> dict[str, np.ndarray]:
    """Every array of a tokenize store, as numpy, keyed by path."""
    require_store(store, "tokenize")
    g = zarrio.open_read(join(store, "data.zarr"))  # a path or an fsspec URL
    out = {}
    for group in ("events", "users", "items", "vocab"):
        if group in g:
            for name in g[group].array_keys():
                out[f"{group}/{name}"] = zarrio.get(g, f"{group}/{name}")
    return out
