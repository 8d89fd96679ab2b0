"""Reliability: bad input never becomes a model, damaged stores are caught, killed and concurrent runs
are safe, messages are one line naming the spec file and field.

Each test reproduces one fault (a deleted chunk, a quoted number, a kill in the write window, two runs
at once ...) through the real CLI or the stage functions and checks the one-line error, the rebuild,
or that the result equals an undisturbed run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, invoke, spec_in, tiny
from lumctl.errors import InputError, io_error_line
from lumctl.specs import load_spec, parse_spec
from lumctl.store import (
    MANIFEST,
    _seal,
    begin_store,
    code_identity,
    read_manifest,
    require_store,
    store_lock,
    sweep_dead,
)

PY = sys.executable


PRETRAIN = {"model": {"preset": "tiny", "d_model": 16, "n_heads": 2, "d_ff": 32},
            "optim": {"max_steps": 4, "batch_rows": 4, "lr": 3e-3, "warmup_steps": 1},
            "eval": {"every_steps": 4, "condition": {"scenario": "s0"}, "batch_rows": 8},
            "checkpoint_every": 2, "log_every": 1, "device": "cpu"}


def ok(*args):
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    return r


def one_line_error(r, code: int = 2) -> str:
    assert r.exit_code == code, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    errors = [x for x in lines if "error" in x.lower() or "Traceback" in x]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), r.stderr
    return errors[0]


def cli(*args, env: dict | None = None, **kw) -> subprocess.Popen:
    """`lumctl ARGS` in a subprocess (for kills and concurrent runs)."""
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen([PY, "-m", "lumctl", *map(str, args)], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def tmp_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def checksums(store: Path) -> dict:
    return read_manifest(store)["checksums"]


# what two runs of one spec under different store roots share byte for byte: pretrain's config.json and
# query's group attributes name paths, metrics.jsonl and loss.png hold wall-clock speeds
PRETRAIN_SAME = ("final/model.pt", "final/metrics.json", "final/test_rank.npy", "final/test_target.npy")


def content(store: Path, stage: str) -> dict:
    c = checksums(store)
    if stage == "pretrain":
        return {k: c[k] for k in PRETRAIN_SAME}
    if stage == "fuse":  # final/config.json records the spec (its store_root)
        return {k: v for k, v in c.items() if k != "final/config.json"}
    return {k: v for k, v in c.items() if not (stage == "query" and k == "answers.zarr/zarr.json")}


# ------------------------------------------------------------------------------ validate before work
@pytest.mark.parametrize("section,key,value,msg", [
    ("pack", "max_items", True, "[pack].max_items: must be a valid integer (got True)"),
    ("pack", "seq_len", "512", "[pack].seq_len: must be a valid integer (got '512')"),
    ("pack", "conditions", 1, "[pack].conditions: must be a valid boolean (got 1)"),
])
def test_strict_types(tmp_path, section, key, value, msg):
    p = tiny(tmp_path, **{section: {key: value}})
    line = one_line_error(invoke("spec", "validate", p))
    assert line == f"error: {p}: {msg}"


def test_quoted_float_is_rejected_but_ints_and_arrays_are_accepted(tmp_path):
    p = tiny(tmp_path, pretrain={"optim": {"lr": "3e-3"}})
    assert one_line_error(invoke("spec", "validate", p)).endswith("[pretrain].optim.lr: must be a valid number (got '3e-3')")
    p = tiny(tmp_path, pretrain={"optim": {"lr": 1, "betas": [0.9, 1]}, "condition_dropout": 0})
    s = load_spec(p)
    assert s.pretrain.optim.lr == 1.0 and isinstance(s.pretrain.optim.lr, float)
    assert s.pretrain.optim.betas == (0.9, 1.0) and s.synth.events_per_user == (4, 25)


def test_seq_len_that_holds_no_trained_position_is_rejected(tmp_path):
    p = tiny(tmp_path, pack={"seq_len": 1, "max_items": 1, "conditions": False})
    line = one_line_error(invoke("pack", p))
    assert line == (f"error: {p}: [pack].max_items: item-only rows need >= 2 events per user to train on (got 1); "
                    "no row would have a loss position")
    assert not (tmp_path / "stores").exists()
    p = tiny(tmp_path, pack={"seq_len": 2, "max_items": 1, "conditions": True})
    load_spec(p)  # (c_1, i_1): one trained position


def test_zero_loss_positions_stop_pretrain(tmp_path):
    from lumctl import synth
    from lumctl.stages import pack, pretrain, tokenize
    spec = load_spec(tiny(tmp_path, pretrain=PRETRAIN))
    spec.pack.max_items, spec.pack.seq_len, spec.pack.conditions = 1, 1, False   # past validation: the stage's guard
    synth.run(spec), tokenize.run(spec), pack.run(spec)
    with pytest.raises(InputError, match="no loss position: nothing to train on"):
        pretrain.run(spec)
    assert read_manifest(spec.store("pretrain")) is None and not (spec.store("pretrain") / "final").exists()


def test_non_finite_loss_stops_pretrain_and_publishes_nothing(tmp_path, monkeypatch):
    from lumctl.stages import pretrain
    p = tiny(tmp_path, pretrain=PRETRAIN, query={"each": ["scenario"]})
    for stage in ("synth", "tokenize", "pack"):
        ok(stage, p)
    monkeypatch.setattr(pretrain, "info_nce", lambda o, *a, **k: o.sum() * float("nan"))
    line = one_line_error(invoke("pretrain", p))
    assert line == (f"error: {p}: [pretrain.optim].lr: the loss is nan at step 1: training diverged (try a lower lr, "
                    "warmup_steps or clip); no model is published")
    spec = load_spec(p)
    assert read_manifest(spec.store("pretrain")) is None and not (spec.store("pretrain") / "final").exists()


def test_bad_eval_condition_fails_right_after_tokenize(tmp_path):
    p = tiny(tmp_path, pretrain={**PRETRAIN, "eval": {**PRETRAIN["eval"], "condition": {"scenario": "nope"}}})
    line = one_line_error(invoke("run", p))
    assert line == f"error: {p}: [pretrain.eval].condition.scenario: unknown value 'nope' (values: ['<any>', 's0', 's1'])"
    spec = load_spec(p)
    assert read_manifest(spec.store("tokenize")) is not None
    assert not spec.store("pack").exists() and not spec.store("pretrain").exists()
    # the verb alone (its pack store made without the check): same line, and no empty pretrain/ left behind
    from lumctl.stages import pack
    pack.run(spec)
    assert one_line_error(invoke("pretrain", p)) == line
    assert not spec.store("pretrain").exists()


def test_unknown_query_condition_names_the_spec_file(tmp_path):
    p = tiny(tmp_path, pretrain=PRETRAIN, query={"conditions": [{"scenario": "s9"}]})
    ok("synth", p), ok("tokenize", p)
    line = one_line_error(invoke("query", p))
    assert line == f"error: {p}: [query].conditions.0.scenario: unknown value 's9' (values: ['<any>', 's0', 's1'])"


# ------------------------------------------------------------------------------ stores verify content
def _chunks(array_dir: Path) -> list[Path]:
    return sorted(f for f in (array_dir / "c").rglob("*") if f.is_file())


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_damaged_chunk_is_caught_and_rebuilt(tmp_path, damage):
    p = tiny(tmp_path)
    for stage in ("synth", "tokenize", "pack"):
        ok(stage, p)
    spec = load_spec(p)
    tok = spec.store("tokenize")
    want = checksums(tok)
    chunk = _chunks(tok / "data.zarr" / "events" / "item")[0]
    blob = chunk.read_bytes()
    if damage == "delete":
        chunk.unlink()
    elif damage == "truncate":
        chunk.write_bytes(blob[: len(blob) // 2])
    else:
        chunk.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    line = one_line_error(invoke("pack", p, "--force"))
    assert line.startswith(f"error: {tok}: array data.zarr/events/item: ")
    assert line.endswith("; run `lumctl tokenize` to rebuild it")
    r = ok("tokenize", p)                                      # not "up to date": the store is rebuilt
    assert "up to date" not in r.stderr and checksums(tok) == want
    assert "up to date" in ok("pack", p).stderr                # the same content: pack's input is unchanged


def test_hand_edited_count_is_caught(tmp_path):
    p = tiny(tmp_path)
    for stage in ("synth", "tokenize", "pack"):
        ok(stage, p)
    tok = load_spec(p).store("tokenize")
    m = json.loads((tok / MANIFEST).read_text())
    m["counts"]["users"] = 10_000
    (tok / MANIFEST).write_text(json.dumps(m))
    line = one_line_error(invoke("pack", p, "--force"))
    assert line == f"error: {tok}: {MANIFEST} was altered after it was written; run `lumctl tokenize` to rebuild it"
    assert "up to date" not in ok("tokenize", p).stderr
    assert read_manifest(tok)["counts"]["users"] == 50


def test_query_counts_users_from_the_arrays(tmp_path):
    from lumctl.stages import query
    src = Path(query.__file__).read_text()
    assert 'tok_manifest["counts"]["users"]' not in src and '["users/offsets"].shape[0]' in src


def _ml100k(folder: Path, n_users: int = 6) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{u}\t{i}\t{1 + (u + i) % 5}\t{1000 + 10 * u + i}" for u in range(1, n_users + 1) for i in range(1, 6)]
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    return folder


def test_inputs_are_identified_by_content(tmp_path):
    data = _ml100k(tmp_path / "data" / "ml-100k")
    spec = {"experiment": "ml", "tokenize": {"format": "movielens-100k", "path": str(data)},
            "pack": {"seq_len": 16, "max_items": 5}}
    p = spec_in(tmp_path, spec, "ml.toml")
    ok("tokenize", p)
    store = load_spec(p).store("tokenize")
    assert read_manifest(store)["inputs"] == {"u.data": read_manifest(store)["inputs"]["u.data"]}
    (data / "notes.txt").write_text("unrelated")                                 # an unrelated file
    assert "up to date" in ok("tokenize", p).stderr
    moved = tmp_path / "elsewhere" / "ml-100k"                                   # the same data at another path
    moved.parent.mkdir(parents=True)
    data.rename(moved)
    p = spec_in(tmp_path, {**spec, "tokenize": {**spec["tokenize"], "path": str(moved)}}, "ml.toml")
    assert "up to date" in ok("tokenize", p).stderr
    _ml100k(moved, n_users=7)                                                    # other content: rebuilt
    assert "up to date" not in ok("tokenize", p).stderr


# ------------------------------------------------------------------------------ code identity
def test_store_from_other_code_is_stale(tmp_path, monkeypatch):
    p = tiny(tmp_path)
    ok("synth", p), ok("tokenize", p)
    tok = load_spec(p).store("tokenize")
    m = read_manifest(tok)
    assert m["code"] == json.loads(json.dumps(code_identity()))
    m["code"] = {"hash": "0" * 64, "git": None, "dirty": None}
    m["seal"] = _seal(m)                                       # as other code would have written it
    (tok / MANIFEST).write_text(json.dumps(m))
    monkeypatch.setenv("LUMCTL_ALLOW_OTHER_CODE", "1")
    assert "up to date" in ok("tokenize", p).stderr           # told to accept it
    monkeypatch.delenv("LUMCTL_ALLOW_OTHER_CODE")
    assert "up to date" not in ok("tokenize", p).stderr       # stale: rebuilt by this code
    assert read_manifest(tok)["code"]["hash"] == code_identity()["hash"]


def test_eval_flags_rows_from_different_code():
    from lumctl.stages.eval import mixed_code, table_markdown
    assert mixed_code([{"code": "a" * 64}, {"code": "a" * 64}, "not run"]) == []
    assert mixed_code([{"code": "a" * 64}, {"code": "b" * 64}]) == ["a" * 12, "b" * 12]
    t = {"title": "T", "kind": "retrieval", "columns": ["hr@10"], "compare": "hr@10", "note": "", "rows": [],
         "comparisons": [], "mixed_code": ["a" * 12, "b" * 12]}
    assert any("Rows from different code" in x for x in table_markdown(t, "t.png", 0.95))


# ------------------------------------------------------------------------------ kills and concurrency
def test_checkpoint_of_an_unfinished_pretrain_is_refused(tmp_path):
    p = tiny(tmp_path, pretrain=PRETRAIN, query={"each": ["scenario"]})
    ok("run", p)
    spec = load_spec(p)
    out = spec.store("pretrain")
    assert (out / "final" / "model.pt").is_file()
    begin_store(out, "pretrain")                              # a run killed after final/, before its manifest
    line = one_line_error(invoke("query", p, "--force"))
    assert line == (f"error: {out / 'final'}: the pretrain store {out} is not complete (a run is going on, or was "
                    "stopped before its manifest); run `lumctl pretrain` to finish it")
    ok("pretrain", p)
    ok("query", p, "--force")


def test_resume_truncates_metrics_to_the_checkpoint(tmp_path):
    import shutil
    spec = {"pretrain": {**PRETRAIN, "optim": {**PRETRAIN["optim"], "max_steps": 8},
                         "eval": {**PRETRAIN["eval"], "every_steps": 8}}}
    full = tiny(tmp_path, "full.toml", store_root=tmp_path / "full", **spec)
    ok("run", full)
    part = tiny(tmp_path, "part.toml", store_root=tmp_path / "part", **spec)
    for stage in ("synth", "tokenize", "pack"):
        ok(stage, part)
    ok("pretrain", part, "--until-step", "6")
    out = load_spec(part).store("pretrain")
    shutil.rmtree(out / "checkpoints" / "step-00000006")     # killed after logging steps 5, 6, before that checkpoint
    assert "resuming from step-00000004" in ok("pretrain", part, "--resume").stderr

    def losses(path):
        return [(r["step"], r["loss"]) for r in map(json.loads, open(path)) if "loss" in r]
    got, want = losses(out / "metrics.jsonl"), losses(load_spec(full).store("pretrain") / "metrics.jsonl")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6, 7, 8]    # no replayed step twice
    assert got == want


def test_dead_runs_temp_folders_are_removed_live_ones_kept(tmp_path):
    p = tiny(tmp_path)
    ok("synth", p)
    parent = load_spec(p).store("tokenize").parent
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        host = socket.gethostname()
        gone = [parent / f".tokenize.tmp-{dead.pid}-0badc0de@{host}", parent / f".pack.old-{dead.pid}-0badc0de@{host}",
                parent / f".pack.tmp-{dead.pid}-abcd"]                        # the older name, without host
        kept = [parent / f".tokenize.tmp-{live.pid}-0badc0de@{host}", parent / f".pack.tmp-{dead.pid}-0badc0de@other-host"]
        for d in gone + kept:
            (d / "data.zarr").mkdir(parents=True)
        ok("tokenize", p)
        assert [d.exists() for d in gone] == [False] * 3 and all(d.exists() for d in kept)
    finally:
        live.kill()
        live.wait()
    assert sweep_dead(parent) == [kept[0]]


def test_second_run_of_a_stage_waits_or_stops_clearly(tmp_path, monkeypatch):
    p = tiny(tmp_path)
    ok("synth", p)
    store = load_spec(p).store("tokenize")
    monkeypatch.setenv("LUMCTL_LOCK_WAIT", "0")
    with store_lock(store, "tokenize"):
        line = one_line_error(invoke("tokenize", p))
        assert line == (f"error: {store}: another `lumctl tokenize` (pid {os.getpid()} on {socket.gethostname()}) is "
                        "writing this store; wait for it to end (or set LUMCTL_LOCK_WAIT)")
    assert not store.exists() and not list(store.parent.glob(".tokenize.lock"))
    ok("tokenize", p)


def test_two_runs_at_once_equal_one_run(tmp_path):
    spec = {"pretrain": {**PRETRAIN, "optim": {**PRETRAIN["optim"], "max_steps": 8}}}
    one = tiny(tmp_path, "one.toml", store_root=tmp_path / "one", **spec)
    ok("run", one)
    two = tiny(tmp_path, "two.toml", store_root=tmp_path / "two", **spec)
    a, b = cli("run", two), cli("run", two)
    (_, ea), (_, eb) = a.communicate(timeout=300), b.communicate(timeout=300)
    assert (a.returncode, b.returncode) == (0, 0), ea + eb
    assert "waiting for another run" in ea + eb
    s1, s2 = load_spec(one), load_spec(two)
    for stage in ("synth", "tokenize", "pack", "pretrain"):
        assert content(s1.store(stage), stage) == content(s2.store(stage), stage), stage
    assert tmp_folders(tmp_path / "two") == []


KILL_AT = {  # stage -> the call that kills the process (SIGKILL to itself) in the stage's write window
    "tokenize": ("lumctl.zarrio", "put", 3),
    "pack": ("lumctl.store", "write_manifest", 1),
    "pretrain": ("lumctl.store", "write_manifest", 1),        # final/ exists, the manifest not yet
    "query": ("lumctl.store", "write_manifest", 1),
    "fuse": ("lumctl.store", "write_manifest", 1),
}
ORDER = ["synth", "tokenize", "pack", "pretrain", "query", "fuse"]
FULL = {"pretrain": PRETRAIN, "query": {"each": ["scenario"], "dtype": "float32"},
        "fuse": {"backbone": "din", "lum": "direct+match", "history_len": 10, "d_emb": 8, "mlp": [16, 8],
                 "batch_size": 64, "epochs": 2, "device": "cpu"}}
KILLER = """
import importlib, os, signal, sys
mod, fn, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = importlib.import_module(mod)
real, calls = getattr(m, fn), [0]
def killing(*a, **k):
    calls[0] += 1
    if calls[0] >= n:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
