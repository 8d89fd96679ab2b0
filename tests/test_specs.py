"""Spec validation: shipped specs, properties of parsing, one-line error messages, ${VAR} expansion."""

from __future__ import annotations

import json
import keyword
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import REPO, invoke, write_toml
from lumctl.errors import InputError
from lumctl.specs import PackSpec, Spec, SynthSpec, TokenizeSpec, expand_vars, load_spec, parse_spec

SHIPPED = sorted((REPO / "specs").glob("*.toml")) + sorted((REPO / "tests" / "specs").glob("*.toml"))


def minimal(**over) -> dict:
    d = {"experiment": "x", "tokenize": {"format": "seq-lines", "path": "data.txt"}}
    d.update(over)
    return d


def error_of(data: dict, path: str = "specs/x.toml") -> str:
    with pytest.raises(InputError) as e:
        parse_spec(data, path)
    return str(e.value)


# ------------------------------------------------------------------------------ shipped specs
def test_there_are_shipped_specs():
    assert len(SHIPPED) >= 1


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spec_validates(path):
    if "\n[report]" in path.read_text():  # a report spec (`lumctl eval`): every row resolves to a valid run
        from lumctl.specs import load_report
        from lumctl.stages.eval import plan
        assert plan(load_report(path), str(path))
        return
    spec = load_spec(path)
    assert spec.experiment
    assert spec.pack.seq_len >= spec.pack.max_items * (2 if spec.pack.conditions else 1)
    if spec.tokenize.format != "synth":
        assert "${" not in spec.tokenize.path  # expanded


def test_spec_validate_command_accepts_all_shipped_specs():
    r = invoke("spec", "validate", *SHIPPED)
    assert r.exit_code == 0, r.output
    assert r.stdout.count(": ok (experiment") + r.stdout.count(": ok (report") == len(SHIPPED)


# ------------------------------------------------------------------------------ properties
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 3000), st.booleans())
def test_seq_len_must_hold_max_items(seq_len, max_items, conditions):
    data = minimal(pack={"seq_len": seq_len, "max_items": max_items, "conditions": conditions})
    need = max_items * (2 if conditions else 1)
    if seq_len >= need and not conditions and max_items < 2:  # item-only: one event has nothing to predict
        assert error_of(data).startswith("specs/x.toml: [pack].max_items: item-only rows need >= 2 events")
    elif seq_len >= need:
        spec = parse_spec(data)
        assert (spec.pack.seq_len, spec.pack.max_items, spec.pack.conditions) == (seq_len, max_items, conditions)
    else:
        msg = error_of(data)
        assert msg == (f"specs/x.toml: [pack]: seq_len must be >= {need} tokens to hold "
                       f"max_items = {max_items} (got {seq_len})")


@settings(max_examples=100, deadline=None)
@given(st.integers(-10**6, 0), st.sampled_from(["seq_len", "max_items", "chunk_rows"]))
def test_non_positive_pack_numbers_are_rejected(value, key):
    assert error_of(minimal(pack={key: value})) == f"specs/x.toml: [pack].{key}: must be > 0 (got {value})"


IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(IDENT, st.sampled_from(["", "tokenize", "pack", "synth", "split"]))
def test_unknown_keys_are_rejected(key, section):
    models = {"": Spec, "tokenize": TokenizeSpec, "pack": PackSpec, "synth": SynthSpec}
    model = models.get(section, None)
    known = set(model.model_fields) if model else {"kind", "train", "valid", "valid_from", "test_from"}
    if key in known or keyword.iskeyword(key):
        return
    data = minimal(synth={"users": 5})
    if section == "":
        data[key] = 1
        where = f"[{key}]"
    elif section == "split":
        data["tokenize"]["split"] = {"kind": "leave_one_out", key: 1}
        where = f"[tokenize].split.{key}"
    else:
        data.setdefault(section, {})[key] = 1
        where = f"[{section}].{key}"
    assert error_of(data) == f"specs/x.toml: {where}: unknown key"


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_experiment_names(name):
    import re
    ok = re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None
    if ok:
        assert parse_spec(minimal(experiment=name)).experiment == name
    else:
        assert error_of(minimal(experiment=name)).startswith("specs/x.toml: experiment: string should match pattern")


# ------------------------------------------------------------------------------ messages
def test_error_message_is_one_line_naming_file_and_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_toml(tmp_path / "specs" / "x.toml", minimal(pack={"seq_len": -4}))
    with pytest.raises(InputError) as e:
        load_spec("specs/x.toml")
    assert str(e.value) == "specs/x.toml: [pack].seq_len: must be > 0 (got -4)"
    assert e.value.where == "specs/x.toml" and e.value.what == "[pack].seq_len: must be > 0 (got -4)"


