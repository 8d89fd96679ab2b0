"""CPU smoke runs of the benchmark scripts (slow: `pytest -m slow tests/test_benchmarks.py`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--device", "cpu", "--out", str(out), *args],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_bench_packing_cpu(tmp_path):
    lines = _run("bench_packing.py", ["--users", "40", "--seq-len", "256", "--max-items", "40", "--rows", "2",
                                      "--warmup", "1", "--passes", "1"], tmp_path / "packing.json")
    packed, padded, summary = lines
    assert packed["layout"] == "packed" and padded["layout"] == "padded"
    assert summary["speedup"] > 0
    saved = json.loads((tmp_path / "packing.json").read_text())[-1]
    assert 0 < saved["packed"]["padding_efficiency"] <= 1 and 0 < saved["padded"]["padding_efficiency"] <= 1
    assert saved["useful_tokens"] > 0
    assert "machine" in saved


@pytest.mark.slow
def test_bench_serving_cpu(tmp_path):
    lines = _run("bench_serving.py", ["--sizes", "tiny", "--lengths", "16,32", "--requests", "5", "--warmup", "1",
                                      "--lum-users", "20"], tmp_path / "serving.json")
    paths = [(r["path"], r["size"]) for r in lines if not r.get("summary")]
    assert paths == [("lum_step3", "tiny"), ("hstu_e2e", "tiny"), ("hstu_e2e", "tiny")]
    assert lines[-1]["summary"] and "hstu_over_budget" in lines[-1]
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in lines[:-1])


@pytest.mark.slow
def test_bench_latest_write_cpu(tmp_path):
    out = tmp_path / "latest.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_latest_write.py"), "--users", "3000",
                        "--batch", "1000", "--d", "16", "--out", str(out)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.splitlines()[0])
    assert res["same_table"] and res["former"]["after_last_batch_s"] > 0 and res["now"]["after_last_batch_s"] == 0
    assert json.loads(out.read_text())[-1]["users"] == 3000


@pytest.mark.slow
def test_bench_lowpass_cpu(tmp_path):
    _run("bench_lowpass.py", ["--rows", "1", "--seq-len", "256", "--repeat", "1"], tmp_path / "lowpass.json")
    saved = json.loads((tmp_path / "lowpass.json").read_text())[-1]
    assert saved["seconds_attention"] > 0 and saved["seconds_lowpass"] > 0 and saved["seq_len"] == 256
