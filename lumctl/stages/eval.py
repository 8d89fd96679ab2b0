"""Stage `eval`: the results report. Reads finished stores (never trains), writes tables, tests and plots.

A report spec (`[report]`, see `ReportSpec` in lumctl/report_specs.py and specs/report-*.toml) lists tables;
each row names an experiment spec plus recipes and overrides, which resolve to one or more *runs*:
  retrieval / scaling row  -> one pretrain store per seed: <store_root>/<exp>[-<name>]-s<seed>/pretrain
                              (no `seeds`: the spec's own seed, <store_root>/<exp>[-<name>]/pretrain)
  ranking row              -> one fuse store (all its seeds):  <store_root>/<exp>[-<name>]/fuse
A run whose store is missing, incomplete or made from other spec sections (stale) stops the report
with one line naming the row, the store and the command that makes it (`optional = true` rows and
`--allow-missing` show it as "not run", or "partial" with the seeds that exist). `lumctl eval REPORT
--train` trains the missing and stale runs first (lumctl/runs.py).

Per row: mean ± std (n - 1) over seeds of each metric. A row with `vs = ["<label>", ...]` is compared
with those rows on the table's compare metric: per-seed paired differences (mean, std, t-test, seeds
better) and a paired bootstrap over users (retrieval: per-user ranks in pretrain's final/test_rank.npy,
paired when final/test_target.npy is the same; ranking: fuse's predictions.zarr, paired on the same
events). Scaling tables fit `metric = a ln(x) + b` (x = non-embedding parameters or max_items) and plot
points and line.

Output (`<store_root>/<report experiment>/eval/`):
  results.json   every number of the report, per run: experiment, spec hash, store hash
  results.md     the tables a person reads, with the commands that regenerate them
  <table>.png    one plot per table
  manifest.json  inputs = the store hashes of every run read
`--out DIR` also writes DIR/results.md and DIR/results/ (plots, results.json) for the repository.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lumctl import __version__, stats, zarrio
from lumctl.errors import InputError
from lumctl.progress import say
from lumctl.report_specs import ReportFile, RowSpec, TableSpec
from lumctl.spec_io import deep_merge, is_report, read_toml
from lumctl.specs import Spec, parse_spec
from lumctl.store import (
    atomic_dir,
    hash_obj,
    is_up_to_date,
    read_manifest,
    store_hash,
    write_manifest,
)

TRAIN = "lumctl eval {path} --train"   # the command that trains a report's missing or stale runs
RETRIEVAL_SECTIONS = ("synth", "tokenize", "pack", "pretrain")  # what a pretrain store depends on
MACHINE_KEYS = {"tokenize": ("path", "items_path")}                # differ between machines, not results


# ------------------------------------------------------------------------------------ plan
@dataclass
class Run:
    """One store the report reads: the resolved spec of a row (and seed)."""

    experiment: str
    stage: str                    # "pretrain" (retrieval, scaling) or "fuse" (ranking)
    data: dict                    # the resolved spec as a dict: what `lumctl eval --train` trains
    spec: Spec
    row: str = ""                 # "<table>/<label>", for messages


@dataclass
class RowPlan:
    table: TableSpec
    row: RowSpec
    runs: list[Run] = field(default_factory=list)


def _subst(obj, store_root: str):
    """Replace '{store_root}' in every string of `obj`."""
    if isinstance(obj, dict):
        return {k: _subst(v, store_root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_subst(v, store_root) for v in obj]
    return obj.replace("{store_root}", store_root) if isinstance(obj, str) else obj


def resolve_row(rep: ReportFile, table: TableSpec, row: RowSpec, where: str) -> list[Run]:
    """The runs of one row: the row's spec with `set` merged in, its experiment name and seeds."""
    try:
        base = read_toml(row.spec)
    except InputError as e:
        raise InputError(where, f"spec = {row.spec!r}: {e.what}") from None
    if is_report(base):
        raise InputError(where, f"spec = {row.spec!r} is a report spec, not an experiment spec")
    d = base
    for recipe in row.extends:
        try:
            d = deep_merge(d, read_toml(recipe))
        except InputError as e:
            raise InputError(where, f"extends {recipe!r}: {e.what}") from None
    d = deep_merge(d, _subst(row.set, rep.store_root))
    d["store_root"] = rep.store_root
    exp = str(base.get("experiment", "")) + (f"-{row.name}" if row.name else "")
    label = f"{table.name}/{row.label}"
    if table.kind == "ranking":
        if row.seeds:
            d = deep_merge(d, {"fuse": {"seed": row.seeds[0], "seeds": len(row.seeds)}})
        d["experiment"] = exp
        spec = _parse(d, where)
        if spec.fuse is None:
            raise InputError(where, "a ranking row reads a fuse store; the spec has no [fuse] section")
        return [Run(exp, "fuse", d, spec, label)]
    seeds = row.seeds or [None]
    runs = []
    for s in seeds:
        dd = deep_merge(d, {"pretrain": {"seed": s}}) if s is not None else copy.deepcopy(d)
        dd["experiment"] = exp + (f"-s{s}" if s is not None else "")
        runs.append(Run(dd["experiment"], "pretrain", dd, _parse(dd, where), label))
    return runs


