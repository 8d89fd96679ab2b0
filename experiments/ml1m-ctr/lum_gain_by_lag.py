"""Where the LUM's AUC gain comes from: test (and valid) AUC of a base and a +LUM fuse store, split by the
lag of each sample behind its LUM snapshot (events between the snapshot's last event and the sample).
Reads the fuse predictions (all seeds, AUC averaged over seeds) and the +LUM row's query store.

    python experiments/ml1m-ctr/lum_gain_by_lag.py stores/ml-1m-ctr-gpu-dien stores/ml-1m-ctr-gpu-dien-lum \\
        [--query stores/ml-1m-ctr-gpu-dien-lum/query]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lumctl import zarrio  # noqa: E402
from lumctl.metrics import auc  # noqa: E402
from lumctl.stages import fuse as F  # noqa: E402
from lumctl.stages import tokenize  # noqa: E402

EDGES = (0, 5, 10, 15, 20, 25, 1 << 40)


def predictions(root: Path) -> dict[str, np.ndarray]:
    g = zarrio.open_read(root / "fuse" / "predictions.zarr")
    return {k: zarrio.get(g, k) for k in ("logit", "event", "split", "label")}  # logit [seeds, n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", type=Path, help="experiment folder of the base fuse row")
    ap.add_argument("lum", type=Path, help="experiment folder of the +LUM fuse row")
    ap.add_argument("--query", type=Path, help="query store (default: LUM/query)")
    a = ap.parse_args()
    data = tokenize.load(a.lum / "tokenize")
    s = F.samples(data)
    q = a.query or a.lum / "query"
    ans = F.load_answers(q)
    pos = zarrio.get(zarrio.open_read(q / "answers.zarr"), "snapshot_pos")
    row, slot, has = F.join_snapshots(ans, s["user"], s["ts"], len(data["users/offsets"]) - 1)
    lag = np.where(has, np.arange(len(s["ts"])) - s["user_start"] - pos[row, slot], -1)  # events since the snapshot
    b, l = predictions(a.base), predictions(a.lum)
    if not np.array_equal(b["event"], l["event"]):
        sys.exit("error: the two fuse stores predicted different samples")
    print("| split | lag (events) | samples | base AUC | +LUM AUC | gain |\n|---|---|---|---|---|---|")
    for part, name in ((1, "valid"), (2, "test")):
        for lo, hi in zip(EDGES, EDGES[1:]):
            m = (b["split"] == part) & (lag[b["event"]] >= lo) & (lag[b["event"]] < hi)
            if m.sum() == 0:
                continue
            y = b["label"][m]
            ab = np.mean([auc(y, x[m]) for x in b["logit"]])
            al = np.mean([auc(y, x[m]) for x in l["logit"]])
            span = f"{lo}-{hi - 1}" if hi < EDGES[-1] else f">= {lo}"
            print(f"| {name} | {span} | {int(m.sum()):,} | {ab:.4f} | {al:.4f} | {al - ab:+.4f} |")


if __name__ == "__main__":
    main()
