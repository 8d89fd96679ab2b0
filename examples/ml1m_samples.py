"""Write the ML-1M CTR samples as a sample table, and two specs that fuse on the same split.

    python examples/ml1m_samples.py specs/ml-1m-ctr.toml WORK [--backbone din] [--lum none]

WORK/ml1m_samples.parquet: one row per rating, read from the spec's [tokenize] log with lumctl's own
reader and tokenizer: user_id, item_id (raw MovieLens ids), timestamp, label (rating >= 4), split
(train/valid/test: the built-in route's per-user split; ratings before the per-user LUM cutoff are the
LUM's and left out) and hour (hour of the day, a feature column the specs do not declare).
WORK/builtin.toml: the spec with [fuse] backbone/lum set (the built-in route). WORK/samples.toml: the
same with [fuse] samples pointing at the table. Both write their stores under WORK/stores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lumctl.readers import read_log
from lumctl.specs import deep_merge, load_spec, read_toml, to_toml
from lumctl.stages.fuse import event_parts
from lumctl.stages.tokenize import tokenize_log


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("work", type=Path)
    ap.add_argument("--backbone", default=None, help="[fuse] backbone of both specs (default: the spec's)")
    ap.add_argument("--lum", default="none", help="[fuse] lum of both specs (default: none, the base model)")
    ap.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                    help="write the rows in a random order (so the table route trains on other batches)")
    a = ap.parse_args()
    spec = load_spec(a.spec)
    a.work.mkdir(parents=True, exist_ok=True)

    data, _ = tokenize_log(spec.tokenize, read_log(spec.tokenize, spec.store("synth")))
    part = event_parts(data)
    keep = part >= 0                                                   # -1: the LUM's pretrain events
    ts = data["events/timestamp"][keep]
    table = pa.table({
        "user_id": pa.array(data["vocab/user"][data["events/user"][keep]]),
        "item_id": pa.array(data["vocab/item"][data["events/item"][keep]]),
        "timestamp": ts,
        "label": (data["events/rating"][keep] >= 4).astype(np.int8),
        "split": pa.array(np.array(["train", "valid", "test"])[part[keep]]),
        "hour": ((ts // 3600) % 24).astype(np.int16)})
    if a.shuffle is not None:
        table = table.take(np.random.default_rng(a.shuffle).permutation(table.num_rows))
    out = a.work / "ml1m_samples.parquet"
    pq.write_table(table, out)
    print(f"{out}: {table.num_rows:,} samples")

    raw = read_toml(a.spec)
    fuse = {"lum": a.lum} | ({"backbone": a.backbone} if a.backbone else {})
    common = {"store_root": str(a.work / "stores"), "fuse": fuse}
    for name, extra in (("builtin", {}), ("samples", {"fuse": {"samples": {"path": str(out), "split_column": "split"}}})):
        d = deep_merge(deep_merge(raw, common), {"experiment": f"{spec.experiment}-{name}", **extra})
        (a.work / f"{name}.toml").write_text(f"# {spec.experiment}, {name} route (examples/ml1m_samples.py)\n" + to_toml(d))
        print(a.work / f"{name}.toml")


if __name__ == "__main__":
    main()
