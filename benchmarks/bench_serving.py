"""Benchmark: serving latency of LUM Step 3 (DIN + precomputed LUM answers) vs end-to-end HSTU.

    python benchmarks/bench_serving.py [--sizes 19m,100m,300m,1b] [--lengths 256,512,1024,2048,4096]
                                       [--ref-len 1024] [--grid] [--requests 300] [--warmup 30]
                                       [--device auto|cpu|cuda]

A request = one user and 100 candidate items to score. Requests are served one at a time; each
latency is wall time from the request's ids on the host to the 100 scores back on the host, with
`torch.cuda.synchronize()` before and after on CUDA, under `torch.inference_mode()` (bf16
autocast on CUDA, fp32 on CPU, eager: no torch.compile, so nothing compiles or recompiles per
request). Reported per configuration: p50 / p99 / mean ms over `--requests` requests after
`--warmup` warm-up requests (paper Figure 5(b)(c)). Random weights, fixed seeds: the latency does
not depend on the weights. n_items = 3,617 (ML-1M).

LUM path (Step 3). The LUM itself is NOT run at serving time: its answers are computed offline
(`lumctl query`) and looked up. Here a realistic answer store is built once per LUM size: a Zarr
group in a temp folder (as `answers.zarr`) with `user_emb` (U, N, D) float16, one chunk per
user (a KV-store row), N = 6 queries, D = the preset's d_model (19m 512, 100m 768, 300m 1024,
1b 2048; `lumctl.models.lum.PRESETS`), and `item_emb` e^i (I, D) float16, opened read-only; the
item table is read into host memory at start-up. A request does: read row u from the Zarr array,
gather the 100 candidates' e^i, L2-normalise (as `lumctl.stages.fuse`), copy to the device, then
a DIN (`lumctl.models.dlrm` DIN, backbone din, lum = "direct+match", d_emb 16, MLP 200-80,
history 50 items, 3 user attributes, 18 genres) scores the 100 candidates in one batch of 100.
The user's row, history and attributes are copied once and expanded over the 100 candidates (the
batch keys are those of `lumctl.stages.fuse.Features.batch`: user_attr, item, hist, hist_mask,
lum, lum_item, lum_missing). Only D changes with the LUM size: the latency is expected to be flat.
The lookup's share (Zarr read + gather + copy) is reported separately too.

HSTU end to end. `lumctl.models.hstu.HSTU` sized like the LUM presets (d_model, n_layers,
n_heads from LUM PRESETS, max_len = L, attention "dense": the model builds its document-causal
mask), scoring the same kind of request: a forward over the user's history of L items (one row,
one segment), then dot products of the last output with the 100 candidates' item embeddings.
Configurations: the first size at every `--lengths` L, and every size at `--ref-len` (`--grid`:
every size x every length). The non-embedding parameter count of each model is reported (for
the LUM path: the DIN's parameters, and the non-embedding parameters of the LUM whose answers
are served, counted on the meta device).

Prints one JSON line per configuration and a final summary line listing the HSTU configurations
whose p99 exceeds `--budget-ms` (30 ms); appends one JSON object (all records + machine) to
benchmarks/results/serving.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import append_result, machine  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "serving.json"
USER_VOCAB = [4, 9, 23]  # ML-1M gender, age, occupation (+ pad, unknown)
N_GENRES = 18


def latency(serve, n_requests: int, n_warmup: int, sync) -> dict:
    """Serve requests 0.. one at a time; p50 / p99 / mean ms over the timed ones."""
    for i in range(n_warmup):
        serve(i)
    ms = []
    for i in range(n_warmup, n_warmup + n_requests):
        sync()
        t = time.perf_counter()
        serve(i)
        sync()
        ms.append((time.perf_counter() - t) * 1e3)
    ms = np.array(ms)
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "mean_ms": round(float(ms.mean()), 3), "requests": n_requests}


def lum_non_embedding_params(size: str, n_items: int) -> int:
    import torch
    from lumctl.models.lum import LUM, LUMConfig, PRESETS
    d, L, H, ff = PRESETS[size]
    with torch.device("meta"):
        return LUM(LUMConfig(n_items=n_items, cond_vocab=[5, 23], d_model=d, n_layers=L, n_heads=H, d_ff=ff)).num_params()


def bench_lum(size: str, args, device, sync, tmp: Path) -> dict:
    """Step 3: answers looked up from a Zarr store, DIN direct+match scores the candidates."""
    import torch
    import zarr
    from lumctl.models.dlrm import DLRMConfig, build
    from lumctl.models.lum import PRESETS
    D, N, U, I = PRESETS[size][0], args.queries, args.lum_users, args.items
    rng = np.random.default_rng(0)
    # ---- the answer store (written once, opened read-only)
    path = tmp / f"answers-{size}.zarr"
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.create_array("user_emb", shape=(U, N, D), dtype="float16", chunks=(1, N, D))[...] = \
        rng.standard_normal((U, N, D), dtype=np.float32).astype(np.float16)
    g.create_array("item_emb", shape=(I, D), dtype="float16", chunks=(I, D))[...] = \
        rng.standard_normal((I, D), dtype=np.float32).astype(np.float16)
    g = zarr.open_group(str(path), mode="r", zarr_format=3)
    user_emb = g["user_emb"]                                     # (U, N, D) on disk, one chunk per user
    item_emb = np.asarray(g["item_emb"][...])                    # (I, D) host memory
    # ---- the model
    torch.manual_seed(0)
    genres = torch.from_numpy((rng.random((I, N_GENRES)) < 0.1).astype(np.float32))
    cfg = DLRMConfig(backbone="din", n_items=I, n_genres=N_GENRES, user_vocab=USER_VOCAB, d_emb=16, mlp=[200, 80],
                     lum="direct+match", n_queries=N, d_lum=D)
    din = build(cfg, item_genres=genres).to(device).eval()
    # ---- requests: (user, attributes (A,), history (H,), candidates (C,)), prepared up front
    n_req = 64
    C, Hn = args.candidates, args.history
    reqs = [(int(rng.integers(U)), np.array([rng.integers(2, v) for v in USER_VOCAB], np.int64),
             rng.integers(2, I, Hn).astype(np.int64), rng.integers(2, I, C).astype(np.int64)) for _ in range(n_req)]

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)

    def lookup(i):
        u, attr, hist, cand = reqs[i % n_req]
        o = unit(user_emb[u])                                    # (N, D) one Zarr chunk
        e = unit(item_emb[cand])                                 # (C, D)
        return {"o": torch.from_numpy(o).to(device), "e": torch.from_numpy(e).to(device),
                "attr": torch.from_numpy(attr).to(device), "hist": torch.from_numpy(hist).to(device),
                "cand": torch.from_numpy(cand).to(device)}

    def serve(i):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            t = lookup(i)
            batch = {"user_attr": t["attr"][None].expand(C, -1),           # (C, A)
                     "item": t["cand"],                                     # (C,)
                     "hist": t["hist"][None].expand(C, -1),                 # (C, H)
                     "hist_mask": torch.ones(C, Hn, dtype=torch.bool, device=device),
                     "lum": t["o"][None].expand(C, -1, -1),                 # (C, N, D)
                     "lum_item": t["e"],                                    # (C, D)
                     "lum_missing": torch.zeros(C, device=device)}          # (C,)
            return din(batch).float().cpu()                                 # (C,) logits on the host

    def lookup_only(i):
        with torch.inference_mode():
            return lookup(i)

    res = {"path": "lum_step3", "size": size, "d_lum": D, "n_queries": N, "history": Hn, "candidates": C,
           "store_users": U, "din_params": sum(p.numel() for p in din.parameters()),
           "lum_non_embedding_params": lum_non_embedding_params(size, I),
           **latency(serve, args.requests, args.warmup, sync)}
    look = latency(lookup_only, args.requests, args.warmup, sync)
    res.update(lookup_p50_ms=look["p50_ms"], lookup_mean_ms=look["mean_ms"])
    return res


def bench_hstu(size: str, L: int, args, device, sync) -> dict:
    """End to end: HSTU over the user's L-item history, last output . 100 candidate embeddings."""
    import torch
    from lumctl.models.hstu import HSTU, HSTUConfig
    from lumctl.models.lum import PRESETS
    d, n_layers, n_heads, _ = PRESETS[size]
    torch.manual_seed(0)
    with device:  # initialised on the device (a 1b-sized model initialises slowly on the host)
        model = HSTU(HSTUConfig(n_items=args.items, d_model=d, n_layers=n_layers, n_heads=n_heads, max_len=L,
                                attention="dense")).eval()
    rng = np.random.default_rng(1)
    n_req, C = 16, args.candidates
    reqs = [(rng.integers(2, args.items, (1, L)).astype(np.int64),                # history (1, L)
             np.cumsum(rng.integers(1, 3600, (1, L)), 1).astype(np.int64),      # timestamps (1, L)
             rng.integers(2, args.items, C).astype(np.int64)) for _ in range(n_req)]
    fixed = {"type": np.full((1, L), 2, np.int8), "pos": np.arange(L, dtype=np.int32)[None],
             "segment": np.zeros((1, L), np.int32)}

    def serve(i):
        item, ts, cand = reqs[i % n_req]
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            b = {k: torch.from_numpy(v).to(device) for k, v in {**fixed, "item": item, "ts": ts}.items()}
            out = model(b, None)[0, -1]                                         # (D,)
            scores = model.item_table(torch.from_numpy(cand).to(device)) @ out  # (C,)
            return scores.float().cpu()

    res = {"path": "hstu_e2e", "size": size, "seq_len": L, "d_model": d, "n_layers": n_layers, "n_heads": n_heads,
           "candidates": C, "non_embedding_params": model.num_params()}
    try:
        res.update(latency(serve, args.requests, args.warmup, sync))
    except torch.OutOfMemoryError as e:
        res["error"] = f"out of memory: {str(e)[:120]}"
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="", help="LUM presets (default 19m,100m,300m,1b on CUDA, tiny,small on CPU)")
    ap.add_argument("--lengths", default="", help="HSTU history lengths (default 256..4096 on CUDA, 64,128,256 on CPU)")
    ap.add_argument("--ref-len", type=int, default=0, help="length for every size (default 1024, or the longest length)")
    ap.add_argument("--grid", action="store_true", help="HSTU: every size x every length")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--history", type=int, default=50, help="DIN history length")
    ap.add_argument("--queries", type=int, default=6, help="N, LUM answers per user")
    ap.add_argument("--lum-users", type=int, default=1000, help="users in the answer store")
    ap.add_argument("--items", type=int, default=3_617)
    ap.add_argument("--budget-ms", type=float, default=30.0)
    ap.add_argument("--skip", default="", help="lum or hstu: leave that path out")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import torch
    from lumctl.stages.pretrain import resolve_device
    device = resolve_device(args.device, "--device")
    cuda = device.type == "cuda"
    sizes = (args.sizes or ("19m,100m,300m,1b" if cuda else "tiny,small")).split(",")
    lengths = [int(x) for x in (args.lengths or ("256,512,1024,2048,4096" if cuda else "64,128,256")).split(",")]
    ref = args.ref_len or (1024 if 1024 in lengths else max(lengths))
    if args.grid:
        hstu_cfgs = [(s, L) for s in sizes for L in lengths]
    else:
        hstu_cfgs = [(sizes[0], L) for L in lengths] + [(s, ref) for s in sizes[1:]]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "lum":
            for size in sizes:
                r = bench_lum(size, args, device, sync, Path(tmp))
                print(json.dumps(r), flush=True)
                records.append(r)
    if args.skip != "hstu":
        for size, L in hstu_cfgs:
            r = bench_hstu(size, L, args, device, sync)
            print(json.dumps(r), flush=True)
            records.append(r)
    lum = [r for r in records if r["path"] == "lum_step3"]
    hstu = [r for r in records if r["path"] == "hstu_e2e"]
    summary = {"summary": True, "device": str(device), "budget_ms": args.budget_ms,
               "lum_step3_p99_ms": {r["size"]: r["p99_ms"] for r in lum},
               "hstu_p99_ms": {f"{r['size']}@{r['seq_len']}": r.get("p99_ms") for r in hstu},
               "hstu_over_budget": [f"{r['size']}@{r['seq_len']}" for r in hstu
                                    if "error" in r or r["p99_ms"] > args.budget_ms]}
    print(json.dumps(summary), flush=True)
    extra = {"torch_threads": torch.get_num_threads()}
    if cuda:
        extra.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    append_result(args.out, {"benchmark": "serving", "records": records, **summary, "machine": machine(**extra)})


if __name__ == "__main__":
    main()
