"""One fuse variant on ML-1M, 3 seeds, from a LUM trained elsewhere: the DIEN + LUM sweep of
benchmarks/results/fuse_ml1m_dien/README.md (experiments/dien-lum/run.sh runs them side by side on one GPU).

It trains in-process (no fuse store is written) so that variants the spec cannot express yet can be
tried: `drop` puts dropout in front of the LUM input layer, `q1` re-queries the LUM with the 3
rating-only conditions, `freeze` trains only the LUM input layer ("base") or it and the ranking MLP
("backbone") of a warm start. Prints valid / test AUC per seed and their mean.

    python experiments/dien-lum/dien_lum_sweep.py NAME '{"fuse": {"backbone": "dien", "lum": "direct+match"},
        "warm": "base/dien/final", "drop": 0.5, "q": "q1"}' --lum DIR   # DIR holds pretrain/ and query/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lumctl.specs import load_spec  # noqa: E402
from lumctl.stages import fuse as F  # noqa: E402
from lumctl.stages import query as Q  # noqa: E402
from lumctl.stages import tokenize  # noqa: E402


def answers(data: dict, spec, lum: Path, kind: str, device: torch.device) -> dict:
    """The LUM answers as fuse reads them: the stored query (q6) or a re-query with rating-only conditions (q1)."""
    if kind == "q6":
        return F.load_answers(lum / "query")
    qs = spec.query.model_copy(update={"top_k": {}})
    model, cfg = Q.load_model(lum / "pretrain" / "final", device)
    users = np.arange(len(data["users/offsets"]) - 1)
    res = Q.compute(model, data, qs, list(cfg["condition_fields"]), users, int(cfg["max_items"]),
                    int(cfg["seq_len"]), device)
    return {"user_emb": res["user_emb"], "snapshot_valid": res["snapshot_valid"], "snapshot_ts": res["snapshot_ts"],
            "user_index": users, "item_emb": res["item_emb"]}


def train_logged(name: str, m, feats, fs, seed: int, dev: torch.device, log: str | None = None) -> dict:
    """Train one seed (fuse.train); print its valid / test AUC line and append it to `log`."""
    t = time.time()
    m, res = F.train(m.to(dev), feats, fs, seed, dev)
    line = (f"{name} seed {seed} valid {res['valid']['auc']:.4f} test {res['test']['auc']:.4f} "
            f"best epoch {res['best_epoch']} ({time.time() - t:.0f}s)")
    print(line, flush=True)
    if log:
        with open(log, "a") as f:
            f.write(line + "\n")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("variant", help="JSON: fuse (FuseSpec overrides), warm (base checkpoint), freeze (base | backbone), "
                    "drop, q (q6 | q1)")
    ap.add_argument("--lum", required=True, help="folder holding the LUM's pretrain/ and query/ stores")
    ap.add_argument("--spec", default="specs/ml-1m-ctr-gpu.toml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--log", help="also append each seed's line to this file")
    a = ap.parse_args()
    v = json.loads(a.variant)
    torch.set_num_threads(1)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = load_spec(a.spec)
    data = tokenize.load(spec.store("tokenize"))
    fs = spec.fuse.model_copy(update=v.get("fuse", {}))
    feats = F.Features(data, fs, answers(data, spec, Path(a.lum), v.get("q", "q6"), dev) if fs.lum != "none" else None)
    cfg = F.model_config(data, fs, feats)
    out = []
    for seed in a.seeds:
        torch.manual_seed(seed)
        m = F.build_model(cfg, data)
        if v.get("warm"):  # a fuse store's final/ warm-starts seed k from the base's seed k (fuse.warm_checkpoint)
            F.warm_start(m, F.warm_checkpoint(Path(v["warm"]), seed))
        if v.get("freeze"):  # base: train only the LUM input layer; backbone: also the ranking MLP
            keep = ("lum_",) if v["freeze"] == "base" else ("lum_", "fc_in", "act_in", "hidden", "out")
            for name, q in m.named_parameters():
                q.requires_grad_(name.startswith(keep))
        if v.get("drop"):
            m.lum_in = nn.Sequential(nn.Dropout(v["drop"]), m.lum_in)
        res = train_logged(a.name, m, feats, fs, seed, dev, a.log)
        out.append((res["valid"]["auc"], res["test"]["auc"]))
    r = np.array(out)
    print(f"## {a.name} valid {r[:, 0].mean():.4f} test {r[:, 1].mean():.4f} ± {r[:, 1].std():.4f} "
          f"{[round(float(x), 4) for x in r[:, 1]]}", flush=True)


if __name__ == "__main__":
    main()
