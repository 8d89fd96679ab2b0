"""Model families. Every user encoder maps a packed batch to per-position outputs and scores
items in the same space:

    model(batch)          -> (B, S, D) outputs at every position
    model.item_table(ids) -> (N, D) item embeddings for item ids (all items when ids is None)

`build(kind, config)` picks the family by name (a small explicit dict, see STYLE.md #5).
"""

from __future__ import annotations

import importlib

# kind -> (module, config class, model class)
FAMILIES = {
    "lum": ("lumctl.models.lum", "LUMConfig", "LUM"),
    "sasrec": ("lumctl.models.sasrec", "SASRecConfig", "SASRec"),  # item-only baselines
    "hstu": ("lumctl.models.hstu", "HSTUConfig", "HSTU"),
}


def module(kind: str):
    """The family's module (its PRESETS and, for the baselines, `config_from_spec`)."""
    return importlib.import_module(FAMILIES[kind][0])


def config_class(kind: str):
    mod, cfg, _ = FAMILIES[kind]
    return getattr(importlib.import_module(mod), cfg)


def build(kind: str, config: dict):
    mod, cfg, cls = FAMILIES[kind]
    m = importlib.import_module(mod)
    return getattr(m, cls)(getattr(m, cfg)(**config))


def item_only_config(kind: str, preset: tuple, m, data: dict, cond_names: list[str], attention: str) -> dict:
    """The config fields the item-only baselines share: preset (d_model, n_layers, n_heads, ...)
    with `[pretrain.model]` overrides (ModelSpec refuses LUM-only knobs; item_features is ignored)."""
    from lumctl.errors import InputError
    if cond_names:
        raise InputError("[pack].conditions", f"{kind} is item-only: set conditions = false "
                         f"(the pack has condition fields {cond_names})")
    d, L, H = m.d_model or preset[0], m.n_layers or preset[1], m.n_heads or preset[2]
    if d % H:
        raise InputError("[pretrain.model].n_heads", f"d_model = {d} must be divisible by n_heads = {H}")
    return {"n_items": int(len(data["vocab/item"])), "d_model": d, "n_layers": L, "n_heads": H,
            "dropout": m.dropout, "attention": attention}
