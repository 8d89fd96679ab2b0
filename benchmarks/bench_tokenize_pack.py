"""Benchmark: tokenize ML-1M, then Numba packing vs the plain Python/NumPy reference.

    python benchmarks/bench_tokenize_pack.py [ML1M_FOLDER] [--seq-len 4096] [--max-items 200]

Times (1) the `tokenize` stage on the MovieLens-1M folder (read + tokenize + Zarr store write, and
read + tokenize alone), (2) `pack_sequences` (Numba, warm: run once first so compilation is not
timed) against `pack_sequences_ref` on the same training windows (most recent `max_items` training
events per user, as `lumctl pack` does), checks that both give identical arrays, and reports the
packing efficiency next to the efficiency of padding every user to the longest one.

When the reference would take longer than `--ref-budget` seconds on all users, it is timed on a
prefix of the users and scaled by token count; the output says so (`ref_scaled`).

Prints one JSON object and appends it, with a description of the machine, to
benchmarks/results/tokenize_pack.json (a JSON list).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import append_result, machine  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "ml-1m"
RESULTS = REPO / "benchmarks" / "results" / "tokenize_pack.json"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def best_of(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", default=str(DEFAULT_DATA), help=f"ML-1M folder (default {DEFAULT_DATA})")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--max-items", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is reported")
    ap.add_argument("--ref-budget", type=float, default=60.0, help="seconds the reference may take on all users")
    ap.add_argument("--out", default=str(RESULTS), help="JSON list to append the result to")
    args = ap.parse_args(argv)

    from lumctl.ops.packing import pack_sequences, pack_sequences_ref
    from lumctl.readers import read_log
    from lumctl.specs import parse_spec
    from lumctl.stages import tokenize
    from lumctl.stages.pack import user_windows

    data_dir = Path(args.data).resolve()
    if not data_dir.is_dir():
        sys.exit(f"error: {data_dir}: ML-1M folder not found (pass it as the first argument)")

    with tempfile.TemporaryDirectory(prefix="lumbench-") as tmp:
        # the shipped spec, with the data folder and a throwaway store root
        d = tomllib.loads((REPO / "specs" / "ml-1m.toml").read_text(encoding="utf-8"))
        d["tokenize"]["path"] = str(data_dir)
        d["store_root"] = tmp
        d["pack"] = {**d.get("pack", {}), "seq_len": args.seq_len, "max_items": args.max_items}
        spec = parse_spec(d, "specs/ml-1m.toml")

        # ---- tokenize
        tok_stage, tok_stage_all = best_of(lambda: tokenize.run(spec, force=True), args.repeats)
        t = time.perf_counter()
        log = read_log(spec.tokenize)
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        tokenize.tokenize_log(spec.tokenize, log)
        tok_only_s = time.perf_counter() - t
        store = spec.store("tokenize")
        counts = json.loads((store / "manifest.json").read_text())["counts"]
        data = tokenize.load(store)

    # ---- training windows, exactly as `lumctl pack` takes them
    first, count = user_windows(data["users/offsets"], data["users/split"][:, 0], spec.pack.max_items)
    keep = count > 0
    first, count = first[keep], count[keep]
    items, conds, ts = data["events/item"], data["events/cond"], data["events/timestamp"]
    per_tok = 2 if spec.pack.conditions else 1
    S = spec.pack.seq_len

    def numba_pack(n=len(count)):
        return pack_sequences(items, conds, first[:n], count[:n], S, spec.pack.conditions, spec.pack.strategy, ts)

    def ref_pack(n=len(count)):
        return pack_sequences_ref(items, conds, first[:n], count[:n], S, spec.pack.conditions, spec.pack.strategy, ts)

    t = time.perf_counter()
    out = numba_pack()  # compiles (or loads the cache)
    numba_first_s = time.perf_counter() - t
    numba_s, numba_all = best_of(numba_pack, max(args.repeats, 5))

    # ---- reference: all users when it fits the budget, else a prefix scaled by tokens
    probe = min(len(count), 200)
    t = time.perf_counter()
    ref_pack(probe)
    probe_s = time.perf_counter() - t
    total_tokens = int(count.sum()) * per_tok
    est_full = probe_s * total_tokens / max(1, int(count[:probe].sum()) * per_tok)
    if est_full <= args.ref_budget:
        t = time.perf_counter()
        ref = ref_pack()
        ref_s = time.perf_counter() - t
        ref_users, ref_scaled = len(count), False
        ref_matches = all(np.array_equal(out[k], ref[k]) for k in out)
        numba_same_s = numba_s
    else:
        # largest prefix expected to fit half the budget, timed, then scaled by token count
        n = probe
        while n < len(count) and probe_s * (count[:n * 2].sum() / max(1, count[:probe].sum())) < args.ref_budget / 2:
            n = min(len(count), n * 2)
        t = time.perf_counter()
        ref = ref_pack(n)
        sub_s = time.perf_counter() - t
        sub_tokens = int(count[:n].sum()) * per_tok
        ref_s = sub_s * total_tokens / sub_tokens
        ref_users, ref_scaled = int(n), True
        sub = numba_pack(n)
        ref_matches = all(np.array_equal(sub[k], ref[k]) for k in sub)
        numba_same_s, _ = best_of(lambda: numba_pack(n), max(args.repeats, 5))

    tokens = int((out["type"] > 0).sum())
    rows = int(out["type"].shape[0])
    longest = int(count.max()) * per_tok
    result = {
        "benchmark": "tokenize_pack",
        "dataset": str(data_dir),
        "users": counts["users"], "items": counts["items"], "events": counts["events"],
        "tokenize_stage_s": round(tok_stage, 3),
        "tokenize_stage_runs_s": [round(x, 3) for x in tok_stage_all],
        "read_s": round(read_s, 3),
        "tokenize_only_s": round(tok_only_s, 3),
        "events_per_s_tokenize_stage": round(counts["events"] / tok_stage),
        "seq_len": S, "max_items": spec.pack.max_items, "conditions": spec.pack.conditions,
        "strategy": spec.pack.strategy,
        "packed_users": int(len(count)), "tokens": tokens, "rows": rows,
        "numba_pack_s": round(numba_s, 4),
        "numba_pack_runs_s": [round(x, 4) for x in numba_all],
        "numba_first_call_s": round(numba_first_s, 3),
        "ref_pack_s": round(ref_s, 3),
        "ref_users_timed": ref_users,
        "ref_scaled": ref_scaled,
        "ref_note": ("reference timed on all users" if not ref_scaled else
                     f"reference timed on the first {ref_users} users and scaled by token count "
                     f"to all {len(count)} (an estimate: part of its cost grows with users x rows)"),
        "speedup": round(ref_s / numba_s, 1),
        "speedup_same_users": round((sub_s if ref_scaled else ref_s) / numba_same_s, 1),
        "ref_matches_numba": bool(ref_matches),
        "packing_efficiency": round(tokens / (rows * S), 5),
        "per_user_padding_efficiency": round(tokens / (len(count) * longest), 5),
        "per_user_padding_len": longest,
        "machine": machine(),
    }
    print(json.dumps(result, indent=2))

    append_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