def _parse(data: dict, where: str) -> Spec:
    try:
        return parse_spec(data, "<row>")
    except InputError as e:
        raise InputError(where, e.what) from None


def plan(rep: ReportFile, path: str = "<report>") -> list[RowPlan]:
    """Every row of every table with its runs. One experiment name must mean one spec."""
    out, seen = [], {}
    for t in rep.report.tables:
        for r in t.rows:
            where = f"{path}: table '{t.name}' row '{r.label}'"
            runs = resolve_row(rep, t, r, where)
            for run in runs:
                key = hash_obj(run.data)
                if run.experiment in seen and seen[run.experiment][0] != key:
                    raise InputError(where, f"experiment '{run.experiment}' is also made by row "
                                     f"'{seen[run.experiment][1]}' with other settings; give one row a `name`")
                seen.setdefault(run.experiment, (key, run.row))
            out.append(RowPlan(t, r, runs))
    return out


def unique_runs(rows: list[RowPlan]) -> list[Run]:
    """The distinct runs of a plan, in order."""
    got: dict[str, Run] = {}
    for rp in rows:
        for run in rp.runs:
            got.setdefault(run.experiment, run)
    return list(got.values())


# ------------------------------------------------------------------------------------ reading stores
class NotReady(Exception):
    """A run's store is missing or stale; str() says which and why."""


def _portable(section: str, value):
    """A spec section without the keys that name machine-specific paths."""
    if not isinstance(value, dict):
        return value
    v = {k: x for k, x in value.items() if k not in MACHINE_KEYS.get(section, ())}
    if section == "fuse" and "init_from" in v:
        v["init_from"] = bool(v["init_from"])                 # warm start or not; the path is the machine's
    return v


