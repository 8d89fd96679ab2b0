"""The `lumctl` command line: one small command per verb; heavy imports happen inside.

Exit codes: 0 ok, 2 bad input or an I/O failure such as a full disk (one line naming file and field),
1 internal failure (a bug; LUMCTL_DEBUG=1 prints the traceback).

Environment: LUMCTL_THREADS (threads per run; default the CPUs the process may use), LUMCTL_LOCK_WAIT
(seconds a second run of a stage on the same store waits for the first; default until it ends),
LUMCTL_ALLOW_OTHER_CODE=1 (accept stores written by other lumctl code as up to date).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import typer

class _Group(typer.core.TyperGroup):
    """Flags (--force, --help, ...) show no type label in --help (typer labels each one `<bool>`)."""

    def get_command(self, ctx, name):
        cmd = super().get_command(ctx, name)
        for p in getattr(cmd, "params", []):
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        if cmd is not None and (h := cmd.get_help_option(ctx)) is not None:
            h.metavar = ""
        return cmd

    def get_help_option(self, ctx):
        h = super().get_help_option(ctx)
        if h is not None:
            h.metavar = ""
        return h


# rich_markup_mode=None: help text such as "a [report] section" is printed as written, never as markup
app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="lumctl: pretrain a Large User Model, query it, fuse its answers into DLRMs, evaluate.")
spec_app = typer.Typer(cls=_Group, no_args_is_help=True, rich_markup_mode=None, help="Validate specs, print them resolved, print their schema.")
app.add_typer(spec_app, name="spec")


def _version(value: bool) -> None:
    if value:
        from lumctl import __version__
        typer.echo(f"lumctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True,
                                       help="print the version and exit")):
    """lumctl: pretrain a Large User Model, query it, fuse its answers into DLRMs, evaluate."""

SpecArg = typer.Argument(..., help="TOML spec of the experiment", show_default=False)
ForceOpt = typer.Option(False, "--force", help="rebuild even when the store is up to date")
SetOpt = typer.Option([], "--set", metavar="SECTION.KEY=VALUE", show_default=False, help=(
    "override one spec key, the value read as TOML (e.g. --set pack.seq_len=1024); repeatable"))


def _guard(fn: Callable[[], object], spec_path: Path | None = None) -> None:
    """Run `fn`; map errors to one line and an exit code. A message about a spec field (`[section].key: ...`)
    is prefixed with the spec file; an I/O failure (permission, disk full, read-only) is bad input, not a bug."""
    from lumctl.errors import InputError, io_error_line
    try:
        fn()
    except InputError as e:
        where = f"{spec_path}: " if spec_path is not None and e.where.startswith("[") else ""
        typer.echo(f"error: {where}{e}", err=True)
        raise typer.Exit(2)
    except OSError as e:
        line = io_error_line(e)
        if line is None:
            _internal(e)
        typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130)
    except Exception as e:
        _internal(e)


def _internal(e: BaseException) -> None:
    """An internal failure (a bug): one line, the traceback only with LUMCTL_DEBUG=1."""
    import os
    import traceback
    if os.environ.get("LUMCTL_DEBUG"):
        traceback.print_exc()
    typer.echo(f"internal error: {type(e).__name__}: {e}", err=True)
    raise typer.Exit(1)


# optional spec sections: the verb has nothing to do without them
NOTHING_TO = {"synth": "generate", "query": "query", "fuse": "fuse"}


def _run_stage(stage: str, spec_path: Path, force: bool, sets: list[str], **kwargs) -> None:
    """Load the spec (with its --set overrides), check the stage's optional section is there, run the stage."""
    from lumctl.errors import InputError
    from lumctl.specs import load_spec

    def go():
        spec = load_spec(spec_path, sets)
        _refuse_torchrun(stage)
        if stage in NOTHING_TO and getattr(spec, stage) is None:
            raise InputError(str(spec_path), f"[{stage}]: section missing; nothing to {NOTHING_TO[stage]}")
        from lumctl.store import store_lock
        with store_lock(spec.store(stage), stage):   # one run of a stage writes a store at a time
            _threads()
            if stage in ("pack", "pretrain", "query"):
                from lumctl.checks import check_vocabularies
                check_vocabularies(spec)             # before any output folder is made
            from lumctl.stages import stage_module
            stage_module(stage).run(spec, force=force, **kwargs)
    _guard(go, spec_path)


