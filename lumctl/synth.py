"""`lumctl synth`: a synthetic behaviour log with known structure, the embedded default.

Two shapes, chosen by `[synth] kind`.

kind = "scenarios" (default): a small log, deterministic from `seed`.
- items belong to `categories`; within a category, item popularity is Zipf(`zipf`);
- each user has, for every scenario, its own `tastes` preferred categories (scenario-dependent
  taste: knowing the scenario tells which categories the user will pick);
- each event: a scenario (the user's scenario mix), then with probability `focus` an item from
  one of that scenario's preferred categories, else an item by global popularity; the rating is
  high (4-5) for preferred-category items and low-to-mid (1-3) otherwise;
- timestamps increase per user from a random start (one event every few minutes to days).
Written as `stores/<experiment>/synth/events.parquet` (user, item, timestamp, scenario, rating)
and `items.parquet` (item, category), which `tokenize` reads with `format = "synth"`.

kind = "taobao": a log shaped like Taobao UserBehavior.csv, `rows` events, any size.
- catalogue: `items` items, each in one of `categories` categories; category sizes are
  lognormal (heavy-tailed); item popularity is lognormal too (ITEM_SIGMA: a few items
  with tens of thousands of rows at 100M, many seen once or not at all), and a category's
  popularity is the sum of its items';
- users: events per user are lognormal (median ~60, a few users with thousands, at least 1),
  rescaled so the counts sum to exactly `rows`;
- tastes: each user prefers TASTES categories drawn by category popularity, with weights
  TASTE_WEIGHTS; an event is "focused" with probability FOCUS and then picks one of those
  categories and an item by popularity inside it, else an item by global popularity;
- behaviour: pv / cart / fav / buy in the real shares (89.5 / 5.5 / 2.9 / 2.0 %), with
  cart / fav / buy NONPV_LIFT times as likely on focused events as on the others, so the
  (behaviour, category) condition tells about the user;
- time: 9 days, 2017-11-25 00:00 to 2017-12-03 23:59:59 UTC+8. A user acts in visits (one per
  VISIT_EVENTS events); a visit starts on a day (the last two days busier) at an hour drawn
  from a daily rhythm (quiet at night, busy in the evening, local time) and its events follow it
  by exponential offsets (mean VISIT_SECONDS); each user's events are in time order, except
  OUTLIER_SHARE of rows whose timestamp lies days to years outside the 9 days (as in the real file);
- raw ids are random integers, not 0..N: user ids below ~1.03 * users, item and category ids
  below ~1.03 * items (at 100M rows about the real file's ranges: ~1.02M and ~5.16M).
Each user's events are one contiguous block of rows. Users are generated BLOCK_USERS at a time,
each block from its own random stream (seed, block index), and written chunk by chunk (whole
blocks, up to `chunk_rows` events), so memory is bounded by `chunk_rows` plus the catalogue and
the output does not depend on `chunk_rows`. Written as `stores/<experiment>/synth/UserBehavior.csv`
(user_id,item_id,category_id,behavior_type,timestamp; integers and pv/cart/fav/buy; no header),
which `tokenize` reads with `format = "taobao"`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from lumctl.progress import progress, say
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


# ------------------------------------------------------------------------------ kind = "taobao"
START, END = 1511539200, 1512316799            # 2017-11-25 00:00:00 .. 2017-12-03 23:59:59 UTC+8
BEHAVIORS = ("pv", "cart", "fav", "buy")
BEHAVIOR_SHARES = np.array([89.5, 5.5, 2.9, 2.0]) / 99.9   # the real log's shares (they sum to 99.9 %)
ITEM_SIGMA = 1.8               # lognormal sigma of item popularity: top 1 % of items ~30 % of rows, top item ~0.05 %
CATEGORY_SIGMA = 1.5           # lognormal sigma of category sizes
EVENTS_SIGMA = 1.0             # lognormal sigma of events per user: median ~60 at the real mean 101.4
TASTE_WEIGHTS = np.array([0.45, 0.25, 0.18, 0.12])         # a user's preferred categories, most liked first
TASTES = len(TASTE_WEIGHTS)
FOCUS = 0.8                    # share of events in the user's preferred categories
NONPV_LIFT = 3.0               # cart/fav/buy are this many times as likely on focused events
VISIT_EVENTS = 8               # a visit per this many events of a user
VISIT_SECONDS = 900            # mean offset of an event from its visit's start
DAY_WEIGHTS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.3, 1.3])   # the last two days are busier
HOUR_WEIGHTS = np.array([      # local hour 0..23: quiet at night, busy in the evening
    3.0, 1.6, 0.9, 0.6, 0.5, 0.6, 1.1, 2.2, 3.3, 4.0, 4.4, 4.5,
    4.6, 4.4, 4.5, 4.6, 4.5, 4.4, 4.6, 5.4, 6.3, 6.8, 6.3, 4.8])
OUTLIER_SHARE = 1e-5           # rows with a timestamp days to years outside the 9 days
OUTLIER_SECONDS = (86_400, 15 * 365 * 86_400)  # 1 day to 15 years away (still < 2^31)
BLOCK_USERS = 2048             # users per random stream (~200k rows); fixed, so the log does not depend on chunk_rows


def _cum(w: np.ndarray) -> np.ndarray:
    """Cumulative distribution for `np.searchsorted(cdf, u, side="right")` with u ~ U[0, 1)."""
    c = np.cumsum(w / w.sum())
    c[-1] = np.inf  # float round-off never points past the last bin
    return c


@dataclass
class Catalogue:
    """What all user blocks share; O(users + items) memory, not O(rows). Items are ordered by category."""

    user_id: np.ndarray      # [users] raw user ids, in file order
    user_events: np.ndarray  # [users] events per user, sums to rows
    item_id: np.ndarray      # [items] raw item ids
    item_cat: np.ndarray     # [items] category index, non-decreasing
    cat_id: np.ndarray       # [categories] raw category ids
    pop: np.ndarray          # [items] cumulative popularity (item order)
    cat_first: np.ndarray    # [categories] first item of the category
    cat_last: np.ndarray     # [categories] last item of the category
    pop_lo: np.ndarray       # [categories] cumulative popularity before the category's first item
    pop_hi: np.ndarray       # [categories] cumulative popularity at its last item


def user_counts(rng: np.random.Generator, users: int, rows: int) -> np.ndarray:
    """Lognormal events per user, each >= 1, summing to exactly `rows`. [users] int64"""
    mean = rows / users
    x = rng.lognormal(np.log(mean) - EVENTS_SIGMA**2 / 2, EVENTS_SIGMA, users)
    x *= rows / x.sum()
    n = np.maximum(1, np.floor(x)).astype(np.int64)
    diff = rows - int(n.sum())
    if diff > 0:  # the largest fractional parts get one more event
        n[np.argsort(np.floor(x) - x, kind="stable")[:diff]] += 1
    while diff < 0:  # lifting zeros to one overshot: the heaviest users give one back
        top = np.argsort(-n, kind="stable")[:-diff]
        n[top[n[top] > 1]] -= 1
        diff = rows - int(n.sum())
    return n


def taobao_catalogue(s: SynthSpec) -> Catalogue:
    rng = np.random.default_rng([s.seed, 0])
    n_users, n_items, n_cats = s.users, s.items, s.categories
    user_id = rng.choice(int(n_users * 1.03) + 1, n_users, replace=False) + 1
    user_events = user_counts(rng, n_users, s.rows)
    id_space = int(n_items * 1.03) + 1
    item_id = rng.choice(id_space, n_items, replace=False) + 1
    cat_id = rng.choice(id_space, n_cats, replace=False) + 1
    size = rng.lognormal(0.0, CATEGORY_SIGMA, n_cats)  # heavy-tailed category sizes
    rest = np.searchsorted(_cum(size), rng.random(n_items - n_cats), side="right")
    item_cat = np.sort(np.concatenate([np.arange(n_cats), rest]))  # [items] every category has >= 1 item
    pop = np.cumsum(rng.lognormal(0.0, ITEM_SIGMA, n_items))  # heavy-tailed item popularity
    cat_first = np.searchsorted(item_cat, np.arange(n_cats))
    cat_last = np.searchsorted(item_cat, np.arange(n_cats), side="right") - 1
    pop_lo = np.where(cat_first > 0, pop[cat_first - 1], 0.0)
    return Catalogue(user_id, user_events, item_id, item_cat, cat_id, pop, cat_first, cat_last, pop_lo, pop[cat_last])


def taobao_block(s: SynthSpec, cat: Catalogue, b: int) -> tuple[pa.Table, np.ndarray]:
    """Events of users [b * BLOCK_USERS, (b + 1) * BLOCK_USERS), from their own random stream.
    Returns the rows (user by user, each user's in time order) and the item of each row."""
    rng = np.random.default_rng([s.seed, 1, b])
    users = slice(b * BLOCK_USERS, (b + 1) * BLOCK_USERS)
    n = cat.user_events[users]                                    # [U] events per user
    n_rows = int(n.sum())
    user = np.repeat(np.arange(len(n)), n)                        # [T] block-local user of each row

    # items: a focused row picks one of the user's preferred categories, then an item by popularity in it
    tastes = cat.item_cat[np.searchsorted(cat.pop, rng.random((len(n), TASTES)) * cat.pop[-1])]  # [U, TASTES]
    focused = rng.random(n_rows) < FOCUS                          # [T]
    c = tastes[user, np.searchsorted(_cum(TASTE_WEIGHTS), rng.random(n_rows), side="right")]       # [T]
    lo = np.where(focused, cat.pop_lo[c], 0.0)
    hi = np.where(focused, cat.pop_hi[c], cat.pop[-1])
    x = lo + rng.random(n_rows) * (hi - lo)                      # [T] a point on the popularity axis
    order = np.argsort(x)  # looked up in order, the catalogue stays in cache: ~7x faster at 5M items
    item = np.empty(n_rows, np.int64)
    item[order] = np.searchsorted(cat.pop, x[order], side="right")
    item = np.clip(item, np.where(focused, cat.cat_first[c], 0), np.where(focused, cat.cat_last[c], len(cat.pop) - 1))

    # behaviour: cart/fav/buy NONPV_LIFT times as likely on focused rows, the overall shares kept
    nonpv = 1.0 - BEHAVIOR_SHARES[0]
    base = nonpv / (FOCUS * NONPV_LIFT + 1.0 - FOCUS)
    acted = rng.random(n_rows) < np.where(focused, NONPV_LIFT * base, base)
    which = 1 + np.searchsorted(_cum(BEHAVIOR_SHARES[1:]), rng.random(n_rows), side="right")
    behavior = np.where(acted, which, 0)                          # [T] index into BEHAVIORS

    # time: visits start on a (weighted) day at a rhythm-weighted hour; rows follow their visit's start
    visits = 1 + (n - 1) // VISIT_EVENTS                      # [U]
    first = np.cumsum(visits) - visits
    sid = first[user] + (rng.random(n_rows) * visits[user]).astype(np.int64)  # [T]
    n_visits = int(visits.sum())
    day = np.searchsorted(_cum(DAY_WEIGHTS), rng.random(n_visits), side="right")
    hour = np.searchsorted(_cum(HOUR_WEIGHTS), rng.random(n_visits), side="right")
    start = START + day * 86_400 + hour * 3_600 + rng.integers(0, 3_600, n_visits)  # [S]
    offset = rng.exponential(VISIT_SECONDS, n_rows).astype(np.int64)
    ts = start[sid] + offset
    ts = np.clip(np.where(ts > END, start[sid] - offset, ts), START, END)  # a visit at the very end runs backwards
    # rows of a user are exchangeable, so sorting the times alone puts each user's rows in time order
    ts = START + (np.sort(user.astype(np.int64) << 20 | (ts - START)) & ((1 << 20) - 1))  # 9 days < 2^20 s
    k = rng.binomial(n_rows, OUTLIER_SHARE)
    if k:
        at = rng.integers(0, n_rows, k)
        gap = rng.integers(*OUTLIER_SECONDS, k)
        ts[at] = np.where(rng.random(k) < 0.5, START - gap, END + gap)

    table = pa.table({
        "user_id": cat.user_id[users][user],
        "item_id": cat.item_id[item],
        "category_id": cat.cat_id[cat.item_cat[item]],
        "behavior_type": pa.array(BEHAVIORS).take(pa.array(behavior)),
        "timestamp": ts,
    })
    return table, item


def write_taobao(s: SynthSpec, path: Path) -> dict[str, int]:
    """Stream the log into `path` chunk by chunk (whole user blocks, at most ~chunk_rows rows); returns counts."""
    cat = taobao_catalogue(s)
    n_blocks = -(-len(cat.user_id) // BLOCK_USERS)
    block_rows = np.add.reduceat(cat.user_events, np.arange(n_blocks) * BLOCK_USERS)
    seen = np.zeros(len(cat.item_id), bool)
    options = pcsv.WriteOptions(include_header=False, quoting_style="none", batch_size=1 << 16)
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()), ("category_id", pa.int64()),
                        ("behavior_type", pa.string()), ("timestamp", pa.int64())])
    with pcsv.CSVWriter(str(path), schema, write_options=options) as writer, progress() as bar:
        task = bar.add_task("synth", total=s.rows, info="rows")
        b = 0
        while b < n_blocks:
            chunk, rows = [], 0
            while b < n_blocks and (not chunk or rows + block_rows[b] <= s.chunk_rows):
                table, item = taobao_block(s, cat, b)
                seen[item] = True
                chunk.append(table)
                rows += table.num_rows
                b += 1
            writer.write_table(pa.concat_tables(chunk))
            bar.update(task, advance=rows)
    return {"rows": s.rows, "users": len(cat.user_id), "items": int(seen.sum()),
            "categories": len(np.unique(cat.item_cat[seen])), "bytes": path.stat().st_size}


