"""Train the runs a report spec reads (`lumctl eval` itself never trains), then `lumctl eval` it.

    python examples/run_report.py specs/report-cpu.toml                  # every missing or stale run
    python examples/run_report.py specs/report-cpu.toml --only 'ml-100k-size-*' --parallel 2
    python examples/run_report.py specs/report-cpu.toml --dry-run        # list the runs and their status
    python examples/run_report.py specs/report.toml --dry-run --export DIR   # export what is finished, train nothing
    python examples/run_report.py specs/report-gpu-sweep.toml --parallel 4 --export $OUT/stores

Each run is one resolved experiment spec (the row's spec, its `set` overrides, its seed; see
lumctl/stages/eval.py), trained by `lumctl run`'s stages in its own process (log in
<store_root>/<report>/logs/<experiment>.log). Ranking rows that differ only in [query] / [fuse] share their
upstream stores: the first trains synth .. fuse, the others link to its stores as deep as their sections
agree and train only the rest (query + fuse, or fuse).
--export DIR copies the small files `lumctl eval` reads (manifests, metrics, configs, per-user
ranks, predictions; no model weights) into DIR/<experiment>/..., so a GPU machine's runs can be
evaluated elsewhere: `LUMCTL_STORES=DIR lumctl eval REPORT` (the report's store_root reads it).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lumctl.report_specs import load_report
from lumctl.specs import STAGES
from lumctl.stages import eval as ev
from lumctl.store import hash_obj

# what `lumctl eval` reads from a run (relative to <store_root>/<experiment>/), weights left out
EXPORT = ["synth/manifest.json", "tokenize/manifest.json", "pack/manifest.json", "query/manifest.json",
          "pretrain/manifest.json", "pretrain/metrics.jsonl", "pretrain/loss.png", "pretrain/final/metrics.json",
          "pretrain/final/config.json", "pretrain/final/test_rank.npy", "pretrain/final/test_target.npy", "fuse/manifest.json", "fuse/metrics.json",
          "fuse/final/config.json", "fuse/predictions.zarr"]


def prefix_key(run: ev.Run, stage: str) -> str:
    """Runs with equal keys at `stage` can share every store up to and including that stage: their
    specs agree on everything but the experiment name and the sections of later stages."""
    later = STAGES[STAGES.index(stage) + 1:]
    return hash_obj({k: v for k, v in run.data.items() if k != "experiment" and k not in later})


def shared_depth(run: ev.Run, leader: ev.Run) -> int:
    """How many stages (synth, tokenize, ...) run can take from leader's stores (before fuse)."""
    n = 0
    for stage in STAGES[:-1]:
        if prefix_key(run, stage) != prefix_key(leader, stage):
            break
        n += 1
    return n


_LOGS: set[Path] = set()   # logs opened by this invocation


def launch(run: ev.Run, code: str, log_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    path = log_dir / f"{run.experiment}.log"
    log = open(path, "a" if path in _LOGS else "w")   # a leader's fuse appends to its upstream log
    _LOGS.add(path)
    return subprocess.Popen([sys.executable, "-c", code], cwd=Path.cwd(), stdout=log, stderr=log, env=env)


def code_for(run: ev.Run, force: bool, linked: int = 0, upto: int = len(STAGES)) -> str:
    """Python that trains run's stages after its first `linked` ones (those are links to another run's
    stores: never retrained, not even with --force) and before STAGES[upto]."""
    spec = f"parse_spec(json.loads({json.dumps(json.dumps(run.data))}), {json.dumps(run.experiment)})"
    stages = [s for s in STAGES[linked:upto] if run.data.get(s) is not None]
    return (f"import json; from lumctl.specs import parse_spec; from lumctl.stages import stage_module; "
            f"spec = {spec}; [stage_module(s).run(spec, force={force}) for s in {stages!r}]")


def ready(run: ev.Run) -> bool:
    """A warm start ([fuse] init_from) can start once the checkpoint it reads exists."""
    f = run.spec.fuse.init_from if run.spec.fuse is not None else ""
    return not f or (Path(f) / "model.pt").is_file()


def run_parallel(jobs: list[tuple[ev.Run, str]], parallel: int, log_dir: Path) -> list[dict]:
    """Run (run, code) jobs, `parallel` at a time, a warm start once its checkpoint exists (or when
    nothing else is left to wait for: it then fails with the fuse stage's error); one line per finished
    job. Interrupted (Ctrl-C, SIGTERM from `timeout`), it stops the running jobs; their stores stay
    unfinished (atomic writes)."""
    pending, running, done = list(jobs), [], []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = next((j for j in pending if ready(j[0])), pending[0] if not running else None)
                if job is None:
                    break
                pending.remove(job)
                run, code = job
                running.append((run, launch(run, code, log_dir), time.time()))
            time.sleep(0.5)
            for job in list(running):
                run, proc, t0 = job
                if proc.poll() is None:
                    continue
                running.remove(job)
                st = ev.status(run)
                done.append({"experiment": run.experiment, "returncode": proc.returncode, "status": st,
                             "seconds": round(time.time() - t0, 1)})
                print(f"{run.experiment}: rc={proc.returncode} {done[-1]['seconds']}s {st}", flush=True)
    finally:
        for run, proc, _ in running:
            proc.terminate()
            print(f"{run.experiment}: stopped", flush=True)
    return done


def link_upstream(run: ev.Run, leader: ev.Run) -> None:
    """Make run's first shared_depth(run, leader) stores (synth, tokenize, ...) links to the leader's;
    code_for(run, ..., linked=shared_depth(run, leader)) then trains only the stages after them."""
    for stage in STAGES[:shared_depth(run, leader)]:
        src, dst = leader.spec.store(stage), run.spec.store(stage)
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve(), target_is_directory=True)


