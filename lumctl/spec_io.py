"""Spec files: TOML in and out, `extends`, `--set`, merging, `${VAR}` expansion, one-line errors.

A spec file may start from others: `extends = "recipes/x.toml"` (or a list, merged in order) names
files relative to the spec; their resolved content is deep-merged under the file's own keys before
validation. `--set section.key=value` overrides merge on top, the value read as a TOML value
(`--set pack.seq_len=1024`, `--set 'tokenize.split={ kind = "fraction" }'`; a bare word such as
`--set pretrain.device=cpu` is a string).
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import tomli_w
from pydantic import ValidationError

from lumctl.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOP_LEVEL_KEYS = ("experiment", "store_root", "inputs_root", "extends")  # top-level scalars, not [sections]


# ------------------------------------------------------------------------------------ ${VAR}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(value: str) -> str:
    """Expand `${NAME}` and `${NAME:-default}` from the environment."""
    return _VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)


# ------------------------------------------------------------------------------------ merging
def deep_merge(base: dict, over: dict) -> dict:
    """`base` with `over` merged in: nested dicts merge key by key, anything else (and an empty dict,
    which clears a table such as `top_k = {}`) replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        merge = isinstance(v, dict) and v and isinstance(out.get(k), dict)
        out[k] = deep_merge(out[k], v) if merge else copy.deepcopy(v)
    return out


# ------------------------------------------------------------------------------------ reading
def _read_one(p: Path) -> dict:
    if not p.is_file():
        raise InputError(str(p), "spec file not found")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(str(p), "spec is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(str(p), f"invalid TOML: {e}") from None


def _parents(data: dict, path: Path) -> list[Path]:
    ext = data.pop("extends", [])
    names = [ext] if isinstance(ext, str) else ext
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise InputError(str(path), f"extends: must be a file name or a list of file names (got {ext!r})")
    return [path.parent / n for n in names]


def read_toml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A spec file as a dict, with the files it `extends` merged in (theirs first, its own keys last)."""
    p = Path(path)
    key = p.resolve()
    if key in _chain:
        names = [str(c) for c in _chain[_chain.index(key):]] + [str(key)]
        raise InputError(str(path), "extends cycle: " + " -> ".join(names))
    data = _read_one(p)
    out: dict = {}
    for parent in _parents(data, p):
        if not parent.is_file():
            raise InputError(str(p), f"extends: {parent}: spec file not found")
        out = deep_merge(out, read_toml(parent, _chain + (key,)))
    return deep_merge(out, data)


def is_report(data: dict) -> bool:
    """A TOML spec with a [report] section is a report spec (`lumctl eval`), else an experiment spec."""
    return "report" in data


# ------------------------------------------------------------------------------------ --set
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+(\s*\.\s*[A-Za-z0-9_-]+)*)\s*=(.*)$", re.S)


def parse_set(arg: str) -> dict:
    """`section.key=value` -> {"section": {"key": value}}; the value is a TOML value, or a bare word
    (no quotes, brackets or spaces) read as a string."""
    m = _KEY.match(arg)
    if not m:
        raise InputError("--set", f"expected section.key=value (got {arg!r})")
    keys = [k.strip() for k in m.group(1).split(".")]
    text = m.group(3).strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if not re.fullmatch(r"[^\s\"'\[\]{}=,#]+", text):
            raise InputError("--set", f"{'.'.join(keys)}: not a TOML value (got {text!r})") from None
        value = text
    for k in reversed(keys):
        value = {k: value}
    return value


def apply_sets(data: dict, sets: list[str] | tuple[str, ...] = ()) -> dict:
    """`data` with every `--set` override merged in, in order."""
    for s in sets:
        data = deep_merge(data, parse_set(s))
    return data


def load_toml(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> dict:
    """A spec file resolved: `extends` merged in, then `--set` overrides."""
    return apply_sets(read_toml(path), sets)


# ------------------------------------------------------------------------------------ writing
def dump_toml(data: dict) -> str:
    """A (resolved) spec dict as TOML text that read_toml reads back to the same dict."""
    return tomli_w.dumps(data)


# ------------------------------------------------------------------------------------ errors
def format_error(path: str, err: dict) -> str:
    """One pydantic error as `path: [section].key: message (got value)`."""
    loc = [str(p) for p in err["loc"]]
    if not loc:
        where = ""
    elif len(loc) == 1:
        where = loc[0] if loc[0] in TOP_LEVEL_KEYS else f"[{loc[0]}]"
    else:
        where = f"[{loc[0]}]." + ".".join(loc[1:])
    msg = err["msg"]
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = msg[0].lower() + msg[1:] if msg else msg
        if "input" in err and not isinstance(err["input"], dict) and "(got" not in msg:
            msg += f" (got {err['input']!r})"
    msg = msg.replace("greater than", ">").replace("less than", "<").replace("Input should be", "must be")
    msg = msg.replace("input should be", "must be")
    return f"{path}: {where + ': ' if where else ''}{msg}"


def validate(model, data: dict, path: str):
    """model.model_validate(data); the first problem becomes one InputError line naming `path`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InputError(path, format_error(path, e.errors()[0]).split(": ", 1)[1]) from None

