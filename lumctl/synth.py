"""`lumctl synth`: a synthetic behaviour log with known structure, the embedded default.

Generative story (deterministic from `seed`):
- items belong to `categories`; within a category, item popularity is Zipf(`zipf`);
- each user has, for every scenario, its own `tastes` preferred categories (scenario-dependent
  taste: knowing the scenario tells which categories the user will pick);
- each event: a scenario (the user's scenario mix), then with probability `focus` an item from
  one of that scenario's preferred categories, else an item by global popularity; the rating is
  high (4-5) for preferred-category items and low-to-mid (1-3) otherwise;
- timestamps increase per user from a random start (one event every few minutes to days).

Written as `stores/<experiment>/synth/events.parquet` (user, item, timestamp, scenario, rating)
and `items.parquet` (item, category), which `tokenize` reads with `format = "synth"`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lumctl.progress import say
from lumctl.specs import Spec, SynthSpec
from lumctl.store import atomic_dir, is_up_to_date, write_manifest


def generate(s: SynthSpec) -> tuple[pa.Table, pa.Table]:
    rng = np.random.default_rng(s.seed)
    item_cat = np.sort(rng.integers(0, s.categories, s.items))
    item_cat[: s.categories] = np.arange(s.categories)  # every category has an item
    item_cat = np.sort(item_cat)
    weights = np.empty(s.items)
    for c in range(s.categories):  # Zipf popularity within each category
        idx = np.flatnonzero(item_cat == c)
        weights[idx] = 1.0 / np.arange(1, len(idx) + 1) ** s.zipf
    cat_items = [np.flatnonzero(item_cat == c) for c in range(s.categories)]
    cat_p = [weights[i] / weights[i].sum() for i in cat_items]
    global_p = weights / weights.sum()

    n_events = rng.integers(s.events_per_user[0], s.events_per_user[1] + 1, s.users)
    cols = {k: [] for k in ("user", "item", "timestamp", "scenario", "rating")}
    for u in range(s.users):
        n = n_events[u]
        tastes = np.stack([rng.choice(s.categories, min(s.tastes, s.categories), replace=False)
                           for _ in range(s.scenarios)])  # [scenarios, tastes]
        mix = rng.dirichlet(np.ones(s.scenarios))
        scen = rng.choice(s.scenarios, n, p=mix)
        focused = rng.random(n) < s.focus
        items = np.empty(n, np.int64)
        for k in range(n):
            if focused[k]:
                c = tastes[scen[k], rng.integers(len(tastes[scen[k]]))]
                items[k] = rng.choice(cat_items[c], p=cat_p[c])
            else:
                items[k] = rng.choice(s.items, p=global_p)
        liked = np.isin(item_cat[items], tastes[scen].ravel()) & focused
        rating = np.where(liked, rng.integers(4, 6, n), rng.integers(1, 4, n))
        ts = 1_600_000_000 + rng.integers(0, 10**7) + np.cumsum(rng.integers(60, 3 * 86400, n))
        cols["user"].append(np.full(n, u + 1)); cols["item"].append(items + 1); cols["timestamp"].append(ts)
        cols["scenario"].append(np.array([f"s{x}" for x in scen])); cols["rating"].append(rating.astype(float))
    events = pa.table({k: np.concatenate(v) for k, v in cols.items()})
    events = events.set_column(0, "user", events["user"].cast(pa.string()))
    events = events.set_column(1, "item", events["item"].cast(pa.string()))
    items = pa.table({"item": pa.array([str(i + 1) for i in range(s.items)]),
                      "category": pa.array([f"c{c}" for c in item_cat])})
    return events, items


def run(spec: Spec, force: bool = False) -> Path:
    out = spec.store("synth")
    started = time.time()
    spec_hash = spec.section_hash("synth")
    if not force and is_up_to_date(out, spec_hash, {}):
        say(f"synth: {out} is up to date")
        return out
    events, items = generate(spec.synth)
    with atomic_dir(out) as tmp:
        pq.write_table(events, tmp / "events.parquet")
        pq.write_table(items, tmp / "items.parquet")
        write_manifest(tmp, stage="synth", spec_hash=spec_hash, inputs={}, started=started,
                       counts={"users": spec.synth.users, "items": spec.synth.items, "events": events.num_rows})
    say(f"synth: {spec.synth.users:,} users, {spec.synth.items:,} items, {events.num_rows:,} events -> {out}")
    return out
