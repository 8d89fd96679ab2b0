"""Checks of a spec against the tokenize store, run before the stages that train or query.

The spec alone cannot say whether `[pretrain.eval].condition = { rating = "high" }` names a value
of the data: that needs the vocabularies. `lumctl run` checks right after tokenize, and the verbs
`pack`, `pretrain` and `query` before they start, so a typo fails before hours of packing and
training, and before any output folder is made.
"""

from __future__ import annotations

from lumctl import zarrio
from lumctl.errors import InputError
from lumctl.store import join, read_manifest


def condition_vocabularies(tok_store) -> dict[str, list[str]]:
    """{condition field: vocabulary values} of a tokenize store (values from index 1: '<any>', ...)."""
    g = zarrio.open_read(join(tok_store, "data.zarr"))
    fields = [c["name"] for c in g.attrs.get("conditions", [])]
    return {n: [str(v) for v in zarrio.get(g, f"vocab/cond_{n}")] for n in fields}


def check_vocabularies(spec) -> None:
    """[pretrain.eval] condition / mixture and [query] conditions / each / top_k name condition fields and
    values of the tokenize store's vocabularies (nothing to check before the store exists, or item-only)."""
    store = spec.input_store("tokenize")
    if read_manifest(store) is None:
        return
    if not (spec.pack.conditions and spec.pretrain.model.kind == "lum"):
        return  # item-only rows: no condition token is ever queried
    vocabs = condition_vocabularies(store)
    fields = list(vocabs)

    def field(f: str, where: str) -> None:
        if f not in vocabs:
            raise InputError(where, f"unknown condition field '{f}' (fields: {fields})")

    def value(f: str, v: str, where: str) -> None:
        field(f, where)
        if v not in vocabs[f][1:]:
            raise InputError(where, f"unknown value '{v}' (values: {vocabs[f][1:]})")

    ev = spec.pretrain.eval
    if ev.mixture is not None:
        field(ev.mixture, "[pretrain.eval].mixture")
    for f, v in ev.condition.items():
        field(f, "[pretrain.eval].condition")
        value(f, v, f"[pretrain.eval].condition.{f}")
    q = spec.query
    if q is None:
        return
    for i, c in enumerate(q.conditions):
        for f, v in c.items():
            field(f, f"[query].conditions.{i}")
            value(f, v, f"[query].conditions.{i}.{f}")
    for f in q.each:
        field(f, "[query].each")
    for f in q.top_k:
        field(f, "[query].top_k")
