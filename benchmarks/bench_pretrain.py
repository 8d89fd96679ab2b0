"""Benchmark: pretrain step throughput (tokens/s, model TFLOP/s, MFU) of LUM presets on packed rows.

    python benchmarks/bench_pretrain.py --presets 19m,100m,300m,1b [--rows 4] [--seq-len 4096]
                                        [--steps 30] [--profile] [--peak-tflops 0]

One training step = forward + InfoNCE (full catalogue) + backward + fused AdamW, bf16 autocast,
flex attention with a document-causal BlockMask, `torch.compile`d model. Rows are packed with the
real packer from users whose lengths follow ML-1M (2 tokens per event, 20..200 events, median ~90),
so attention cost matches the ML-1M runs. No data loading is timed: `--with-loader` instead feeds
the steps through `lumctl.stages.pretrain.Batches` (pinned host->device copies in a thread) from
the same rows, to show whether the GPU waits on input.

FLOPs: 6 N per token for the non-embedding weights plus causal attention per user segment
(`lumctl.stages.pretrain.train_flops`); the loss and embedding tables are not counted (undercount).
MFU = model FLOP/s / peak; the peak is measured with a large bf16 matmul unless --peak-tflops is given.
Appends a JSON object per preset to benchmarks/results/pretrain_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from common import append_result, machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pretrain_throughput.json"


def packed_rows(n_rows: int, seq_len: int, n_items: int, n_fields: int, seed: int = 0) -> dict:
    """Enough users (ML-1M-like lengths) packed by the real packer to fill `n_rows` rows."""
    from lumctl.ops.packing import pack_sequences
    rng = np.random.default_rng(seed)
    need = n_rows * seq_len // 2
    counts = []
    while sum(counts) < need * 1.01:
        counts.append(int(np.clip(rng.lognormal(np.log(90), 0.8), 20, 200)))
    counts = np.array(counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    E = int(counts.sum())
    rows = pack_sequences(rng.integers(2, n_items, E), rng.integers(2, 5, (E, n_fields)), first, counts, seq_len,
                          True, "best_fit", np.arange(E))
    return {k: v[:n_rows] for k, v in rows.items()}


def peak_bf16_tflops(device) -> float:
    import torch
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12


def bench(preset: str, args, device, peak: float) -> dict:
    import torch
    from lumctl.attention import make_mask
    from lumctl.loss import info_nce
    from lumctl.models.lum import LUM, LUMConfig, PRESETS
    from lumctl.stages.pretrain import TENSOR_KEYS, Batches, row_costs, train_flops
    d, L, H, ff = PRESETS[preset]
    n_items = args.items
    torch.manual_seed(0)
    model = LUM(LUMConfig(n_items=n_items, cond_vocab=[5, 23], d_model=d, n_layers=L, n_heads=H, d_ff=ff,
                          attention="flex")).to(device)
    n_params = model.num_params()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model)
    rows = packed_rows(args.rows * 8, args.seq_len, n_items, 2)
    tokens, pairs = row_costs(rows["segment"])
    batches = Batches(rows, args.rows, 0, device, dense_mask=False)
    stream = batches.stream(0, args.steps + args.warmup)
    fixed = {k: torch.from_numpy(rows[k][:args.rows]).to(TENSOR_KEYS[k]).to(device) for k in TENSOR_KEYS}

    def step(b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            o = fwd(b, make_mask(b, "flex"))
            loss = info_nce(o[b["loss_mask"]], b["target"][b["loss_mask"]], model.item_table, negatives="full", tau=0.05)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_compile = time.perf_counter()
    for _ in range(args.warmup):
        step(next(stream) if args.with_loader else fixed)
    torch.cuda.synchronize()
    t_compile = time.perf_counter() - t_compile
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for k in range(args.steps):
        step(next(stream) if args.with_loader else fixed)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    if args.with_loader:
        tok = float(np.mean([tokens[batches.indices(k)].sum() for k in range(args.warmup, args.warmup + args.steps)]))
        pr = float(np.mean([pairs[batches.indices(k)].sum() for k in range(args.warmup, args.warmup + args.steps)]))
    else:
        tok, pr = float(tokens[:args.rows].sum()), float(pairs[:args.rows].sum())
    flops = train_flops(n_params, d, L, tok, pr)
    res = {"preset": preset, "non_embedding_params": n_params, "d_model": d, "n_layers": L, "n_heads": H,
           "rows": args.rows, "seq_len": args.seq_len, "tokens_per_step": tok, "step_ms": round(dt * 1e3, 2),
           "tokens_per_s": round(tok / dt, 1), "model_tflops": round(flops / dt / 1e12, 2),
           "attention_flop_share": round(1 - 6.0 * n_params * tok / flops, 4),
           "mfu": round(flops / dt / 1e12 / peak, 4), "peak_tflops": round(peak, 1),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "with_loader": args.with_loader,
           "warmup_s": round(t_compile, 1)}
    print(json.dumps(res), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(fixed)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)
    del model, opt, fwd
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="19m,100m,300m,1b")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--items", type=int, default=3_617)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--with-loader", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    import torch
    device = torch.device("cuda")
    peak = args.peak_tflops or peak_bf16_tflops(device)
    print(f"measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    info = machine(gpu=torch.cuda.get_device_name(), torch_version=torch.__version__)
    for preset in args.presets.split(","):
        try:
            res = bench(preset, args, device, peak)
        except torch.OutOfMemoryError as e:
            res = {"preset": preset, "rows": args.rows, "error": f"out of memory: {str(e)[:120]}"}
            print(json.dumps(res), flush=True)
            torch.cuda.empty_cache()
        append_result(args.out, {"benchmark": "pretrain_throughput", "machine": info, **res})


if __name__ == "__main__":
    main()
