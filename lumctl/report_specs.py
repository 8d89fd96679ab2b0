"""Report specs (`lumctl eval`): which finished stores make which tables.

A report spec is a TOML file with a [report] section; each row of a table names an experiment spec
(plus recipes and overrides) whose runs it reads. A table may instead copy another report's table,
`{ from = "other.toml#table-name", title = "..." }`: that table, with the keys given here on top, so a
table shown by two reports is written once. See lumctl/stages/eval.py for how rows resolve.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from lumctl.errors import InputError
from lumctl.spec_io import deep_merge, expand_vars, is_report, load_toml, validate
from lumctl.specs import Spec, Strict, parse_spec

RETRIEVAL_METRICS = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr")
RANKING_METRICS = ("auc", "gauc", "logloss")


class RowSpec(Strict):
    """One row of a report table: the runs of one experiment spec (plus recipes and overrides), read from finished stores.

    The run's experiment is `<spec's experiment>[-<name>]`; a retrieval/scaling row with `seeds` has one
    run per seed, `<...>-s<seed>` with [pretrain] seed = <seed> (rows of any table that resolve to the
    same experiment share its run). A ranking row is one fuse store whose [fuse] seed/seeds are set from
    `seeds` (consecutive)."""

    label: str = Field(min_length=1, description="what the row is called in the table, e.g. 'LUM' or 'DIN + LUM'")
    spec: str = Field(min_length=1, description="experiment spec (TOML) the run starts from, relative to the working directory")
    name: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$", description=(
        "variant name: the run's experiment is '<spec experiment>-<name>' (empty: the spec's own experiment)"))
    extends: list[str] = Field(default_factory=list, description=(
        "recipes (TOML, relative to the working directory like `spec`) merged over the spec in order, before "
        "`set`, e.g. ['specs/recipes/sasrec-ml1m.toml']"))
    set: dict = Field(default_factory=dict, description=(
        "overrides deep-merged into the spec, e.g. { pack = { conditions = false } }; the string '{store_root}' "
        "in a value is replaced by the report's store_root (for [fuse] init_from)"))
    seeds: list[int] = Field(default_factory=list, description=(
        "retrieval/scaling: one run per seed ([pretrain] seed); ranking: [fuse] seed = seeds[0], seeds = len "
        "(consecutive). Empty: the spec's own seed(s)"))
    vs: list[str] = Field(default_factory=list, description=(
        "labels of rows of the same table this row is compared with (delta, per-seed test, paired bootstrap)"))
    optional: bool = Field(False, description="a missing or stale store shows the row as 'not run' instead of failing")


class SweepSpec(Strict):
    """Rows made from one spec by sweeping one key: `sweep = { spec = "specs/x.toml", key =
    "pretrain.model.d_model", values = [16, 32, 64] }` adds the rows `d_model = 16`, ... whose runs are
    `<spec experiment>-d_model-16`, ... (the rows' `name`), each with `key = value` merged over `set`."""

    spec: str = Field(min_length=1, description="experiment spec (TOML) of every row, relative to the working directory")
    key: str = Field(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$", description=(
        "the swept key, section.key (nested: pretrain.model.d_model)"))
    values: list[int | float | bool | str] = Field(min_length=1, description="one row per value, in order")
    name: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$", description="prefix of the rows' names (default: the key's last part)")
    extends: list[str] = Field(default_factory=list, description="recipes of every row (as a row's `extends`)")
    set: dict = Field(default_factory=dict, description="overrides of every row, under the swept key")
    seeds: list[int] = Field(default_factory=list, description="seeds of every row (as a row's `seeds`)")

    def rows(self) -> list[dict]:
        leaf = self.key.split(".")[-1]
        out = []
        for v in self.values:
            over: object = v
            for k in reversed(self.key.split(".")):
                over = {k: over}
            text = str(v).lower() if isinstance(v, bool) else str(v)
            out.append({"label": f"{leaf} = {text}", "spec": self.spec, "name": f"{self.name or leaf}-{text}",
                        "extends": list(self.extends), "set": deep_merge(self.set, over), "seeds": list(self.seeds)})
        return out


class TableSpec(Strict):
    """One table of the report (and its plot)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="id of the table; names its plot file")
    title: str = Field(min_length=1, description="heading of the table")
    kind: Literal["retrieval", "ranking", "scaling"] = Field(description=(
        "retrieval: next-item test metrics of pretrain stores; ranking: test AUC/GAUC/logloss of fuse stores; "
        "scaling: retrieval rows plus the fit metric = a ln(x) + b"))
    metrics: list[str] = Field(default_factory=list, description=(
        "columns (default: hr@10, ndcg@10, hr@50, mrr for retrieval/scaling; auc, gauc, logloss for ranking, "
        "where a two_tower row also has recall@K of its [fuse] retrieval_ks)"))
    compare: str = Field("", description=(
        "metric of the delta / significance columns and of the plot (default: hr@10, or auc for ranking)"))
    x: Literal["params", "max_items"] = Field("params", description=(
        "scaling: x of the fit: non-embedding parameters of the model, or [pack] max_items (events per user)"))
    source: str = Field("test", pattern=r"^(test|test_requests\.[A-Za-z0-9_.-]+)$", description=(
        "retrieval/scaling: the metrics.json entry the columns come from: 'test' (next-item retrieval) or "
        "'test_requests.<field>' (the conditioned-request task of [pretrain.eval].requests on that field)"))
    note: str = Field("", description="a line printed under the table")
    rows: list[RowSpec] = Field(min_length=1, description="the rows, in table order (a sweep's rows follow)")
    sweep: SweepSpec | None = Field(None, description="rows made by sweeping one key of one spec")

    @model_validator(mode="before")
    @classmethod
    def _sweep_rows(cls, data):
        """The rows of `sweep` join the table's rows before validation (so their names are checked too)."""
        if isinstance(data, dict) and isinstance(data.get("sweep"), dict):
            try:
                sweep = SweepSpec.model_validate(data["sweep"])
            except ValidationError as e:
                err = e.errors()[0]
                msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"][0].lower() + err["msg"][1:]
                got = f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and "input" in err else ""
                raise ValueError(f"sweep.{'.'.join(map(str, err['loc']))}: {msg}{got}") from None
            made = [r["label"] for r in data.get("rows", [])]
            data = {**data, "rows": list(data.get("rows", [])) + [r for r in sweep.rows() if r["label"] not in made]}
        return data

    @model_validator(mode="after")
    def _check(self):
        known = RANKING_METRICS if self.kind == "ranking" else None
        for m in self.metrics + ([self.compare] if self.compare else []):
            ok = (m in known or bool(re.fullmatch(r"recall@\d+", m))) if known else bool(re.fullmatch(r"(hr|ndcg)@\d+|mrr", m))
            if not ok:
                raise ValueError(f"unknown {self.kind} metric {m!r} (use "
                                 + ("auc, gauc, logloss or recall@K (two_tower)" if known else "hr@K, ndcg@K or mrr") + ")")
        labels = [r.label for r in self.rows]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"row labels must be unique within a table (got {dup} twice)")
        for r in self.rows:
            for v in r.vs:
                if v not in labels:
                    raise ValueError(f"row '{r.label}': vs {v!r} is not a row of this table (rows: {labels})")
                if v == r.label:
                    raise ValueError(f"row '{r.label}' is compared with itself")
            if self.kind == "ranking" and r.seeds and r.seeds != list(range(r.seeds[0], r.seeds[0] + len(r.seeds))):
                raise ValueError(f"row '{r.label}': ranking seeds must be consecutive (got {r.seeds})")
        if self.kind == "ranking" and self.source != "test":
            raise ValueError(f"source = {self.source!r} is for retrieval tables (a ranking table reads fuse stores)")
        if self.kind == "scaling" and len(self.rows) < 2:
            raise ValueError("a scaling table needs at least 2 rows to fit a line")
        return self

    def columns(self) -> list[str]:
        if self.metrics:
            return list(self.metrics)
        return list(RANKING_METRICS) if self.kind == "ranking" else ["hr@10", "ndcg@10", "hr@50", "mrr"]

    def compare_metric(self) -> str:
        return self.compare or ("auc" if self.kind == "ranking" else "hr@10")


class ReportSpec(Strict):
    """`lumctl eval`: tables, significance tests and plots from finished stores (never trains)."""

    title: str = Field("lumctl results", description="heading of results.md")
    note: str = Field("", description="a paragraph under the title (data, hardware, caveats)")
    bootstrap: int = Field(1000, ge=0, description="paired bootstrap replicates over users (0 = off)")
    seed: int = Field(0, description="seed of the bootstrap")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the bootstrap interval")
    tables: list[TableSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self):
        names = [t.name for t in self.tables]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise ValueError(f"table names must be unique (got {dup} twice)")
        return self


class ReportFile(Strict):
    """A report spec: which finished stores make which tables. Outputs go to <store_root>/<experiment>/eval/."""

    experiment: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", description="name of the report; output in <store_root>/<experiment>/eval/")]
    store_root: str = Field("stores", description=(
        "root of the runs' stores (replaces each run spec's store_root) and of the report's; `${VAR:-default}` expanded"))
    report: ReportSpec

    @field_validator("store_root")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_vars(v)

    def store(self, stage: str = "eval") -> Path:
        return Path(self.store_root) / self.experiment / stage



def parse_report(data: dict, path: str = "<report>") -> ReportFile:
    return validate(ReportFile, data, path)


def resolve_table_refs(data: dict, path: str | Path) -> dict:
    """Replace each table `{ from = "REPORT.toml#NAME", key = value ... }` of a raw report by table NAME of
    REPORT.toml (a path relative to this report's folder, `extends` merged) with the given keys on top;
    keys replace whole values (a `rows` given here replaces the other table's rows). One level: the table
    copied must not itself be a copy."""
    report = data.get("report")
    tables = report.get("tables") if isinstance(report, dict) else None
    if not isinstance(tables, list):                     # an experiment spec, or a report pydantic will refuse
        return data
    others: dict[Path, list] = {}
    out = []
    for i, t in enumerate(tables):
        if not isinstance(t, dict) or "from" not in t:
            out.append(t)
            continue
        where = f"[report].tables.{i}.from"
        file, sep, name = str(t["from"]).partition("#")
        if not (sep and file and name):
            raise InputError(str(path), f"{where}: expected 'REPORT.toml#TABLE' (got {t['from']!r})")
        src = Path(path).parent / file
        if src not in others:
            if not src.is_file():
                raise InputError(str(path), f"{where}: no report file {src}")
            other = load_toml(src)
            if not is_report(other):
                raise InputError(str(path), f"{where}: {src} is not a report spec (no [report] section)")
            others[src] = other["report"].get("tables", [])
        found = [x for x in others[src] if isinstance(x, dict) and x.get("name") == name]
        if not found:
            names = ", ".join(str(x.get("name")) for x in others[src] if isinstance(x, dict))
            raise InputError(str(path), f"{where}: {src} has no table '{name}' (its tables: {names})")
        if "from" in found[0]:
            raise InputError(str(path), f"{where}: table '{name}' of {src} is itself a copy; name the original")
        out.append({**found[0], **{k: v for k, v in t.items() if k != "from"}})
    data["report"]["tables"] = out
    return data


def load_resolved(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> dict:
    """A spec file as a plain dict: `extends` merged, `--set` overrides applied and, in a report, the
    tables copied from another report written out (not yet validated)."""
    return resolve_table_refs(load_toml(path, sets), path)


def load_report(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> ReportFile:
    """Read (extends merged, `--set` overrides applied) and validate a report spec; any problem becomes
    one InputError line."""
    data = load_resolved(path, sets)
    if not is_report(data):
        raise InputError(str(path), "[report]: section missing; this is an experiment spec, not a report spec")
    return parse_report(data, str(path))


def load_any(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> Spec | ReportFile:
    """An experiment spec or a report spec, whichever the file is."""
    data = load_resolved(path, sets)
    return parse_report(data, str(path)) if is_report(data) else parse_spec(data, str(path))