@pytest.mark.parametrize("data, expected", [
    (minimal(pack={"seqlen": 3}), "[pack].seqlen: unknown key"),
    (minimal(foo=1), "[foo]: unknown key"),
    (minimal(pack={"seq_len": "long"}), "[pack].seq_len: must be a valid integer (got 'long')"),
    (minimal(pack={"conditions": "maybe"}), "[pack].conditions: must be a valid boolean (got 'maybe')"),
    (minimal(pack={"strategy": "worst_fit"}), "[pack].strategy: must be 'best_fit' or 'first_fit' (got 'worst_fit')"),
    ({"experiment": "x"}, "[tokenize]: required key is missing"),
    (minimal(tokenize={"format": "seq-lines"}), "[tokenize]: path is required for format 'seq-lines'"),
    (minimal(tokenize={"format": "synth"}), "tokenize.format = 'synth' needs a [synth] section"),
    (minimal(tokenize={"format": "table", "path": "a.csv", "columns": {"user": "u"}}),
     "[tokenize]: columns must map ['item', 'timestamp'] for format 'table'"),
    (minimal(tokenize={"format": "seq-lines", "path": "a", "conditions": [{"name": "r", "source": "bucket", "column": "rating"}]}),
     "[tokenize].conditions.0: bucket conditions need `edges`"),
    (minimal(tokenize={"format": "seq-lines", "path": "a", "conditions": [{"name": "r", "source": "bucket", "column": "rating", "edges": [4, 3]}]}),
     "[tokenize].conditions.0: edges must be increasing (got [4.0, 3.0])"),
    (minimal(tokenize={"format": "seq-lines", "path": "a", "split": {"kind": "fraction", "train": 0.8, "valid": 0.3}}),
     "[tokenize].split: train + valid must be < 1 (got 1.1)"),
    (minimal(synth={"users": 0}), "[synth].users: must be > 0 (got 0)"),
    (minimal(synth={"events_per_user": [2, 10]}), "[synth]: events_per_user must be [min, max] with 3 <= min <= max (got [2, 10])"),
])
def test_error_messages(data, expected):
    msg = error_of(data)
    assert msg == f"specs/x.toml: {expected}"
    assert "\n" not in msg


def test_tokenize_format_error_lists_choices():
    msg = error_of(minimal(tokenize={"format": "csv", "path": "a"}))
    assert msg.startswith("specs/x.toml: [tokenize].format: must be 'synth', 'movielens-1m'")
    assert msg.endswith("(got 'csv')")


def test_load_spec_file_problems(tmp_path):
    with pytest.raises(InputError, match="spec file not found"):
        load_spec(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("experiment = \n")
    with pytest.raises(InputError, match=r"bad\.toml: invalid TOML"):
        load_spec(bad)
    latin = tmp_path / "latin.toml"
    latin.write_bytes('experiment = "Misérables"\n'.encode("latin-1"))
    with pytest.raises(InputError, match="spec is not UTF-8 text"):
        load_spec(latin)


def test_minimal_spec_has_working_defaults():
    s = parse_spec(minimal())
    assert s.store_root == "stores" and s.pack.seq_len == 4096 and s.pack.strategy == "best_fit"
    assert s.tokenize.split.kind == "leave_one_out" and s.tokenize.min_user_events == 3
    assert s.store("pack") == Path("stores/x/pack")


def test_section_hash_tracks_only_its_sections():
    a = parse_spec(minimal(pack={"seq_len": 1024}))
    b = parse_spec(minimal(pack={"seq_len": 2048}))
    assert a.section_hash("tokenize") == b.section_hash("tokenize")
    assert a.section_hash("pack") != b.section_hash("pack")
    assert a.section_hash("pack") == parse_spec(minimal(pack={"seq_len": 1024})).section_hash("pack")


# ------------------------------------------------------------------------------ ${VAR:-default}
def test_expand_vars(monkeypatch):
    monkeypatch.setenv("LUMTEST_A", "/data/a")
    monkeypatch.delenv("LUMTEST_UNSET", raising=False)
    monkeypatch.setenv("LUMTEST_EMPTY", "")
    assert expand_vars("${LUMTEST_A:-/x}/ml-1m") == "/data/a/ml-1m"
    assert expand_vars("${LUMTEST_UNSET:-../shared/data}/ml-1m") == "../shared/data/ml-1m"
    assert expand_vars("${LUMTEST_EMPTY:-dflt}") == "dflt"  # like the shell's :-
    assert expand_vars("${LUMTEST_UNSET}/f") == "/f"
    assert expand_vars("${LUMTEST_A}") == "/data/a"
    assert expand_vars("$LUMTEST_A and ${not a var}") == "$LUMTEST_A and ${not a var}"


def test_spec_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("LUMTEST_DATA", "/mnt/data")
    monkeypatch.delenv("LUMTEST_STORES", raising=False)
    p = write_toml(tmp_path / "s.toml", {
        "experiment": "x", "store_root": "${LUMTEST_STORES:-/tmp/st}",
        "tokenize": {"format": "table", "path": "${LUMTEST_DATA:-../shared/data}/log.csv",
                     "items_path": "${LUMTEST_DATA}/items.csv",
                     "columns": {"user": "u", "item": "i", "timestamp": "t"}},
    })
    s = load_spec(p)
    assert s.tokenize.path == "/mnt/data/log.csv"
    assert s.tokenize.items_path == "/mnt/data/items.csv"
    assert s.store_root == "/tmp/st"
    assert s.store("tokenize") == Path("/tmp/st/x/tokenize")


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="}$", blacklist_categories=("Cs",)), max_size=20))
def test_default_is_used_verbatim_when_unset(default):
    import os
    name = "LUMTEST_SURELY_UNSET_VAR"
    assert name not in os.environ
    assert expand_vars("${" + name + ":-" + default + "}/x") == default + "/x"


# ------------------------------------------------------------------------------ schema
def test_spec_schema_prints_valid_json():
    r = invoke("spec", "schema")
    assert r.exit_code == 0, r.output
    schema = json.loads(r.stdout)
    assert {"experiment", "tokenize", "pack", "synth", "store_root"} <= set(schema["properties"])
    assert "tokenize" in schema["required"] and "experiment" in schema["required"]
    # every documented field carries its description into the schema
    pack = schema["$defs"]["PackSpec"]["properties"]
    assert pack["seq_len"]["description"] and pack["seq_len"]["exclusiveMinimum"] == 0
