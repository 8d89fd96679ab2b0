"""Next-item retrieval evaluation: full ranking over the item catalogue, the user's history filtered.

Each evaluated user's held-out event (the first valid or the first test event) is predicted from
the most recent `max_items - 1` events before it; its condition is the query condition, never its
own. The held-out item's rank is the number of candidate items scored strictly higher (a tie
counts for the held-out item); candidates are all items from id 2 except those already in the
user's history (the held-out item itself always stays a candidate).

Memory grows with the evaluated users (a `users` sample bounds it) and with settings, never with
users x items:
  - eval rows are planned for all evaluated users at once (one int per user) and filled and run
    `batch_rows` rows at a time, reading only those users' events;
  - the evaluated users' packed events and history items are read once and kept between the
    evaluations of a run; the user vectors (U, D) and the normalised item table (I, D), fp32;
  - scores are computed `user_batch` users x `item_block` items at a time, the rank counted
    block by block. With item_block >= I this is the single (user_batch, I) product.
`[pretrain.eval] users = N` scores a fixed random sample of N users (seeded by `sample_seed`: the
same users at every evaluation and in every run on the same data); the metrics then say
`users_sampled: "N of M"`.

Conditioned requests (`evaluate_requests`, `[pretrain.eval] requests`): the condition is part of the
request, as in a search or browse setting. Each user makes requests (user, c) for values c of one
condition field, chosen from the events before the test split only; the positives of a request are
the user's test-window events with value c, ranked among the request's candidates (an item-attribute
field restricts every model's candidates to the items with value c). The same blocks as above: user
vectors `batch_rows` rows at a time (for each value, only the users that request it), scores
`user_batch` (request, positive) pairs x `item_block` items at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from lumctl.attention import make_mask
from lumctl.batch import to_batch
from lumctl.metrics import request_metrics, retrieval_metrics
from lumctl.ops.packing import assign_rows, pack_sequences
from lumctl.ops.packing import fill_rows as fill_packed_rows

FIRST_ITEM = 2  # ids 0 and 1 are padding and unknown: never candidates
ROW_KEYS = ("type", "item", "cond", "segment", "pos", "loss_mask", "target", "user", "ts")


# ------------------------------------------------------------------------------------ users
def open_store(store) -> dict:
    """A tokenize store's arrays keyed by path (the layout of lumctl.stages.tokenize): `events/*`
    stay on disk as zarr arrays, read in slices by the evaluation; the rest is loaded as numpy."""
    from lumctl import zarrio
    from lumctl.store import join, require_store
    require_store(store, "tokenize")
    g = zarrio.open_read(join(store, "data.zarr"))  # a path or an fsspec URL
    return zarrio.load_groups(g, ("events", "users", "items", "vocab"), lazy=("events",))


def held_out_users(data: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(users [U] that have a held-out event in `split` and at least one event before it,
    end [U]: the held-out event's index within each user's events)."""
    offsets, split_at = np.asarray(data["users/offsets"]), np.asarray(data["users/split"])
    n = np.diff(offsets)
    end = split_at[:, 0] if split == "valid" else split_at[:, 1]
    users = np.flatnonzero((end >= 1) & (end < n))
    return users, end[users]


