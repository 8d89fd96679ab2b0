"""Benchmark: what writing `latest.parquet` costs the query's critical path, the former way (each batch's
latest rows written to a part file by the writer thread, then every part decoded and written again into
latest.parquet after the last batch) against now (the writer thread appends each batch to latest.parquet
as it goes; nothing is left to do after the last batch).

    python benchmarks/bench_latest_write.py [--users 100000] [--batch 16384] [--queries 8] [--d 512] [--out FILE]

Synthetic latest rows (one per user: its id, index, snapshot name, time, position and --queries answers of
--d float16 values) in batches of --batch users, written with the store's schema and writer options
(`latest_schema`, `latest_options`, `latest_table`). Times, in seconds: the batch writes (off the critical
path: they overlap the device's answering) and the join after the last batch (on it). Prints one JSON
object and appends it, with a description of the machine, to --out (benchmarks/results/latest_write.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import append_result, machine  # noqa: E402
from lumctl.stages.query import latest_options, latest_schema, latest_table  # noqa: E402


def batches(users: int, batch: int, n: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for a in range(0, users, batch):
        b = min(users, a + batch)
        u = np.arange(a, b)
        yield (np.array([f"u{i}" for i in u]), u, ["split"] * len(u), rng.integers(0, 1 << 30, len(u)),
               rng.integers(1, 200, len(u)), rng.standard_normal((len(u), n, d)).astype(np.float16),
               np.ones((len(u), n, 0), np.int32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=16_384, help="users whose latest rows one batch writes")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "latest_write.json"))
    a = ap.parse_args()
    schema = latest_schema([f"q{i}" for i in range(a.queries)], a.d, False, {}, "float16")
    opts = latest_options(schema)
    tables = [latest_table(schema, *cols, [], {}) for cols in batches(a.users, a.batch, a.queries, a.d)]
    gib = sum(t.nbytes for t in tables) / 2**30
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()                             # former: a part file per batch ...
        for k, t in enumerate(tables):
            pq.write_table(t, tmp / f"b{k:06d}.parquet", **opts)
        parts_s = time.perf_counter() - t0
        t0 = time.perf_counter()                             # ... joined after the last batch
        with pq.ParquetWriter(tmp / "joined.parquet", schema, **opts) as w:
            for k in range(len(tables)):
                pf = pq.ParquetFile(tmp / f"b{k:06d}.parquet")
                for rg in range(pf.num_row_groups):
                    w.write_table(pf.read_row_group(rg))
        join_s = time.perf_counter() - t0
        t0 = time.perf_counter()                             # now: appended as the batches finish
        with pq.ParquetWriter(tmp / "direct.parquet", schema, **opts) as w:
            for t in tables:
                w.write_table(t)
        direct_s = time.perf_counter() - t0
        same = pq.read_table(tmp / "joined.parquet").equals(pq.read_table(tmp / "direct.parquet"))
    res = {"users": a.users, "batch": a.batch, "queries": a.queries, "d": a.d, "gib": round(gib, 3),
           "former": {"batch_writes_s": round(parts_s, 2), "after_last_batch_s": round(join_s, 2)},
           "now": {"batch_writes_s": round(direct_s, 2), "after_last_batch_s": 0.0}, "same_table": same}
    print(json.dumps(res))
    append_result(a.out, {**res, "machine": machine()})


if __name__ == "__main__":
    main()
