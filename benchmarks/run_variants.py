"""Run variants of a spec (deep-merged overrides) in parallel processes and collect their
pretrain metrics into one JSON file.

    python benchmarks/run_variants.py specs/ml-1m.toml benchmarks/variants/ml1m.json \
        --parallel 4 --out benchmarks/results/ml1m_variants.json

The variants file is a JSON list of {"name": ..., "overrides": {...}}; each variant becomes
experiment `<base experiment>-<name>` under the base spec's store_root (or --store-root).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lumctl.specs import deep_merge as merge  # noqa: E402  (the overrides of report rows merge the same way)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec")
    ap.add_argument("variants")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--store-root", default=None)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--upto", default="pretrain", help="last stage to run (default pretrain: no query/fuse)")
    a = ap.parse_args()
    import tomllib
    base = tomllib.loads(Path(a.spec).read_text())
    if a.store_root:
        base["store_root"] = a.store_root
    variants = json.loads(Path(a.variants).read_text())
    if a.only:
        keep = set(a.only.split(","))
        variants = [v for v in variants if v["name"] in keep]
    jobs, results = [], []
    machine = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch
        machine["torch"] = torch.__version__
        machine["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:
        pass
    for v in variants:
        d = merge(base, v.get("overrides", {}))
        d["experiment"] = f"{base['experiment']}-{v['name']}"
        code = ("import json,sys; from lumctl.specs import parse_spec; from lumctl.stages import run_all; "
                f"run_all(parse_spec(json.loads({json.dumps(json.dumps(d))}), {json.dumps(v['name'])}), upto={a.upto!r})")
        jobs.append((v, d, code))
    running: list = []
    log_dir = Path(a.out).with_suffix(".logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < a.parallel:
            v, d, code = pending.pop(0)
            log = open(log_dir / f"{v['name']}.log", "w")
            running.append((v, d, subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=log),
                            time.time()))
        time.sleep(1)
        for job in list(running):
            v, d, proc, t0 = job
            if proc.poll() is None:
                continue
            running.remove(job)
            final = Path(d.get("store_root", "stores")) / d["experiment"] / "pretrain" / "final" / "metrics.json"
            rec = {"name": v["name"], "overrides": v.get("overrides", {}), "returncode": proc.returncode,
                   "seconds": round(time.time() - t0, 1)}
            if final.is_file():
                rec["metrics"] = json.loads(final.read_text())
                mpath = final.parent.parent / "metrics.jsonl"
                tr = [json.loads(x) for x in open(mpath) if '"loss"' in x]
                if tr:
                    rec["tokens_per_s_median"] = sorted(r["tokens_per_s"] for r in tr)[len(tr) // 2]
                    rec["tflops_median"] = sorted(r["tflops"] for r in tr)[len(tr) // 2]
            results.append(rec)
            t = rec.get("metrics", {}).get("test", {})
            print(f"{v['name']}: rc={proc.returncode} {rec['seconds']}s test hr@10={t.get('hr@10')} ndcg@10={t.get('ndcg@10')}",
                  flush=True)
            # rewritten after every finished variant, so a killed sweep keeps what finished
            Path(a.out).write_text(json.dumps({"spec": a.spec, "machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
