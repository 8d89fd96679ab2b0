"""Micro-benchmark: backward of a bias gathered from a small table by B·S² indices with heavy
duplication (HSTU's relative position / time bias): plain indexing, F.embedding, and
`lumctl.models.hstu.bias_gather` (histogram backward), on CUDA.

    python benchmarks/bench_gather.py
"""
import time

import torch
import torch.nn.functional as F


def main() -> None:
    dev = torch.device("cuda")
    B, S = 13, 1024
    w = torch.zeros(129, device=dev, requires_grad=True)
    idx = torch.randint(0, 8, (B, S, S), device=dev)  # few buckets: the time-bias case
    from lumctl.models.hstu import bias_gather
    for name, fn in [("index", lambda: w[idx]), ("embedding", lambda: F.embedding(idx, w[:, None])[..., 0]),
                     ("bincount", lambda: bias_gather(w, idx))]:
        for _ in range(2):
            fn().sum().backward()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            fn().sum().backward()
        torch.cuda.synchronize()
        print(f"{name}: {(time.perf_counter() - t) / 5 * 1e3:.2f} ms per forward+backward", flush=True)


if __name__ == "__main__":
    main()
