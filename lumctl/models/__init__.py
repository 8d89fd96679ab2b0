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
}


def config_class(kind: str):
    mod, cfg, _ = FAMILIES[kind]
    return getattr(importlib.import_module(mod), cfg)


def build(kind: str, config: dict):
    mod, cfg, cls = FAMILIES[kind]
    m = importlib.import_module(mod)
    return getattr(m, cls)(getattr(m, cfg)(**config))
