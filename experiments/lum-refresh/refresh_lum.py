"""ML-1M CTR with a refreshed LUM: answers of snapshots past each user's train part come from a LUM
continued on the whole train part (specs/ml-1m-ctr-gpu-refresh.toml), the others from the LUM of
specs/ml-1m-ctr-gpu.toml (pretrained on the first half of each user's train events).

Snapshots: every 25 events (as [query] of ml-1m-ctr-gpu) plus one "refresh" snapshot per user that
holds exactly its train events (and any later event stamped at the same second as the last one). A
snapshot is answered by the refreshed LUM when its prefix holds all of the user's train events (the
refreshed LUM trained on nothing later), else by the base LUM; the target's e^i comes from the LUM
that answered the sample's snapshot. Fuse rows train in-process (no store), one seed per call, so the
rows of a comparison run side by side on one GPU (experiments/lum-refresh/run.sh).

    python experiments/lum-refresh/refresh_lum.py answers --base A/final --refresh B/final --out answers.npz
    python experiments/lum-refresh/refresh_lum.py fuse NAME '{"fuse": {"backbone": "dien"}, "src": "refresh",
        "warm": "base/dien/final"}' --answers answers.npz --seed 0 --log results.log
src: refresh (as above) | aligned (refresh, its answers and e^i rotated into the base LUM's coordinates by
orthogonal Procrustes on the item tables) | base (every snapshot, the refresh one too, from the base
LUM) | none (no LUM).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.dien_lum_sweep import train_logged  # noqa: E402
from lumctl.specs import load_spec  # noqa: E402
from lumctl.stages import fuse as F  # noqa: E402
from lumctl.stages import query as Q  # noqa: E402
from lumctl.stages import tokenize  # noqa: E402


def refresh_cuts(data: dict, qs) -> tuple[np.ndarray, np.ndarray]:
    """(cut [U, T] events in each snapshot's prefix, sorted per user, 0 = none; train_end [U])."""
    users = np.arange(len(data["users/offsets"]) - 1)
    cut, valid, _ = Q.snapshots(data, users, qs)
    off, ts = data["users/offsets"], data["events/timestamp"]
    te = data["users/split"][:, 0].astype(np.int64)
    _, tie_last = tokenize.tie_groups(off, ts)
    rc = np.where(te > 0, tie_last[np.maximum(off[:-1] + te - 1, 0)] - off[:-1] + 1, 0)  # the refresh snapshot
    allc = np.sort(np.concatenate([np.where(valid, cut, 0), rc[:, None]], 1), 1)
    allc[:, 1:][allc[:, 1:] == allc[:, :-1]] = 0                                            # equal snapshots once
    return np.sort(allc, 1), te


def answers(a) -> None:
    spec = load_spec(a.spec)
    data = tokenize.load(spec.store("tokenize"))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cut, te = refresh_cuts(data, spec.query)
    users = np.arange(len(cut))
    # query.compute takes its snapshots from query.snapshots: point it at these cuts for this process
    Q.snapshots = lambda data_, users_, qs_: (cut[users_], cut[users_] > 0, [f"s{t}" for t in range(cut.shape[1])])
    out = {}
    for name, path in (("base", a.base), ("refresh", a.refresh)):
        t = time.time()
        model, cfg = Q.load_model(Path(path), dev)
        res = Q.compute(model, data, spec.query, list(cfg["condition_fields"]), users, int(cfg["max_items"]),
                        int(cfg["seq_len"]), dev)
        out[f"{name}_user_emb"] = res["user_emb"].astype(np.float16)
        out[f"{name}_item_emb"] = res["item_emb"].astype(np.float32)
        print(f"answers {name}: {int((cut > 0).sum())} snapshots in {time.time() - t:.0f}s", flush=True)
    out["snapshot_valid"], out["snapshot_ts"], out["use_refresh"] = cut > 0, res["snapshot_ts"], cut >= te[:, None]
    np.savez(a.out, **out)
    print(f"answers: {out['use_refresh'].sum()} of {(cut > 0).sum()} snapshots from the refreshed LUM -> {a.out}")


def align(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Orthogonal Procrustes: the rotation R (d, d) minimising ||unit(src) R - unit(dst)|| over the real
    items (ids >= 2). A rotation of both o and e^i keeps every score o . e^i of the refreshed LUM."""
    a, b = F._unit(src)[2:], F._unit(dst)[2:]
    u, _, vt = np.linalg.svd(a.T @ b)
    R = (u @ vt).astype(np.float32)
    print(f"align: mean cos(item_refresh R, item_base) {(F._unit(a @ R) * b).sum(1).mean():.3f} "
          f"(unrotated {(a * b).sum(1).mean():.3f})", flush=True)
    return R


class RefreshFeatures(F.Features):
    """fuse.Features whose target e^i comes from the LUM that answered the joined snapshot."""

    def __init__(self, data, fs, ans, item_refresh, use_refresh):
        super().__init__(data, fs, ans)
        self.item_refresh = F._unit(item_refresh)
        self.from_refresh = use_refresh[self.lum_row, self.lum_slot] & self.lum_has   # per sample

    def numpy(self, idx):
        out = super().numpy(idx)
        r = self.from_refresh[idx]
        out["lum_item"] = np.where(r[:, None], self.item_refresh[out["item"]], out["lum_item"]).astype(np.float32)
        return out


def fuse_one(a) -> None:
    v = json.loads(a.variant)
    torch.set_num_threads(1)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = load_spec(a.spec)
    data = tokenize.load(spec.store("tokenize"))
    src = v.get("src", "refresh")
    fs = spec.fuse.model_copy(update={"lum": "none" if src == "none" else "direct+match", **v.get("fuse", {})})
    if src == "none":
        feats = F.Features(data, fs)
    else:
        z = np.load(a.answers)
        use = z["use_refresh"] if src != "base" else np.zeros_like(z["use_refresh"])
        ref_user, ref_item = z["refresh_user_emb"], z["refresh_item_emb"]
        if src == "aligned":  # the refreshed LUM rotated into the base LUM's coordinates
            R = align(ref_item, z["base_item_emb"])
            ref_user, ref_item = (ref_user.astype(np.float32) @ R).astype(np.float16), ref_item @ R
        emb = np.where(use[..., None, None], ref_user, z["base_user_emb"])
        ans = {"user_emb": emb, "snapshot_valid": z["snapshot_valid"], "snapshot_ts": z["snapshot_ts"],
               "user_index": np.arange(len(emb)), "item_emb": z["base_item_emb"]}
        feats = RefreshFeatures(data, fs, ans, ref_item, use)
    cfg = F.model_config(data, fs, feats)
    torch.manual_seed(a.seed)
    m = F.build_model(cfg, data)
    if v.get("warm"):
        F.warm_start(m, Path(v["warm"]))
    res = train_logged(a.name, m, feats, fs, a.seed, dev, a.log)
    if a.pred:  # valid/test logits for paired comparisons
        s = feats.s
        np.savez(a.pred, valid=np.flatnonzero(s["split"] == 1), test=np.flatnonzero(s["split"] == 2),
                 valid_logit=res["valid_logit"], test_logit=res["test_logit"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("answers")
    p.add_argument("--base", required=True)
    p.add_argument("--refresh", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("fuse")
    p.add_argument("name")
    p.add_argument("variant", help="JSON: fuse (FuseSpec overrides), src (refresh | aligned | base | none), warm")
    p.add_argument("--answers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log")
    p.add_argument("--pred")
    for p in sub.choices.values():
        p.add_argument("--spec", default="specs/ml-1m-ctr-gpu.toml")
    a = ap.parse_args()
    answers(a) if a.cmd == "answers" else fuse_one(a)


if __name__ == "__main__":
    main()
