"""Train the runs of a report (`lumctl eval REPORT --train`): every run whose store is missing or stale,
in order, a few at a time, sharing upstream stores where specs agree.

A run is one resolved experiment spec (a row's spec, its recipes, `set` and seed; lumctl/stages/eval.py).
A retrieval run trains synth .. pretrain; a ranking run synth .. fuse. Ranking runs whose sections agree
up to a stage share the stores up to that stage: the first run of such a group (its leader) trains them,
the others get links (`<store_root>/<experiment>/<stage>` -> the leader's store; the manifests match,
since the sections do) and train only the later stages, e.g. a base DLRM and the same DLRM + LUM read
one LUM. A warm start ([fuse] init_from) waits until the checkpoint it reads exists.

Each run trains in its own process (`parallel` at a time), its output in
<store_root>/<report>/logs/<experiment>.log.
"""

from __future__ import annotations

import fnmatch
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

from lumctl.errors import InputError
from lumctl.progress import say
from lumctl.report_specs import ReportFile
from lumctl.specs import STAGES
from lumctl.stages import eval as ev
from lumctl.store import hash_obj

# what `lumctl eval` reads from a run (relative to <store_root>/<experiment>/); weights left out
EXPORT = ["synth/manifest.json", "tokenize/manifest.json", "pack/manifest.json", "query/manifest.json",
          "pretrain/manifest.json", "pretrain/metrics.jsonl", "pretrain/loss.png", "pretrain/final/metrics.json",
          "pretrain/final/config.json", "pretrain/final/test_rank.npy", "pretrain/final/test_target.npy",
          "fuse/manifest.json", "fuse/metrics.json", "fuse/final/config.json", "fuse/predictions.zarr",
          "pretrain/final/test_requests_*.npz"]   # a pattern: one file per [pretrain.eval].requests task


# ------------------------------------------------------------------------------------ sharing
def prefix_key(run: ev.Run, stage: str) -> str:
    """Runs with equal keys at `stage` can share every store up to and including that stage: their
    specs agree on everything but the experiment name and the sections of later stages."""
    later = STAGES[STAGES.index(stage) + 1:]
    return hash_obj({k: v for k, v in run.data.items() if k != "experiment" and k not in later})


def shared_depth(run: ev.Run, leader: ev.Run) -> int:
    """How many stages (synth, tokenize, ...; never fuse) `run` takes from `leader`'s stores."""
    n = 0
    for stage in STAGES[:-1]:
        if prefix_key(run, stage) != prefix_key(leader, stage):
            break
        n += 1
    return n


def link_upstream(run: ev.Run, leader: ev.Run) -> int:
    """Link run's first shared_depth(run, leader) stores to the leader's; returns that depth."""
    depth = shared_depth(run, leader)
    for stage in STAGES[:depth]:
        src, dst = leader.spec.store(stage), run.spec.store(stage)
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src.resolve(), target_is_directory=True)
    return depth