def _first_diff(a, b, path: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_diff(a.get(k), b.get(k), f"{path}.{k}")
    return f"{path}: store {json.dumps(a)}, spec {json.dumps(b)}"


def _current(section: str, value, spec: Spec):
    """A recorded section re-read by today's spec model, so fields added since (at their defaults)
    do not make an old store stale; unreadable sections are compared as recorded."""
    model = getattr(spec, section, None)
    if not isinstance(value, dict) or model is None:
        return value
    try:
        return type(model).model_validate(value).model_dump(mode="json")
    except Exception:
        return value


def _check_sections(recorded: dict, spec: Spec, sections) -> None:
    want = spec.model_dump(mode="json")
    for s in sections:
        a, b = _portable(s, _current(s, recorded.get(s), spec)), _portable(s, want.get(s))
        if a != b:
            raise NotReady(f"stale: made from another [{s}] ({_first_diff(a, b, f'[{s}]')})")


def _check_inputs(manifest: dict, spec: Spec) -> None:
    """Upstream stores that are present must be the ones this store was made from."""
    for stage, h in manifest.get("inputs", {}).items():
        if stage in ("tokenize", "pack", "query"):
            up = read_manifest(spec.store(stage))
            if up is not None and store_hash(up) != h:
                raise NotReady(f"stale: its {stage} store was rebuilt after it was made")


def read_pretrain(run: Run) -> dict:
    """Test/valid metrics, size and per-user test ranks of a finished pretrain store."""
    store = run.spec.store("pretrain")
    m = read_manifest(store)
    final = store / "final"
    if m is None or not (final / "metrics.json").is_file():
        raise NotReady(f"no finished pretrain store ({store.parent.name}/{store.name})")
    cfg = json.loads((final / "config.json").read_text())
    _check_sections(cfg.get("spec", {}), run.spec, RETRIEVAL_SECTIONS)
    _check_inputs(m, run.spec)
    met = json.loads((final / "metrics.json").read_text())
    rank_f, target_f = final / "test_rank.npy", final / "test_target.npy"
    requests = {f.stem[len("test_requests_"):]: dict(np.load(f)) for f in sorted(final.glob("test_requests_*.npz"))}
    return {"experiment": run.experiment, "seed": run.spec.pretrain.seed, "test": met["test"], "valid": met["valid"],
            "best_step": met.get("best_step"), "n_params": cfg.get("n_params"), "max_items": cfg.get("max_items"),
            "kind": cfg.get("kind"), "spec_hash": m["spec_hash"], "store_hash": store_hash(m),
            "tokenize": m["inputs"].get("tokenize"), "seconds": m.get("seconds"), "created": m.get("created"),
            "versions": m.get("versions", {}), "code": (m.get("code") or {}).get("hash"),
            "rank": np.load(rank_f) if rank_f.is_file() else None,
            "target": np.load(target_f) if target_f.is_file() else None,
            "test_requests": met.get("test_requests", {}), "request_ranks": requests}


def source_metrics(g: dict, source: str) -> dict:
    """The metrics of a finished pretrain run that a table's `source` names ({} when the run has none)."""
    if source == "test":
        return g["test"]
    return g.get("test_requests", {}).get(source.split(".", 1)[1], {})


def read_fuse(run: Run) -> dict:
    """Per-seed test metrics and test predictions of a finished fuse store."""
    spec = run.spec
    store = spec.store("fuse")
    m = read_manifest(store)
    if m is None or not (store / "metrics.json").is_file():
        raise NotReady(f"no finished fuse store ({store.parent.name}/{store.name})")
    cfg = json.loads((store / "final" / "config.json").read_text())
    _check_sections({"fuse": cfg.get("spec"), "tokenize": cfg.get("tokenize")}, spec,
                    ("fuse", "tokenize") if cfg.get("tokenize") is not None else ("fuse",))
    _check_inputs(m, spec)
    if spec.fuse.lum != "none":
        q = read_manifest(spec.store("query"))
        if q is not None and q["spec_hash"] != spec.section_hash("query"):
            raise NotReady("stale: its query store was made from another [query] section")
        p = spec.store("pretrain") / "final" / "config.json"
        if p.is_file():
            _check_sections(json.loads(p.read_text()).get("spec", {}), spec, RETRIEVAL_SECTIONS)
    met = json.loads((store / "metrics.json").read_text())
    # per seed: test auc, gauc, logloss (+ recall@K of a two_tower, flattened from "retrieval")
    out = {"experiment": run.experiment,
           "seeds": {int(s["seed"]): {**s["test"], **s["test"].get("retrieval", {})} for s in met["seeds"]},
           "backbone": met.get("backbone"), "lum": met.get("lum"), "lum_coverage": met.get("lum_coverage"),
           "spec_hash": m["spec_hash"], "store_hash": store_hash(m), "tokenize": m["inputs"].get("tokenize"),
           "seconds": m.get("seconds"), "created": m.get("created"), "versions": m.get("versions", {}),
           "code": (m.get("code") or {}).get("hash"), "pred": None}
    pz = store / "predictions.zarr"
    if pz.exists():
        g = zarrio.open_read(pz)
        test = zarrio.get(g, "split") == 2
        out["pred"] = {"event": zarrio.get(g, "event")[test], "user": zarrio.get(g, "user")[test],
                       "label": zarrio.get(g, "label")[test], "logit": zarrio.get(g, "logit")[:, test]}
    return out


def status(run: Run) -> str:
    """'ok', or why the run is not ready (missing / stale ...)."""
    try:
        (read_pretrain if run.stage == "pretrain" else read_fuse)(run)
        return "ok"
    except NotReady as e:
        return str(e)


# ------------------------------------------------------------------------------------ numbers
def _mean_std(x: list[float]) -> dict:
    a = np.array([v for v in x if v is not None], np.float64)
    return {"mean": float(a.mean()) if len(a) else None, "std": float(a.std(ddof=1)) if len(a) > 1 else None,
            "n": len(a), "values": [float(v) for v in a]}


def row_values(kind: str, got: list[dict], columns: list[str], source: str = "test") -> dict:
    """metric -> mean/std/values over the row's seeds; plus per-seed values of every metric."""
    if kind == "ranking":
        seeds = got[0]["seeds"]
        per_seed = {s: {c: seeds[s].get(c) for c in columns} for s in sorted(seeds)}
    else:
        per_seed = {g["seed"]: {c: source_metrics(g, source).get(c) for c in columns} for g in got}
    return {"per_seed": per_seed, **{c: _mean_std([v[c] for v in per_seed.values()]) for c in columns}}


def compare(kind: str, metric: str, a: list[dict], b: list[dict], va: dict, vb: dict, reps: int, seed: int,
            confidence: float, source: str = "test") -> dict:
    """Row a vs row b on `metric`: per-seed paired differences and, where both keep per-example
    outputs on the same examples, a paired bootstrap over users."""
    out = {"metric": metric, "delta": va[metric]["mean"] - vb[metric]["mean"]
           if va[metric]["mean"] is not None and vb[metric]["mean"] is not None else None,
           "seeds": stats.paired_seeds({s: v[metric] for s, v in va["per_seed"].items() if v[metric] is not None},
                                       {s: v[metric] for s, v in vb["per_seed"].items() if v[metric] is not None}),
           "bootstrap": None, "bootstrap_note": ""}
    if reps <= 0:
        out["bootstrap_note"] = "bootstrap off"
        return out
    if kind == "ranking":
        pa, pb = a[0]["pred"], b[0]["pred"]
        if pa is None or pb is None:
            out["bootstrap_note"] = "no predictions.zarr"
        elif len(pa["event"]) != len(pb["event"]) or not np.array_equal(pa["event"], pb["event"]):
            out["bootstrap_note"] = "not paired: the runs score different samples"
        elif metric not in ("auc", "logloss"):
            out["bootstrap_note"] = f"no bootstrap for {metric}"
        else:
            out["bootstrap"] = stats.bootstrap_ranking_diff(pa["user"], pa["label"], pa["logit"], pb["logit"],
                                                            metric, reps, seed, confidence)
        return out
    if source != "test":
        return out | compare_requests(metric, a, b, source.split(".", 1)[1], reps, seed, confidence)
    ra, rb = [g["rank"] for g in a], [g["rank"] for g in b]
    targets = [g["target"] for g in a + b]
    if any(r is None for r in ra + rb + targets):
        out["bootstrap_note"] = "no per-user ranks (final/test_rank.npy, test_target.npy)"
    elif any(len(t) != len(targets[0]) or not np.array_equal(t, targets[0]) for t in targets):
        out["bootstrap_note"] = "not paired: the runs score different users or items"
    else:
        d = np.mean([stats.per_user(r, metric) for r in ra], 0) - np.mean([stats.per_user(r, metric) for r in rb], 0)
        out["bootstrap"] = stats.bootstrap_mean_diff(d, reps, seed, confidence)
    return out


def compare_requests(metric: str, a: list[dict], b: list[dict], field: str, reps: int, seed: int,
                     confidence: float) -> dict:
    """Paired bootstrap over users of a conditioned-request metric (per user: the mean over the user's
    requests), when every run of both rows scored the same requests and positives."""
    from lumctl.metrics import per_user_requests
    arrays = [g["request_ranks"].get(field) for g in a + b]
    keys = ("user", "value", "pos_off", "item")
    if any(x is None for x in arrays):
        return {"bootstrap_note": f"no per-request ranks (final/test_requests_{field}.npz)"}
    if any(not all(np.array_equal(x[k], arrays[0][k]) for k in keys) for x in arrays):
        return {"bootstrap_note": "not paired: the runs score different requests"}
    per = [per_user_requests(x["rank"], x["pos_off"], x["user"], metric) for x in arrays]
    d = np.mean(per[:len(a)], 0) - np.mean(per[len(a):], 0)
    return {"bootstrap": stats.bootstrap_mean_diff(d, reps, seed, confidence)}


def request_counts(rows: list[dict], field: str) -> dict | None:
    """Users, requests, positives and skipped requests of a request table's runs (one dict when every
    run has the same ones, else None)."""
    keys = ("users", "requests", "positives", "skipped_no_positive", "candidates", "users_sampled")
    got = [{k: g["test_requests"][field].get(k) for k in keys} for g in rows if field in g.get("test_requests", {})]
    return got[0] if got and all(x == got[0] for x in got) else None


def x_of(table: TableSpec, got: list[dict]) -> float | None:
    key = "n_params" if table.x == "params" else "max_items"
    xs = {g.get(key) for g in got}
    return float(xs.pop()) if len(xs) == 1 and None not in xs else None


def evaluate_table(t: TableSpec, rows: list[RowPlan], read: dict[str, dict | str], rs) -> dict:
    """Numbers of one table: row values, comparisons, and the fit of a scaling table."""
    cols = t.columns()
    metric = t.compare_metric()
    if metric not in cols:
        cols = cols + [metric]
    out_rows, by_label = [], {}
    for rp in rows:
        res = [read[run.experiment] for run in rp.runs]
        missing = [(run, r) for run, r in zip(rp.runs, res) if isinstance(r, str)]
        rec = {"label": rp.row.label, "spec": rp.row.spec, "extends": list(rp.row.extends), "set": rp.row.set,
               "vs": list(rp.row.vs),
               "runs": [{"experiment": run.experiment, "stage": run.stage,
                         **({"status": r} if isinstance(r, str) else
                            {"status": "ok", **{k: r[k] for k in ("spec_hash", "store_hash", "seconds", "created")},
                             "seed": r.get("seed"), "seeds": sorted(r["seeds"]) if "seeds" in r else None,
                             "n_params": r.get("n_params"), "max_items": r.get("max_items")})}
                        for run, r in zip(rp.runs, res)]}
        done = [r for r in res if not isinstance(r, str)]
        if not done:
            rec["status"] = "not run"
        else:  # "partial": some seeds missing (--allow-missing); the values are those of the others
            rec["status"] = "partial" if missing else "ok"
            rec["values"] = row_values(t.kind, done, cols, t.source)
            if t.kind == "scaling":
                rec["x"] = x_of(t, done)
            by_label[rp.row.label] = (done, rec["values"])
        out_rows.append(rec)
    comparisons = []
    for rec in out_rows:
        for other in rec["vs"]:
            c = {"row": rec["label"], "vs": other}
            if rec["label"] in by_label and other in by_label:
                (a, va), (b, vb) = by_label[rec["label"]], by_label[other]
                c.update(compare(t.kind, metric, a, b, va, vb, rs.bootstrap, rs.seed, rs.confidence, t.source))
            else:
                c["status"] = "not run"
            comparisons.append(c)
    table = {"name": t.name, "title": t.title, "kind": t.kind, "columns": cols, "compare": metric, "note": t.note,
             "rows": out_rows, "comparisons": comparisons}
    codes = mixed_code([read[run.experiment] for rp in rows for run in rp.runs])
    if codes:
        table["mixed_code"] = codes
    if t.source != "test":
        table["source"] = t.source
        table["requests"] = request_counts([read[run.experiment] for rp in rows for run in rp.runs
                                            if not isinstance(read[run.experiment], str)], t.source.split(".", 1)[1])
    if t.kind == "scaling":
        table["x"] = t.x
        pts = [(r["x"], v) for r in out_rows if r["status"] != "not run" and r.get("x")
               for v in r["values"][metric]["values"]]
        try:
            table["fit"] = stats.fit_log([p[0] for p in pts], [p[1] for p in pts])
            table["fit"]["on"] = "every seed's point"
        except ValueError as e:
            table["fit"] = None
            table["fit_note"] = str(e)
    return table


# ------------------------------------------------------------------------------------ plots
def plot_table(table: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metric = table["compare"]
    ok = [r for r in table["rows"] if r["status"] != "not run"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if table["kind"] == "scaling":
        for r in ok:
            if r.get("x"):
                v = r["values"][metric]
                ax.scatter([r["x"]] * len(v["values"]), v["values"], color="C0", s=18, alpha=0.6)
                ax.errorbar([r["x"]], [v["mean"]], yerr=[v["std"] or 0.0], fmt="none", color="C1", capsize=4)
                ax.annotate(f"{r['label']}: {_value_label(v)}", (r["x"], v["mean"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        f = table.get("fit")
        if f:
            xs = np.array([r["x"] for r in ok if r.get("x")], np.float64)
            grid = np.exp(np.linspace(np.log(xs.min()), np.log(xs.max()), 50))
            ax.plot(grid, f["a"] * np.log(grid) + f["b"], color="C1",
                    label=f"{metric} = {f['a']:.4f} ln(x) {'+' if f['b'] >= 0 else '−'} {abs(f['b']):.4f}, R² = {f['r2']:.3f}")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters" if table["x"] == "params" else "max items per user (events)")
    else:  # mean with a ± std error bar across seeds per row, every seed a dot, the value written beside it
        for i, r in enumerate(ok):
            v = r["values"][metric]
            ax.scatter([i] * len(v["values"]), v["values"], color="C0", s=14, alpha=0.5)
            ax.errorbar([i], [v["mean"]], yerr=[v["std"] or 0.0], fmt="o", color="C1", capsize=4, markersize=6)
            ax.annotate(_value_label(v), (i, v["mean"]), textcoords="offset points", xytext=(8, 0), va="center",
                        fontsize=7)
        ax.set_xticks(range(len(ok)), [r["label"] for r in ok], rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.5, len(ok) - 0.5)
        ax.grid(axis="y", alpha=0.3)
    ax.set_ylabel(f"test {metric}")
    ax.set_title("\n".join(textwrap.wrap(table["title"], 70)), fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ markdown
def _num(v, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _cell(v: dict) -> str:
    if v["mean"] is None:
        return "—"
    return _num(v["mean"]) + (f" ± {v['std']:.4f}" if v["std"] is not None else "")


def _value_label(v: dict) -> str:
    """A plot's label of one row: mean ± std, or the single value and '1 seed'."""
    return f"{v['mean']:.4f}" + (f" ± {v['std']:.4f}" if v["std"] is not None else f" ({v['n']} seed)")


def _signed(v, digits: int = 4) -> str:
    return "—" if v is None else f"{v:+.{digits}f}"


def _params(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _compare_line(c: dict) -> str:
    if c.get("status") == "not run":
        return f"| {c['row']} | {c['vs']} | not run | | |"
    sd = c["seeds"]
    one = sd is not None and sd["n"] < 2       # one shared seed: no spread, no test (seed noise unmeasured)
    if sd is None:
        seeds = "—"
    elif one:
        seeds = f"{_signed(sd['mean'])}; n/a (1 seed)"
    else:
        seeds = (f"{_signed(sd['mean'])}" + (f" ± {sd['std']:.4f}" if sd["std"] is not None else "")
                 + f"; {sd['better']}/{sd['n']} seeds better"
                 + ("" if sd["p"] is None else "; t-test p < 0.001" if sd["p"] < 0.001 else f"; t-test p = {sd['p']:.3f}"))
    b = c["bootstrap"]
    if b is None:
        boot = c["bootstrap_note"] or "—"
    elif one:   # the interval covers resampled users only; a p-value would claim more than one seed shows
        boot = f"{b['delta']:+.4f} [{b['lo']:+.4f}, {b['hi']:+.4f}], p n/a (1 seed)"
    else:
        star = " *" if b["lo"] > 0 or b["hi"] < 0 else ""
        p = f"p < {1 / b['reps']:.3f}" if b["p"] == 0 else f"p = {b['p']:.3f}"
        boot = f"{b['delta']:+.4f} [{b['lo']:+.4f}, {b['hi']:+.4f}], {p}{star}"
    return f"| {c['row']} | {c['vs']} | {_signed(c['delta'])} | {seeds} | {boot} |"


def mixed_code(results: list) -> list[str]:
    """The code identities (short hashes) of finished runs when they are not all the same, else []."""
    codes = sorted({(r.get("code") or "unknown")[:12] for r in results if not isinstance(r, str)})
    return codes if len(codes) > 1 else []


def table_markdown(t: dict, img: str, confidence: float) -> list[str]:
    cols, metric, scaling = t["columns"], t["compare"], t["kind"] == "scaling"
    head = ["row"] + (["x"] if scaling else []) + [f"test {c}" for c in cols] + ["seeds"]
    head += ["store"] if t["kind"] == "ranking" else ["params"]
    lines = [f"### {t['title']}", ""]
    if t.get("kept_from"):
        k = t["kept_from"]
        lines += [f"*Kept from the page generated on {k['generated']} (commit {k['commit']}): these runs' stores "
                  "were not under the store root of this page's report; rows, runs and plot are that page's.*", ""]
    if t.get("mixed_code"):
        lines += [f"**Rows from different code** ({', '.join(t['mixed_code'])}): the stores of this table were "
                  "written by different lumctl code; rerun the older ones to compare like with like.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t["rows"]:
        why = "; ".join(f"`{x['experiment']}`: {x['status']}" for x in r["runs"] if x["status"] != "ok")
        if r["status"] == "not run":
            lines.append(f"| {r['label']} | not run: {why} |" + " |" * (len(head) - 2))
            continue
        v, first = r["values"], next(x for x in r["runs"] if x["status"] == "ok")
        cells = [r["label"] + (f" (partial: {why})" if r["status"] == "partial" else "")]
        if scaling:
            cells.append("—" if not r.get("x") else _params(r["x"]) if t["x"] == "params" else str(int(r["x"])))
        cells += [_cell(v[c]) for c in cols] + [str(v[cols[0]]["n"])]
        cells.append(f"`{first['experiment']}`" if t["kind"] == "ranking" else _params(first.get("n_params")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if scaling:
        f = t.get("fit")
        if f:
            xname = "non-embedding parameters" if t["x"] == "params" else "max_items (events per user)"
            sign = "+" if f["b"] >= 0 else "−"
            lines += [f"Fit over {f['n']} points ({f['on']}), x = {xname}: **{metric} = {f['a']:.4f} · ln(x) {sign} "
                      f"{abs(f['b']):.4f}**, R² = {f['r2']:.3f} ({_signed(f['per_10x'])} {metric} per 10× x).", ""]
        else:
            lines += [f"No fit: {t.get('fit_note', '')}", ""]
    if t.get("source"):
        field, rq = t["source"].split(".", 1)[1], t.get("requests")
        lines += [(f"Conditioned requests on `{field}` (metrics.json `{t['source']}`): {rq['users']} users, "
                   f"{rq['requests']} requests with a positive and {rq['positives']} positives; "
                   f"{rq['skipped_no_positive']} requests formed from the history had no positive in the test window "
                   f"and are skipped for every row; candidates: {rq['candidates']}"
                   + (f"; users sampled: {rq['users_sampled']}" if rq.get("users_sampled") else "") + ".")
                  if rq else f"Conditioned requests on `{field}` (metrics.json `{t['source']}`); the runs scored "
                  "different requests.", ""]
    if t["comparisons"]:
        lines += [f"Paired comparisons on test {metric} (Δ = row − vs):", "",
                  f"| row | vs | Δ {metric} (means) | per-seed Δ (mean ± std; seeds better; t-test) | "
                  f"paired bootstrap over users: Δ [{confidence:.0%} CI], p |", "|---|---|---|---|---|"]
        lines += [_compare_line(c) for c in t["comparisons"]]
        lines += ["", "Per seed: differences of runs with the same seed. Paired bootstrap: test users resampled with "
                  "replacement (all their examples), metric averaged over seeds; * = the interval excludes 0.", ""]
    if t["note"]:
        lines += [t["note"], ""]
    lines += [f"![{t['title']}]({img})", ""]
    return lines


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown(res: dict, img_dir: str) -> str:
    rp, path = res["report_spec"], res["report_path"]
    lines = [f"# {res['title']}", "",
             f"Generated by `lumctl eval {path}` (lumctl {res['lumctl_version']}, commit {res['commit']}) on "
             f"{res['generated']}, from finished stores under `{res['store_root']}`. Do not edit by hand.", ""]
    if rp["note"]:
        lines += [rp["note"], ""]
    lines += ["Regenerate every number below (train the runs, then rebuild this page):", "", "```bash",
              f"{TRAIN.format(path=path)} --out docs   # trains the runs whose stores are missing or stale, "
              "then writes this page", "```", "",
              "Every table cell is a test metric, mean ± std (n − 1) over seeds. Retrieval holds out one item "
              "per user, so HR@K is also Recall@K. The runs, their spec hashes (manifest `spec_hash` of the "
              "stage) and the command that retrains each are listed at the end.", ""]
    for t in res["tables"]:
        lines += table_markdown(t, f"{img_dir}{t['name']}.png", rp["confidence"])
    lines += ["## Runs", "", "| run (experiment) | table / row | spec + overrides | seed(s) | stage spec hash | "
              "store hash | train time | regenerate |", "|---|---|---|---|---|---|---|---|"]
    done = set()
    for t in res["tables"]:
        for r in t["rows"]:
            for x in r["runs"]:
                if x["experiment"] in done:
                    continue
                done.add(x["experiment"])
                over = "".join(f" + `{e}`" for e in r.get("extends", []))
                over += f" + `{json.dumps(r['set'], separators=(',', ':'))}`" if r["set"] else ""
                seeds = x.get("seeds") or ([x["seed"]] if x.get("seed") is not None else [])
                secs = x.get("seconds")
                lines.append(f"| `{x['experiment']}` ({x['stage']}) | {t['name']} / {r['label']} | `{r['spec']}`{over} | "
                             f"{','.join(map(str, seeds)) or '—'} | "
                             f"{x['spec_hash'][:12] if x['status'] == 'ok' else x['status']} | "
                             f"{x['store_hash'][:12] if x['status'] == 'ok' else '—'} | "
                             f"{'—' if secs is None else f'{secs:.0f} s'} | "
                             f"`{TRAIN.format(path=path)} --only {x['experiment']}` |")
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ run
def _clean(x):
    """JSON-safe: NaN -> null, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def run(rep: ReportFile, force: bool = False, out: str | Path | None = None, allow_missing: bool = False,
        path: str = "<report>", keep_previous: bool = False) -> Path:
    started = time.time()
    rows = plan(rep, path)
    read: dict[str, dict | str] = {}
    for r in unique_runs(rows):
        try:
            read[r.experiment] = (read_pretrain if r.stage == "pretrain" else read_fuse)(r)
        except NotReady as e:
            read[r.experiment] = str(e)
    for rp in rows:  # a missing or stale store stops the report, unless the row may be missing
        for r in rp.runs:
            if isinstance(read[r.experiment], str) and not (rp.row.optional or allow_missing):
                raise InputError(f"{path}: table '{rp.table.name}' row '{rp.row.label}' ({rp.row.spec})",
                                 f"{read[r.experiment]}; make it with `{TRAIN.format(path=path)} --only {r.experiment}`")
    inputs = {e: (g["store_hash"] if isinstance(g, dict) else g) for e, g in read.items()}
    spec_hash = hash_obj({"report": rep.report.model_dump(mode="json"), "runs": [hash_obj(r.data) for r in unique_runs(rows)]})
    dest = rep.store("eval")
    if force or not is_up_to_date(dest, spec_hash, inputs):
        res = {"title": rep.report.title, "report_path": str(path), "report_spec": rep.report.model_dump(mode="json"),
               "store_root": rep.store_root, "lumctl_version": __version__, "commit": git_commit(),
               "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "tables": [evaluate_table(t, [rp for rp in rows if rp.table is t], read, rep.report)
                          for t in rep.report.tables]}
        res = _clean(res)
        with atomic_dir(dest) as tmp:
            for t in res["tables"]:
                plot_table(t, tmp / f"{t['name']}.png")
            (tmp / "results.json").write_text(json.dumps(res, indent=2))
            (tmp / "results.md").write_text(markdown(res, ""))
            not_run = sum(r["status"] == "not run" for t in res["tables"] for r in t["rows"])
            write_manifest(tmp, stage="eval", spec_hash=spec_hash, inputs=inputs, started=started,
                           counts={"tables": len(res["tables"]), "rows": sum(len(t["rows"]) for t in res["tables"]),
                                   "not_run": not_run})
        say(f"eval: {len(res['tables'])} tables, {len(read)} runs ({not_run} rows not run) -> {dest}")
    else:
        say(f"eval: {dest} is up to date")
    if out is not None:
        export(dest, Path(out), keep_previous)
    return dest


def export(dest: Path, out: Path, keep_previous: bool = False) -> None:
    """Write <out>/results.md (images under <out>/results/) and <out>/results/results.json.
    keep_previous: a table with rows that did not run here keeps its rendering from the previous
    <out>/results/results.json (rows, runs and plot), marked with that report's date and commit, when
    that rendering had more of its rows run: a page assembled from runs made on several machines, where
    some of a table's runs are shared with a table rerun here."""
    res = json.loads((dest / "results.json").read_text())
    img = out / "results"
    plots = {t["name"]: dest / f"{t['name']}.png" for t in res["tables"]}
    old_plots: dict[str, bytes] = {}
    prev_f = img / "results.json"
    if keep_previous and prev_f.is_file():
        prev = json.loads(prev_f.read_text())

        def ran(t: dict) -> int:
            return sum(r["status"] != "not run" for r in t["rows"])
        before = {t["name"]: t for t in prev["tables"] if ran(t)}
        for i, t in enumerate(res["tables"]):
            if t["name"] in before and ran(t) < min(len(t["rows"]), ran(before[t["name"]])) \
                    and (img / f"{t['name']}.png").is_file():
                kept = before[t["name"]]
                kept["kept_from"] = kept.get("kept_from") or {"generated": prev["generated"], "commit": prev["commit"]}
                res["tables"][i] = kept
                old_plots[t["name"]] = (img / f"{t['name']}.png").read_bytes()
    if img.exists():
        shutil.rmtree(img)
    img.mkdir(parents=True)
    for name, png in plots.items():
        if name in old_plots:
            (img / f"{name}.png").write_bytes(old_plots[name])
        else:
            shutil.copy2(png, img / f"{name}.png")
    (img / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.md").write_text(markdown(res, "results/"))
    kept = [t["name"] for t in res["tables"] if t.get("kept_from")]
    say(f"eval: wrote {out / 'results.md'} and {img}/" + (f" ({len(kept)} tables kept from the previous page)" if kept else ""))
