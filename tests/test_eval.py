"""`lumctl eval`: report specs, how rows resolve to runs, missing and stale stores, sweeps, and tiny
end-to-end reports (runs trained by `lumctl eval --train`, then the report through the CLI)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TINY
from helpers import REPO, invoke

from lumctl.errors import InputError
from lumctl.report_specs import load_report, parse_report
from lumctl.spec_io import deep_merge, dump_toml
from lumctl.stages import eval as ev
from lumctl.stages import run_all


def tiny_experiment(tmp_path, extra: str = "") -> str:
    """The tiny synthetic experiment spec of conftest, written to tmp_path; returns its path."""
    p = tmp_path / "tiny.toml"
    p.write_text(TINY.format(root=tmp_path / "unused", steps=4, every=4, ckpt=4, conditions="true") + extra)
    return str(p)


def report_in(tmp_path, tables: list[dict], **report) -> str:
    data = {"experiment": "rep", "store_root": str(tmp_path / "stores"),
            "report": {"title": "tiny report", "bootstrap": 200, **report, "tables": tables}}
    p = tmp_path / "report.toml"
    p.write_text(dump_toml(data))
    return str(p)


# ------------------------------------------------------------------------------ report specs
def test_report_spec_errors_name_the_key(tmp_path):
    ok_row = {"label": "A", "spec": "x.toml"}
    base = {"experiment": "r", "report": {"tables": [{"name": "t", "title": "T", "kind": "retrieval", "rows": [ok_row]}]}}
    assert parse_report(base).report.tables[0].compare_metric() == "hr@10"

    def err(tables=None, **rep) -> str:
        d = deep_merge(base, {"report": rep})
        if tables is not None:
            d["report"]["tables"] = tables
        with pytest.raises(InputError) as e:
            parse_report(d, "r.toml")
        return str(e.value)

    t = base["report"]["tables"][0]
    assert err(colour=1) == "r.toml: [report].colour: unknown key"
    assert "vs 'B' is not a row of this table" in err([{**t, "rows": [{**ok_row, "vs": ["B"]}]}])
    assert "row labels must be unique" in err([{**t, "rows": [ok_row, ok_row]}])
    assert "unknown ranking metric 'hr@10'" in err([{**t, "kind": "ranking", "metrics": ["hr@10"]}])
    assert "at least 2 rows" in err([{**t, "kind": "scaling"}])
    assert "seeds must be consecutive" in err([{**t, "kind": "ranking", "rows": [{**ok_row, "seeds": [0, 2]}]}])
    assert "table names must be unique" in err([t, t])


def test_report_schema_is_printed():
    r = invoke("spec", "schema", "--report")
    assert r.exit_code == 0 and "TableSpec" in json.loads(r.stdout)["$defs"]


def test_a_report_spec_is_not_an_experiment_spec(tmp_path):
    rep = report_in(tmp_path, [{"name": "t", "title": "T", "kind": "retrieval", "rows": [{"label": "A", "spec": "x.toml"}]}])
    r = invoke("pretrain", rep)
    assert r.exit_code == 2 and "this is a report spec ([report]); run it with `lumctl eval`" in r.stderr
    r = invoke("spec", "validate", rep)
    assert r.exit_code == 0 and r.stdout.strip() == f"{rep}: ok (report 'rep')"


def test_a_table_copied_from_another_report(tmp_path):
    rows = [{"label": "A", "spec": "x.toml", "seeds": [0, 1]}, {"label": "B", "spec": "y.toml", "vs": ["A"]}]
    other = tmp_path / "gpu.toml"
    other.write_text(dump_toml({"experiment": "gpu", "report": {"tables": [
        {"name": "t", "title": "T", "kind": "retrieval", "note": "n", "metrics": ["hr@10", "mrr"], "rows": rows}]}}))
    rep = report_in(tmp_path, [{"name": "own", "title": "O", "kind": "retrieval", "rows": rows[:1]},
                               {"from": "gpu.toml#t", "name": "t-gpu", "title": "T on a GPU"}])
    own, copy = load_report(rep).report.tables
    assert own.name == "own"
    assert (copy.name, copy.title, copy.note, copy.metrics) == ("t-gpu", "T on a GPU", "n", ["hr@10", "mrr"])
    assert [(r.label, r.spec, r.seeds, r.vs) for r in copy.rows] == [("A", "x.toml", [0, 1], []), ("B", "y.toml", [], ["A"])]
    r = invoke("spec", "resolve", rep)                         # the resolved report writes the copy out
    assert r.exit_code == 0 and 'name = "t-gpu"' in r.stdout and "\nfrom =" not in r.stdout

    def err(ref: str) -> str:
        with pytest.raises(InputError) as e:
            load_report(report_in(tmp_path, [{"from": ref}]))
        return str(e.value)

    assert err("gpu.toml") == f"{rep}: [report].tables.0.from: expected 'REPORT.toml#TABLE' (got 'gpu.toml')"
    assert err("cpu.toml#t") == f"{rep}: [report].tables.0.from: no report file {tmp_path / 'cpu.toml'}"
    assert err("gpu.toml#u") == f"{rep}: [report].tables.0.from: {other} has no table 'u' (its tables: t)"
    (tmp_path / "x.toml").write_text('experiment = "x"\n')
    assert "x.toml is not a report spec" in err("x.toml#t")
    chain = tmp_path / "chain.toml"
    chain.write_text(dump_toml({"experiment": "c", "report": {"tables": [{"from": "gpu.toml#t", "name": "t"}]}}))
    assert "table 't' of " in err("chain.toml#t") and "is itself a copy" in err("chain.toml#t")


def test_rows_resolve_to_runs(tmp_path):
    spec = tiny_experiment(tmp_path, '\n[query]\neach = ["scenario"]\ntop_k = { category = 2 }\n\n[fuse]\nbackbone = "din"\n')
    rep = load_report(report_in(tmp_path, [
        {"name": "r", "title": "R", "kind": "retrieval", "rows": [
            {"label": "A", "spec": spec},
            {"label": "B", "spec": spec, "name": "nocond", "seeds": [3, 4], "set": {"pack": {"conditions": False}}}]},
        {"name": "k", "title": "K", "kind": "ranking", "rows": [
            {"label": "W", "spec": spec, "name": "warm", "seeds": [5, 6, 7],
             "set": {"query": {"top_k": {}}, "fuse": {"init_from": "{store_root}/tiny-din/fuse/final"}}}]}]))
    rows = ev.plan(rep, "report.toml")
    a, b, w = (r.runs for r in rows)
    assert [r.experiment for r in a] == ["tiny"] and a[0].spec.pretrain.seed == 0
    assert [r.experiment for r in b] == ["tiny-nocond-s3", "tiny-nocond-s4"]
    assert [r.spec.pretrain.seed for r in b] == [3, 4] and not b[0].spec.pack.conditions
    assert b[0].spec.store("pretrain") == tmp_path / "stores" / "tiny-nocond-s3" / "pretrain"
    assert len(w) == 1 and w[0].stage == "fuse" and w[0].experiment == "tiny-warm"
    assert (w[0].spec.fuse.seed, w[0].spec.fuse.seeds) == (5, 3)
    assert w[0].spec.query.top_k == {} and w[0].spec.query.each == ["scenario"]   # an empty table clears
    assert w[0].spec.fuse.init_from == str(tmp_path / "stores" / "tiny-din" / "fuse" / "final")


def test_a_row_whose_spec_file_is_missing_is_named(tmp_path):
    rep = report_in(tmp_path, [{"name": "t", "title": "T", "kind": "retrieval", "rows": [{"label": "A", "spec": "no.toml"}]}])
    r = invoke("eval", rep)
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {rep}: table 't' row 'A': spec = 'no.toml': spec file not found"


def test_rows_of_different_tables_share_a_run(tmp_path):
    spec = tiny_experiment(tmp_path)
    rep = load_report(report_in(tmp_path, [
        {"name": "r", "title": "R", "kind": "retrieval", "rows": [{"label": "A", "spec": spec, "seeds": [0, 1]}]},
        {"name": "s", "title": "S", "kind": "scaling", "rows": [
            {"label": "d32", "spec": spec, "seeds": [0]},
            {"label": "d8", "spec": spec, "name": "d8", "set": {"pretrain": {"model": {"d_model": 8}}}}]}]))
    rows = ev.plan(rep, "report.toml")
    assert [r.experiment for r in rows[1].runs] == ["tiny-s0"]
    assert [r.experiment for r in ev.unique_runs(rows)] == ["tiny-s0", "tiny-s1", "tiny-d8"]


def test_one_experiment_name_means_one_spec(tmp_path):
    spec = tiny_experiment(tmp_path)
    rep = load_report(report_in(tmp_path, [{"name": "r", "title": "R", "kind": "retrieval", "rows": [
        {"label": "A", "spec": spec, "name": "v"},
        {"label": "B", "spec": spec, "name": "v", "set": {"pretrain": {"seed": 9}}}]}]))
    with pytest.raises(InputError, match="experiment 'tiny-v' is also made by row 'r/A' with other settings"):
        ev.plan(rep, "report.toml")


def test_missing_store_fails_with_one_line_naming_row_store_and_command(tmp_path):
    spec = tiny_experiment(tmp_path)
    rep = report_in(tmp_path, [{"name": "r", "title": "R", "kind": "retrieval", "rows": [{"label": "LUM", "spec": spec}]}])
    r = invoke("eval", rep)
    assert r.exit_code == 2
    err = r.stderr.strip()
    assert "\n" not in err
    assert err == (f"error: {rep}: table 'r' row 'LUM' ({spec}): no finished pretrain store (tiny/pretrain); "
                   f"make it with `lumctl eval {rep} --train --only tiny`")
    # --allow-missing: the report is written, the row says why it is missing
    r = invoke("eval", rep, "--allow-missing")
    assert r.exit_code == 0, r.output
    md = (tmp_path / "stores" / "rep" / "eval" / "results.md").read_text()
    assert "| LUM | not run: `tiny`: no finished pretrain store" in md


def test_keep_previous_keeps_tables_whose_runs_are_elsewhere(tmp_path):
    """A page assembled from several machines: with --keep-previous a table none of whose rows ran
    here keeps its previous rows, runs and plot, marked with the previous page's date and commit;
    without it the table says 'not run'."""
    spec = tiny_experiment(tmp_path)
    rep = report_in(tmp_path, [{"name": "r", "title": "R", "kind": "retrieval", "rows": [{"label": "LUM", "spec": spec}]}])
    run_all(ev.plan(load_report(rep), rep)[0].runs[0].spec)
    out = tmp_path / "docs"
    assert invoke("eval", rep, "--out", out).exit_code == 0
    before = json.loads((out / "results" / "results.json").read_text())
    png = (out / "results" / "r.png").read_bytes()
    shutil.rmtree(tmp_path / "stores" / "tiny")                     # its store lives on another machine now
    assert invoke("eval", rep, "--keep-previous").exit_code == 2     # needs --out
    r = invoke("eval", rep, "--allow-missing", "--out", out, "--keep-previous")
    assert r.exit_code == 0 and "1 tables kept from the previous page" in r.stderr, r.output
    res = json.loads((out / "results" / "results.json").read_text())
    kept = res["tables"][0]
    assert kept["rows"] == before["tables"][0]["rows"]
    assert kept["kept_from"] == {"generated": before["generated"], "commit": before["commit"]}
    assert (out / "results" / "r.png").read_bytes() == png
    md = (out / "results.md").read_text()
    assert md == ev.markdown(res, "results/") and f"*Kept from the page generated on {before['generated']}" in md
    assert "| LUM | not run" not in md
    r = invoke("eval", rep, "--allow-missing", "--out", out, "--force")
    assert r.exit_code == 0 and "| LUM | not run: `tiny`: no finished pretrain store" in (out / "results.md").read_text()


def test_keep_previous_keeps_a_table_that_ran_more_rows_before(tmp_path):
    """A table two of whose rows ran on another machine and one of them again here keeps the fuller
    previous rendering; once every row ran here the new rendering replaces it."""
    spec = tiny_experiment(tmp_path)
    rows = [{"label": "a", "spec": spec}, {"label": "b", "spec": spec, "name": "b", "set": {"pretrain": {"seed": 1}}}]
    rep = report_in(tmp_path, [{"name": "r", "title": "R", "kind": "retrieval", "rows": rows}])
    runs = ev.unique_runs(ev.plan(load_report(rep), rep))
    for run in runs:
        run_all(run.spec)
    out = tmp_path / "docs"
    assert invoke("eval", rep, "--out", out).exit_code == 0
    before = json.loads((out / "results" / "results.json").read_text())
    shutil.move(tmp_path / "stores" / "tiny-b", tmp_path / "elsewhere")         # row b is on another machine
    r = invoke("eval", rep, "--allow-missing", "--out", out, "--keep-previous", "--force")
    assert r.exit_code == 0 and "1 tables kept from the previous page" in r.stderr, r.output
    kept = json.loads((out / "results" / "results.json").read_text())["tables"][0]
    assert kept["rows"] == before["tables"][0]["rows"] and kept["kept_from"]["commit"] == before["commit"]
    shutil.move(tmp_path / "elsewhere", tmp_path / "stores" / "tiny-b")
    r = invoke("eval", rep, "--allow-missing", "--out", out, "--keep-previous", "--force")
    assert r.exit_code == 0 and "kept from the previous page" not in r.stderr, r.output
    assert "kept_from" not in json.loads((out / "results" / "results.json").read_text())["tables"][0]


# ------------------------------------------------------------------------------ end to end
def test_size_report_end_to_end(tmp_path):
    """A tiny size sweep (width 8 and 32, two seeds each) on the synthetic spec, trained in-process;
    `lumctl eval` writes the tables, the paired comparison, the fit and the plots; a changed spec
    makes the report refuse."""
    spec = tiny_experiment(tmp_path)
    d8 = {"label": "d8", "spec": spec, "name": "d8", "seeds": [0, 1],
          "set": {"pretrain": {"model": {"d_model": 8, "d_ff": 16}}}}
    d32 = {"label": "d32", "spec": spec, "seeds": [0, 1]}
    rep = report_in(tmp_path, [
        {"name": "cmp", "title": "Widths", "kind": "retrieval", "metrics": ["hr@10", "mrr"],
         "rows": [d32, {**d8, "vs": ["d32"]}]},
        {"name": "size", "title": "Sizes", "kind": "scaling", "x": "params", "rows": [d8, d32]}])
    r = invoke("eval", rep, "--dry-run")
    assert r.exit_code == 0 and r.stderr.count("no finished pretrain store") == 4, r.output
    for run in ev.unique_runs(ev.plan(load_report(rep), rep)):   # what --train does, in-process
        run_all(run.spec)
    out = tmp_path / "docs"
    r = invoke("eval", rep, "--out", out)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "stores" / "rep" / "eval" / "results.json").read_text())
    cmp, size = res["tables"]
    # row values are the means of the runs' own metrics.json
    per = [json.loads((tmp_path / "stores" / f"tiny-s{s}" / "pretrain" / "final" / "metrics.json").read_text())
           for s in (0, 1)]
    v32 = cmp["rows"][0]["values"]
    assert v32["hr@10"]["mean"] == pytest.approx(np.mean([p["test"]["hr@10"] for p in per]))
    assert v32["mrr"]["std"] == pytest.approx(np.std([p["test"]["mrr"] for p in per], ddof=1))
    # the comparison is paired: per-user ranks of the same users, bootstrap over them
    ranks = np.load(tmp_path / "stores" / "tiny-s0" / "pretrain" / "final" / "test_rank.npy")
    assert ranks.dtype == np.int32 and (ranks < 10).mean() == pytest.approx(per[0]["test"]["hr@10"])
    c = cmp["comparisons"][0]
    assert (c["row"], c["vs"], c["metric"]) == ("d8", "d32", "hr@10")
    assert c["seeds"]["n"] == 2 and c["bootstrap"]["reps"] == 200, c
    assert c["delta"] == pytest.approx(cmp["rows"][1]["values"]["hr@10"]["mean"] - v32["hr@10"]["mean"])
    assert c["bootstrap"]["delta"] == pytest.approx(c["delta"])
    assert c["bootstrap"]["lo"] <= c["delta"] <= c["bootstrap"]["hi"]
    # the fit: x = the stored non-embedding parameter count, every seed a point, least squares
    x8, x32 = (row["x"] for row in size["rows"])
    cfg = json.loads((tmp_path / "stores" / "tiny-d8-s0" / "pretrain" / "final" / "config.json").read_text())
    assert x8 == cfg["n_params"] and x8 < x32
    ys = [v for row in size["rows"] for v in row["values"]["hr@10"]["values"]]
    a, b = np.polyfit(np.log([x8, x8, x32, x32]), ys, 1)
    assert size["fit"]["n"] == 4 and size["fit"]["a"] == pytest.approx(a) and size["fit"]["b"] == pytest.approx(b)
    md = (out / "results.md").read_text()
    assert "### Widths" in md and "| d8 | d32 |" in md and f"R² = {size['fit']['r2']:.3f}" in md
    assert "![Sizes](results/size.png)" in md and (out / "results" / "size.png").stat().st_size > 1000
    assert f"`lumctl eval {rep} --train --only tiny-d8-s1`" in md
    m = json.loads((tmp_path / "stores" / "tiny-d8-s1" / "pretrain" / "manifest.json").read_text())
    assert m["spec_hash"][:12] in md
    # a row missing one seed: an error, or with --allow-missing a "partial" row of the other seed
    shutil.rmtree(tmp_path / "stores" / "tiny-d8-s1")
    assert invoke("eval", rep).exit_code == 2
    r = invoke("eval", rep, "--allow-missing")
    assert r.exit_code == 0, r.output
    part = json.loads((tmp_path / "stores" / "rep" / "eval" / "results.json").read_text())["tables"][1]["rows"][0]
    assert part["status"] == "partial" and part["values"]["hr@10"]["n"] == 1
    assert "| d8 (partial: `tiny-d8-s1`: no finished pretrain store" in (tmp_path / "stores" / "rep" / "eval" / "results.md").read_text()
    run_all(ev.plan(load_report(rep), rep)[1].runs[1].spec)         # train tiny-d8-s1 again
    # a second eval is a no-op; a changed row spec makes the store stale and the report refuse
    invoke("eval", rep)
    r = invoke("eval", rep)
    assert r.exit_code == 0 and "is up to date" in r.stderr
    text = open(spec).read()
    open(spec, "w").write(text.replace("lr = 3e-3", "lr = 1e-3"))
    r = invoke("eval", rep)
    assert r.exit_code == 2
    assert "stale: made from another [pretrain] ([pretrain].optim.lr: store 0.003, spec 0.001)" in r.stderr


@pytest.mark.slow
def test_runner_trains_ranking_rows_sharing_upstream_and_exports(tmp_path, monkeypatch):
    """`lumctl eval --train` on ranking rows: base, + LUM and a warm start share one LUM (links), a row
    with another [query] shares it up to pretrain and queries it itself, the export holds what eval reads
    and no weights, and eval on the export gives the same report."""
    qf = '\n[query]\neach = ["scenario"]\nsnapshot = "every_n_events"\nevery_n_events = 5\n' \
         '\n[fuse]\nbackbone = "din"\nlum = "direct+match"\nd_emb = 8\nmlp = [16, 8]\nbatch_size = 64\nepochs = 2\n'
    spec = tiny_experiment(tmp_path, qf)
    rows = [{"label": "DIN", "spec": spec, "name": "din", "seeds": [0, 1], "set": {"fuse": {"lum": "none"}}},
            {"label": "DIN + LUM", "spec": spec, "name": "din-lum", "seeds": [0, 1], "vs": ["DIN"]},
            {"label": "warm", "spec": spec, "name": "din-warm", "seeds": [0, 1], "vs": ["DIN", "DIN + LUM"],
             "set": {"fuse": {"init_from": "{store_root}/tiny-din/fuse/final"}}},
            {"label": "q7", "spec": spec, "name": "din-q7", "seeds": [0, 1], "set": {"query": {"every_n_events": 7}}}]
    rep = report_in(tmp_path, [{"name": "rank", "title": "Ranking", "kind": "ranking", "rows": rows}])
    export = tmp_path / "export"
    r = invoke("eval", rep, "--train", "--parallel", "2", "--export", str(export))
    assert r.exit_code == 0, r.output
    assert "training 4 of 4 runs (1 from scratch, 3 sharing upstream stores)" in r.stderr and "4 ok, 0 failed" in r.stderr
    root = tmp_path / "stores"
    assert (root / "tiny-din-lum" / "query").is_symlink() and not (root / "tiny-din" / "query").is_symlink()
    assert (root / "tiny-din-q7" / "pretrain").is_symlink() and not (root / "tiny-din-q7" / "query").is_symlink()
    q7 = json.loads((root / "tiny-din-q7" / "query" / "manifest.json").read_text())
    assert q7["spec_hash"] != json.loads((root / "tiny-din" / "query" / "manifest.json").read_text())["spec_hash"]
    assert not list(export.rglob("*.pt")) and (export / "tiny-din-warm" / "fuse" / "predictions.zarr").is_dir()
    r = invoke("eval", rep)
    assert r.exit_code == 0, r.output
    res = json.loads((root / "rep" / "eval" / "results.json").read_text())
    t = res["tables"][0]
    assert [c["vs"] for c in t["comparisons"]] == ["DIN", "DIN", "DIN + LUM"]   # q7 has no vs
    for c in t["comparisons"]:
        assert c["seeds"]["n"] == 2 and c["bootstrap"] is not None and c["bootstrap"]["reps"] == 200
    m = json.loads((root / "tiny-din" / "fuse" / "metrics.json").read_text())
    assert t["rows"][0]["values"]["auc"]["values"] == pytest.approx([s["test"]["auc"] for s in m["seeds"]])
    # the same report from the exported files only
    monkeypatch.setenv("LUMCTL_STORES", str(export))
    text = open(rep).read()
    assert f'"store_root" = "{root}"' in text
    open(rep, "w").write(text.replace(f'"store_root" = "{root}"', '"store_root" = "${LUMCTL_STORES:-stores}"'))
    r = invoke("eval", rep)
    assert r.exit_code == 0, r.output
    res2 = json.loads((export / "rep" / "eval" / "results.json").read_text())
    assert res2["tables"][0]["comparisons"] == t["comparisons"]


@pytest.mark.slow
def test_runner_trains_a_retrieval_row_only_up_to_pretrain(tmp_path):
    """A retrieval row reads a pretrain store: --train leaves its spec's [query] alone (an item-only
    LUM has no conditions to query: running query there failed the row)."""
    spec = tiny_experiment(tmp_path, '\n[query]\neach = ["scenario"]\nsnapshot = "split"\n')
    rows = [{"label": "item only", "spec": spec, "name": "nocond", "seeds": [0], "set": {"pack": {"conditions": False}}}]
    rep = report_in(tmp_path, [{"name": "ret", "title": "Retrieval", "kind": "retrieval", "rows": rows}])
    r = invoke("eval", rep, "--train")
    assert r.exit_code == 0, r.output
    assert "1 ok, 0 failed" in r.stderr
    root = tmp_path / "stores" / "tiny-nocond-s0"
    assert (root / "pretrain" / "manifest.json").is_file() and not (root / "query").exists()


def test_docs_results_md_is_the_tools_rendering_of_its_json():
    """docs/results.md is written by `lumctl eval --out docs`: rendering docs/results/results.json
    again gives the page byte for byte (so nobody edited a number by hand)."""
    md, js = REPO / "docs" / "results.md", REPO / "docs" / "results" / "results.json"
    if not md.is_file():
        pytest.skip("no docs/results.md yet")
    res = json.loads(js.read_text())
    assert ev.markdown(res, "results/") == md.read_text(), (
        f"docs/results.md is not the rendering of its results.json: regenerate it with "
        f"`lumctl eval {res['report_path']} --out docs`")
    for t in res["tables"]:
        assert (REPO / "docs" / "results" / f"{t['name']}.png").is_file()


# ------------------------------------------------------------------------------ one seed
def _comparison(n: int) -> dict:
    sd = {"seeds": list(range(n)), "n": n, "mean": 0.08, "std": 0.01 if n > 1 else None, "better": n,
          "t": 13.9 if n > 1 else None, "p": 0.005 if n > 1 else None}
    return {"row": "A", "vs": "B", "delta": 0.08, "seeds": sd, "bootstrap_note": "",
            "bootstrap": {"delta": 0.08, "lo": 0.06, "hi": 0.09, "p": 0.0, "reps": 200}}


def test_one_seed_comparisons_print_no_spread_or_test():
    line = ev._compare_line(_comparison(1))
    assert line == "| A | B | +0.0800 | +0.0800; n/a (1 seed) | +0.0800 [+0.0600, +0.0900], p n/a (1 seed) |"
    line = ev._compare_line(_comparison(3))
    assert line == ("| A | B | +0.0800 | +0.0800 ± 0.0100; 3/3 seeds better; t-test p = 0.005 | "
                    "+0.0800 [+0.0600, +0.0900], p < 0.005 * |")


def test_cells_and_plot_labels_of_one_and_several_seeds():
    one = ev._mean_std([0.25])
    three = ev._mean_std([0.2, 0.3, 0.4])
    assert ev._cell(one) == "0.2500" and ev._value_label(one) == "0.2500 (1 seed)"
    assert ev._cell(three) == "0.3000 ± 0.1000" and ev._value_label(three) == "0.3000 ± 0.1000"


# ------------------------------------------------------------------------------ sweeps
def test_a_sweep_makes_one_row_per_value(tmp_path):
    spec = tiny_experiment(tmp_path)
    rep = load_report(report_in(tmp_path, [{
        "name": "len", "title": "Length", "kind": "scaling", "x": "max_items",
        "rows": [{"label": "base", "spec": spec, "seeds": [0]}],
        "sweep": {"spec": spec, "key": "pack.max_items", "values": [8, 16], "seeds": [0],
                  "set": {"pretrain": {"optim": {"lr": 1e-3}}}}}]))
    t = rep.report.tables[0]
    assert [r.label for r in t.rows] == ["base", "max_items = 8", "max_items = 16"]
    runs = [rp.runs for rp in ev.plan(rep, "r.toml")]
    assert [r[0].experiment for r in runs] == ["tiny-s0", "tiny-max_items-8-s0", "tiny-max_items-16-s0"]
    assert [r[0].spec.pack.max_items for r in runs[1:]] == [8, 16]
    assert {r[0].spec.pretrain.optim.lr for r in runs[1:]} == {1e-3}
    with pytest.raises(InputError, match=r"sweep\.key: string should match pattern"):
        parse_report({"experiment": "r", "report": {"tables": [{"name": "t", "title": "T", "kind": "retrieval",
                      "sweep": {"spec": spec, "key": "lr", "values": [1]}}]}}, "r.toml")


def test_only_and_parallel_need_train(tmp_path):
    spec = tiny_experiment(tmp_path)
    rep = report_in(tmp_path, [{"name": "r", "title": "R", "kind": "retrieval", "rows": [{"label": "LUM", "spec": spec}]}])
    r = invoke("eval", rep, "--only", "tiny")
    assert r.exit_code == 2 and "add --train" in r.stderr
    r = invoke("eval", rep, "--train", "--only", "nothing*")
    assert r.exit_code == 2 and r.stderr == f"error: {rep}: --only 'nothing*' matches no run of the report\n"


def test_train_trains_the_missing_runs_then_evaluates(tmp_path):
    """`lumctl eval --train`: the missing run trains in its own process (log under the report's store),
    the report follows; a second --train has nothing to do."""
    spec = tiny_experiment(tmp_path)
    rep = report_in(tmp_path, [{"name": "r", "title": "R", "kind": "retrieval", "rows": [
        {"label": "LUM", "spec": spec}, {"label": "nocond", "spec": spec, "name": "nocond",
                                          "set": {"pack": {"conditions": False}}, "optional": True}]}])
    r = invoke("eval", rep, "--train", "--only", "tiny")
    assert r.exit_code == 0, r.output
    assert "training 1 of 1 runs (1 from scratch, 0 sharing upstream stores)" in r.stderr and "1 ok, 0 failed" in r.stderr
    assert "pretrain:" in (tmp_path / "stores" / "rep" / "logs" / "tiny.log").read_text()
    res = json.loads((tmp_path / "stores" / "rep" / "eval" / "results.json").read_text())
    assert [row["status"] for row in res["tables"][0]["rows"]] == ["ok", "not run"]
    r = invoke("eval", rep, "--train", "--only", "tiny")
    assert r.exit_code == 0 and "training" not in r.stderr and "is up to date" in r.stderr, r.output
