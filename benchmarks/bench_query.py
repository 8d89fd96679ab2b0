"""Benchmark: grouped query (prefix once + N query tokens) vs one query per pass (N copies of the prefix).

    python benchmarks/bench_query.py [--data ML1M_FOLDER | --synth | --store TOKENIZE_STORE]
                                     [--users 300] [--preset small | --checkpoint DIR] [--ns 1,4,16,64]
                                     [--max-items 200] [--seq-len 0] [--batch-rows 8] [--device auto]

Both ways run `lumctl.stages.query.answer` on the same documents: each user's test-time snapshot
(its events before the first test event, the most recent max_items - 1 of them), asked N
conditions (the first N of rating x genre, or scenario x category on the synthetic log, '<any>'
included). "grouped" packs one document per user with its N query tokens; "per pass" packs N
documents per user, each the prefix plus one query token. Both are packed with best fit into rows
of `--seq-len` tokens (default: the longest grouped document, rounded up to a multiple of 128) and
run `--batch-rows` rows per forward: sdpa with the dense Numba mask on CPU, flex attention with a
BlockMask on CUDA (bf16 autocast). A warm-up call on a few users compiles Numba / flex first; each
timing is the best of `--repeats` runs. The answers of the two ways are compared (max abs diff).

The model is a freshly initialised LUM of `--preset` (timings do not depend on the weights) or a
checkpoint (`--checkpoint`, a folder with config.json + model.pt; it must match the store's vocabularies).

Goal (DESIGN.md section 4): grouped >= 0.7 N x faster than one query per pass for N >= 4.
Prints one JSON object and appends it, with a description of the machine, to
benchmarks/results/query.json (a JSON list).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import append_result, machine  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "query.json"


def machine_info(device) -> dict:
    import torch
    extra = {"torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        extra.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return machine(**extra)

def tokenize_store(args, tmp: Path) -> tuple[Path, str]:
    """(tokenize store, dataset label): an existing store, or ML-1M / the synthetic demo tokenized into tmp."""
    from lumctl.specs import load_spec
    from lumctl.stages import run_all
    if args.store:
        return Path(args.store), str(args.store)
    spec_file = REPO / "specs" / ("demo.toml" if args.synth else "ml-1m.toml")
    if not args.synth:
        os.environ["LUMCTL_DATA"] = str(Path(args.data).resolve().parent)
    spec = load_spec(spec_file).model_copy(update={"store_root": str(tmp)})
    run_all(spec, upto="tokenize")
    return spec.store("tokenize"), ("synth (specs/demo.toml)" if args.synth else str(args.data))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "ml-1m"), help="MovieLens-1M folder")
    src.add_argument("--synth", action="store_true", help="the synthetic log of specs/demo.toml instead")
    src.add_argument("--store", help="an existing tokenize store folder")
    ap.add_argument("--users", type=int, default=300, help="the first U users with a test snapshot")
    ap.add_argument("--preset", default="small", help="LUM preset of the freshly initialised model")
    ap.add_argument("--checkpoint", help="checkpoint folder (config.json + model.pt) instead of a fresh model")
    ap.add_argument("--ns", default="1,4,16,64", help="numbers of query conditions")
    ap.add_argument("--max-items", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=0, help="tokens per packed row (0 = fit the longest document)")
    ap.add_argument("--batch-rows", type=int, default=8)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import torch

    from lumctl.specs import ModelSpec, PretrainSpec, QuerySpec
    from lumctl.stages import query as q
    from lumctl.stages import tokenize
    from lumctl.stages.pretrain import _cond_fields, build_model, load_model, model_config

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    ns = [int(x) for x in args.ns.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        store, dataset = tokenize_store(args, Path(tmp))
        data = tokenize.load(store)
        cond_names = [c["name"] for c in _cond_fields(store)]
    if args.checkpoint:
        model, cfg = load_model(Path(args.checkpoint), device)
        if cfg["model"]["n_items"] != len(data["vocab/item"]) or cfg["condition_fields"] != cond_names:
            sys.exit(f"{args.checkpoint}: checkpoint does not match the store's vocabularies")
        model_desc = {"checkpoint": str(args.checkpoint), **{k: cfg["model"][k] for k in ("d_model", "n_layers", "n_heads")}}
    else:
        cfg = model_config(PretrainSpec(model=ModelSpec(preset=args.preset)), data, cond_names, device)
        torch.manual_seed(0)
        model = build_model("lum", cfg, data).to(device)
        model_desc = {"preset": args.preset, **{k: cfg[k] for k in ("d_model", "n_layers", "n_heads", "d_ff")}}
    model.eval()
    model_desc["non_embedding_params"] = model.num_params()

    # documents: each user's test-time snapshot, the first --users users that have one
    n_users = len(data["users/offsets"]) - 1
    cut, valid, _ = q.snapshots(data, np.arange(n_users), QuerySpec(snapshot="split"))
    users = np.flatnonzero(valid[:, 1])[:args.users]
    pcut = cut[users, 1]
    count = np.minimum(pcut, args.max_items - 1)
    first = data["users/offsets"][users] + pcut - count
    # conditions: the product of every field's values ('<any>' first), first N of them
    values = [range(1, len(data[f"vocab/cond_{n}"])) for n in cond_names]
    all_q = np.array(list(itertools.product(*values)), np.int32)
    if len(all_q) < max(ns):
        sys.exit(f"only {len(all_q)} distinct conditions; lower --ns")
    seq_len = args.seq_len or int(np.ceil((2 * count.max() + max(ns)) / 128) * 128)
    items, conds = data["events/item"], data["events/cond"]
    cuda = device.type == "cuda"

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best, out

    results = []
    for N in ns:
        queries = all_q[:N]
        kw = dict(seq_len=seq_len, batch_rows=args.batch_rows, device=device, autocast=cuda)
        for grouped in (True, False):  # warm-up: Numba, flex compilation for this shape
            q.answer(model, items, conds, first[:4], count[:4], queries, grouped=grouped, **kw)
        g_s, g_out = timed(lambda: q.answer(model, items, conds, first, count, queries, grouped=True, **kw))
        p_s, p_out = timed(lambda: q.answer(model, items, conds, first, count, queries, grouped=False, **kw))
        g_tok = int(2 * count.sum() + N * len(count))
        p_tok = int(N * (2 * count.sum() + len(count)))
        r = {"n": N, "grouped_s": round(g_s, 4), "per_pass_s": round(p_s, 4), "speedup": round(p_s / g_s, 2),
             "goal": round(0.7 * N, 2), "meets_goal": bool(p_s / g_s >= 0.7 * N) if N >= 4 else None,
             "grouped_tokens": g_tok, "per_pass_tokens": p_tok, "token_ratio": round(p_tok / g_tok, 2),
             "max_abs_diff": float(np.abs(g_out - p_out).max())}
        results.append(r)
        print(json.dumps(r), file=sys.stderr)

    result = {
        "benchmark": "query", "dataset": dataset, "users": int(len(users)), "documents": int(len(users)),
        "prefix_events": {"mean": round(float(count.mean()), 1), "max": int(count.max())},
        "model": model_desc, "device": device.type, "attention": "flex" if cuda else "sdpa",
        "precision": "bf16 autocast" if cuda else "fp32",
        "seq_len": seq_len, "max_items": args.max_items, "batch_rows": args.batch_rows, "repeats": args.repeats,
        "results": results, "machine": machine_info(device),
    }
    print(json.dumps(result, indent=2))
    append_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
