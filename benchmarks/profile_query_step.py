"""Benchmark: where one step of `lumctl query` spends its time on a GPU (the 19m preset at Taobao scale).

    python benchmarks/profile_query_step.py [--preset 19m] [--items 4000000] [--docs 16384]
                                            [--seq-len 4096] [--batch-rows 64] [--steps 8]
                                            [--shapes 2048x128,1024x256]

Documents shaped as the 100M-row Taobao query (specs/taobao-synth-gpu.toml): a prefix of a lognormal
number of events (median 40, clipped to [1, 499]) plus 8 query tokens, packed into rows of --seq-len
tokens with `pack_queries`. A freshly initialised LUM (timings do not depend on the weights) with
--items items, 4 behaviours x 9.4k categories as conditions. Each part is timed alone with CUDA
synchronisation (median of --steps steps, after a warm-up):
  mask      the grouped-query BlockMask of one step (`query_block_mask`, compiled)
  h2d       the step's tensors to the device
  forward   the model's forward on those (bf16 autocast), eager and torch.compile'd
  answer    `lumctl.stages.query.answer` (flex) on all --docs documents, per step
then the top CUDA kernels of three eager forwards (torch.profiler). --shapes times the eager forward
again with the same documents packed into other (rows of S tokens) x (B rows a step) shapes, with the
BlockMask's sparsity (fraction of blocks skipped), and with a dense mask on SDPA.

Prints one JSON object and appends it, with a description of the machine, to
benchmarks/results/query_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import append_result, machine  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "query_step.json"


def timed(fn, steps: int) -> tuple[float, object]:
    """Median seconds of `steps` synchronised calls of fn (after one warm-up call), and fn's last result."""
    import torch
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def call_s(fn) -> float:
    """Seconds of one synchronised call of fn (a first call includes its compiles)."""
    import torch
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round(time.perf_counter() - t, 2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="19m")
    ap.add_argument("--items", type=int, default=4_000_000)
    ap.add_argument("--docs", type=int, default=16_384)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--shapes", default="", help="more SxB shapes for the forward alone (e.g. 1024x256)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import torch

    from lumctl.attention import query_block_mask
    from lumctl.models.lum import LUM, PRESETS, LUMConfig
    from lumctl.ops.packing import grouped_query_mask, pack_queries
    from lumctl.stages.query import answer, step_tensors
    if not torch.cuda.is_available():
        sys.exit("profile_query_step.py needs a CUDA GPU")
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    n = np.clip(rng.lognormal(np.log(40), 1.0, args.docs), 1, 499).astype(np.int64)   # events before each snapshot
    E = int(n.sum())
    items = rng.integers(2, args.items, E).astype(np.int32)
    conds = np.stack([rng.integers(2, 6, E), rng.integers(2, 9_400, E)], 1).astype(np.int32)
    first = np.r_[0, np.cumsum(n)[:-1]].astype(np.int64)
    queries = np.stack([np.repeat(np.arange(2, 6), 2)[None].repeat(args.docs, 0),
                        rng.integers(2, 9_400, (args.docs, 8))], -1).astype(np.int32)       # (D, 8, 2)
    d, L, H, ff = PRESETS[args.preset]
    torch.manual_seed(0)
    model = LUM(LUMConfig(n_items=args.items, cond_vocab=[6, 9_402], d_model=d, n_layers=L, n_heads=H, d_ff=ff,
                          attention="flex")).to(dev).eval()

    t = time.perf_counter()
    rows = pack_queries(items, conds, first, n, queries, args.seq_len)
    pack_s = time.perf_counter() - t
    R, B = len(rows["type"]), args.batch_rows
    tokens = int(2 * n.sum() + 8 * args.docs)
    idx = np.arange(B) % R

    seg, isq = torch.from_numpy(rows["segment"][idx]).to(dev), torch.from_numpy(rows["is_query"][idx]).to(dev)
    r = {"benchmark": "query_step", "preset": args.preset, "items": args.items, "docs": args.docs,
         "tokens": tokens, "rows": R, "seq_len": args.seq_len, "batch_rows": B, "fill": round(tokens / (R * args.seq_len), 4),
         "pack_s": round(pack_s, 3)}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        r["mask_first_s"] = call_s(lambda: query_block_mask(seg, isq))
        r["mask_s"], mask = timed(lambda: query_block_mask(seg, isq), args.steps)
        r["h2d_s"], batch = timed(lambda: step_tensors(rows, idx, dev), args.steps)
        r["forward_first_s"] = call_s(lambda: model(batch, mask))
        r["forward_s"], _ = timed(lambda: model(batch, mask), args.steps)
        compiled = torch.compile(model, dynamic=False)
        r["forward_compiled_first_s"] = call_s(lambda: compiled(batch, mask))
        r["forward_compiled_s"], _ = timed(lambda: compiled(batch, mask), args.steps)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                model(batch, mask)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
        print(table, file=sys.stderr)
    r["shapes"] = []
    for shape in filter(None, args.shapes.split(",")):
        S2, B2 = map(int, shape.split("x"))
        rows2 = pack_queries(items, conds, first, n, queries, S2)
        i2 = np.arange(B2) % len(rows2["type"])
        b2 = step_tensors(rows2, i2, dev)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            m2 = query_block_mask(torch.from_numpy(rows2["segment"][i2]).to(dev), torch.from_numpy(rows2["is_query"][i2]).to(dev))
            f2, _ = timed(lambda: model(b2, m2), args.steps)
            dense = torch.from_numpy(grouped_query_mask(rows2["segment"][i2], rows2["is_query"][i2])).to(dev)
            d2, _ = timed(lambda: model(b2, dense), args.steps)
        fill = tokens / (len(rows2["type"]) * S2)
        r["shapes"].append({"seq_len": S2, "batch_rows": B2, "fill": round(fill, 4), "sparsity": round(float(m2.sparsity()), 2),
                            "forward_s": round(f2, 4), "forward_sdpa_dense_s": round(d2, 4),
                            "forward_us_per_filled_token": round(1e6 * f2 / (B2 * S2 * fill), 3)})
        print(json.dumps(r["shapes"][-1]), file=sys.stderr)
    r["sparsity"] = round(float(mask.sparsity()), 2)
    r["forward_us_per_filled_token"] = round(1e6 * r["forward_s"] / (B * args.seq_len * r["fill"]), 3)
    n_steps = (R + B - 1) // B

    def run_answer():
        answer(model, items, conds, first, n, queries, args.seq_len, B, dev, backend="flex", autocast=True)

    r["answer_first_s"] = call_s(run_answer)
    r["answer_s"] = call_s(run_answer)
    r["answer_per_step_s"] = round(r["answer_s"] / n_steps, 4)
    r["answer_snapshots_per_s"] = round(args.docs / r["answer_s"], 1)
    flops = 2 * tokens / R * B * model.num_params()                                  # matmul FLOPs of one step
    for key in ("mask_s", "h2d_s", "forward_s", "forward_compiled_s"):
        r[key] = round(r[key], 4)
    r["forward_model_tflops"] = round(flops / r["forward_s"] / 1e12, 1)
    r["forward_compiled_model_tflops"] = round(flops / r["forward_compiled_s"] / 1e12, 1)
    r["machine"] = machine(gpu=torch.cuda.get_device_name(dev), cuda=torch.version.cuda)
    print(json.dumps(r, indent=2))
    append_result(args.out, r)
    return r


if __name__ == "__main__":
    main()
