"""Verb `export`: the LUM answers of a sample table, joined point in time, as parquet for another ranker.

`lumctl export SPEC --samples PATH --out OUT.parquet` reads the table (columns as [fuse.samples] maps
them, else user_id, item_id, timestamp; lumctl/samples.py) in batches of `batch_rows` and writes, batch
by batch through one ParquetWriter, every column of the table unchanged (raw ids preserved) plus:
  lum_snapshot_ts  int64                     timestamp of the joined snapshot (null: none before the sample)
  o_q1 .. o_qN     fixed_size_list<float32>[D] the answer of query n (field metadata "query" names it;
                                             null without a snapshot or for an unseen user)
  e_item           fixed_size_list<float32>[D] the target item's LUM embedding e^i (null for an unseen item)
  sim_q1 .. sim_qN float32                   cos(o_qn, e^i) (null where either is null)
The join is the one fuse uses (fuse.join_snapshots): the user's latest snapshot with a timestamp strictly
before the sample's. Memory is one batch plus the query store's answers, whatever the table's size.

Beside it: OUT_items.parquet (or --items): item_id (raw), item (vocab index), e (fixed_size_list<float32>[D])
for every item of the vocabulary, and OUT.manifest.json. Both parquet files carry key-value metadata
(lumctl.checkpoint, lumctl.query_store, lumctl.tokenize_store, lumctl.snapshot_rule, lumctl.queries), so a
ranker trained on one LUM's answers can check it is fed the same LUM's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lumctl import zarrio
from lumctl.errors import InputError
from lumctl.progress import say
from lumctl.samples import IdMap, iter_batches, open_dataset, parse_ids, parse_timestamp
from lumctl.specs import SamplesSpec, Spec
from lumctl.stages.fuse import answers_shape, join_snapshots, load_answers, snapshot_answers
from lumctl.store import join, require_store, store_hash


def _fixed_list(x: np.ndarray, valid: np.ndarray | None) -> pa.Array:
    """(B, D) float32 -> fixed_size_list<float32>[D], null where not valid."""
    B, D = x.shape
    values = pa.array(np.ascontiguousarray(x, np.float32).reshape(-1))
    mask = None if valid is None or valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, D, mask=mask)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32; all-zero rows stay zero)."""
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.sqrt(np.einsum("...d,...d->...", x, x))[..., None], 1e-6)


def query_names(store: Path, n: int) -> list[str]:
    """The query names of the answers store (its `conditions` array), else q1..qN."""
    try:
        names = [str(v) for v in zarrio.get(zarrio.open_read(Path(store) / "answers.zarr"), "conditions")]
        return names if len(names) == n else [f"q{k + 1}" for k in range(n)]
    except (KeyError, FileNotFoundError, OSError):
        return [f"q{k + 1}" for k in range(n)]