def _threads() -> None:
    """Threads of torch, BLAS and Numba: LUMCTL_THREADS, else the CPUs this process may run on (its
    affinity, which a container or `taskset` narrows, not every core of the host). Runs sharing a small
    machine set LUMCTL_THREADS so their threads add up to its cores; idle threads sleep instead of
    spinning (OMP_WAIT_POLICY=PASSIVE), so an oversubscribed machine slows down instead of stalling."""
    import os

    from lumctl.errors import InputError
    v = os.environ.get("LUMCTL_THREADS", "").strip()
    if v and not (v.isdigit() and int(v) > 0):
        raise InputError("LUMCTL_THREADS", f"must be a positive number of threads (got {v!r})")
    n = int(v) if v else len(os.sched_getaffinity(0))
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        if v or k not in os.environ:
            os.environ[k] = str(n)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:  # already imported (tests, torchrun): set it directly
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if "numba" in sys.modules:
        import numba
        numba.set_num_threads(min(int(os.environ["NUMBA_NUM_THREADS"]), numba.config.NUMBA_NUM_THREADS))


def _refuse_torchrun(stage: str) -> None:
    """Only pretrain and query know how to share their work between torchrun's processes."""
    import os

    from lumctl.errors import InputError
    if stage not in ("pretrain", "query") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("torchrun", f"only pretrain and query run on several processes; run `lumctl {stage}` "
                         "without torchrun first")


@app.command()
def synth(spec: Path = SpecArg, force: bool = ForceOpt, sets: list[str] = SetOpt):
    """Generate the synthetic behaviour log described by the spec's synth section."""
    _run_stage("synth", spec, force, sets)


@app.command()
def tokenize(spec: Path = SpecArg, force: bool = ForceOpt, sets: list[str] = SetOpt):
    """Raw log -> vocabularies, feature tables, per-user sequences and splits (Zarr)."""
    _run_stage("tokenize", spec, force, sets)


@app.command()
def pack(spec: Path = SpecArg, force: bool = ForceOpt, sets: list[str] = SetOpt):
    """Per-user sequences -> packed rows with segment ids, positions, loss mask (Numba)."""
    _run_stage("pack", spec, force, sets)


@app.command()
def pretrain(spec: Path = SpecArg, force: bool = ForceOpt, sets: list[str] = SetOpt,
             resume: bool = typer.Option(False, "--resume", help="continue from the newest step checkpoint"),
             until_step: int = typer.Option(None, "--until-step", help="stop after this step (resume later)")):
    """Train the LUM user encoder on packed rows (next-condition-item InfoNCE)."""
    _run_stage("pretrain", spec, force, sets, resume=resume, until_step=until_step)


@app.command()
def query(spec: Path = SpecArg, force: bool = ForceOpt, sets: list[str] = SetOpt,
          users: str = typer.Option(None, "--users", help="limit the run to some users: tokenize-store user "
                                    "indices such as 0-99 or 1,5,7")):
    """Grouped conditional queries of the pretrained LUM at point-in-time snapshots -> feature store."""
    _run_stage("query", spec, force, sets, users=users)


@app.command()
def fuse(spec: Path = SpecArg, force: bool = ForceOpt, sets: list[str] = SetOpt,
         seeds: int = typer.Option(None, "--seeds", min=1, help="independent runs (overrides the spec's fuse seeds)")):
    """Train a DLRM backbone on the CTR protocol, with the LUM answers of the query store fused in."""
    _run_stage("fuse", spec, force, sets, seeds=seeds)


@app.command()
def export(spec: Path = SpecArg,
           samples: str = typer.Option(..., "--samples", help="sample table (CSV/parquet file or folder, gzip, "
                                       "fsspec URL); columns as fuse.samples maps them, else user_id, item_id, "
                                       "timestamp"),
           out: Path = typer.Option(..., "--out", help="output parquet: the table plus o_q1..o_qN, e_item, "
                                    "sim_q1..sim_qN"),
           items: Path = typer.Option(None, "--items", help="item embeddings parquet (default: OUT_items.parquet)")):
    """The LUM answers of a sample table, joined point in time as fuse joins them, written to parquet."""
    from lumctl.specs import load_spec

    def go():
        _refuse_torchrun("export")
        from lumctl.stages import export as stage
        stage.run(load_spec(spec), samples=samples, out=out, items=items)
    _guard(go)


