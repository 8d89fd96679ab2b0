"""`lumctl run` of all three steps: [fuse] compare_base trains the base beside the + LUM model, and the run
ends with the results table read from the stores."""

from __future__ import annotations

import json

import pytest
from helpers import invoke
from test_fuse import QUERY_FUSE

from lumctl.specs import FuseSpec, load_spec
from lumctl.stages import fuse as f
from lumctl.summary import lines


def test_compare_base_trains_the_base_as_a_run_of_its_own_and_the_run_ends_with_the_table(tiny_spec, tmp_path):
    path = tiny_spec(steps=4, every=4, ckpt=4)
    text = path.read_text().replace("batch_rows = 8 }", "batch_rows = 8, oracle = true }")
    assert "oracle = true" in text
    path.write_text(text + QUERY_FUSE.format(lum="direct+match", init="") + "compare_base = true\nseeds = 2\n")
    r = invoke("run", path)                                     # synth ... query, fuse (+ LUM and base)
    assert r.exit_code == 0, r.output
    spec = load_spec(path)
    out = spec.store("fuse")
    m = json.loads((out / "metrics.json").read_text())
    assert m["lum"] == "direct+match" and m["base"]["lum"] == "none" and m["base"]["backbone"] == "din"
    assert [s["seed"] for s in m["base"]["seeds"]] == [0, 1]
    # the store holds the + LUM model only, as without compare_base
    assert sorted(p.name for p in out.iterdir()) == ["final", "manifest.json", "metrics.json", "predictions.zarr", "seeds"]

    # the table: the stores' numbers, as written
    pre = json.loads((spec.store("pretrain") / "final" / "metrics.json").read_text())
    rows = lines(spec)
    text_out = "\n".join(rows)
    assert rows[0] == "results of tiny (test split)"
    q, o = pre["test"], pre["test_oracle_condition"]
    assert _row(rows, "query condition scenario=s0, category=<any>") == [f"{q['hr@10']:.4f}", f"{q['ndcg@10']:.4f}"]
    assert _row(rows, "oracle: the held-out event's own scenario, category") == [f"{o['hr@10']:.4f}", f"{o['ndcg@10']:.4f}"]
    b, p = m["base"]["test"]["auc"], m["test"]["auc"]
    assert _row(rows, "base (lum = none)") == [f"{b['mean']:.4f}", "±", f"{b['std']:.4f}"]
    assert _row(rows, "+ LUM (lum = direct+match)") == [f"{p['mean']:.4f}", "±", f"{p['std']:.4f}",
                                                       f"{p['mean'] - b['mean']:+.4f}"]
    assert "fuse: din CTR, 2 seed(s)" in text_out
    assert f"plots: {spec.store('pretrain') / 'loss.png'}" in text_out
    assert r.stderr.splitlines()[-len(rows):] == rows                  # `lumctl run` ended with it

    # the base equals a lum = "none" run of the same backbone, samples and seeds
    out.rename(tmp_path / "with-lum")
    path.write_text(text + QUERY_FUSE.format(lum="none", init="") + "seeds = 2\n")
    r = invoke("fuse", path)
    assert r.exit_code == 0, r.output
    alone = json.loads((out / "metrics.json").read_text())
    for k in (0, 1):
        assert m["base"]["seeds"][k]["test"] == alone["seeds"][k]["test"]
        assert m["base"]["seeds"][k]["valid"] == alone["seeds"][k]["valid"]
    assert m["base"]["test"] == alone["test"]
    assert m["seeds"][0]["test"]["auc"] != alone["seeds"][0]["test"]["auc"]     # the LUM model is another model


def _row(rows: list[str], label: str) -> list[str]:
    """The cells of the row that starts with `label`."""
    (row,) = [r for r in rows if r.strip().startswith(label)]
    return row.strip()[len(label):].split()


def test_compare_base_needs_lum_answers_and_no_warm_start():
    with pytest.raises(ValueError, match="needs lum != 'none'"):
        FuseSpec(compare_base=True)
    with pytest.raises(ValueError, match="does not go with init_from"):
        FuseSpec(lum="direct", compare_base=True, init_from="base/final")


def test_compare_base_off_leaves_the_fuse_hash_of_existing_stores():
    # the hash of FuseSpec(lum = "direct+match") before compare_base existed
    assert f.fuse_spec_hash(FuseSpec(lum="direct+match")) == GOLDEN_HASH
    assert f.fuse_spec_hash(FuseSpec(lum="direct+match", compare_base=True)) != GOLDEN_HASH


GOLDEN_HASH = "ec70542c5b39770f32d0ebb8ecb179cb01dac66feba15a4f3555e66f73f7b9e9"
