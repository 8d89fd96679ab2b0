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


# ------------------------------------------------------------------------------------ requests
def request_positions(rank: np.ndarray, pos_off: np.ndarray) -> np.ndarray:
    """Positions (0 = top) of each request's positives in its ranked list, request after request,
    ascending within a request. rank [P]: candidates scored strictly higher than each positive (the
    request's other positives included), so positives of equal score share a rank; they are given
    consecutive positions: position j = j + max over i <= j of (rank_i - i), ranks ascending."""
    rank = np.asarray(rank, np.int64)
    n = np.diff(pos_off)
    if not len(rank):
        return rank
    req = np.repeat(np.arange(len(n), dtype=np.int64), n)
    srt = rank[np.lexsort((rank, req))]
    j = np.arange(len(rank)) - np.repeat(np.asarray(pos_off[:-1], np.int64), n)  # index within the request
    big = int(srt.max()) + int(n.max()) + 1                                     # > any rank_i - i: requests stay apart
    return j + np.maximum.accumulate(srt - j + req * big) - req * big


def request_values(rank: np.ndarray, pos_off: np.ndarray, metric: str) -> np.ndarray:
    """Per-request value [R] of hr@K (a positive in the top K), ndcg@K (sum of 1/log2(pos + 2) over the
    positives in the top K, over the same sum for the best possible list of min(P, K) positives) or
    mrr (1 / (1 + position of the best positive)), from the positives' ranks (`request_positions`)."""
    pos_off = np.asarray(pos_off, np.int64)
    pos = request_positions(rank, pos_off).astype(np.float64)
    n = np.diff(pos_off)
    first = pos[pos_off[:-1]] if len(n) else np.zeros(0)
    if metric == "mrr":
        return 1.0 / (first + 1)
    kind, k = metric.split("@")
    k = int(k)
    if kind == "hr":
        return (first < k).astype(np.float64)
    gain = np.where(pos < k, 1.0 / np.log2(pos + 2), 0.0)
    dcg = np.add.reduceat(gain, pos_off[:-1]) if len(n) else np.zeros(0)
    ideal = np.r_[0.0, np.cumsum(1.0 / np.log2(np.arange(k) + 2))][np.minimum(n, k)]
    return dcg / ideal


def per_user_requests(rank: np.ndarray, pos_off: np.ndarray, user: np.ndarray, metric: str) -> np.ndarray:
    """Per-user mean [U'] of a request metric over the user's requests (users in increasing order)."""
    v = request_values(rank, pos_off, metric)
    _, inv, cnt = np.unique(user, return_inverse=True, return_counts=True)
    return np.bincount(inv, v, minlength=len(cnt)) / cnt


def request_metrics(rank: np.ndarray, pos_off: np.ndarray, user: np.ndarray, ks=(10, 50, 200)) -> dict:
    """hr@K, ndcg@K, mrr of conditioned requests: mean over users of the mean over each user's
    requests; `users` = users with a request."""
    out = {}
    for k in ks:
        for m in (f"hr@{k}", f"ndcg@{k}"):
            out[m] = float(per_user_requests(rank, pos_off, user, m).mean()) if len(user) else 0.0
    out["mrr"] = float(per_user_requests(rank, pos_off, user, "mrr").mean()) if len(user) else 0.0
    out["users"] = int(len(np.unique(user)))
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
    have both classes (the others are skipped). NaN when no user has both.

    Vectorised: one sort by (user, score), ties averaged within (user, score) runs, per-user sums by
    segment reduction; no Python loop over users."""
    user = np.asarray(user)
    y = np.asarray(label).astype(bool)
    s = np.asarray(score, np.float64)
    n = len(y)
    if n == 0:
        return float("nan")
    by_score = np.argsort(s)
    order = by_score[np.argsort(user[by_score], kind="stable")]        # by user, then score (2x lexsort's speed)
    u, y, s = user[order], y[order], s[order]
    new_user = np.r_[True, u[1:] != u[:-1]]
    starts = np.flatnonzero(new_user)                                  # [G] first row of each user
    counts = np.diff(np.r_[starts, n])                                 # [G] n_u
    first = np.repeat(starts, counts)                                  # [n] the row's user start
    run = np.flatnonzero(new_user | np.r_[True, s[1:] != s[:-1]])      # starts of (user, score) runs
    run_len = np.diff(np.r_[run, n])
    # average 1-based rank of a run within its user: (a + b + 1) / 2 for rows [a, b) counted from the user start
    a = run - first[run]
    rank = np.repeat((2 * a + run_len + 1) / 2.0, run_len)             # [n]
    n_pos = np.add.reduceat(y.astype(np.float64), starts)              # [G]
    rank_pos = np.add.reduceat(np.where(y, rank, 0.0), starts)         # [G] rank sum of the positives
    n_neg = counts - n_pos
    both = (n_pos > 0) & (n_neg > 0)
    if not both.any():
        return float("nan")
    auc_u = (rank_pos[both] - n_pos[both] * (n_pos[both] + 1) / 2) / (n_pos[both] * n_neg[both])
    w = counts[both].astype(np.float64)
    return float((w * auc_u).sum() / w.sum())


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
