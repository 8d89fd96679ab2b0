"""Ranking metrics from the 0-based rank of the held-out item among all candidates."""

from __future__ import annotations

import numpy as np


def retrieval_metrics(rank: np.ndarray, ks=(10, 50, 200)) -> dict[str, float]:
    """rank [N]: number of candidates scored strictly higher than the target (0 = top).
    HR@K = P(rank < K); NDCG@K = mean(1/log2(rank + 2) if rank < K); MRR = mean(1/(rank + 1))."""
    rank = np.asarray(rank, np.float64)
    out = {}
    for k in ks:
        hit = rank < k
        out[f"hr@{k}"] = float(hit.mean()) if len(rank) else 0.0
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(rank + 2), 0.0).mean()) if len(rank) else 0.0
    out["mrr"] = float((1.0 / (rank + 1)).mean()) if len(rank) else 0.0
    out["n"] = int(len(rank))
    return out
