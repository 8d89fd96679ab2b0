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


# ------------------------------------------------------------------------------------ CTR
def auc(label: np.ndarray, score: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted 1/2 (Mann-Whitney
    with average ranks). NaN when only one class is present."""
    y = np.asarray(label).astype(bool)
    s = np.asarray(score, np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ss = s[order]
    rank = np.empty(len(s), np.float64)
    # average 1-based rank of each run of equal scores
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    ends = np.r_[starts[1:], len(ss)]
    avg = (starts + ends + 1) / 2.0
    rank[order] = np.repeat(avg, ends - starts)
    return float((rank[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def gauc(user: np.ndarray, label: np.ndarray, score: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC: sum_u n_u AUC_u / sum_u n_u over the users that
    have both classes (the others are skipped). NaN when no user has both."""
    user = np.asarray(user)
    label = np.asarray(label).astype(bool)
    score = np.asarray(score, np.float64)
    order = np.argsort(user, kind="stable")
    u, y, s = user[order], label[order], score[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(u)]
    num = den = 0.0
    for a, b in zip(starts, ends):
        k = int(y[a:b].sum())
        if 0 < k < b - a:
            num += (b - a) * auc(y[a:b], s[a:b])
            den += b - a
    return float(num / den) if den else float("nan")


def logloss(label: np.ndarray, prob: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 - eps])."""
    y = np.asarray(label, np.float64)
    p = np.clip(np.asarray(prob, np.float64), eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()) if len(y) else float("nan")


def ctr_metrics(user: np.ndarray, label: np.ndarray, logit: np.ndarray) -> dict[str, float]:
    """AUC, GAUC and logloss of logits; n samples and the positive rate."""
    logit = np.asarray(logit, np.float64)
    prob = 1.0 / (1.0 + np.exp(-logit))
    return {"auc": auc(label, logit), "gauc": gauc(user, label, logit), "logloss": logloss(label, prob),
            "n": len(label), "pos_rate": float(np.mean(label)) if len(label) else float("nan")}
