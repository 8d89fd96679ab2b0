"""Spec validation: shipped specs, properties of parsing, one-line error messages, ${VAR} expansion,
composition (`extends`, `--set`, `lumctl spec resolve`)."""

from __future__ import annotations

import json
import keyword
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import REPO, invoke, write_toml
from lumctl.errors import InputError
from lumctl.report_specs import load_any, load_resolved
from lumctl.spec_io import dump_toml, parse_set, read_toml
from lumctl.specs import PackSpec, Spec, SynthSpec, TokenizeSpec, expand_vars, load_spec, parse_spec

SHIPPED = sorted((REPO / "specs").glob("*.toml"))   # recipes (specs/recipes/) are parts, not specs
# every shipped spec (and every run of a shipped report) as validated before its recipes moved to
# specs/recipes/: non-default values only, so a field added later at its default changes nothing.
# A deliberate change of a shipped spec updates it (and makes that spec's stores stale).
RESOLVED = json.loads((REPO / "tests" / "data" / "shipped_specs_resolved.json").read_text())
SPEC_VARS = ("LUMCTL_DATA", "LUMCTL_STORES", "LUM_BASE")


def minimal(**over) -> dict:
    d = {"experiment": "x", "tokenize": {"format": "seq-lines", "path": "data.txt"}}
    d.update(over)
    return d


def error_of(data: dict, path: str = "specs/x.toml") -> str:
    with pytest.raises(InputError) as e:
        parse_spec(data, path)
    return str(e.value)


# ------------------------------------------------------------------------------ shipped specs
def test_every_recorded_spec_is_shipped():
    shipped = {str(p.relative_to(REPO)) for p in SHIPPED}
    assert set(RESOLVED) <= shipped, sorted(set(RESOLVED) - shipped)


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_shipped_spec_resolves_as_recorded(name, monkeypatch):
    """Recipes moved out of the specs; what every spec and report run validates to did not change (so
    no store made before is stale)."""
    for v in SPEC_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.chdir(REPO)
    s = load_any(name)
    if "runs" in RESOLVED[name]:   # a report: the specs of its runs
        from lumctl.stages.eval import plan
        runs = {f"{rp.table.name}/{rp.row.label}": [r.spec.model_dump(mode="json", exclude_defaults=True)
                                                   for r in rp.runs] for rp in plan(s, name)}
        assert runs == RESOLVED[name]["runs"]
    else:
        assert s.model_dump(mode="json", exclude_defaults=True) == RESOLVED[name]


def test_recipes_live_once():
    """The MovieLens conditions and the item-only baseline recipe are written in specs/recipes/ only."""
    for p in SHIPPED:
        text = p.read_text()
        assert 'column = "genres"' not in text, p.name
        assert "logq_correction = false" not in text, p.name


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_spec_validates(path):
    if "\n[report]" in path.read_text():  # a report spec (`lumctl eval`): every row resolves to a valid run
        from lumctl.report_specs import load_report
        from lumctl.stages.eval import plan
        assert plan(load_report(path), str(path))
        return
    spec = load_spec(path)
    assert spec.experiment
    assert spec.pack.seq_len >= spec.pack.max_items * (2 if spec.pack.conditions else 1)
    if spec.tokenize.format != "synth":
        assert "${" not in spec.tokenize.path  # expanded


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_spec_resolve_round_trips(path, tmp_path, monkeypatch):
    """`lumctl spec resolve` prints TOML that parses back to the same spec, with no `extends` (and no table
    copied `from` another report) left."""
    monkeypatch.chdir(REPO)
    r = invoke("spec", "resolve", path)
    assert r.exit_code == 0, r.output
    out = tmp_path / path.name
    out.write_text(r.stdout)
    assert "extends" not in read_toml(out)
    assert "\nfrom =" not in r.stdout
    assert read_toml(out) == load_resolved(path)
    assert load_any(out) == load_any(path)


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


# ------------------------------------------------------------------------------ extends
def test_extends_merges_parents_in_order_under_the_file(tmp_path):
    write_toml(tmp_path / "recipes" / "a.toml", {"pack": {"seq_len": 100, "max_items": 10}, "tokenize": {"min_user_events": 4}})
    write_toml(tmp_path / "recipes" / "b.toml", {"extends": "a.toml", "pack": {"seq_len": 200}})
    write_toml(tmp_path / "recipes" / "c.toml", {"pack": {"max_items": 20, "chunk_rows": 8}})
    p = write_toml(tmp_path / "x.toml", {**minimal(pack={"chunk_rows": 16}),
                                          "extends": ["recipes/b.toml", "recipes/c.toml"]})
    s = load_spec(p)
    # a < b (b extends a), then c, then the file's own keys
    assert (s.pack.seq_len, s.pack.max_items, s.pack.chunk_rows) == (200, 20, 16)
    assert s.tokenize.min_user_events == 4 and s.tokenize.format == "seq-lines"
    assert "extends" not in read_toml(p)


