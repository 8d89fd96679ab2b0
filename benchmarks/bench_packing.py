"""Benchmark: one training pass over the same users, packed rows vs one user per padded row.

    python benchmarks/bench_packing.py [--ratings ML1M_RATINGS | --users 3000] [--preset 19m]
                                       [--rows 4] [--seq-len 4096] [--max-items 200] [--passes 2]
                                       [--device auto|cpu|cuda]

The users: with `--ratings` (a MovieLens `ratings.dat`, gzip accepted) each user's event count
is read from the file; otherwise `--users` counts are drawn to look like ML-1M (lognormal, median
~90, clipped to 20..max_items). Counts are capped at `--max-items` (the most recent events, as
`[pack] max_items`); item ids, conditions (2 fields) and timestamps are random (the cost does not
depend on them). Tokens per user = 2 x events (condition + item).

The same token sequences are laid out two ways:
  packed  `lumctl.ops.packing.pack_sequences` (best fit) into rows of `--seq-len` tokens;
          `--rows` rows per step (default 4 x 4096 = 16384 token slots).
  padded  one user per row, right-padded to the longest user (2 x max_items tokens, 400 for 200
          events), the rows copied token for token from the packed layout (segment 0 for the
          user, -1 at padding, so the same mask code handles it); users per step chosen so a step
          holds about as many token slots as a packed step (16384 // 400 = 40 users x 400 = 16000).
The last step of a pass is topped up with empty rows (all padding, no loss) so every step has one
shape: the useful (non-pad) tokens of a pass are exactly the same in both layouts.

One step = mask + forward + InfoNCE (full catalogue negatives, tau 0.05, at the condition tokens) +
backward + AdamW, on a freshly initialised LUM of `--preset` (the same model object for both).
On CUDA: bf16 autocast, flex attention with a document-causal BlockMask
(`lumctl.attention.make_mask(batch, "flex")`, built in the step), `torch.compile`d model
(dynamic=False: one static graph per layout), fused AdamW. On CPU: sdpa with the Numba dense
document-causal mask (built in the step), fp32, eager. All rows are copied to the device before
timing (no data loading is timed). `--warmup` steps of each layout run first (compilation);
then `--passes` passes of each layout alternate (packed, padded, packed, ...) and the fastest
pass of each is reported. CPU runs are for testing only: the dense mask makes every row cost
S^2 attention whatever its segments (no block skipping), so packing is not expected to win there.

Reported per layout: pass seconds, steps, step ms, useful tokens/s, padding efficiency (useful
tokens / token slots); and speedup = padded pass / packed pass, time saved = 1 - packed / padded.
The paper (LUM, arXiv 2502.08309) reports packing cutting training time by 82%; goal here >= 2x.
Prints JSON lines and appends one JSON object to benchmarks/results/packing.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
from common import append_result, machine  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "packing.json"
KEYS = ("type", "item", "cond", "segment", "pos", "loss_mask", "target", "ts")


def event_counts(args, rng) -> tuple[np.ndarray, str]:
    """Events per user (U,), capped at max_items, and a label for where they came from."""
    if args.ratings:
        opener = gzip.open if args.ratings.endswith(".gz") else open
        with opener(args.ratings, "rt", encoding="latin-1") as f:
            users = np.array([int(line.split("::", 1)[0]) for line in f if line.strip()])
        counts = np.bincount(users)
        counts = counts[counts > 0]
        label = f"ratings file {Path(args.ratings).name}"
    else:
        counts = np.clip(rng.lognormal(np.log(90), 0.8, args.users), min(20, args.max_items), None).astype(np.int64)
        label = "ML-1M-like lognormal lengths"
    return np.minimum(counts, args.max_items).astype(np.int64), label


def packed_layout(counts: np.ndarray, n_items: int, seq_len: int, rng) -> dict:
    """The users' random events packed by the real packer: keys of pack_sequences, (R, S[, F])."""
    from lumctl.ops.packing import pack_sequences
    E = int(counts.sum())
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    times = np.cumsum(rng.integers(1, 3600, E))
    return pack_sequences(rng.integers(2, n_items, E), rng.integers(2, 5, (E, 2)), first, counts, seq_len,
                          True, "best_fit", times)


def padded_layout(packed: dict, counts: np.ndarray, pad_len: int) -> dict:
    """One row per user (U, pad_len[, F]): each user's tokens copied from its packed row, segment 0."""
    U = len(counts)
    out = {k: np.zeros((U, pad_len) + packed[k].shape[2:], packed[k].dtype) for k in KEYS}
    out["segment"][:] = -1
    for u in range(U):
        r, s, n = packed["row"][u], packed["start"][u], 2 * counts[u]
        for k in KEYS:
            out[k][u, :n] = packed[k][r, s:s + n]
        out["segment"][u, :n] = 0
    return out


