"""What the LUM low-pass branch (`[pretrain.model] lowpass_bins`) costs a training step: forward + backward
of the encoder at the Beauty recipe's shape (64 dims, 2 blocks, 12,102 items; 4 packed rows of 2048 tokens,
users of 3-50 items), attention alone against attention + the branch.

    python benchmarks/bench_lowpass.py                  # CPU, the threads torch picks
    python benchmarks/bench_lowpass.py --device cuda
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import REPO, append_result, machine
from lumctl.models.lum import LUM, LUMConfig
from lumctl.ops.packing import document_causal_mask, pack_sequences


def packed_rows(rows: int, seq_len: int, seed: int = 0) -> dict:
    """`rows` rows of item-only users of 3-50 events, packed by the real packer (`pack_sequences`)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 51, 2 * rows * seq_len // 26)               # users for about twice the rows
    E = int(counts.sum())
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    packed = pack_sequences(rng.integers(2, 12102, E), np.zeros((E, 0), np.int32), first, counts, seq_len, False)
    keys = {"type": torch.int8, "item": torch.long, "cond": torch.long, "pos": torch.long, "segment": torch.int32}
    return {k: torch.from_numpy(packed[k][:rows]).to(dt) for k, dt in keys.items()}


def step_seconds(bins: int, batch: dict, device: torch.device, repeat: int) -> float:
    torch.manual_seed(0)
    model = LUM(LUMConfig(n_items=12102, d_model=64, n_layers=2, n_heads=2, d_ff=128, item_proj=False,
                          lowpass_bins=bins)).to(device)
    b = {k: v.to(device) for k, v in batch.items()}
    mask = torch.from_numpy(document_causal_mask(batch["segment"].numpy())).to(device)
    times = []
    for _ in range(repeat + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(b, mask).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/lowpass.json"))
    a = ap.parse_args()
    device = torch.device(a.device)
    batch = packed_rows(a.rows, a.seq_len)
    res = {b: step_seconds(b, batch, device, a.repeat) for b in (0, 3)}
    print(f"{a.rows} x {a.seq_len} tokens on {device} ({torch.get_num_threads()} threads): "
          f"attention alone {res[0] * 1e3:.1f} ms, + low-pass branch {res[3] * 1e3:.1f} ms "
          f"(x{res[3] / res[0]:.2f}) per encoder forward + backward")
    append_result(a.out, {"benchmark": "lowpass", "rows": a.rows, "seq_len": a.seq_len, "device": str(device),
                          "threads": torch.get_num_threads(), "seconds_attention": res[0], "seconds_lowpass": res[3],
                          "machine": machine()})


if __name__ == "__main__":
    main()
