"""Plots for docs/performance.md from benchmarks/results/*.json (no measuring here).

    python benchmarks/plot_performance.py      # writes docs/img/perf_*.png
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RES, IMG = REPO / "benchmarks" / "results", REPO / "docs" / "img"


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    # pretrain throughput: the bench_pretrain.py records (fixed batch, no loader)
    tp = [r for r in json.loads((RES / "pretrain_throughput.json").read_text())
          if r.get("benchmark") == "pretrain_throughput" and "mfu" in r and not r.get("with_loader") and "note" not in r]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["non_embedding_params"] / 1e6 for r in tp], [100 * r["mfu"] for r in tp], marker="o")
    for r in tp:
        ax.annotate(r["preset"], (r["non_embedding_params"] / 1e6, 100 * r["mfu"]), textcoords="offset points", xytext=(4, -10))
    ax.axhline(40, ls="--", c="gray", label="goal 40% (>= 300M)")
    ax.set(xscale="log", xlabel="non-embedding parameters (M)", ylabel="MFU (%)", title="LUM pretraining, H100, bf16, 4096-token rows")
    ax.legend()
    fig.tight_layout(); fig.savefig(IMG / "perf_mfu.png", dpi=110); plt.close(fig)

    runs = [x for x in json.loads((RES / "serving.json").read_text()) if x.get("device") == "cuda"]
    sv = [r for r in runs[-1]["records"] if "p99_ms" in r]  # the latest GPU run
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    lum = [r for r in sv if r["path"] == "lum_step3"]
    hstu_size = [r for r in sv if r["path"] == "hstu_e2e" and r["seq_len"] == 1024]
    ax[0].plot([r["lum_non_embedding_params"] / 1e6 for r in lum], [r["p99_ms"] for r in lum], marker="o", label="LUM Step 3 (lookup + DIN)")
    ax[0].plot([r["non_embedding_params"] / 1e6 for r in hstu_size], [r["p99_ms"] for r in hstu_size], marker="s", label="HSTU end to end, L = 1024")
    ax[0].axhline(30, ls="--", c="gray", label="30 ms budget")
    ax[0].set(xscale="log", xlabel="model non-embedding parameters (M)", ylabel="p99 latency (ms)", title="100 candidates, one request")
    ax[0].legend(fontsize=8)
    hstu_len = sorted([r for r in sv if r["path"] == "hstu_e2e" and r["size"] == "19m"], key=lambda r: r["seq_len"])
    ax[1].plot([r["seq_len"] for r in hstu_len], [r["p99_ms"] for r in hstu_len], marker="s", label="HSTU (19m preset dims)")
    ax[1].axhline(lum[0]["p99_ms"], ls=":", c="C0", label="LUM Step 3 (any length)")
    ax[1].axhline(30, ls="--", c="gray")
    ax[1].set(xscale="log", xlabel="user sequence length", ylabel="p99 latency (ms)", title="latency vs history length, H100")
    ax[1].set_xticks([r["seq_len"] for r in hstu_len], [str(r["seq_len"]) for r in hstu_len])
    ax[1].minorticks_off()
    ax[1].legend(fontsize=8)
    fig.tight_layout(); fig.savefig(IMG / "perf_serving.png", dpi=110); plt.close(fig)
    print("wrote", IMG / "perf_mfu.png", IMG / "perf_serving.png")


if __name__ == "__main__":
    main()
