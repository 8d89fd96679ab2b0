"""Statistics of the report (`lumctl eval`): paired comparisons over seeds, paired bootstrap over
users, and the scaling-law fit `y = a ln(x) + b`. NumPy only (no scipy).

Two runs are *paired* when they score the same test examples: retrieval runs on the same tokenize
store (the same users, in the same order), ranking runs on the same samples (same event ids).
"""

from __future__ import annotations

import math

import numpy as np


# ------------------------------------------------------------------------------------ per-seed
def t_pvalue(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with integer `df` degrees of freedom (closed form of
    Abramowitz & Stegun 26.7.3-4: A(t|df) = P(|T| < t), p = 1 - A)."""
    if df < 1:
        raise ValueError(f"df must be >= 1 (got {df})")
    if not np.isfinite(t):
        return 0.0
    th = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(th) ** 2
    if df % 2 == 1:
        s, term = 0.0, 1.0
        if df > 1:
            s = 1.0
            for k in range(1, (df - 3) // 2 + 1):      # 1 + 2/3 c^2 + 2*4/(3*5) c^4 + ...
                term *= (2 * k) / (2 * k + 1) * c2
                s += term
            s *= math.sin(th) * math.cos(th)
        a = 2.0 / math.pi * (th + s)
    else:
        s, term = 1.0, 1.0
        for k in range(1, (df - 2) // 2 + 1):          # 1 + 1/2 c^2 + 1*3/(2*4) c^4 + ...
            term *= (2 * k - 1) / (2 * k) * c2
            s += term
        a = math.sin(th) * s
    return float(min(1.0, max(0.0, 1.0 - a)))


def paired_seeds(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Per-seed paired difference a - b over the seeds both have: mean, std (n-1), t, two-sided
    p-value (t-test, n >= 2), and how many seeds are better. None when no seed is shared."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds], np.float64)
    n = len(d)
    out = {"seeds": seeds, "n": n, "mean": float(d.mean()), "std": float(d.std(ddof=1)) if n > 1 else None,
           "better": int((d > 0).sum()), "t": None, "p": None}
    if n > 1:
        sd = d.std(ddof=1)
        t = float("inf") * np.sign(d.mean()) if sd == 0 else d.mean() / (sd / math.sqrt(n))
        out["t"] = float(t) if np.isfinite(t) else None
        out["p"] = t_pvalue(float(t), n - 1) if d.mean() != 0 or sd > 0 else 1.0
    return out


# ------------------------------------------------------------------------------------ retrieval
def per_user(rank: np.ndarray, metric: str) -> np.ndarray:
    """Per-user value of a retrieval metric from the 0-based rank of the held-out item:
    hr@K = [rank < K], ndcg@K = [rank < K] / log2(rank + 2), mrr = 1 / (rank + 1). Its mean over
    users is `lumctl.metrics.retrieval_metrics`."""
    r = np.asarray(rank, np.float64)
    if metric == "mrr":
        return 1.0 / (r + 1)
    kind, k = metric.split("@")
    hit = r < int(k)
    return hit.astype(np.float64) if kind == "hr" else np.where(hit, 1.0 / np.log2(r + 2), 0.0)


def bootstrap_mean_diff(d: np.ndarray, reps: int, seed: int, confidence: float) -> dict:
    """Paired bootstrap over users of mean(d), d [U] the per-user difference of two runs.
    Returns the point estimate, the percentile interval and a two-sided p-value
    (2 * the smaller share of replicates on either side of 0)."""
    d = np.asarray(d, np.float64)
    rng = np.random.default_rng(seed)
    U = len(d)
    stats = np.empty(reps)
    for a in range(0, reps, 256):                       # (r, U) index blocks keep memory small
        r = min(reps, a + 256) - a
        stats[a:a + r] = d[rng.integers(0, U, (r, U))].mean(1)
    return _summary(float(d.mean()), stats, confidence)


def _summary(point: float, stats: np.ndarray, confidence: float) -> dict:
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    p = 2 * min((stats <= 0).mean(), (stats >= 0).mean())
    return {"delta": point, "lo": float(lo), "hi": float(hi), "p": float(min(1.0, p)), "reps": len(stats),
            "confidence": confidence}


# ------------------------------------------------------------------------------------ ranking
class SortedAUC:
    """AUC under sample weights, for many weightings of the same (label, score): the scores are
    sorted once, each weighting costs O(n). Ties count 1/2, as in `lumctl.metrics.auc`."""

    def __init__(self, label: np.ndarray, score: np.ndarray):
        order = np.argsort(np.asarray(score, np.float64), kind="mergesort")
        s = np.asarray(score, np.float64)[order]
        self.order = order
        self.y = np.asarray(label).astype(bool)[order]
        self.group = np.cumsum(np.r_[False, s[1:] != s[:-1]])    # tie group of each sorted sample
        self.G = int(self.group[-1]) + 1 if len(s) else 0

    def __call__(self, weight: np.ndarray) -> float:
        w = np.asarray(weight, np.float64)[self.order]
        wp = np.bincount(self.group, weights=w * self.y, minlength=self.G)
        wn = np.bincount(self.group, weights=w * ~self.y, minlength=self.G)
        below = np.cumsum(wn) - wn                                # negative weight strictly below
        den = wp.sum() * wn.sum()
        return float((wp * (below + 0.5 * wn)).sum() / den) if den > 0 else float("nan")


def bootstrap_ranking_diff(user: np.ndarray, label: np.ndarray, logit_a: np.ndarray, logit_b: np.ndarray,
                           metric: str, reps: int, seed: int, confidence: float) -> dict:
    """Paired bootstrap over users (every sample of a drawn user, as often as it is drawn) of
    metric(a) - metric(b); logit_* [S, N] hold one row per seed, the metric is averaged over seeds.
    metric: 'auc' or 'logloss'."""
    user = np.asarray(user)
    _, uidx = np.unique(user, return_inverse=True)
    U = int(uidx.max()) + 1 if len(uidx) else 0
    y = np.asarray(label, np.float64)
    la, lb = np.atleast_2d(logit_a), np.atleast_2d(logit_b)

    if metric == "auc":
        fa = [SortedAUC(y, s) for s in la]
        fb = [SortedAUC(y, s) for s in lb]

        def stat(w):
            return np.mean([f(w) for f in fa]) - np.mean([f(w) for f in fb])
    elif metric == "logloss":
        def nll(lg):
            p = np.clip(1 / (1 + np.exp(-np.asarray(lg, np.float64))), 1e-7, 1 - 1e-7)
            return -(y * np.log(p) + (1 - y) * np.log(1 - p))
        diff = np.mean([nll(s) for s in la], 0) - np.mean([nll(s) for s in lb], 0)    # (N,)

        def stat(w):
            return float((w * diff).sum() / w.sum())
    else:
        raise ValueError(f"no bootstrap for ranking metric {metric!r} (auc or logloss)")
    rng = np.random.default_rng(seed)
    point = stat(np.ones(len(y)))
    stats = np.array([stat(np.bincount(rng.integers(0, U, U), minlength=U)[uidx].astype(np.float64))
                      for _ in range(reps)])
    return _summary(float(point), stats, confidence)


# ------------------------------------------------------------------------------------ scaling
def fit_log(x: np.ndarray, y: np.ndarray) -> dict:
    """Least squares y = a ln(x) + b. Returns a, b, R^2 = 1 - SS_res / SS_tot, n, and the gain per
    10x of x (a ln 10)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if len(x) < 2 or np.any(x <= 0) or np.ptp(np.log(x)) == 0:
        raise ValueError("the fit needs >= 2 points with distinct positive x")
    X = np.stack([np.log(x), np.ones_like(x)], 1)                 # (n, 2)
    (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
    res = y - X @ np.array([a, b])
    tot = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (res ** 2).sum() / tot if tot > 0 else 1.0
    return {"a": float(a), "b": float(b), "r2": float(r2), "n": len(x), "per_10x": float(a * math.log(10))}