@app.command("eval")
def eval_(spec: Path = typer.Argument(..., help="report spec (TOML with a [report] section)", show_default=False),
          force: bool = typer.Option(False, "--force", help="rebuild the report (with --train: retrain every "
                                     "selected run) even when up to date"),
          sets: list[str] = SetOpt,
          out: Path = typer.Option(None, "--out", help="also write OUT/results.md and OUT/results/ (plots, JSON), "
                                   "e.g. --out docs"),
          allow_missing: bool = typer.Option(False, "--allow-missing", help="show rows whose stores are missing or "
                                             "stale as 'not run' instead of failing"),
          keep_previous: bool = typer.Option(False, "--keep-previous", help="with --out (and --allow-missing): a "
                                             "table with rows that did not run here keeps its rendering from the previous "
                                             "OUT/results/results.json when that one had more rows run, marked with "
                                             "that page's date and commit"),
          train: bool = typer.Option(False, "--train", help="first train the runs whose stores are missing or "
                                     "stale (upstream stores shared where specs agree; logs in "
                                     "<store_root>/<report>/logs/)"),
          only: str = typer.Option("", "--only", help="with --train: only these runs (comma-separated experiment "
                                   "names or globs)"),
          parallel: int = typer.Option(1, "--parallel", min=1, help="with --train: runs trained at a time"),
          dry_run: bool = typer.Option(False, "--dry-run", help="list the report's runs and their status; train "
                                       "and evaluate nothing"),
          export: Path = typer.Option(None, "--export", help="copy what eval reads of every run (no model weights) "
                                      "to this folder, e.g. to evaluate a GPU machine's runs elsewhere")):
    """Results report from finished stores: tables, significance tests, scaling fits, plots. Trains
    nothing unless --train."""
    from lumctl.errors import InputError

    def go():
        from lumctl import runs
        from lumctl.report_specs import load_report
        from lumctl.stages import eval as ev
        rep = load_report(spec, sets)
        _refuse_torchrun("eval")
        bad = []
        if train or dry_run:
            done = runs.train(rep, str(spec), only=only, parallel=parallel, force=force and train, dry_run=dry_run)
            bad = [d for d in done if d["returncode"] != 0 or d["status"] != "ok"]
        elif only or parallel != 1:
            raise InputError("--only/--parallel", "select and schedule runs to train; add --train")
        if keep_previous and out is None:
            raise InputError("--keep-previous", "keeps tables of the page written by --out; add --out DIR")
        if export is not None:
            runs.export(runs.select(rep, str(spec), only), Path(rep.store_root), export)
        if dry_run:
            return
        from lumctl.store import store_lock
        with store_lock(rep.store("eval"), "eval"):
            ev.run(rep, force=force, out=out, allow_missing=allow_missing or bool(bad), path=str(spec),
                   keep_previous=keep_previous)
        if bad:
            raise InputError(str(spec), f"{len(bad)} runs failed to train: " + ", ".join(d["experiment"] for d in bad))
    _guard(go, spec)


@app.command()
def run(spec: Path = SpecArg, force: bool = ForceOpt, sets: list[str] = SetOpt):
    """synth -> tokenize -> pack -> pretrain -> query -> fuse in order (synth, query and fuse when the spec
    has those sections), skipping stages already up to date. Reports run apart: `lumctl eval`."""
    from lumctl.specs import load_spec

    def go():
        _refuse_torchrun("run")
        _threads()
        from lumctl.stages import run_all
        run_all(load_spec(spec, sets), force=force)
    _guard(go, spec)


@spec_app.command("validate")
def spec_validate(specs: list[Path] = typer.Argument(..., help="spec files"), sets: list[str] = SetOpt):
    """Validate spec files; print one line per file."""
    from lumctl.errors import InputError
    from lumctl.report_specs import ReportFile, load_any
    bad = 0
    for p in specs:
        try:
            s = load_any(p, sets)
            what = "report" if isinstance(s, ReportFile) else "experiment"
            typer.echo(f"{p}: ok ({what} '{s.experiment}')")
        except InputError as e:
            typer.echo(f"error: {e}", err=True)
            bad += 1
    raise typer.Exit(2 if bad else 0)


@spec_app.command("resolve")
def spec_resolve(spec: Path = typer.Argument(..., help="experiment or report spec", show_default=False),
                 sets: list[str] = SetOpt):
    """Print the spec as TOML with its `extends` recipes and --set overrides merged in (validated)."""
    def go():
        from lumctl.report_specs import load_any, load_resolved
        from lumctl.spec_io import dump_toml
        load_any(spec, sets)  # validate first: a resolved spec that would not run is an error
        typer.echo(f"# {spec} resolved" + "".join(f" --set {s}" for s in sets), nl=True)
        typer.echo(dump_toml(load_resolved(spec, sets)), nl=False)
    _guard(go, spec)


@spec_app.command("schema")
def spec_schema(report: bool = typer.Option(False, "--report", help="the schema of report specs (lumctl eval)")):
    """Print the JSON schema of the specs."""
    from lumctl.report_specs import ReportFile
    from lumctl.specs import Spec
    typer.echo(json.dumps((ReportFile if report else Spec).model_json_schema(), indent=2))


def main() -> None:  # console script entry point
    app()


if __name__ == "__main__":
    sys.exit(main())
