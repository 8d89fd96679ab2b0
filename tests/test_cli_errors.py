"""Bad input through the real CLI: exit code 2 and one line naming the file and the field/line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO, invoke, spec_in


def seq_spec(tmp_path, data_name="log.txt", fmt="seq-lines", **tokenize):
    return spec_in(tmp_path, {"experiment": "x",
                              "tokenize": {"format": fmt, "path": str(tmp_path / data_name), **tokenize},
                              "pack": {"seq_len": 64, "max_items": 16}})


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)  # exactly one line
    assert err.startswith("error: ")
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in err, (f, err)
    return err.strip()


def test_unknown_key_in_spec(tmp_path):
    p = spec_in(tmp_path, {"experiment": "x", "tokenize": {"format": "seq-lines", "path": "a.txt"},
                           "pack": {"seq_len": 64, "max_itmes": 16}})
    err = assert_one_line_error(invoke("tokenize", p))
    assert err == f"error: {p}: [pack].max_itmes: unknown key"


def test_wrong_type_in_spec(tmp_path):
    p = spec_in(tmp_path, {"experiment": "x", "tokenize": {"format": "seq-lines", "path": "a.txt", "strict": "yes please"}})
    err = assert_one_line_error(invoke("pack", p), str(p), "[tokenize].strict", "must be a valid boolean")
    assert err.endswith("(got 'yes please')")


def test_negative_seq_len(tmp_path):
    p = spec_in(tmp_path, {"experiment": "x", "tokenize": {"format": "seq-lines", "path": "a.txt"},
                           "pack": {"seq_len": -4}})
    assert assert_one_line_error(invoke("tokenize", p)) == f"error: {p}: [pack].seq_len: must be > 0 (got -4)"


def test_spec_file_missing(tmp_path):
    assert_one_line_error(invoke("tokenize", tmp_path / "none.toml"), "none.toml", "spec file not found")


def test_invalid_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('experiment = "x"\n[tokenize\n')
    assert_one_line_error(invoke("tokenize", p), str(p), "invalid TOML")


def test_missing_data_file(tmp_path):
    p = seq_spec(tmp_path, "nowhere.txt")
    assert_one_line_error(invoke("tokenize", p), str(tmp_path / "nowhere.txt"), "data path not found")


def test_missing_data_folder(tmp_path):
    p = spec_in(tmp_path, {"experiment": "x", "tokenize": {"format": "movielens-1m", "path": str(tmp_path / "ml-1m")}})
    assert_one_line_error(invoke("tokenize", p), str(tmp_path / "ml-1m"), "not found")


@pytest.mark.parametrize("fmt, content, message", [
    ("seq-lines", b"", "no valid events in the log"),
    ("seq-pairs", b"", "empty file: no events"),
    ("amazon-csv", b"\n\n", "empty file: no events"),
])
def test_empty_log_file(tmp_path, fmt, content, message):
    (tmp_path / "log.txt").write_bytes(content)
    assert_one_line_error(invoke("tokenize", seq_spec(tmp_path, fmt=fmt)), str(tmp_path / "log.txt"), message)


def test_non_utf8_bytes(tmp_path):
    (tmp_path / "log.txt").write_bytes(b"1 2 3 4\n2 5 \xff 6\n")
    err = assert_one_line_error(invoke("tokenize", seq_spec(tmp_path)), f"{tmp_path / 'log.txt'}:2: not UTF-8 text")
    assert "0xff" in err


@pytest.mark.parametrize("fmt, content, where, message", [
    ("seq-pairs", "1 2\n1 3\n1\n1 4\n", 3, "expected 2 fields, got 1"),
    ("amazon-csv", "u,i,5,1\nu,j,5,2\nu,k,4,3\nu,l,4\n", 4, "expected 4 fields, got 3"),
    ("taobao", "1,2,3,pv,10\n1,2,3,pv\n1,4,3,pv,11\n1,5,3,pv,12\n", 2, "expected 5 fields, got 4"),
    ("seq-lines", "1 2 3 5\n4\n", 2, "expected a user and at least one item"),
    ("amazon-csv", "u,i,5,1\nu,j,5,2\nu,k,4,soon\nu,l,4,4\n", 3, "field 'timestamp': expected a number, got 'soon'"),
])
def test_malformed_row_stops_strict_and_is_skipped_otherwise(tmp_path, fmt, content, where, message):
    """Every log holds one malformed row and three good events of one user."""
    (tmp_path / "log.txt").write_text(content)
    p = seq_spec(tmp_path, fmt=fmt, strict=True)
    assert_one_line_error(invoke("tokenize", p), f"{tmp_path / 'log.txt'}:{where}: {message}")
    # without strict the row is skipped and counted
    p = seq_spec(tmp_path, fmt=fmt, strict=False)
    r = invoke("tokenize", p)
    assert r.exit_code == 0, r.output
    assert "1 users, 3 items, 3 events (1 malformed rows skipped" in r.stderr


def test_missing_upstream_store(tmp_path):
    p = seq_spec(tmp_path)
    assert_one_line_error(invoke("pack", p), str(tmp_path / "stores" / "x" / "tokenize"),
                          "no complete tokenize store here (run `lumctl tokenize` first)")


def test_spec_validate_reports_each_bad_file(tmp_path):
    good = spec_in(tmp_path, {"experiment": "x", "tokenize": {"format": "seq-lines", "path": "a.txt"}}, "good.toml")
    bad = spec_in(tmp_path, {"experiment": "x", "tokenize": {"format": "seq-lines", "path": "a.txt"},
                             "pack": {"seq_len": -4}}, "bad.toml")
    r = invoke("spec", "validate", good, bad)
    assert r.exit_code == 2
    assert r.stdout.strip() == f"{good}: ok (experiment 'x')"
    assert r.stderr.strip() == f"error: {bad}: [pack].seq_len: must be > 0 (got -4)"


def test_good_input_exits_zero(tmp_path):
    (tmp_path / "log.txt").write_text("1 2 3 4 5\n2 3 4 5\n3 2 4 5\n")
    r = invoke("tokenize", seq_spec(tmp_path))
    assert r.exit_code == 0, r.output
    assert "tokenize: 3 users, 4 items, 10 events" in r.stderr


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_help_does_not_import_torch_or_numba():
    code = """