def synth_hash(s: SynthSpec) -> str:
    """Hash of what the log depends on: each kind's own fields (chunk_rows does not change the log);
    for kind = "scenarios" the same as Spec.section_hash("synth") over those fields."""
    own = {"scenarios", "events_per_user", "tastes", "focus", "zipf"} if s.kind == "scenarios" else {"kind", "rows"}
    other = {"kind", "rows", "chunk_rows", "scenarios", "events_per_user", "tastes", "focus", "zipf"} - own
    d = {"synth": s.model_dump(mode="json", exclude=other)}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def run(spec: Spec, force: bool = False) -> Path:
    out = spec.store("synth")
    started = time.time()
    spec_hash = synth_hash(spec.synth)
    if not force and is_up_to_date(out, spec_hash, {}):
        say(f"synth: {out} is up to date")
        return out
    if spec.synth.kind == "taobao":
        with atomic_dir(out) as tmp:
            counts = write_taobao(spec.synth, tmp / "UserBehavior.csv")
            write_manifest(tmp, stage="synth", spec_hash=spec_hash, inputs={}, started=started, counts=counts)
        c = counts
        say(f"synth: {c['rows']:,} rows, {c['users']:,} users, {c['items']:,} items, {c['categories']:,} categories, "
            f"{c['bytes'] / 2**20:,.0f} MiB in {time.time() - started:.1f}s -> {out / 'UserBehavior.csv'}")
        return out
    events, items = generate(spec.synth)
    with atomic_dir(out) as tmp:
        pq.write_table(events, tmp / "events.parquet")
        pq.write_table(items, tmp / "items.parquet")
        write_manifest(tmp, stage="synth", spec_hash=spec_hash, inputs={}, started=started,
                       counts={"users": spec.synth.users, "items": spec.synth.items, "events": events.num_rows})
    say(f"synth: {spec.synth.users:,} users, {spec.synth.items:,} items, {events.num_rows:,} events -> {out}")
    return out
