"""End to end through the real CLI: every verb on a tiny synthetic spec, in tmp_path."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lumctl.cli import app

# first logged InfoNCE loss of the tiny spec (seed 0, fp32 CPU); a change here means the
# numerics of synth, tokenize, pack, the model or the loss changed
GOLDEN_FIRST_LOSS = 7.26773


def test_run_all_stages_through_the_cli(tiny_spec, tmp_path):
    spec = tiny_spec(steps=6, every=3, ckpt=3)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(spec)])
    assert res.exit_code == 0, res.output
    root = tmp_path / "stores" / "tiny"
    for stage in ("synth", "tokenize", "pack", "pretrain"):
        m = json.loads((root / stage / "manifest.json").read_text())
        assert m["complete"] and m["stage"] == stage
    final = root / "pretrain" / "final"
    assert {"model.pt", "config.json", "metrics.json"} <= {p.name for p in final.iterdir()}
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["test"]["n"] == 60 and 0 <= metrics["test"]["hr@10"] <= 1
    assert (root / "pretrain" / "loss.png").stat().st_size > 1000
    recs = [json.loads(x) for x in open(root / "pretrain" / "metrics.jsonl")]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 6
    assert losses[0] == pytest.approx(GOLDEN_FIRST_LOSS, rel=1e-3)
    # a second run is a no-op for every stage
    res = runner.invoke(app, ["run", str(spec)])
    assert res.exit_code == 0
    assert res.output.count("up to date") == 4, res.output