import sys
from typer.testing import CliRunner
from lumctl.cli import app
runner = CliRunner()
for args in (["--help"], ["tokenize", "--help"], ["pack", "--help"], ["spec", "--help"], ["eval", "--help"]):
    r = runner.invoke(app, args)
    assert r.exit_code == 0, (args, r.output)
    assert "Usage" in r.output
heavy = sorted(m for m in ("torch", "numba") if m in sys.modules)
assert not heavy, heavy
print("ok")
"""
    r = _python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_spec_validate_does_not_import_torch_or_numba():
    spec = REPO / "specs" / "demo.toml"
    code = f"""
import sys
from typer.testing import CliRunner
from lumctl.cli import app
r = CliRunner().invoke(app, ["spec", "validate", {str(spec)!r}])
assert r.exit_code == 0, r.output
assert "torch" not in sys.modules and "numba" not in sys.modules
print("ok")
"""
    r = _python(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def test_exit_code_of_the_real_process(tmp_path):
    p = spec_in(tmp_path, {"experiment": "x", "tokenize": {"format": "seq-lines", "path": "a.txt"}, "oops": 1})
    r = subprocess.run([sys.executable, "-m", "lumctl", "tokenize", str(p)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stderr == f"error: {p}: [oops]: unknown key\n"
    assert r.stdout == ""


# ------------------------------------------------------------------------------ what a new user sees
def test_version():
    from lumctl import __version__
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout == f"lumctl {__version__}\n"


@pytest.mark.parametrize("verb", [(), ("run",), ("pretrain",), ("eval",), ("spec",), ("spec", "validate")])
def test_help_labels_no_flag_bool(verb):
    r = invoke(*verb, "--help")
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.stdout and "--help" in r.stdout


def test_run_help_names_its_stages():
    r = invoke("run", "--help")
    assert "synth -> tokenize -> pack -> pretrain -> query -> fuse" in " ".join(r.stdout.split())
