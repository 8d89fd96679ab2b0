"""Write the ML-1M CTR samples as a sample table, and two specs that fuse on the same split.

    python examples/ml1m_samples.py specs/ml-1m-ctr.toml WORK [--backbone din] [--lum none]

WORK/ml1m_samples.parquet: one row per rating, read from the spec's [tokenize] log with lumctl's own
reader and tokenizer: user_id, item_id (raw MovieLens ids), timestamp, label (rating >= 4), split
(train/valid/test: the built-in route's per-user split; ratings before the per-user LUM cutoff are the
LUM's and left out), and the feature columns a ranker would join from its own tables: the user's
gender, age and occupation (users.dat codes, as text), the movie's year (from its title, an integer;
null when the title has none) and genres ('|'-separated), and hour (hour of the day). WORK/samples.toml
declares none of them; specs/ml-1m-ctr-samples.toml declares all but hour (the ML-1M CPU ranking table of
specs/report-cpu.toml). WORK/builtin.toml: the spec with [fuse] backbone/lum set (the built-in route).
WORK/samples.toml: the same with [fuse] samples pointing at the table. Both write their stores under
WORK/stores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lumctl.readers import read_log
from lumctl.spec_io import deep_merge, dump_toml, read_toml
from lumctl.specs import load_spec
from lumctl.stages.fuse import event_parts
from lumctl.stages.tokenize import tokenize_log


def profile_columns(log, user: pa.Array, item: pa.Array) -> dict[str, pa.Array]:
    """Per sample: the user's gender, age, occupation (users.dat) and the movie's year and genres
    (movies.dat), joined by raw id; null where the file has no row for the id."""
    out = {}
    if log.users is not None:
        row = pc.index_in(user, value_set=log.users["user"])
        for c in ("gender", "age", "occupation"):
            out[c] = log.users[c].combine_chunks().take(row)
    if log.items is not None:
        row = pc.index_in(item, value_set=log.items["item"])
        year = pc.extract_regex(log.items["title"], r"\((?P<year>\d{4})\)\s*$")
        out["year"] = pc.cast(pc.struct_field(year, "year"), pa.int16()).combine_chunks().take(row)
        out["genres"] = pc.binary_join(log.items["genres"], "|").combine_chunks().take(row)
    return out


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

    log = read_log(spec.tokenize, spec.store("synth"))
    data, _ = tokenize_log(spec.tokenize, log)
    part = event_parts(data)
    keep = part >= 0                                                   # -1: the LUM's pretrain events
    ts = data["events/timestamp"][keep]
    user = pa.array(data["vocab/user"][data["events/user"][keep]].astype(str))
    item = pa.array(data["vocab/item"][data["events/item"][keep]].astype(str))
    table = pa.table({
        "user_id": user, "item_id": item, "timestamp": ts,
        "label": (data["events/rating"][keep] >= 4).astype(np.int8),
        "split": pa.array(np.array(["train", "valid", "test"])[part[keep]]),
        **profile_columns(log, user, item),
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
        (a.work / f"{name}.toml").write_text(f"# {spec.experiment}, {name} route (examples/ml1m_samples.py)\n" + dump_toml(d))
        print(a.work / f"{name}.toml")


if __name__ == "__main__":
    main()
