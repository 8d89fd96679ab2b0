"""Benchmark: `lumctl pack` wall time and peak memory on Taobao-shaped tokenize stores.

    python benchmarks/bench_pack_scale.py --events 10000000 30000000 [--seq-len 4096] [--max-items 500]

For each size a tokenize store is written directly (the arrays `pack` reads, in the layout of
lumctl/stages/tokenize.py, with Taobao-like shapes): ~101 events per user with a heavy tail
(lognormal, at least 5), item ids up to 4M with a power-law popularity, two condition fields
(behaviour: pv / cart / fav / buy = 89.5 / 5.5 / 2.9 / 2.0 %; category up to 9.4k), 9 days of
timestamps sorted per user, a time split leaving ~78 % of each user's events for training. Then
`python -m lumctl pack --force` runs under `/usr/bin/time -v`: wall seconds and peak RSS are
read from its report (and CPU seconds, user + system: on a shared machine wall time also
measures the others' load, reported as the 1-minute load average before the run), the packing counts from the store's manifest.

Stores are kept in `--workdir` (reused when present; delete it to rebuild). Prints one JSON
object and appends it, with a description of the machine, to benchmarks/results/pack_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import append_result, machine  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pack_scale.json"
N_ITEMS, N_CATEGORIES, DAY = 4_000_000, 9_400, 86_400
BEHAVIOUR_P = (0.895, 0.055, 0.029, 0.021)


def user_counts(n_events: int, rng: np.random.Generator) -> np.ndarray:
    """Events per user: lognormal around 101 (at least 5), summing to n_events."""
    n_users = max(1, n_events // 101)
    c = np.maximum(5, rng.lognormal(np.log(101) - 0.6, 1.1, n_users)).astype(np.int64)
    c = np.maximum(5, np.round(c * n_events / c.sum()).astype(np.int64))
    c[-1] += n_events - c.sum()                       # exact total (the last user absorbs rounding)
    if c[-1] < 5:
        c[-1] = 5
    return c


def write_store(store: Path, n_events: int, seed: int, chunk_events: int = 1 << 22) -> None:
    """A complete tokenize store at `store` (data.zarr + manifest), written in event chunks."""
    from lumctl import zarrio
    from lumctl.store import atomic_dir, write_manifest
    rng = np.random.default_rng(seed)
    count = user_counts(n_events, rng)
    E, U = int(count.sum()), len(count)
    offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
    train_end = np.clip(np.round(count * rng.uniform(0.65, 0.9, U)), 1, count).astype(np.int64)
    valid_end = np.minimum(count, train_end + np.maximum(1, count // 9))
    user = np.repeat(np.arange(U, dtype=np.int32), count)
    with atomic_dir(store) as tmp:
        g = zarrio.create(tmp / "data.zarr")
        zarrio.put(g, "users/offsets", offsets)
        zarrio.put(g, "users/split", np.stack([train_end, valid_end], 1))
        zarrio.put(g, "events/user", user)
        arrs = {"events/item": ((E,), np.int32), "events/cond": ((E, 2), np.int32), "events/timestamp": ((E,), np.int64)}
        out = {k: g.create_array(k, shape=s, dtype=d, chunks=(chunk_events,) + s[1:]) for k, (s, d) in arrs.items()}
        t0 = 1511539200
        for a in range(0, E, chunk_events):
            b = min(E, a + chunk_events)
            n = b - a
            item = (2 + N_ITEMS * rng.random(n) ** 3).astype(np.int32)            # power-law popularity
            beh = 2 + np.searchsorted(np.cumsum(BEHAVIOUR_P), rng.random(n)).clip(0, 3)
            cat = 2 + (item.astype(np.int64) * 2654435761 % N_CATEGORIES)          # one category per item
            out["events/item"][a:b] = item
            out["events/cond"][a:b] = np.stack([beh, cat], 1).astype(np.int32)
            # timestamps increase within each user: the user's rank of the event spread over 9 days
            u = user[a:b]
            rank = np.arange(a, b) - offsets[u]
            out["events/timestamp"][a:b] = t0 + (rank * (9 * DAY) // count[u]).astype(np.int64)
        g.attrs.update({"conditions": ["behavior", "category"]})
        write_manifest(tmp, stage="tokenize", spec_hash="bench", inputs={"bench": f"{n_events}-{seed}"},
                       counts={"events": E, "users": U})


def run_pack(spec_path: Path) -> dict:
    """`lumctl pack --force` under /usr/bin/time -v: wall seconds and peak RSS."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "lumctl", "pack", str(spec_path), "--force"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(f"pack failed:\n{p.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", p.stderr).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    cpu = {k: float(re.search(rf"{k.capitalize()} time \(seconds\): ([\d.]+)", p.stderr).group(1)) for k in ("user", "system")}
    return {"wall_s": round(secs, 2), "cpu_s": round(cpu["user"] + cpu["system"], 2), "peak_rss_gib": round(rss_kb / 2 ** 20, 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, nargs="+", default=[10_000_000], help="log sizes (events)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--max-items", type=int, default=500)
    ap.add_argument("--pack", default="", help="extra [pack] keys as TOML, e.g. 'block_mib = 128'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/lumctl-bench-pack", help="where the stores live (reused)")
    ap.add_argument("--out", default=str(RESULTS), help="JSON list to append the result to")
    args = ap.parse_args(argv)

    runs = []
    for n in args.events:
        root = Path(args.workdir) / f"e{n}"
        tok = root / "bench" / "tokenize"
        if not (tok / "manifest.json").is_file():
            t = time.perf_counter()
            write_store(tok, n, args.seed)
            print(f"wrote a {n:,}-event tokenize store in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        spec = root / "spec.toml"
        spec.write_text(f'experiment = "bench"\nstore_root = "{root}"\n'
                        f'[tokenize]\nformat = "taobao"\npath = "unused.csv"\n'
                        f'[pack]\nseq_len = {args.seq_len}\nmax_items = {args.max_items}\n{args.pack}\n')
        load = os.getloadavg()[0]                  # the machine may be shared: wall time counts others' load
        res = run_pack(spec)
        counts = json.loads((root / "bench" / "pack" / "manifest.json").read_text())["counts"]
        runs.append({"events": n, **res, "load_avg_1min_before": round(load, 2), "counts": counts})
        print(json.dumps(runs[-1]), file=sys.stderr)
    result = {"benchmark": "pack_scale", "seq_len": args.seq_len, "max_items": args.max_items,
              "pack_extra": args.pack, "runs": runs, "machine": machine()}
    print(json.dumps(result, indent=2))
    append_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