# ------------------------------------------------------------------------------------ one run
def _train(data: dict, stages: list[str], force: bool, log: str) -> None:
    """Child process: train `stages` of the run whose resolved spec is `data`, output to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from lumctl.specs import parse_spec
    from lumctl.stages import stage_module
    spec = parse_spec(data, data["experiment"])
    try:
        for s in stages:
            stage_module(s).run(spec, force=force)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def stages_of(run: ev.Run, first: int = 0, upto: int = len(STAGES)) -> list[str]:
    """The stages of `run` from STAGES[first] to before STAGES[upto] that its spec has."""
    return [s for s in STAGES[first:upto] if run.data.get(s) is not None]


def run_jobs(jobs: list[tuple[ev.Run, list[str]]], parallel: int, force: bool, log_dir: Path) -> list[dict]:
    """Train (run, stages) jobs, `parallel` at a time; a warm start once the checkpoint it reads exists
    (or when nothing else is left to wait for: it then fails with the fuse stage's own error). One line
    per finished job. Interrupted, it stops the running jobs; their stores stay unfinished (atomic writes)."""
    ctx = multiprocessing.get_context("spawn")     # a fresh interpreter: no torch or numba state shared

    def ready(run: ev.Run) -> bool:
        f = run.spec.fuse.init_from if run.spec.fuse is not None else ""
        return not f or (Path(f) / "model.pt").is_file()

    pending, running, done = list(jobs), [], []
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = next((j for j in pending if ready(j[0])), pending[0] if not running else None)
                if job is None:
                    break
                pending.remove(job)
                run, stages = job
                p = ctx.Process(target=_train, args=(run.data, stages, force, str(log_dir / f"{run.experiment}.log")))
                p.start()
                running.append((run, p, time.time()))
            time.sleep(0.2)
            for job in list(running):
                run, p, t0 = job
                if p.is_alive():
                    continue
                running.remove(job)
                st = ev.status(run)
                done.append({"experiment": run.experiment, "returncode": p.exitcode, "status": st,
                             "seconds": round(time.time() - t0, 1)})
                say(f"{run.experiment}: {'ok' if p.exitcode == 0 and st == 'ok' else 'failed'} in "
                    f"{done[-1]['seconds']}s ({st})")
    finally:
        for run, p, _ in running:
            p.terminate()
            p.join()
            say(f"{run.experiment}: stopped")
    return done


# ------------------------------------------------------------------------------------ a report
def select(rep: ReportFile, path: str, only: str = "") -> list[ev.Run]:
    """The distinct runs of the report, those matching `only` (comma-separated names or globs)."""
    runs = ev.unique_runs(ev.plan(rep, path))
    if only:
        pats = [p for p in only.split(",") if p]
        runs = [r for r in runs if any(fnmatch.fnmatch(r.experiment, p) for p in pats)]
        if not runs:
            raise InputError(path, f"--only {only!r} matches no run of the report")
    return runs


def export(runs: list[ev.Run], root: Path, dest: Path) -> None:
    """Copy what `lumctl eval` reads of each run (no model weights) to dest/<experiment>/..."""
    for run in runs:
        for src in (p for rel in EXPORT for p in sorted((root / run.experiment).glob(rel))):
            out = dest / run.experiment / src.relative_to(root / run.experiment)
            out.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, out, dirs_exist_ok=True)
            else:
                shutil.copy2(src, out)
    say(f"exported {len(runs)} runs to {dest}")


def train(rep: ReportFile, path: str, only: str = "", parallel: int = 1, force: bool = False,
          dry_run: bool = False) -> list[dict]:
    """Train the selected runs that are missing or stale (all of them with force); returns one dict per
    trained run (experiment, returncode, status, seconds). dry_run lists the runs and trains nothing."""
    runs = select(rep, path, only)
    todo = [r for r in runs if force or ev.status(r) != "ok"]
    for r in runs:
        say(f"{r.experiment:40s} {r.stage:9s} {'ok' if r not in todo else ev.status(r)}")
    if dry_run or not todo:
        return []
    log_dir = rep.store("logs")
    log_dir.mkdir(parents=True, exist_ok=True)

    # the leader of a group of ranking runs that agree on synth .. pretrain: its first run in the whole
    # report, or the group's first selected run when the report's first is neither selected nor finished
    def key(r: ev.Run) -> str:
        return prefix_key(r, "pretrain")

    leaders: dict[str, ev.Run] = {}
    for r in ev.unique_runs(ev.plan(rep, path)):
        if r.stage == "fuse":
            leaders.setdefault(key(r), r)
    names = {r.experiment for r in todo}
    for r in todo:
        lead = leaders[key(r)] if r.stage == "fuse" else None
        if lead is not None and lead.experiment not in names and ev.status(lead) != "ok":
            leaders[key(r)] = r

    def leads(r: ev.Run) -> bool:
        return r.stage == "fuse" and leaders[key(r)].experiment == r.experiment

    n_up = len(STAGES) - 1   # synth .. query
    # phase 1: retrieval runs (synth .. pretrain: a retrieval row reads a pretrain store, its spec's [query]
    # and [fuse] are not its business) and the leaders up to query; phase 2: every ranking run's fuse,
    # the others linked to their leader's stores as deep as their sections agree
    first = [(r, stages_of(r, 0, n_up if leads(r) else STAGES.index(r.stage) + 1))
             for r in todo if r.stage == "pretrain" or leads(r)]
    second = [r for r in todo if r.stage == "fuse"]
    say(f"training {len(todo)} of {len(runs)} runs ({len(first)} from scratch, "
        f"{len([r for r in second if not leads(r)])} sharing upstream stores), {parallel} at a time; logs in {log_dir}")
    t0 = time.time()
    done = [d for d in run_jobs(first, parallel, force, log_dir)
            if not leads(next(r for r in todo if r.experiment == d["experiment"])) or d["returncode"] != 0]
    failed = {d["experiment"] for d in done if d["returncode"] != 0}
    second = [r for r in second if leaders[key(r)].experiment not in failed]   # no upstream to share
    jobs = [(r, stages_of(r, n_up if leads(r) else link_upstream(r, leaders[key(r)]))) for r in second]
    done += run_jobs(jobs, parallel, force, log_dir)
    bad = [d for d in done if d["returncode"] != 0 or d["status"] != "ok"]
    say(f"trained in {time.time() - t0:.0f}s: {len(done) - len(bad)} ok, {len(bad)} failed"
        + "".join(f"\n  {d['experiment']}: {d['status']} (log {log_dir / d['experiment']}.log)" for d in bad))
    return done
