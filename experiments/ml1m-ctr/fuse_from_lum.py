"""Train fuse rows of a report spec here, reading a LUM (pretrain + query stores) trained elsewhere.

A report's ranking rows normally pretrain their LUM themselves (`lumctl eval REPORT --train`). When the LUM
was trained on another machine (the GPU) and only its stores came back, this builds each row's
tokenize (and pack) store here, copies the given pretrain/ and query/ stores in, and trains the fuse
stage, so `lumctl eval` reads the row like any other. The copied stores must come from the row's
[tokenize]/[pack]/[pretrain]/[query] sections (eval checks the sections it can).

    python experiments/ml1m-ctr/fuse_from_lum.py specs/report.toml --lum stores-in/ml-1m-ctr-gpu-din \\
        ml-1m-ctr-gpu-dien ml-1m-ctr-gpu-dien-lum
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lumctl.report_specs import load_report  # noqa: E402
from lumctl.stages import eval as ev  # noqa: E402
from lumctl.stages import fuse, pack, tokenize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", help="report spec (TOML with [report])")
    ap.add_argument("rows", nargs="+", help="experiment names of fuse rows")
    ap.add_argument("--lum", required=True, help="folder holding pretrain/ and query/ stores")
    a = ap.parse_args()
    lum = Path(a.lum)
    runs = {r.experiment: r for r in ev.unique_runs(ev.plan(load_report(a.report), a.report))}
    for name in a.rows:
        r = runs.get(name)
        if r is None or r.stage != "fuse":
            sys.exit(f"error: {name} is not a fuse row of {a.report}")
        root = r.spec.store("fuse").parent
        if root.exists():
            shutil.rmtree(root)
        tokenize.run(r.spec, force=True)
        if r.spec.fuse.lum != "none":
            pack.run(r.spec, force=True)
            for stage in ("pretrain", "query"):
                shutil.copytree(lum / stage, r.spec.store(stage))
        fuse.run(r.spec, force=True)
        print(f"{name}: {ev.status(r)}", flush=True)


if __name__ == "__main__":
    main()