def device_batches(rows: dict, per_step: int, device) -> list[dict]:
    """Consecutive groups of `per_step` rows as device tensors; the last topped up with empty rows."""
    import torch
    from lumctl.stages.pretrain import TENSOR_KEYS
    n = len(rows["type"])
    steps = -(-n // per_step)
    batches = []
    for k in range(steps):
        b = {}
        for key in KEYS:
            part = rows[key][k * per_step:(k + 1) * per_step]
            if len(part) < per_step:  # top up: empty rows (segment -1, no loss)
                fill = np.full((per_step - len(part),) + part.shape[1:], -1 if key == "segment" else 0, part.dtype)
                part = np.concatenate([part, fill])
            b[key] = torch.from_numpy(np.ascontiguousarray(part)).to(TENSOR_KEYS[key]).to(device)
        batches.append(b)
    return batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratings", default="", help="MovieLens ratings.dat(.gz): real per-user event counts")
    ap.add_argument("--users", type=int, default=3000, help="users with drawn lengths (without --ratings)")
    ap.add_argument("--preset", default="", help="LUM preset (default 19m on CUDA, tiny on CPU)")
    ap.add_argument("--rows", type=int, default=4, help="packed rows per step")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--max-items", type=int, default=200)
    ap.add_argument("--items", type=int, default=3_617)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    import torch
    from lumctl.attention import make_mask
    from lumctl.loss import info_nce
    from lumctl.models.lum import LUM, LUMConfig, PRESETS
    from lumctl.ops.packing import document_causal_mask
    from lumctl.stages.pretrain import resolve_device
    device = resolve_device(args.device, "--device")
    cuda = device.type == "cuda"
    backend = "flex" if cuda else "sdpa"
    preset = args.preset or ("19m" if cuda else "tiny")

    rng = np.random.default_rng(0)
    counts, source = event_counts(args, rng)
    packed = packed_layout(counts, args.items, args.seq_len, rng)
    pad_len = int(2 * counts.max())
    padded = padded_layout(packed, counts, pad_len)
    users_per_step = max(1, args.rows * args.seq_len // pad_len)
    layouts = {"packed": device_batches(packed, args.rows, device),
               "padded": device_batches(padded, users_per_step, device)}
    useful = int((packed["segment"] >= 0).sum())
    assert useful == int((padded["segment"] >= 0).sum()) == int(2 * counts.sum())

    torch.manual_seed(0)
    d, L, H, ff = PRESETS[preset]
    model = LUM(LUMConfig(n_items=args.items, cond_vocab=[5, 23], d_model=d, n_layers=L, n_heads=H, d_ff=ff,
                          attention=backend)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    fwd = torch.compile(model, dynamic=False) if cuda else model

    def step(b):
        if not cuda:  # sdpa: the Numba dense mask, built in the step
            b = {**b, "mask": torch.from_numpy(document_causal_mask(b["segment"].numpy()))}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            o = fwd(b, make_mask(b, backend))                                          # (B, S, D)
            lm = b["loss_mask"]
            loss = info_nce(o[lm], b["target"][lm], model.item_table, negatives="full", tau=0.05)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    warmup_s = {}
    for name, batches in layouts.items():
        t = time.perf_counter()
        for k in range(args.warmup):
            step(batches[k % len(batches)])
        sync()
        warmup_s[name] = round(time.perf_counter() - t, 1)
    times = {name: [] for name in layouts}
    for _ in range(args.passes):
        for name, batches in layouts.items():
            sync()
            t = time.perf_counter()
            for b in batches:
                step(b)
            sync()
            times[name].append(time.perf_counter() - t)

    res = {"benchmark": "packing", "preset": preset, "non_embedding_params": model.num_params(), "device": str(device),
           "attention": backend, "users": len(counts), "users_from": source, "max_items": args.max_items,
           "useful_tokens": useful, "events_median": float(np.median(counts)), "n_items": args.items}
    for name, batches in layouts.items():
        B, S = batches[0]["type"].shape
        best = min(times[name])
        r = {"layout": name, "rows_per_step": B, "row_len": S, "token_slots_per_step": B * S, "steps": len(batches),
             "pass_s": round(best, 3), "pass_s_all": [round(t, 3) for t in times[name]],
             "step_ms": round(best / len(batches) * 1e3, 2), "useful_tokens_per_s": round(useful / best, 1),
             "padding_efficiency": round(useful / (len(batches) * B * S), 4), "warmup_s": warmup_s[name]}
        print(json.dumps(r), flush=True)
        res[name] = r
    res["speedup"] = round(res["padded"]["pass_s"] / res["packed"]["pass_s"], 3)
    res["time_saved"] = round(1 - res["packed"]["pass_s"] / res["padded"]["pass_s"], 4)
    print(json.dumps({k: res[k] for k in ("preset", "users", "useful_tokens", "speedup", "time_saved")}), flush=True)
    extra = {"torch_threads": torch.get_num_threads()}
    if cuda:
        extra.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    append_result(args.out, {**res, "machine": machine(**extra)})


if __name__ == "__main__":
    main()
