"""Scaling of pretraining with torchrun: tokens/s on 1, 2, 4, 8 GPUs (weak scaling: the same rows
per GPU, so `batch_rows` = rows_per_gpu x W), and the scaling efficiency tokens/s(W) / (W x tokens/s(1)).

    python benchmarks/bench_ddp.py                       # specs/ml-1m.toml, 100m preset, W = 1,2,4,8 (as many as there are GPUs)
    python benchmarks/bench_ddp.py --parallel fsdp --preset 300m --rows-per-gpu 2
    python benchmarks/bench_ddp.py --spec specs/demo.toml --device cpu --preset tiny --worlds 1,2 --steps 20   # CPU smoke run (gloo)

Each W runs `torchrun --standalone --nproc-per-node W -m lumctl pretrain` on a copy of the spec whose
outputs go to <store-root>/w<W>/ and whose tokenize/pack stores are read from <store-root> (built
once, single process). tokens/s is the median of the logged intervals after the first (compilation,
warm-up), summed over ranks, as the pretrain manifest reports it. The result is appended to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, append_result, machine  # noqa: E402

sys.path.insert(0, str(REPO))
from lumctl.spec_io import deep_merge, dump_toml, read_toml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="specs/ml-1m.toml")
    ap.add_argument("--preset", default="100m")
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--rows-per-gpu", type=int, default=4, help="packed rows per GPU per micro-batch")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--worlds", default="1,2,4,8", help="numbers of processes; those above the GPU count are skipped")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for cuda")
    ap.add_argument("--store-root", default="/tmp/lumctl-bench-ddp")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pretrain_ddp.json"))
    a = ap.parse_args()
    import torch
    gpus = torch.cuda.device_count() if a.device == "cuda" else os.cpu_count()
    worlds = [w for w in map(int, a.worlds.split(",")) if w <= gpus]
    skipped = [w for w in map(int, a.worlds.split(",")) if w > gpus]
    if skipped:
        print(f"skipping W = {skipped}: only {gpus} {'GPUs' if a.device == 'cuda' else 'CPUs'}", file=sys.stderr)

    base = read_toml(a.spec)
    root = Path(a.store_root)
    base["store_root"] = str(root)
    # torchrun sets OMP_NUM_THREADS=1 for W > 1 only; the same for every W keeps the runs comparable
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           # NVLink multicast stays off (shared hosts: a program using it can take the GPUs out of service)
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "inputs.toml").write_text(dump_toml(base))
    for stage in ("synth", "tokenize", "pack") if "synth" in base else ("tokenize", "pack"):
        subprocess.run([sys.executable, "-m", "lumctl", stage, str(root / "inputs.toml")], env=env, check=True)

    runs = []
    for w in worlds:
        spec = deep_merge(base, {"store_root": str(root / f"w{w}"), "inputs_root": str(root), "pretrain": {
            "model": {"preset": a.preset}, "device": a.device, "parallel": a.parallel,
            "compile": a.device == "cuda" if a.compile is None else a.compile,
            "optim": {"max_steps": a.steps, "batch_rows": a.rows_per_gpu * w, "grad_accum": 1},
            "eval": {"every_steps": 10 ** 9, "ks": [10]}, "log_every": 10, "checkpoint_every": 10 ** 9}})
        path = root / f"w{w}.toml"
        path.write_text(dump_toml(spec))
        log = root / f"w{w}.log"
        t0 = time.time()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(w),
               "-m", "lumctl", "pretrain", str(path), "--force"]
        with open(log, "w") as f:
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        out = root / f"w{w}" / base["experiment"] / "pretrain"
        recs = [json.loads(x) for x in open(out / "metrics.jsonl") if '"tokens_per_s"' in x] if rc == 0 else []
        tps = sorted(r["tokens_per_s"] for r in recs[1:])
        tfl = sorted(r["tflops"] for r in recs[1:])
        run = {"world": w, "returncode": rc, "seconds": round(time.time() - t0, 1), "log": str(log),
               "tokens_per_s": tps[len(tps) // 2] if tps else None, "tflops": tfl[len(tfl) // 2] if tfl else None,
               "tokens_per_s_all": [r["tokens_per_s"] for r in recs]}
        runs.append(run)
        print(f"W={w}: rc={rc} tokens/s={run['tokens_per_s']} TFLOP/s={run['tflops']}", file=sys.stderr)

    one = next((r["tokens_per_s"] for r in runs if r["world"] == 1 and r["tokens_per_s"]), None)
    for r in runs:
        r["per_gpu_tokens_per_s"] = round(r["tokens_per_s"] / r["world"], 1) if r["tokens_per_s"] else None
        r["scaling_efficiency"] = round(r["tokens_per_s"] / (r["world"] * one), 3) if one and r["tokens_per_s"] else None
    gpu = torch.cuda.get_device_name() if a.device == "cuda" and torch.cuda.is_available() else None
    result = {"benchmark": "pretrain_ddp", "spec": a.spec, "preset": a.preset, "parallel": a.parallel,
              "rows_per_gpu": a.rows_per_gpu, "steps": a.steps, "device": a.device, "runs": runs,
              "machine": machine(gpu=gpu, gpus=gpus if a.device == "cuda" else 0)}
    append_result(a.out, result)
    print("| W | tokens/s | per GPU | efficiency |\n|---|---|---|---|")
    for r in runs:
        print(f"| {r['world']} | {r['tokens_per_s']} | {r['per_gpu_tokens_per_s']} | {r['scaling_efficiency']} |")


if __name__ == "__main__":
    main()