def sample_users(users: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A fixed random sample of n of `users` (sorted), the same for every call with the same
    arguments; all of them when n is 0 or not smaller than their number."""
    if n <= 0 or n >= len(users):
        return users
    return np.sort(np.random.default_rng([seed, 0x5E7]).choice(users, n, replace=False))


def _ranges(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Flat indices of the ranges start[k] : start[k] + count[k], one after the other."""
    count = np.asarray(count, np.int64)
    if not len(count):
        return np.zeros(0, np.int64)
    return np.repeat(np.asarray(start, np.int64) - np.cumsum(count) + count, count) + np.arange(int(count.sum()))


def read_ranges(arr, start: np.ndarray, count: np.ndarray, window: int = 1 << 22) -> np.ndarray:
    """arr[start[k] : start[k] + count[k]] for every k, concatenated; ranges in increasing order.
    `arr` is a numpy array or a zarr array: it is read in spans of about `window` elements (one
    slice per run of ranges that starts within one window), never whole."""
    start, count = np.asarray(start, np.int64), np.asarray(count, np.int64)
    if not len(start) or not count.sum():
        return np.zeros((0, *arr.shape[1:]), arr.dtype)
    group = start // window
    cuts = np.flatnonzero(np.r_[True, group[1:] != group[:-1], True])
    parts = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        lo, hi = int(start[a]), int((start[a:b] + count[a:b]).max())
        span = np.asarray(arr[lo:hi])
        parts.append(span[_ranges(start[a:b] - lo, count[a:b])])
    return np.concatenate(parts)


@dataclass
class HeldOut:
    """The events one evaluation reads, for its users only (users in increasing order)."""

    users: np.ndarray     # [U] user index
    count: np.ndarray     # [U] events packed per user: the most recent prefix + the held-out event
    items: np.ndarray     # [P] their items, user after user (P = sum count)
    conds: np.ndarray     # [P, F] their conditions
    ts: np.ndarray        # [P] their timestamps
    target: np.ndarray    # [U] held-out item
    seen_off: np.ndarray  # [U + 1] the items of user k's history are seen[seen_off[k]:seen_off[k + 1]]
    seen: np.ndarray      # [H] history items (every event before the held-out one)
    n_total: int          # users with a held-out event in the split (before sampling)


def read_held_out(data: dict, split: str, max_items: int, n_users: int = 0, seed: int = 0) -> HeldOut:
    """Read the held-out events of `split` for all users, or for a fixed sample of `n_users`."""
    users, end = held_out_users(data, split)
    n_total = len(users)
    keep = sample_users(np.arange(n_total), n_users, seed)
    users, end = users[keep], end[keep]
    base = np.asarray(data["users/offsets"])[users]
    count = np.minimum(end, max_items - 1) + 1                                        # prefix + held-out
    first = base + end + 1 - count
    items = read_ranges(data["events/item"], first, count)
    conds = (read_ranges(data["events/cond"], first, count) if "events/cond" in data   # absent: no condition fields
             else np.zeros((len(items), 0), np.int32))
    ts = read_ranges(data["events/timestamp"], first, count)
    seen = read_ranges(data["events/item"], base, end)
    return HeldOut(users, count, items, conds, ts, items[np.cumsum(count) - 1] if len(users) else items[:0],
                   np.r_[0, np.cumsum(end)].astype(np.int64), seen, n_total)


def take_users(ev: HeldOut, keep: np.ndarray) -> HeldOut:
    """The held-out events of the users ev.users[keep] (keep: increasing indices)."""
    first = np.cumsum(ev.count) - ev.count
    idx = _ranges(first[keep], ev.count[keep])
    lens = np.diff(ev.seen_off)[keep]
    return HeldOut(ev.users[keep], ev.count[keep], ev.items[idx], ev.conds[idx], ev.ts[idx], ev.target[keep],
                   np.r_[0, np.cumsum(lens)].astype(np.int64), ev.seen[_ranges(ev.seen_off[:-1][keep], lens)], ev.n_total)


def history_weights(data: dict, split: str, field: int, n_values: int, alpha: float,
                    users: np.ndarray | None = None) -> np.ndarray:
    """p(value | user) of one condition field from the user's events before the held-out one, for
    `users` (default: every user with a held-out event, as `held_out_users`), smoothed:
    (count + alpha) / (n + alpha V). Returns (U, V - 2): values from id 2."""
    w = history_counts(data, split, field, n_values, users)[:, FIRST_ITEM:n_values] + alpha
    return (w / w.sum(1, keepdims=True)).astype(np.float32)                          # (U, V - 2)


def history_counts(data: dict, split: str, field: int, n_values: int, users: np.ndarray | None = None) -> np.ndarray:
    """How often each value of one condition field occurs in the user's events before the held-out
    one, for `users` (default: every user with a held-out event, as `held_out_users`) -> (U, V) int64."""
    all_users, end = held_out_users(data, split)
    if users is not None:
        end = end[np.searchsorted(all_users, users)]
        all_users = users
    base = np.asarray(data["users/offsets"])[all_users]
    vals = read_ranges(data["events/cond"], base, end)[:, field]
    who = np.repeat(np.arange(len(all_users), dtype=np.int64), end)
    return np.bincount(who * n_values + vals, minlength=len(all_users) * n_values).reshape(-1, n_values)


# ------------------------------------------------------------------------------------ rows
@dataclass
class RowPlan:
    """Where each user's eval tokens go: rows are filled from this plan a batch at a time."""

    row: np.ndarray       # [U] row of each user
    start: np.ndarray     # [U] first token within the row
    n_rows: int
    out_pos: np.ndarray   # [U] position of the output that scores the held-out item
    by_row: np.ndarray    # [U] users ordered by row
    row_first: np.ndarray  # [n_rows + 1] users of row r are by_row[row_first[r]:row_first[r + 1]]
    first: np.ndarray     # [U] each user's first packed event in ev.items


def plan_rows(ev: HeldOut, seq_len: int, conditions: bool) -> RowPlan:
    """The best-fit packing of `pack_sequences` for these users (longest first, ties by user)."""
    count = ev.count.astype(np.int64)
    row, start, n_rows = assign_rows(count * (2 if conditions else 1), seq_len, "best_fit")
    out_pos = start + (2 * (count - 1) if conditions else count - 2)
    by_row = np.argsort(row, kind="stable")
    row_first = np.searchsorted(row[by_row], np.arange(n_rows + 1))
    return RowPlan(row, start, int(n_rows), out_pos, by_row, row_first, np.cumsum(count) - count)


def fill_rows(ev: HeldOut, plan: RowPlan, r0: int, r1: int, seq_len: int, conditions: bool,
              query_cond: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """Rows r0..r1 of the plan ([r1 - r0, S] arrays as `pack_sequences`; `user` numbers the users
    within these rows) and the users they hold (indices into ev.users)."""
    us = plan.by_row[plan.row_first[r0]:plan.row_first[r1]]
    cnt = ev.count[us].astype(np.int64)
    idx = _ranges(plan.first[us], cnt)
    conds = ev.conds[idx]                                                             # a copy: (P', F)
    local_first = np.r_[0, np.cumsum(cnt)[:-1]].astype(np.int64)
    if query_cond is not None and conds.shape[1] and len(us):
        conds[local_first + cnt - 1] = query_cond                                     # never the held-out condition
    out = fill_packed_rows(ev.items[idx].astype(np.int32), conds, local_first, cnt, plan.row[us] - r0, plan.start[us],
                           r1 - r0, seq_len, conditions, ev.ts[idx])
    return {k: out[k] for k in ROW_KEYS}, us


def eval_rows(data: dict, split: str, max_items: int, seq_len: int, conditions: bool,
              query_cond: np.ndarray | None) -> tuple[dict, np.ndarray, np.ndarray, list[np.ndarray]]:
    """All eval rows at once (small data, tests): pack each user's prefix plus the held-out event.
    Returns (rows, (row, position) of the output that scores the held-out item per user, target
    item per user, seen items per user); `evaluate` fills the same rows a batch at a time."""
    ev = read_held_out(data, split, max_items)
    ends = np.cumsum(ev.count)
    conds = ev.conds.copy()
    if query_cond is not None and conds.shape[1] and len(ends):
        conds[ends - 1] = query_cond
    rows = pack_sequences(ev.items, conds, ends - ev.count, ev.count, seq_len, conditions, "best_fit", ev.ts)
    out_pos = rows["start"] + (2 * (ev.count - 1) if conditions else ev.count - 2)
    seen = [ev.seen[a:b] for a, b in zip(ev.seen_off[:-1], ev.seen_off[1:])]
    return rows, np.stack([rows["row"], out_pos], 1), ev.target, seen


@torch.no_grad()
def user_vectors(model, ev: HeldOut, plan: RowPlan, seq_len: int, conditions: bool, query_cond,
                 batch_rows: int, device, autocast, normalize: bool = True) -> torch.Tensor:
    """The output at each user's held-out position -> (U, D) float32, L2-normalised unless
    `normalize` is false (a model trained with [pretrain.loss] similarity = 'dot'); rows are filled
    and run `batch_rows` at a time."""
    backend = model.config.attention
    q = torch.empty(len(ev.users), model.config.d_model, device=device)
    with autocast():
        for r0 in range(0, plan.n_rows, batch_rows):
            r1 = min(plan.n_rows, r0 + batch_rows)
            rows, us = fill_rows(ev, plan, r0, r1, seq_len, conditions, query_cond)
            idx = np.arange(r1 - r0)
            if backend == "flex" and plan.n_rows >= batch_rows:  # one shape for the compiled kernels: pad with copies
                idx = np.concatenate([idx, np.full(batch_rows - len(idx), idx[-1])])
            b = to_batch(rows, idx, device, backend == "sdpa")
            out = model(b, make_mask(b, backend))                                     # (B, S, D)
            q[torch.as_tensor(us, device=device)] = out[torch.as_tensor(plan.row[us] - r0),
                                                        torch.as_tensor(plan.out_pos[us])].float()
    return F.normalize(q, dim=-1) if normalize else q


# ------------------------------------------------------------------------------------ ranking
def rank_in_blocks(score, target: np.ndarray, seen_off: np.ndarray, seen: np.ndarray, n_items: int,
                   item_block: int, user_batch: int, device) -> np.ndarray:
    """0-based rank of each user's target among the candidate items, scored in blocks.

    score(users, i0, i1) -> a new (n, i1 - i0) tensor (modified here): scores of items i0..i1 for
    `users` (a slice or a long tensor of user indices). target [U] item ids; seen_off [U + 1] / seen [H] each user's history
    items (not candidates; the target itself stays one). Memory: user_batch x item_block scores.
    The target's score comes from the product of its own block, so with item_block >= n_items it
    is exactly the single full-matrix computation."""
    U = len(target)
    ranks = np.zeros(U, np.int64)
    blocks = [(i0, min(n_items, i0 + item_block)) for i0 in range(0, n_items, item_block)]
    for u0 in range(0, U, user_batch):
        u1 = min(U, u0 + user_batch)
        n = u1 - u0
        t = torch.as_tensor(target[u0:u1], device=device, dtype=torch.long)           # (n,)
        lens = np.diff(seen_off[u0:u1 + 1])
        h_row = torch.as_tensor(np.repeat(np.arange(n), lens), device=device)          # (H_b,)
        h_item = torch.as_tensor(seen[seen_off[u0]:seen_off[u1]], device=device, dtype=torch.long)
        # 1. the target's score: the blocks that hold targets, for the users whose target is there
        pos = torch.empty(n, device=device)
        kept = None  # a block computed for all n users is reused by step 2
        for i0, i1 in blocks:
            sel = torch.nonzero((t >= i0) & (t < i1))[:, 0]
            if not len(sel):
                continue
            s = score(slice(u0, u1) if len(sel) == n else sel + u0, i0, i1)          # (n_sel, B)
            pos[sel] = s.gather(1, (t[sel] - i0)[:, None])[:, 0]
            if len(sel) == n:
                kept = (i0, s)
        # 2. count the candidates scored strictly higher, block by block
        count = torch.zeros(n, dtype=torch.long, device=device)
        for i0, i1 in blocks:
            s = kept[1] if kept is not None and kept[0] == i0 else score(slice(u0, u1), i0, i1)  # (n, B)
            if i0 < FIRST_ITEM:
                s[:, :FIRST_ITEM - i0] = float("-inf")
            h = (h_item >= i0) & (h_item < i1)
            s[h_row[h], h_item[h] - i0] = float("-inf")                               # filter the history ...
            in_b = torch.nonzero((t >= i0) & (t < i1))[:, 0]
            s[in_b, t[in_b] - i0] = float("-inf")                                     # ... the target is `pos`
            count += (s > pos[:, None]).float().sum(1).long()  # exact: a block has < 2^24 items; faster than a long sum
        ranks[u0:u1] = count.cpu().numpy()
    return ranks


def rank_full_ref(scores: torch.Tensor, target: np.ndarray, seen: list[np.ndarray]) -> np.ndarray:
    """Reference twin of `rank_in_blocks`: the whole (U, I) score matrix at once."""
    scores = scores.clone()
    scores[:, :FIRST_ITEM] = float("-inf")
    t = torch.as_tensor(target, dtype=torch.long)
    pos = scores.gather(1, t[:, None])
    for u, items in enumerate(seen):
        scores[u, torch.as_tensor(items, dtype=torch.long)] = float("-inf")
    scores.scatter_(1, t[:, None], pos)
    return (scores > pos).sum(1).numpy()


@torch.no_grad()
def item_keys(model, item_block: int, device, autocast, normalize: bool = True) -> torch.Tensor:
    """The item table (I, D) float32, L2-normalised unless `normalize` is false, built `item_block`
    items at a time (no transient copies of the whole table)."""
    n_items = model.config.n_items
    keys = torch.empty(n_items, model.config.d_model, device=device)
    with autocast():
        for i0 in range(0, n_items, item_block):
            ids = torch.arange(i0, min(n_items, i0 + item_block), device=device)
            k = model.item_table(ids).float()                                       # (B, D)
            keys[i0:i0 + len(ids)] = F.normalize(k, dim=-1) if normalize else k
    return keys


def dot_scores(q: torch.Tensor, keys: torch.Tensor):
    """score(users, i0, i1) = q . keys: the cosine similarity when both are normalised, else the
    inner product. q (U, D), keys (I, D)."""
    return lambda users, i0, i1: q[users] @ keys[i0:i1].T                            # (n, B)


def mixture_scores(qs: list[torch.Tensor], keys: torch.Tensor, logw: torch.Tensor, tau: float,
                   item_block: int, user_batch: int):
    """score(users, i0, i1) = log sum_v p(v | history) p(item | user, v); qs V tensors (U, D), one
    per value v; logw (U, V) log p(v | history); p(item | user, v) the softmax over items from id 2
    at temperature tau, its normaliser accumulated over item blocks."""
    U, I = len(logw), len(keys)
    lse = torch.full((U, len(qs)), float("-inf"), device=keys.device)                # (U, V)
    for u0 in range(0, U, user_batch):
        u1 = min(U, u0 + user_batch)
        for i0 in range(FIRST_ITEM, I, item_block):
            k = keys[i0:min(I, i0 + item_block)]
            blk = torch.stack([torch.logsumexp(qv[u0:u1] @ k.T / tau, -1) for qv in qs], 1)  # (n, V)
            lse[u0:u1] = torch.logaddexp(lse[u0:u1], blk)

    def score(users, i0, i1):
        lp = torch.stack([qv[users] @ keys[i0:i1].T / tau for qv in qs], 1)           # (n, V, B)
        return torch.logsumexp(lp - lse[users][:, :, None] + logw[users][:, :, None], 1)  # (n, B)
    return score


@torch.no_grad()
def evaluate(model, data: dict, split: str, p, pack_spec, device, query_cond, autocast,
             cache: dict | None = None, tau: float = 1.0, cond_names: list[str] | None = None,
             ranks_out: list | None = None) -> dict:
    """Full-ranking next-item retrieval of `split` ([pretrain.eval] settings `p.eval`, packing of
    `pack_spec`). `ranks_out`, when given, receives (ranks, targets): per-user 0-based rank of the
    held-out item and its item id, both [U] (users in increasing order; the sample with
    `users = N`). `cache` keeps the held-out events between evaluations of a run.

    With [pretrain.eval].mixture = F, every value v of condition field F is queried (grouped
    conditions, as in LUM step 2) and items are scored by log sum_v p(v | history) p(item | user, v),
    p(item | user, v) the model's softmax over all items at temperature tau."""
    e = p.eval
    key = (split, e.users, e.sample_seed, pack_spec.max_items)
    ev = cache.get(key) if cache is not None else None
    if ev is None:
        ev = read_held_out(data, split, pack_spec.max_items, e.users, e.sample_seed)
        if cache is not None:
            cache[key] = ev
    conditions, seq_len = pack_spec.conditions, pack_spec.seq_len
    plan = plan_rows(ev, seq_len, conditions)

    model.eval()
    unit = getattr(getattr(p, "loss", None), "similarity", "cosine") == "cosine"     # as the loss scored
    keys = item_keys(model, e.item_block, device, autocast, unit)                     # (I, D)
    n_items = keys.shape[0]
    mixture = e.mixture if (query_cond is not None and cond_names) else None
    if mixture:
        f = cond_names.index(mixture)
        n_values = int(model.config.cond_vocab[f])
        qs = []
        for v in range(FIRST_ITEM, n_values):
            qc = np.array(query_cond, np.int32).copy()
            qc[f] = v
            qs.append(user_vectors(model, ev, plan, seq_len, conditions, qc, e.batch_rows, device, autocast, unit))
        logw = torch.as_tensor(np.log(history_weights(data, split, f, n_values, e.mixture_smoothing, ev.users)),
                               device=device)
        score = mixture_scores(qs, keys, logw, tau, e.item_block, e.user_batch)
    else:
        q = user_vectors(model, ev, plan, seq_len, conditions, query_cond, e.batch_rows, device, autocast, unit)
        score = dot_scores(q, keys)
    ranks = rank_in_blocks(score, ev.target, ev.seen_off, ev.seen, n_items, e.item_block, e.user_batch, device)
    model.train()
    if ranks_out is not None:
        ranks_out.append((ranks, ev.target))
    out = retrieval_metrics(ranks, e.ks)
    if len(ev.users) < ev.n_total:
        out["users_sampled"] = f"{len(ev.users)} of {ev.n_total}"
    return out


# ------------------------------------------------------------------------------------ requests
@dataclass
class Requests:
    """The requests of one task: request r asks for value `value[r]` of the field for user `user[r]`
    (an index into HeldOut.users); its positives are item[pos_off[r]:pos_off[r + 1]]."""

    user: np.ndarray      # [R]
    value: np.ndarray     # [R]
    pos_off: np.ndarray   # [R + 1]
    item: np.ndarray      # [P] positive items, request after request, ascending within a request
    formed: int           # requests formed from the history, before those without a positive were skipped


def form_requests(data: dict, split: str, field: int, n_values: int, values: str, top_k: int,
                  users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(user [R] index into `users`, value [R]): each user's requests, sorted by (user, value).
    values = 'all': every value of the field; 'history': the values of the user's events before the
    held-out one (the `top_k` most frequent, ties by value id, when top_k > 0). Reads no event from
    the held-out one on."""
    U = len(users)
    if values == "all":
        vals = np.arange(FIRST_ITEM, n_values, dtype=np.int64)
        return np.repeat(np.arange(U, dtype=np.int64), len(vals)), np.tile(vals, U)
    cnt = history_counts(data, split, field, n_values, users)[:, FIRST_ITEM:]        # (U, V - 2)
    k = cnt.shape[1] if top_k == 0 else min(top_k, cnt.shape[1])
    top = np.argsort(-cnt, axis=1, kind="stable")[:, :k]                              # (U, k) most frequent first
    keep = np.take_along_axis(cnt, top, 1) > 0
    u = np.broadcast_to(np.arange(U, dtype=np.int64)[:, None], top.shape)[keep]
    v = top[keep].astype(np.int64) + FIRST_ITEM
    order = np.lexsort((v, u))
    return u[order], v[order]


def window_events(data: dict, split: str, users: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test window of `users`: their first `window` events from the held-out one on (0 = all of
    them). Returns (count [U], item [W], cond [W, F]), user after user."""
    offsets = np.asarray(data["users/offsets"])
    all_users, end = held_out_users(data, split)
    end = end[np.searchsorted(all_users, users)]
    first = offsets[users] + end
    count = offsets[users + 1] - first
    if window:
        count = np.minimum(count, window)
    return count, read_ranges(data["events/item"], first, count), read_ranges(data["events/cond"], first, count)


def request_positives(req_user: np.ndarray, req_value: np.ndarray, win_count: np.ndarray, win_item: np.ndarray,
                      win_value: np.ndarray, seen_off: np.ndarray, seen: np.ndarray, n_values: int,
                      item_value: np.ndarray | None) -> Requests:
    """Join the requests (sorted by user, value) with the window events: the positives of (u, c) are
    u's window items whose value is c, each once, leaving out items of u's history (they are never
    candidates) and, with an item-attribute filter `item_value` [I], items whose value is not c.
    Requests without a positive are skipped."""
    U = len(win_count)
    n_items = int(max(win_item.max(initial=0), seen.max(initial=0))) + 1
    w_user = np.repeat(np.arange(U, dtype=np.int64), win_count)
    w_item, w_value = win_item.astype(np.int64), win_value.astype(np.int64)
    h_user = np.repeat(np.arange(U, dtype=np.int64), np.diff(seen_off))
    ok = ~np.isin(w_user * n_items + w_item, h_user * n_items + seen.astype(np.int64))
    if item_value is not None:
        ok &= item_value[w_item] == w_value
    rkey = req_user.astype(np.int64) * n_values + req_value                           # sorted: (user, value)
    wkey = w_user * n_values + w_value
    r = np.searchsorted(rkey, wkey)
    ok &= (r < len(rkey)) & (rkey[np.minimum(r, len(rkey) - 1)] == wkey) if len(rkey) else np.zeros_like(ok)
    pairs = np.unique(r[ok] * n_items + w_item[ok])                                   # (request, item), each once
    pr, pi = pairs // n_items, pairs % n_items
    n_pos = np.bincount(pr, minlength=len(rkey))
    kept = np.flatnonzero(n_pos > 0)
    return Requests(req_user[kept].astype(np.int64), req_value[kept].astype(np.int64),
                    np.r_[0, np.cumsum(n_pos[kept])].astype(np.int64), pi.astype(np.int64), len(rkey))


def item_values(data: dict, field: int, n_items: int, window: int = 1 << 22) -> np.ndarray:
    """[I] each item's value of an item-attribute condition field (0 for an item in no event), read
    from the events `window` at a time: the value is the item's, the same in every event."""
    out = np.zeros(n_items, np.int64)
    items, conds = data["events/item"], data["events/cond"]
    for a in range(0, items.shape[0], window):
        out[np.asarray(items[a:a + window])] = np.asarray(conds[a:a + window])[:, field]
    return out


def rank_positives(q_of, req: Requests, seen_off: np.ndarray, seen: np.ndarray, keys: torch.Tensor,
                   item_value: np.ndarray | None, item_block: int, user_batch: int, device) -> np.ndarray:
    """0-based rank [P] of every positive of every request among the request's candidates: the items
    from id 2 outside the user's history (and, with `item_value`, whose value is the requested one),
    the request's other positives included; ties count for the positive. `q_of(value)` -> (U, D) the
    normalised user vectors that answer requests for `value`. Memory: user_batch x item_block scores."""
    n_pos = np.diff(req.pos_off)
    pair_req = np.repeat(np.arange(len(req.user)), n_pos)                             # [P]
    ranks = np.zeros(len(req.item), np.int64)
    iv = torch.as_tensor(item_value, device=device) if item_value is not None else None
    for c in np.unique(req.value):
        q = q_of(int(c))                                                              # (U, D)
        pairs = np.flatnonzero(req.value[pair_req] == c)
        for a in range(0, len(pairs), user_batch):
            p = pairs[a:a + user_batch]
            pu = req.user[pair_req[p]]                                                # user of each pair
            lens = seen_off[pu + 1] - seen_off[pu]
            pu_t = torch.as_tensor(pu, device=device)

            def score(users, i0, i1):
                s = q[pu_t[users]] @ keys[i0:i1].T                                    # (n, B)
                if iv is not None:
                    s[:, iv[i0:i1] != int(c)] = float("-inf")                         # not a candidate of this request
                return s
            ranks[p] = rank_in_blocks(score, req.item[p], np.r_[0, np.cumsum(lens)].astype(np.int64),
                                      seen[_ranges(seen_off[pu], lens)], len(keys), item_block, user_batch, device)
    return ranks


@torch.no_grad()
def evaluate_requests(model, data: dict, task, p, pack_spec, device, query_cond, autocast,
                      cond_fields: list[dict], conditions: bool, out: dict | None = None) -> dict:
    """Conditioned-request retrieval on the test split ([pretrain.eval].requests `task`, a RequestSpec).

    For each evaluated user (all, or the `users` sample), requests (user, c) for values c of
    `task.field` chosen without reading the test events (`form_requests`); the positives of (user, c)
    are the user's first `task.window` test events with value c (`request_positives`); a request
    without a positive is skipped, the same for every model. Candidates: items from id 2 outside the
    user's history; for an item-attribute field only the items with value c (the request is a filter
    every model is given). Scores: a model trained with condition tokens answers with its output at a
    query condition token whose `task.field` is c (the other fields as `query_cond`); an item-only
    model with its one user vector. HR@K, NDCG@K (several positives: DCG over the positives in the top
    K / the ideal DCG) and MRR (of the best positive) are averaged over each user's requests, then over
    users. `out`, when given, receives the per-request arrays (user, value, pos_off, item, rank)."""
    e = p.eval
    names = [c["name"] for c in cond_fields]
    f = names.index(task.field)
    n_values = len(data[f"vocab/cond_{task.field}"])
    ev = read_held_out(data, "test", pack_spec.max_items, e.users, e.sample_seed)    # conds: every field, for the requests
    req_user, req_value = form_requests(data, "test", f, n_values, task.values, task.top_k, ev.users)
    win_count, win_item, win_cond = window_events(data, "test", ev.users, task.window)
    model.eval()
    keys = item_keys(model, e.item_block, device, autocast)                           # (I, D)
    item_value = item_values(data, f, len(keys)) if cond_fields[f]["source"] == "item_attr" else None
    req = request_positives(req_user, req_value, win_count, win_item, win_cond[:, f], ev.seen_off, ev.seen, n_values,
                            item_value)
    seq_len = pack_spec.seq_len
    if conditions:
        base = np.ones(len(names), np.int32) if query_cond is None else np.asarray(query_cond, np.int32)

        def q_of(c):  # only the users that request c are run
            qc = base.copy()
            qc[f] = c                                                                 # the request's value, never the held-out one
            keep = np.unique(req.user[req.value == c])
            sub = take_users(ev, keep)
            q = torch.zeros(len(ev.users), keys.shape[1], device=device)             # (U, D), rows of other users unused
            q[torch.as_tensor(keep, device=device)] = user_vectors(model, sub, plan_rows(sub, seq_len, True), seq_len, True,
                                                                   qc, e.batch_rows, device, autocast)
            return q
    else:
        ev_items = replace(ev, conds=ev.conds[:, :0])                                 # an item-only model reads no condition
        q = user_vectors(model, ev_items, plan_rows(ev_items, seq_len, False), seq_len, False, None, e.batch_rows,
                         device, autocast)
        q_of = lambda c: q                                                            # noqa: E731  the same vector for every request
    ranks = rank_positives(q_of, req, ev.seen_off, ev.seen, keys, item_value, e.item_block, e.user_batch, device)
    model.train()
    if out is not None:
        out.update(user=ev.users[req.user], value=req.value, pos_off=req.pos_off, item=req.item, rank=ranks)
    res = request_metrics(ranks, req.pos_off, req.user, e.ks)
    res.update(requests=len(req.user), positives=len(req.item), skipped_no_positive=req.formed - len(req.user),
               candidates="items with the requested value" if item_value is not None else "all items")
    if len(ev.users) < ev.n_total:
        res["users_sampled"] = f"{len(ev.users)} of {ev.n_total}"
    return res
