"""The results of a finished `lumctl run`, as a few plain lines: read from the stores' metrics files,
never recomputed.

  pretrain  test next-item retrieval (HR@10, NDCG@10; the smallest K when ks has no 10) with the query condition of [pretrain.eval], and with
            the held-out event's own condition when [pretrain.eval] oracle = true; each conditioned-request
            task of [pretrain.eval].requests (its field, users and requests)
  fuse      test AUC of the model; with [fuse] compare_base = true also the base (lum = "none") and the gain
  plots     every *.png in the experiment's stores
"""

from __future__ import annotations

import json
from pathlib import Path

from lumctl.progress import say


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _condition(cond: dict) -> str:
    """{"scenario": "<any>"} -> "scenario=<any>"; no conditions -> "none"."""
    return ", ".join(f"{k}={v}" for k, v in cond.items()) or "none"


def _auc(block: dict) -> str:
    """Test AUC: the mean over seeds (the seeds' std beside it when there are several)."""
    a = block["test"]["auc"]
    return f"{a['mean']:.4f}" + (f" ± {a['std']:.4f}" if len(block.get("seeds", [])) > 1 else "")


W = 56  # width of a row's label


def _row(label: str, *cells: str) -> str:
    return f"    {label:<{W}}" + "".join(f"{c:>17}" for c in cells)


def lines(spec) -> list[str]:
    """The summary of the experiment's finished stores (a stage without a finished store is left out)."""
    out = [f"results of {spec.experiment} (test split)"]
    pre = _read(spec.store("pretrain") / "final" / "metrics.json")
    if pre is not None:
        t = pre["test"]
        ks = sorted(int(k[3:]) for k in t if k.startswith("hr@"))
        k = 10 if 10 in ks else ks[0]                                   # [pretrain.eval] ks
        out.append(f"  pretrain: next-item retrieval over all items, {t.get('n', '?')} users")
        out.append(_row("", f"HR@{k}", f"NDCG@{k}"))
        out.append(_row(f"query condition {_condition(pre.get('query_condition', {}))}",
                        f"{t[f'hr@{k}']:.4f}", f"{t[f'ndcg@{k}']:.4f}"))
        o = pre.get("test_oracle_condition")
        if o is not None:
            fields = ", ".join(pre.get("query_condition", {})) or "condition"
            out.append(_row(f"oracle: the held-out event's own {fields}", f"{o[f'hr@{k}']:.4f}",
                            f"{o[f'ndcg@{k}']:.4f}"))
        for field, r in pre.get("test_requests", {}).items():
            out.append(_row(f"requests by {field}: {r['requests']} of {r['users']} users", f"{r[f'hr@{k}']:.4f}",
                            f"{r[f'ndcg@{k}']:.4f}"))
    fu = _read(spec.store("fuse") / "metrics.json") if spec.fuse is not None else None
    if fu is not None:
        base = fu.get("base")
        out.append(f"  fuse: {fu['backbone']} CTR, {len(fu.get('seeds', []))} seed(s)")
        out.append(_row("", "test AUC", "gain") if base is not None else _row("", "test AUC"))
        if base is not None:
            out.append(_row("base (lum = none)", _auc(base)))
        label = ("+ LUM" if fu["lum"] != "none" else "base") + f" (lum = {fu['lum']})"
        gain = [f"{fu['test']['auc']['mean'] - base['test']['auc']['mean']:+.4f}"] if base is not None else []
        out.append(_row(label, _auc(fu), *gain))
    plots = sorted((Path(spec.store_root) / spec.experiment).glob("*/*.png"))
    if plots:
        out.append("  plots: " + "  ".join(str(p) for p in plots))
    return out if len(out) > 1 else []


def show(spec) -> None:
    """Print the summary on stderr (nothing when no stage has finished)."""
    for line in lines(spec):
        say(line)
