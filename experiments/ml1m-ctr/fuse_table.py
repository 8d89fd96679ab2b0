"""The ML-1M CTR table: [fuse] variants of one spec (backbone x LUM use), each over N seeds, one
metrics JSON per variant.

    lumctl run specs/ml-1m-ctr.toml                      # tokenize, pack, pretrain, query, fuse
    OMP_NUM_THREADS=1 python experiments/ml1m-ctr/fuse_table.py specs/ml-1m-ctr.toml \\
        --out benchmarks/results/fuse_ml1m_cpu_v2 --seeds 3 [--only din-none,din-direct+match]
    python experiments/ml1m-ctr/fuse_table.py --table benchmarks/results/fuse_ml1m_cpu_v2   # Markdown table

`--set key=value` overrides a [fuse] field for every variant run (value parsed as JSON, else a
string) and `--tag` names such a run (files `<variant>@<tag>.json`), for tuning on valid AUC.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine

# variant -> [fuse] overrides (the spec's other [fuse] fields apply)
VARIANTS = {
    "dnn-none": {"backbone": "dnn", "lum": "none"},
    "dnn-direct+match": {"backbone": "dnn", "lum": "direct+match"},
    "din-none": {"backbone": "din", "lum": "none"},
    "din-direct+match": {"backbone": "din", "lum": "direct+match"},
    "din-direct": {"backbone": "din", "lum": "direct"},
    "din-match": {"backbone": "din", "lum": "match"},
    "dien-none": {"backbone": "dien", "lum": "none"},
    "dien-direct+match": {"backbone": "dien", "lum": "direct+match"},
    "sim-none": {"backbone": "sim", "lum": "none"},
    "sim-direct+match": {"backbone": "sim", "lum": "direct+match"},
    "two_tower-none": {"backbone": "two_tower", "lum": "none"},
    "two_tower-direct+match": {"backbone": "two_tower", "lum": "direct+match"},
    "hstu-none": {"backbone": "hstu", "lum": "none"},                 # end-to-end generative ranker
    "hstu-direct+match": {"backbone": "hstu", "lum": "direct+match"},
}


def parse_set(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def run(a) -> None:
    from lumctl.specs import load_spec
    from lumctl.stages import fuse
    spec = load_spec(a.spec)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = a.only.split(",") if a.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown} (have {list(VARIANTS)})")
    extra = parse_set(a.set)
    for name in names:
        fs = spec.fuse.model_validate({**spec.fuse.model_dump(), **VARIANTS[name], **extra, "seeds": a.seeds})
        t0 = time.time()
        store = fuse.run(spec.model_copy(update={"fuse": fs}), force=True)
        m = json.loads((store / "metrics.json").read_text())
        m.update({"variant": name, "tag": a.tag, "fuse": fs.model_dump(mode="json"), "wall_s": round(time.time() - t0, 1),
                  "tokenize_counts": json.loads((spec.store("tokenize") / "manifest.json").read_text())["counts"],
                  "machine": machine()})
        (out / f"{name}{'@' + a.tag if a.tag else ''}.json").write_text(json.dumps(m, indent=1))
        t = m["test"]
        print(f"{name}{'@' + a.tag if a.tag else ''}: valid auc {m['valid']['auc']['mean']:.4f} "
              f"test auc {t['auc']['mean']:.4f} ± {t['auc']['std']:.4f} ({m['wall_s']:.0f}s)", flush=True)


def table(folder: Path) -> str:
    rows = ["| variant | seeds | valid AUC | test AUC | test GAUC | test logloss | Recall@10 | Recall@50 | epochs |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(folder.glob("*.json")):
        m = json.loads(p.read_text())
        t = m["test"]

        def ms(d):
            return f"{d['mean']:.4f} ± {d['std']:.4f}" if d else "-"
        rows.append(f"| {p.stem} | {len(m['seeds'])} | {ms(m['valid']['auc'])} | {ms(t['auc'])} | {ms(t['gauc'])} | "
                    f"{ms(t['logloss'])} | {ms(t.get('recall@10'))} | {ms(t.get('recall@50'))} | "
                    f"{','.join(str(s['best_epoch']) for s in m['seeds'])} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", nargs="?")
    ap.add_argument("--out")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--set", action="append", default=[], help="[fuse] key=value for every variant")
    ap.add_argument("--tag", default="", help="suffix of the result files of a --set run")
    ap.add_argument("--table", default=None, help="print the Markdown table of a result folder")
    a = ap.parse_args()
    if a.table:
        print(table(Path(a.table)))
    else:
        run(a)


if __name__ == "__main__":
    main()
