"""Benchmark: the CPU data path, stage by stage, on the real files.

    python benchmarks/bench_cpu_datapath.py [--data ../shared/data] [--threads 0]

1. `tokenize` and `pack` (each stage timed end to end: read, tokenize, Zarr write / load, Numba
   pack, Zarr write) on MovieLens-1M (users 1-2999, ratings + movie genres as conditions) and on
   the largest Amazon file we have (BERT4Rec's Amazon Beauty, `user item` lines, 353,962 events).
2. `query` on ML-1M with specs/ml-1m-ctr.toml (every user, a snapshot every 25 events, 6 grouped
   queries per snapshot), from a tiny LUM pretrained for a few steps (weights do not change the
   speed): answers/s and tokens/s.
3. `fuse` on the same spec, DIN + LUM (direct+match), one epoch: train samples/s (the stage's wall
   time over the train samples, so it includes feature building and the valid/test scoring).

Prints one JSON object per step and appends them, with the machine, to
benchmarks/results/cpu_datapath.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tomllib
from pathlib import Path

from common import append_result, machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "cpu_datapath.json"


def timed(stage: str, spec) -> float:
    from lumctl.stages import stage_module
    t = time.perf_counter()
    stage_module(stage).run(spec, force=True)
    return time.perf_counter() - t


def manifest(spec, stage: str) -> dict:
    return json.loads((spec.store(stage) / "manifest.json").read_text())["counts"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from lumctl.specs import deep_merge as merge
    from lumctl.specs import parse_spec
    os.environ["LUMCTL_DATA"] = str(Path(a.data).resolve())
    info = machine(torch_threads=torch.get_num_threads())
    tmp = Path(tempfile.mkdtemp(prefix="lumctl-bench-"))
    amazon = {"experiment": "amazon-beauty-b4r", "store_root": str(tmp),
              "tokenize": {"format": "seq-pairs", "path": str(Path(a.data) / "amazon" / "bert4rec" / "beauty.txt")},
              "pack": {"seq_len": 4096, "max_items": 200, "conditions": False}}
    ml1m = tomllib.loads((REPO / "specs" / "ml-1m.toml").read_text())
    ml1m["store_root"] = str(tmp)
    for name, d in [("ml-1m", ml1m), ("amazon-beauty (bert4rec)", amazon)]:
        spec = parse_spec(d, name)
        t_tok, t_pack = timed("tokenize", spec), timed("pack", spec)
        tc, pc = manifest(spec, "tokenize"), manifest(spec, "pack")
        events = int(tc.get("events", 0))
        res = {"benchmark": "cpu_datapath", "step": "tokenize+pack", "dataset": name, "events": events,
               "users": tc.get("users"), "items": tc.get("items"), "tokenize_s": round(t_tok, 2), "pack_s": round(t_pack, 2),
               "tokenize_events_per_s": round(events / t_tok), "pack_events_per_s": round(events / t_pack),
               "pack_rows": pc.get("rows"), "pack_efficiency": pc.get("efficiency")}
        print(json.dumps(res), flush=True)
        append_result(a.out, {"machine": info, **res})

    ctr = merge(tomllib.loads((REPO / "specs" / "ml-1m-ctr.toml").read_text()),
                {"store_root": str(tmp), "pretrain": {"optim": {"max_steps": 10, "warmup_steps": 1},
                                                      "eval": {"every_steps": 10}, "log_every": 10},
                 "fuse": {"epochs": 1, "seeds": 1}})
    spec = parse_spec(ctr, "ml-1m-ctr")
    for stage in ("tokenize", "pack", "pretrain"):
        timed(stage, spec)
    t_q = timed("query", spec)
    qc = manifest(spec, "query")
    answers = int(qc["valid_snapshots"]) * int(qc["queries"])
    res = {"benchmark": "cpu_datapath", "step": "query", "dataset": "ml-1m (ml-1m-ctr.toml)", "users": qc["users"],
           "snapshots": qc["valid_snapshots"], "queries": qc["queries"], "answers": answers, "tokens": qc["tokens"],
           "query_s": round(t_q, 2), "answers_per_s": round(answers / t_q), "tokens_per_s": round(qc["tokens"] / t_q)}
    print(json.dumps(res), flush=True)
    append_result(a.out, {"machine": info, **res})
    t_f = timed("fuse", spec)
    fc = manifest(spec, "fuse")
    res = {"benchmark": "cpu_datapath", "step": "fuse", "dataset": "ml-1m (ml-1m-ctr.toml)", "backbone": spec.fuse.backbone,
           "lum": spec.fuse.lum, "train_samples": fc["train"], "valid_test_samples": fc["valid"] + fc["test"],
           "epochs": 1, "fuse_s": round(t_f, 2), "train_samples_per_s_incl_eval": round(fc["train"] / t_f)}
    print(json.dumps(res), flush=True)
    append_result(a.out, {"machine": info, **res})


if __name__ == "__main__":
    main()
