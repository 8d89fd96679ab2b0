"""Protocol effects of a finished leave-one-out retrieval run, measured on its best checkpoint:

1. the RecTools split of transformer_benchmark: test users whose test item is cold (absent from every
   user's events before their own test event) or already seen are dropped;
2. the valid -> test drop by the held-out item's training count (its events in the packed training
   part of all users): test items are newer, so rarer in training; the drop that remains when the test
   users are reweighted to the valid users' count mix is what the popularity shift does not explain.

    python experiments/beauty/protocol.py stores/beauty-sasrec-s0 [more run folders]

Reads <run>/pretrain/final (config.json, model.pt) and the run's tokenize store; scores valid and test
once each on the CPU (or CUDA when present); prints one block per run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from lumctl.evaluation import evaluate, open_store, read_held_out
from lumctl.metrics import retrieval_metrics
from lumctl.specs import PackSpec, PretrainSpec
from lumctl.stages.pretrain import load_model

BUCKETS = [(0, 0), (1, 4), (5, 19), (20, 10 ** 9)]   # training events of the held-out item


def hr_ndcg(rank: np.ndarray, w: np.ndarray | None = None) -> tuple[float, float]:
    w = np.ones(len(rank)) if w is None else w
    hit = rank < 10
    return float((hit * w).sum() / w.sum()), float((np.where(hit, 1 / np.log2(rank + 2), 0) * w).sum() / w.sum())


def main(run: Path) -> None:
    final = run / "pretrain" / "final"
    cfg = json.loads((final / "config.json").read_text())
    spec = cfg["spec"]
    p, pk = PretrainSpec(**spec["pretrain"]), PackSpec(**spec["pack"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(final, device)
    tok = run / "tokenize"
    data = open_store(tok)
    if not cfg["conditions"]:
        data = {k: v for k, v in data.items() if k != "events/cond"}
    off = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731
    ranks = {}
    for split in ("valid", "test"):
        out: list = []
        evaluate(model, data, split, p, pk, device, None, off, None, cfg.get("tau", 1.0), [], out)
        ranks[split] = out[0][0]
    offsets, split_at = np.asarray(data["users/offsets"]), np.asarray(data["users/split"])
    items = np.asarray(data["events/item"])
    user_of = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    pos = np.arange(len(items)) - offsets[user_of]
    train = items[pos < split_at[user_of, 0]]                      # every user's training part
    count = np.bincount(train, minlength=int(items.max()) + 1)
    held = {s: read_held_out(data, s, pk.max_items) for s in ("valid", "test")}
    n = {s: count[held[s].target] for s in held}
    # 1. RecTools: drop test users whose item is cold before the test event or already seen
    before_test = items[pos < split_at[user_of, 1]]
    seen_anywhere = np.bincount(before_test, minlength=len(count)) > 0
    t = held["test"]
    seen_own = np.array([t.target[k] in t.seen[t.seen_off[k]:t.seen_off[k + 1]] for k in range(len(t.target))])
    keep = seen_anywhere[t.target] & ~seen_own
    print(f"== {run.name} (best step {json.loads((final / 'metrics.json').read_text())['best_step']})")
    for s in ("valid", "test"):
        m = retrieval_metrics(ranks[s], (10,))
        print(f"  {s:5s} all {m['n']:6d} users  HR@10 {m['hr@10']:.4f}  NDCG@10 {m['ndcg@10']:.4f}")
    h, g = hr_ndcg(ranks["test"][keep])
    print(f"  test  RecTools split ({keep.sum()} users: {(~keep).sum()} cold or seen dropped)  HR@10 {h:.4f}  NDCG@10 {g:.4f}")
    # 2. the valid -> test drop by the held-out item's training count
    print("  held-out item's training events: share of users, HR@10 (valid | test)")
    share = {}
    for lo, hi in BUCKETS:
        row = []
        for s in ("valid", "test"):
            b = (n[s] >= lo) & (n[s] <= hi)
            share[s, lo] = b.mean()
            row.append(f"{b.mean():5.3f} {hr_ndcg(ranks[s][b])[0] if b.any() else 0:.4f}")
        print(f"    {lo:>3d}-{hi if hi < 10 ** 9 else 'inf':<4}  valid {row[0]}  |  test {row[1]}")
    w = np.zeros(len(n["test"]))
    for lo, hi in BUCKETS:
        b = (n["test"] >= lo) & (n["test"] <= hi)
        w[b] = share["valid", lo] / max(share["test", lo], 1e-12)
    h, g = hr_ndcg(ranks["test"], w)
    print(f"  test reweighted to the valid users' training-count mix  HR@10 {h:.4f}  NDCG@10 {g:.4f}")


if __name__ == "__main__":
    for a in sys.argv[1:]:
        main(Path(a))