def run(spec: Spec, samples: str, out: Path, items: Path | None = None, force: bool = False) -> Path:
    if spec.query is None:
        raise InputError("[query]", "section missing; export writes the query store's answers")
    started = time.time()
    out = Path(out)
    items = Path(items) if items else out.with_name(out.name.removesuffix(".parquet") + "_items.parquet")
    ss = spec.fuse.samples if spec.fuse is not None and spec.fuse.samples is not None else None
    ss = (ss.model_copy(update={"path": samples}) if ss is not None
          else SamplesSpec(path=samples))                                # default column names
    tok_store, q_store = spec.input_store("tokenize"), spec.store("query")
    tok_manifest, q_manifest = require_store(tok_store, "tokenize"), require_store(q_store, "query")
    g = zarrio.open_read(join(tok_store, "data.zarr"))
    vocab_user, vocab_item = zarrio.get(g, "vocab/user"), zarrio.get(g, "vocab/item")
    ans = load_answers(q_store)
    if len(ans["item_emb"]) != len(vocab_item):
        raise InputError(str(q_store), "query store's items do not match the tokenize store "
                         f"({len(ans['item_emb'])} vs {len(vocab_item)}); rerun `lumctl query`")
    N, D = answers_shape(ans)
    names = query_names(q_store, N)
    qs = spec.query
    rule = ("latest snapshot of the user with snapshot_ts < the sample's timestamp (strictly before); "
            f"[query] snapshot = {qs.snapshot}" + (f", every_n_events = {qs.every_n_events}" if qs.every_n_events else ""))
    meta = {"lumctl.checkpoint": q_manifest.get("inputs", {}).get("checkpoint", ""),
            "lumctl.query_store": store_hash(q_manifest), "lumctl.tokenize_store": store_hash(tok_manifest),
            "lumctl.snapshot_rule": rule, "lumctl.queries": json.dumps(names),
            "lumctl.experiment": spec.experiment}
    item_emb = np.nan_to_num(ans["item_emb"].astype(np.float32))       # (I, D)
    item_unit = _unit(item_emb)

    users, item_map = IdMap(vocab_user), IdMap(vocab_item, offset=2)
    dset = open_dataset(samples, ss)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer, schema = None, None
    counts = {"rows": 0, "with_answers": 0, "unseen_user_rows": 0, "unseen_item_rows": 0}
    try:
        for file, b in iter_batches(dset, ss, [ss.user, ss.item, ss.timestamp], read_all=True):
            u = users(parse_ids(b.column(ss.user), file, ss.user))
            i = item_map(parse_ids(b.column(ss.item), file, ss.item))
            ts = parse_timestamp(b.column(ss.timestamp), file, ss.timestamp)
            known_u, known_i = u >= 0, i >= 0
            row, has = join_snapshots(ans, np.where(known_u, u, 0), ts, len(vocab_user))
            has &= known_u
            o = snapshot_answers(ans, row).astype(np.float32)                 # (B, N, D)
            o[~has] = 0
            e = item_emb[np.where(known_i, i, 1)]                             # (B, D)
            sim = np.einsum("bnd,bd->bn", _unit(o), item_unit[np.where(known_i, i, 1)])  # (B, N) cosines
            both = has & known_i
            cols = {"lum_snapshot_ts": pa.array(np.where(has, ans["snap/ts"][row] if len(ans["snap/ts"]) else 0, 0), pa.int64(),
                                                mask=~has)}
            for n in range(N):
                cols[f"o_q{n + 1}"] = _fixed_list(o[:, n], has)
            cols["e_item"] = _fixed_list(e, known_i)
            for n in range(N):
                cols[f"sim_q{n + 1}"] = pa.array(sim[:, n].astype(np.float32), mask=~both)
            batch = pa.RecordBatch.from_arrays(list(b.columns) + list(cols.values()),
                                               names=b.schema.names + list(cols))
            if writer is None:
                fields = [f.with_metadata({"query": names[int(f.name.split("q")[-1]) - 1]})
                          if f.name.startswith(("o_q", "sim_q")) and f.name not in b.schema.names else f
                          for f in batch.schema]
                schema = pa.schema(fields, metadata=meta)
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_batch(batch.cast(schema) if batch.schema != schema else batch)
            counts["rows"] += len(u)
            counts["with_answers"] += int(has.sum())
            counts["unseen_user_rows"] += int((~known_u).sum())
            counts["unseen_item_rows"] += int((~known_i).sum())
        if writer is None:
            raise InputError(samples, "the sample table is empty (no rows)")
        writer.close()
        writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)

    # the item embeddings keyed by the raw item id (vocabulary entries 2.., not pad / unknown)
    item_table = pa.table({"item_id": pa.array(vocab_item[2:], pa.string()),
                           "item": pa.array(np.arange(2, len(vocab_item), dtype=np.int64)),
                           "e": _fixed_list(ans["item_emb"][2:].astype(np.float32), None)},
                          schema=pa.schema([("item_id", pa.string()), ("item", pa.int64()),
                                            ("e", pa.list_(pa.float32(), int(D)))], metadata=meta))
    tmp_items = items.with_name(f".{items.name}.tmp-{os.getpid()}")
    pq.write_table(item_table, tmp_items)
    os.replace(tmp_items, items)
    manifest = {**{k.removeprefix("lumctl."): v for k, v in meta.items()}, "queries": names,
                "samples": str(samples), "out": str(out), "items": str(items), "counts": counts,
                "columns": {"answers": [f"o_q{n + 1}" for n in range(N)], "item": "e_item",
                            "similarities": [f"sim_q{n + 1}" for n in range(N)], "d": int(D)},
                "seconds": round(time.time() - started, 2)}
    mpath = out.with_name(out.name.removesuffix(".parquet") + ".manifest.json")
    mpath.write_text(json.dumps(manifest, indent=2))
    say(f"export: {counts['rows']:,} samples ({counts['with_answers']:,} with answers, "
        f"{counts['unseen_user_rows']:,} unseen-user rows, {counts['unseen_item_rows']:,} unseen-item rows), "
        f"{N} queries x {D} in {time.time() - started:.1f}s -> {out}, {items}")
    return out