def export(runs: list[ev.Run], root: Path, dest: Path) -> None:
    for run in runs:
        for rel in EXPORT:
            src = root / run.experiment / rel
            if not src.exists():
                continue
            out = dest / run.experiment / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, out, dirs_exist_ok=True)
            else:
                shutil.copy2(src, out)
    print(f"exported {len(runs)} runs to {dest}", flush=True)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # `timeout` stops the jobs too (finally above)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", help="report spec (TOML with [report])")
    ap.add_argument("--only", default="", help="comma-separated experiment names or globs (default: all)")
    ap.add_argument("--parallel", type=int, default=1, help="runs at a time")
    ap.add_argument("--store-root", default=None, help="override the report's store_root")
    ap.add_argument("--force", action="store_true", help="retrain runs that are up to date")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and their status; train nothing")
    ap.add_argument("--export", default=None, help="copy what `lumctl eval` reads (no weights) to this folder")
    ap.add_argument("--eval", action="store_true", help="run `lumctl eval` on the report afterwards")
    a = ap.parse_args()
    rep = load_report(a.report)
    if a.store_root:
        rep = rep.model_copy(update={"store_root": a.store_root})
    runs = ev.unique_runs(ev.plan(rep, a.report))
    if a.only:
        pats = [p for p in a.only.split(",") if p]
        runs = [r for r in runs if any(fnmatch.fnmatch(r.experiment, p) for p in pats)]
        if not runs:
            sys.exit(f"error: --only {a.only!r} matches no run of {a.report}")
    todo = [r for r in runs if a.force or ev.status(r) != "ok"]
    for r in runs:
        print(f"{r.experiment:40s} {r.stage:9s} {'ok' if r not in todo else ev.status(r)}")
    if a.dry_run:
        if a.export:
            export(runs, Path(rep.store_root), Path(a.export))
        return
    log_dir = rep.store("logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    # phase 1: every retrieval run (up to pretrain) and the leader of each group of ranking runs that
    # share synth .. pretrain (synth .. query); phase 2: every ranking run's fuse, the others of a group
    # linked to the leader's stores as deep as their sections agree (fuse only, or query + fuse).
    # The leader of a group is its first run in the whole report; when --only leaves it out and it is
    # not finished, the group's first selected run trains the upstream stores itself.
    def key(r: ev.Run) -> str:
        return prefix_key(r, "pretrain")

    leaders: dict[str, ev.Run] = {}   # pretrain key -> the run that trains synth .. pretrain
    for r in ev.unique_runs(ev.plan(rep, a.report)):
        if r.stage == "fuse":
            leaders.setdefault(key(r), r)
    by_name = {r.experiment: r for r in todo}
    for r in todo:
        lead = leaders[key(r)] if r.stage == "fuse" else None
        if lead is not None and lead.experiment not in by_name and ev.status(lead) != "ok":
            leaders[key(r)] = r

    def leads(r: ev.Run) -> bool:
        return r.stage == "fuse" and leaders[key(r)].experiment == r.experiment

    n_up = len(STAGES) - 1   # synth .. query
    # (a retrieval row reads a pretrain store: its spec's [query] / [fuse], if any, are not its business)
    first = [(r, code_for(r, a.force, 0, n_up if leads(r) else STAGES.index(r.stage) + 1))
             for r in todo if r.stage == "pretrain" or leads(r)]
    second = [r for r in todo if r.stage == "fuse"]   # warm starts wait for their checkpoint (ready)
    print(f"training {len(todo)} of {len(runs)} runs ({len(first)} from scratch, "
          f"{len([r for r in todo if r.stage == 'fuse' and not leads(r)])} sharing upstream stores), "
          f"{a.parallel} at a time; logs in {log_dir}", flush=True)
    t0 = time.time()
    done = [d for d in run_parallel(first, a.parallel, log_dir) if not leads(by_name[d["experiment"]])
            or d["returncode"] != 0]   # a leader counts once its fuse is done (or when it failed here)
    failed = {d["experiment"] for d in done if d["returncode"] != 0}
    second = [r for r in second if leaders[key(r)].experiment not in failed]   # no upstream to share
    for r in second:
        link_upstream(r, leaders[key(r)])
    done += run_parallel([(r, code_for(r, a.force, n_up if leads(r) else shared_depth(r, leaders[key(r)])))
                          for r in second], a.parallel, log_dir)
    bad = [d for d in done if d["returncode"] != 0 or d["status"] != "ok"]
    print(f"done in {time.time() - t0:.0f}s: {len(done) - len(bad)} ok, {len(bad)} failed"
          + "".join(f"\n  {d['experiment']}: {d['status']} (log {log_dir / d['experiment']}.log)" for d in bad), flush=True)
    if a.export:
        export(runs, Path(rep.store_root), Path(a.export))
    if a.eval:
        ev.run(rep, path=a.report, allow_missing=bool(bad))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