setattr(m, fn, killing)
for name in ("pack", "pretrain", "query", "fuse"):  # (they import it by name: patch theirs too)
    s = importlib.import_module(f"lumctl.stages.{name}")
    if hasattr(s, fn) and mod == "lumctl.store":
        setattr(s, fn, killing)
from lumctl.cli import app
sys.argv = ["lumctl", *sys.argv[4:]]
app()
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(KILL_AT))
def test_sigkill_in_the_write_window_then_rerun_is_identical(tmp_path, stage):
    clean = tiny(tmp_path, "clean.toml", store_root=tmp_path / "clean", **FULL)
    ok("run", clean)
    p = tiny(tmp_path, "killed.toml", store_root=tmp_path / "killed", **FULL)
    for s in ORDER[:ORDER.index(stage)]:
        ok(s, p)
    mod, fn, n = KILL_AT[stage]
    r = subprocess.run([PY, "-c", KILLER, mod, fn, str(n), stage, str(p)], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert read_manifest(load_spec(p).store(stage)) is None
    ok("run", p)
    a, b = load_spec(clean), load_spec(p)
    for s in ORDER:
        assert content(a.store(s), s) == content(b.store(s), s), s
    assert tmp_folders(tmp_path / "killed") == []


def test_killed_query_continues_from_its_written_batches(tmp_path):
    """A query killed while answering its 4th batch leaves its finished batches; the rerun answers
    only the others and the store equals an uninterrupted run's, with no folder left behind."""
    full = {**FULL, "query": {**FULL["query"], "batch_snapshots": 8}}
    clean = tiny(tmp_path, "clean.toml", store_root=tmp_path / "clean", **full)
    for s in ORDER[:ORDER.index("query") + 1]:
        ok(s, clean)
    p = tiny(tmp_path, "killed.toml", store_root=tmp_path / "killed", **full)
    for s in ORDER[:ORDER.index("query")]:
        ok(s, p)
    r = subprocess.run([PY, "-c", KILLER, "lumctl.stages.query", "answer", "4", "query", str(p)],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    out = load_spec(p).store("query")
    assert read_manifest(out) is None
    partial = list(out.parent.glob(".query.partial-*"))
    assert len(partial) == 1 and len(list((partial[0] / ".batches-done").glob("b*"))) >= 2
    r = ok("query", p)
    n = int(json.loads((load_spec(clean).store("query") / MANIFEST).read_text())["counts"]["snapshots"])
    assert "continuing an interrupted run: " in r.stderr and f"of {-(-n // 8)} batches were written" in r.stderr
    assert f"of {-(-n // 8)} batches answered in this run" in r.stderr
    assert content(load_spec(clean).store("query"), "query") == content(out, "query")
    assert not list(out.parent.glob(".query.partial-*")) and tmp_folders(tmp_path / "killed") == []
    # another run's leftovers (other work) are removed, not continued
    (out.parent / ".query.partial-0123456789abcdef").mkdir()
    ok("query", p, "--force")
    assert not list(out.parent.glob(".query.partial-*"))


@pytest.mark.slow
def test_sigkill_at_any_time_then_rerun_is_identical(tmp_path):
    """`lumctl run` (synth ... fuse) killed after 1, 3, 5, ... seconds, each time rerun to the end."""
    clean = tiny(tmp_path, "clean.toml", store_root=tmp_path / "clean", **FULL)
    t0 = time.time()
    ok("run", clean)
    took = time.time() - t0
    a = load_spec(clean)
    for k, delay in enumerate(np.linspace(0.5, took + 3, 6)):   # (+3 s: the subprocess imports first)
        root = tmp_path / f"killed-{k}"
        p = tiny(tmp_path, f"killed-{k}.toml", store_root=root, **FULL)
        run = cli("run", p)
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.communicate()
        ok("run", p)
        b = load_spec(p)
        for s in ORDER:
            assert content(a.store(s), s) == content(b.store(s), s), (delay, s)
        assert tmp_folders(root) == [], delay


def test_threads_follow_lumctl_threads(monkeypatch):
    import torch

    from lumctl.cli import _threads
    before = torch.get_num_threads()
    monkeypatch.setenv("LUMCTL_THREADS", "1")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        monkeypatch.setenv(k, "7")
    try:
        _threads()
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        monkeypatch.setenv("LUMCTL_THREADS", "two")
        with pytest.raises(InputError, match="LUMCTL_THREADS: must be a positive number"):
            _threads()
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ messages
def test_markup_in_paths_and_help_prints_literally(tmp_path):
    root = tmp_path / "run[/old]" / "[bold]x"
    p = tiny(tmp_path, store_root=root)
    ok("synth", p)
    r = ok("tokenize", p)
    assert f"-> {root}/tiny/tokenize" in r.stderr
    assert "up to date" in ok("tokenize", p).stderr and "[bold]x" in ok("tokenize", p).stderr
    assert "TOML with a [report] section" in invoke("eval", "--help").stdout


def test_permission_and_disk_full_are_one_line(tmp_path, monkeypatch):
    from lumctl import zarrio
    p = tiny(tmp_path)
    ok("synth", p)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "stores"))
    monkeypatch.setattr(zarrio, "put", full)
    assert one_line_error(invoke("tokenize", p)) == f"error: {tmp_path / 'stores'}: no space left on device"
    monkeypatch.undo()
    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if "tokenize" in str(self):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", denied)
    line = one_line_error(invoke("tokenize", p))
    assert line.startswith("error: ") and line.endswith(": permission denied") and "internal error" not in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_store_root_is_one_line(tmp_path):
    p = tiny(tmp_path)
    ok("synth", p)
    root = load_spec(p).store("tokenize").parent
    root.chmod(0o555)
    try:
        assert one_line_error(invoke("tokenize", p)).endswith(": permission denied")
    finally:
        root.chmod(0o755)


def test_io_error_line():
    assert io_error_line(PermissionError(errno.EACCES, "Permission denied", "/x")) == "/x: permission denied"
    assert io_error_line(OSError(errno.EROFS, "Read-only file system", "/a", None, "/b")) == "/a -> /b: read-only file system"
    assert io_error_line(OSError(errno.EBADF, "Bad file descriptor")) is None   # a bug, not the machine


def test_optional_tuple_fields_accept_toml_arrays(tmp_path):
    p = tiny(tmp_path, tokenize={"time_range": [0, 10**10]})
    assert load_spec(p).tokenize.time_range == (0, 10**10)