def test_extends_errors_are_one_line_naming_the_files(tmp_path):
    p = write_toml(tmp_path / "x.toml", {**minimal(), "extends": "gone.toml"})
    with pytest.raises(InputError) as e:
        load_spec(p)
    assert str(e.value) == f"{p}: extends: {tmp_path / 'gone.toml'}: spec file not found"
    write_toml(tmp_path / "a.toml", {"extends": "b.toml"})
    write_toml(tmp_path / "b.toml", {"extends": "a.toml"})
    p = write_toml(tmp_path / "y.toml", {**minimal(), "extends": "a.toml"})
    with pytest.raises(InputError) as e:
        load_spec(p)
    msg = str(e.value)
    assert "\n" not in msg and "extends cycle: " in msg
    assert msg.endswith(f"{(tmp_path / 'a.toml').resolve()} -> {(tmp_path / 'b.toml').resolve()} -> {(tmp_path / 'a.toml').resolve()}")
    p = write_toml(tmp_path / "z.toml", {**minimal(), "extends": 3})
    with pytest.raises(InputError, match=r"z\.toml: extends: must be a file name or a list of file names \(got 3\)"):
        load_spec(p)


def test_a_child_value_error_names_the_child(tmp_path):
    write_toml(tmp_path / "r.toml", {"pack": {"seq_len": 64}})
    p = write_toml(tmp_path / "x.toml", {**minimal(pack={"max_items": 100}), "extends": "r.toml"})
    with pytest.raises(InputError) as e:
        load_spec(p)
    assert str(e.value) == f"{p}: [pack]: seq_len must be >= 200 tokens to hold max_items = 100 (got 64)"


# ------------------------------------------------------------------------------ --set
TOML_SCALARS = (st.integers(-2**63, 2**63 - 1) | st.booleans()
                | st.floats(allow_nan=False, allow_infinity=False)
                | st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12))
TOML_VALUES = TOML_SCALARS | st.lists(st.integers(-1000, 1000), max_size=4) | st.dictionaries(IDENT, st.integers(), max_size=3)


def toml_text(v) -> str:
    """A value as inline TOML (what a user types after `=`)."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_text(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_text(x) for x in v) + "]"
    return dump_toml({"v": v}).split("=", 1)[1].strip()


@settings(max_examples=300, deadline=None)
@given(st.lists(IDENT, min_size=1, max_size=3), TOML_VALUES)
def test_set_reads_a_toml_value(keys, value):
    got = parse_set(".".join(keys) + "=" + toml_text(value))
    for k in keys:
        assert list(got) == [k]
        got = got[k]
    assert got == value


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"[A-Za-z][A-Za-z0-9_./:-]{0,20}", fullmatch=True))
def test_set_reads_a_bare_word_as_a_string(word):
    if word in ("true", "false", "inf", "nan") or word[0].isdigit():
        return
    try:
        import tomllib
        tomllib.loads(f"v = {word}")
        return  # a TOML value after all (e.g. a date)
    except Exception:
        pass
    assert parse_set(f"pretrain.device={word}") == {"pretrain": {"device": word}}


@pytest.mark.parametrize("arg, expected", [
    ("pack.seq_len", "--set: expected section.key=value (got 'pack.seq_len')"),
    ("=3", "--set: expected section.key=value (got '=3')"),
    ("pack..x=3", "--set: expected section.key=value (got 'pack..x=3')"),
    ("pack.seq_len=[1, 2", "--set: pack.seq_len: not a TOML value (got '[1, 2')"),
    ('tokenize.path="a', "--set: tokenize.path: not a TOML value (got '\"a')"),
])
def test_set_errors(arg, expected):
    with pytest.raises(InputError) as e:
        parse_set(arg)
    assert str(e.value) == expected


def test_set_on_the_cli_is_validated_like_the_file(tmp_path):
    p = write_toml(tmp_path / "x.toml", minimal())
    r = invoke("spec", "validate", p, "--set", "pack.seq_len=-4")
    assert r.exit_code == 2 and r.stderr == f"error: {p}: [pack].seq_len: must be > 0 (got -4)\n"
    r = invoke("spec", "validate", p, "--set", "pack.seqlen=3")
    assert r.exit_code == 2 and r.stderr == f"error: {p}: [pack].seqlen: unknown key\n"
    r = invoke("spec", "resolve", p, "--set", "pack.seq_len=1024", "--set", "pack.strategy=first_fit",
               "--set", "tokenize.split={ kind = 'fraction' }")
    assert r.exit_code == 0, r.output
    out = tmp_path / "out.toml"
    out.write_text(r.stdout)
    s = load_spec(out)
    assert (s.pack.seq_len, s.pack.strategy, s.tokenize.split.kind) == (1024, "first_fit", "fraction")
    r = invoke("pack", p, "--set", "pack.seq_len=abc")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "[pack].seq_len: must be a valid integer" in r.stderr
