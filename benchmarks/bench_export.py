"""Benchmark: `lumctl export` wall time and peak RSS against the sample table's size.

    python benchmarks/bench_export.py SPEC --rows 2000000 10000000 [--work DIR]

SPEC is an experiment whose tokenize and query stores exist (e.g. specs/demo.toml after `lumctl run`).
For each N, writes an N-row parquet sample table (in 1M-row chunks) from the experiment's users and items:
user_id, item_id, timestamp uniform over the log's time range, label, and two feature columns
(price float, hour int); then runs `lumctl export` under /usr/bin/time -v and records its wall time and
maximum resident set size. Appends the results, with the machine, to benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import REPO, append_result, machine

from lumctl import zarrio
from lumctl.specs import load_spec
from lumctl.store import join


def write_table(spec, path: Path, rows: int, chunk: int = 1 << 20, seed: int = 0) -> None:
    g = zarrio.open_read(join(spec.input_store("tokenize"), "data.zarr"))
    users = np.array(zarrio.get(g, "vocab/user").tolist())
    items = np.array(zarrio.get(g, "vocab/item")[2:].tolist())
    ts = zarrio.get(g, "events/timestamp")
    lo, hi = int(ts.min()), int(ts.max()) + 1
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(path, pa.schema([("user_id", pa.string()), ("item_id", pa.string()),
                                           ("timestamp", pa.int64()), ("label", pa.int8()),
                                           ("price", pa.float32()), ("hour", pa.int16())])) as w:
        for a in range(0, rows, chunk):
            n = min(chunk, rows - a)
            t = rng.integers(lo, hi, n)
            w.write_table(pa.table({"user_id": users[rng.integers(0, len(users), n)],
                                    "item_id": items[rng.integers(0, len(items), n)], "timestamp": t,
                                    "label": (rng.random(n) < 0.3).astype(np.int8),
                                    "price": rng.gamma(2.0, 10.0, n).astype(np.float32),
                                    "hour": ((t // 3600) % 24).astype(np.int16)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 10_000_000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_export"))
    a = ap.parse_args()
    spec = load_spec(a.spec)
    a.work.mkdir(parents=True, exist_ok=True)
    for rows in a.rows:
        table = a.work / f"samples_{rows}.parquet"
        if not table.is_file():
            write_table(spec, table, rows)
        out = a.work / f"export_{rows}.parquet"
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "lumctl", "export", a.spec, "--samples", str(table),
               "--out", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if r.returncode:
            sys.exit(r.stderr)
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", r.stderr).group(1)
        secs = sum(float(x) * 60 ** k for k, x in enumerate(reversed(wall.split(":"))))
        res = {"bench": "export", "spec": a.spec, "rows": rows, "wall_s": round(secs, 1),
               "peak_rss_gib": round(rss_kb / 2**20, 3), "table_mib": round(table.stat().st_size / 2**20, 1),
               "out_mib": round(out.stat().st_size / 2**20, 1), "rows_per_s": round(rows / secs),
               "log": r.stderr.strip().splitlines()[0]}
        print(res, flush=True)
        append_result(REPO / "benchmarks" / "results" / "export.json", {**res, "machine": machine()})


if __name__ == "__main__":
    main()
