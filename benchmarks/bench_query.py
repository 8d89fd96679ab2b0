"""Benchmark: grouped query (prefix once + N query tokens) vs one query per pass (N copies of the prefix);
and (--stage) the whole `lumctl query` stage at scale: users/s and peak RSS.

    python benchmarks/bench_query.py [--data ML1M_FOLDER | --synth | --store TOKENIZE_STORE]
                                     [--users 300] [--preset small | --checkpoint DIR] [--ns 1,4,16,64]
                                     [--max-items 200] [--seq-len 0] [--batch-rows 8] [--device auto]
    python benchmarks/bench_query.py --stage [--stage-users 50000] [--every-n 25] [--code REPO_DIR ...]

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

--stage: a synthetic tokenize store written directly (no synth/tokenize run): `--stage-users` users
with a heavy-tailed number of events (lognormal, median 30, clipped to [5, `--max-events`]), 4
scenarios x 20 categories, 10k items; a freshly initialised LUM of `--preset` saved as a checkpoint
(max_items 200, seq_len 512); then `python -m lumctl query` on a spec asking 8 conditions (each
scenario x the user's top-2 categories) at snapshots every `--every-n` events, once per `--code`
folder (a lumctl checkout whose code runs the stage, e.g. the main branch for "before"), each in its
own process: wall time, the stage's own seconds (manifest), users/s, peak RSS (wait4), store size.

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


# ------------------------------------------------------------------------------------ --stage
def synth_store(out: Path, users: int, max_events: int, seed: int = 0) -> dict:
    """A tokenize store (layout of lumctl/stages/tokenize.py) of `users` synthetic users; its manifest."""
    from lumctl import zarrio
    from lumctl.store import atomic_dir, write_manifest
    rng = np.random.default_rng(seed)
    n = np.clip(rng.lognormal(np.log(30), 1.0, users), 5, max_events).astype(np.int64)    # events per user
    E, I, C = int(n.sum()), 10_000, 20
    offsets = np.r_[0, np.cumsum(n)].astype(np.int64)
    user = np.repeat(np.arange(users), n)
    item = (2 + (I * rng.random(E) ** 3)).astype(np.int32)                                 # popular items first
    item_cat = rng.integers(2, 2 + C, I + 2).astype(np.int32)
    gap = np.where(rng.random(E) < 0.1, 0, rng.integers(1, 3600, E))                       # 10% same-second ties
    gap[offsets[:-1]] = rng.integers(0, 9 * 86400, users)                                   # each user's start
    ts = (1_500_000_000 + np.cumsum(gap) - np.repeat(np.cumsum(gap)[offsets[:-1]] - gap[offsets[:-1]], n))
    cond = np.stack([rng.integers(2, 6, E), item_cat[item]], 1).astype(np.int32)            # scenario, category
    arrays = {"events/user": user.astype(np.int32), "events/item": item, "events/timestamp": ts.astype(np.int64),
              "events/cond": cond, "users/offsets": offsets,
              "users/split": np.stack([n - 2, n - 1], 1).astype(np.int64),
              "items/popularity": np.r_[0, 0, np.full(I, 2)].astype(np.int32), "items/category": item_cat,
              "vocab/user": np.array([f"u{u}" for u in range(users)]),
              "vocab/item": np.array(["<pad>", "<unk>"] + [f"i{i}" for i in range(I)]),
              "vocab/category": np.array(["<pad>", "<unk>"] + [f"c{c}" for c in range(C)]),
              "vocab/cond_scenario": np.array(["<pad>", "<any>", "s0", "s1", "s2", "s3"]),
              "vocab/cond_category": np.array(["<pad>", "<any>"] + [f"c{c}" for c in range(C)])}
    counts = {"users": users, "items": I, "events": E,
              "events_per_user": {"min": int(n.min()), "mean": round(float(n.mean()), 2), "max": int(n.max())}}
    with atomic_dir(out) as tmp:
        g = zarrio.create(tmp / "data.zarr")
        for k, a in arrays.items():
            zarrio.put(g, k, a)
        g.attrs["conditions"] = [{"name": "scenario", "source": "column", "column": "scenario"},
                                 {"name": "category", "source": "item_attr", "column": "category"}]
        return write_manifest(tmp, stage="tokenize", spec_hash="bench_query", inputs={"bench": f"{users}-{seed}"},
                              counts=counts)


def stage_bench(args) -> dict:
    import subprocess

    import torch

    from lumctl.specs import ModelSpec, PretrainSpec
    from lumctl.stages import tokenize
    from lumctl.stages.pretrain import build_model, model_config
    from lumctl.store import store_hash
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_query_"))
    store = root / "stores" / "bench" / "tokenize"
    t = time.time()
    manifest = synth_store(store, args.stage_users, args.max_events)
    print(f"store: {manifest['counts']} in {time.time() - t:.1f}s", file=sys.stderr)
    data = tokenize.load(store)
    cond_names = ["scenario", "category"]
    cfg = model_config(PretrainSpec(model=ModelSpec(preset=args.preset)), data, cond_names, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model("lum", cfg, data)
    ckpt = root / "checkpoint"
    ckpt.mkdir(exist_ok=True)
    torch.save(model.state_dict(), ckpt / "model.pt")
    (ckpt / "config.json").write_text(json.dumps({
        "kind": "lum", "model": cfg, "inputs": {"tokenize": store_hash(manifest)}, "condition_fields": cond_names,
        "conditions": True, "max_items": 200, "seq_len": 512}))
    del data, model
    spec = root / "query.toml"
    spec.write_text(f'experiment = "bench"\nstore_root = "{root / "stores"}"\n\n[tokenize]\nformat = "seq-lines"\n'
                    f'path = "{root}"\n\n[query]\ncheckpoint = "{ckpt}"\neach = ["scenario"]\n'
                    f'top_k = {{ category = 2 }}\nsnapshot = "every_n_events"\nevery_n_events = {args.every_n}\n'
                    f'batch_rows = {args.batch_rows}\n' + (f'max_items = {args.query_max_items}\n' if args.query_max_items else ''))
    runs = []
    for code in args.code or [str(REPO)]:
        env = {**os.environ, "PYTHONPATH": str(Path(code).resolve())}
        t = time.time()
        p = subprocess.Popen([sys.executable, "-m", "lumctl", "query", str(spec), "--force"], env=env, cwd=code,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)   # cwd: `-m` imports from it
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.time() - t
        if status != 0:
            sys.exit(f"lumctl query ({code}) failed:\n{out[-3000:]}")
        qm = json.loads((root / "stores" / "bench" / "query" / "manifest.json").read_text())
        size = sum(f.stat().st_size for f in (root / "stores" / "bench" / "query").rglob("*") if f.is_file())
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True).stdout.strip()
        r = {"code": str(code), "commit": commit, "wall_s": round(wall, 1), "stage_s": qm["seconds"],
             "users_per_s": round(args.stage_users / qm["seconds"], 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
             "store_mib": round(size / 2**20, 1), "counts": qm["counts"]}
        runs.append(r)
        print(json.dumps(r), file=sys.stderr)
    return {"benchmark": "query_stage", "users": args.stage_users, "events": manifest["counts"]["events"],
            "events_per_user": manifest["counts"]["events_per_user"], "every_n_events": args.every_n, "queries": 8,
            "model": {"preset": args.preset, **{k: cfg[k] for k in ("d_model", "n_layers", "n_heads", "d_ff")}},
            "max_items": args.query_max_items or 200, "device": "cpu", "batch_rows": args.batch_rows, "runs": runs,
            "machine": machine_info(torch.device("cpu"))}


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
    ap.add_argument("--stage", action="store_true", help="benchmark the whole query stage (see the docstring)")
    ap.add_argument("--stage-users", type=int, default=50_000)
    ap.add_argument("--max-events", type=int, default=500, help="--stage: most events of one user")
    ap.add_argument("--every-n", type=int, default=25, help="--stage: a snapshot every N events")
    ap.add_argument("--code", action="append", help="--stage: lumctl checkout to run (repeatable; default: this one)")
    ap.add_argument("--workdir", help="--stage: folder for the store and checkpoint (default: a new temp folder)")
    ap.add_argument("--query-max-items", type=int, default=0, help=(
        "--stage: [query].max_items (0 = the checkpoint's 200); small values shorten the model input only, "
        "the snapshots and the store stay the same"))
    args = ap.parse_args(argv)
    if args.stage:
        result = stage_bench(args)
        print(json.dumps(result, indent=2))
        append_result(args.out, result)
        return result

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
    n_snap, cut, slot = q.snapshot_cuts(data["users/offsets"], data["events/timestamp"], data["users/split"],
                                        QuerySpec(snapshot="split"))
    test = slot == 1                                                          # the test-time snapshots
    users = np.repeat(np.arange(n_users), n_snap)[test][:args.users]
    pcut = cut[test][:args.users]
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
