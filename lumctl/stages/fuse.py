"""Stage `fuse` (Step 3): DLRM backbones on the CTR protocol, with LUM answers fused in.

Samples. [fuse] samples: a labelled sample table (lumctl/samples.py: its user, item, timestamp, label,
split and extra feature columns; raw ids through the tokenize vocabularies, unseen ones counted in
metrics.json "samples"). Without it the samples derive from the tokenize store by `protocol`:
"rating": every event is an impression, label = rating >= 4; "behavior" (Taobao): one sample per
(user, item, part) at its first event, label 1 for a cart / fav / buy of the item in the part, 0 when
it was only viewed. A user's events split as the tokenize store's users/split says: train = [0, train_end),
valid = [train_end, valid_end), test = the rest. A sample's behaviour history is the user's events with a timestamp
strictly before its own (same-second events are never history of each other), the most recent
`history_len` of them; sim also searches the most recent `sim_search_len` for the target's category
(items/category, else the first genre).

LUM answers (lum != "none"). Joined point in time from the query store: the latest snapshot of the
user whose timestamp is strictly before the sample's; none -> zeros and missing = 1. Which snapshots
exist is the query store's choice:
  - [query] snapshot = "split": one snapshot before the first valid event and one before the first
    test event. Valid and test samples get answers; train samples (before the first) get none, so the
    fusion layer only sees "missing" in training - use this for serving-like evaluation only.
  - [query] snapshot = "every_n_events" (K): a snapshot after every K events, so train samples get
    answers that are at most K events old; this is what trains the fusion layer.
Leak-free LUM: with a cutoff in [tokenize.split] the LUM pretrains on each user's train events before
it (users/pretrain_end) and the DLRM (base and +LUM alike) trains on the rest of the train events;
pretrain events are still history (context) of later samples and of the query snapshots. Then no LUM
answer comes from a model that trained on the sample or on any later event of its user (valid/test
events are never pretrained on either). pretrain_fraction cuts each user's train events (every user
has a pretrained prefix and DLRM samples); pretrain_before / pretrain_quantile cut at one timestamp
T0 (users active only before T0 then have no DLRM sample and users only after it no pretrained
prefix, so train and test samples differ in how well the LUM knows their user).
Without a cutoff, pretrain trains on each user's last max_items train events, so the answers joined
to those train samples come from a model that saw the samples themselves (in-sample; the fusion layer
may over-trust them). As for the base DLRM, the per-user split is not a global time cut (other users'
train events may be later).

Output (`stores/<experiment>/fuse/`):
  metrics.json        per seed {valid, test: auc, gauc, logloss, n, pos_rate (two_tower: retrieval: recall@K,
                      users); best_epoch}, and mean / std (recall@K too); with compare_base also `base`:
                      the same for the backbone with lum = "none" trained on the same samples and seeds
  predictions.zarr/   event [S] int64 (sample table: its row), user [S] (sample table: unseen users numbered
                      from U by raw id), split [S] int8 (1 valid, 2 test), label [S] int8,
                      logit [seeds, S] float32 (valid + test samples)
  final/              the first seed's best-valid model: model.pt + config.json (DLRMConfig, [fuse] and [tokenize], inputs)
  seeds/seed-<k>/     the other seeds' models (a warm start from a base store's final/ starts seed k
                      from the base's seed k where the base trained it)
  manifest.json
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from lumctl import zarrio
from lumctl.errors import InputError
from lumctl.metrics import ctr_metrics
from lumctl.models import dlrm
from lumctl.models.dlrm import DLRM, DLRMConfig
from lumctl.progress import say
from lumctl.samples import read_samples, sample_table_hash
from lumctl.specs import FuseSpec, Spec
from lumctl.stages import tokenize
from lumctl.stages.pretrain import resolve_device
from lumctl.store import (
    atomic_dir,
    hash_file,
    hash_obj,
    is_up_to_date,
    require_checkpoint,
    require_store,
    store_hash,
    write_manifest,
)

USER_ATTRS = tokenize.USER_ATTRS


# ------------------------------------------------------------------------------------ samples
def event_parts(data: dict) -> np.ndarray:
    """[E] int8 part of every event: 0 train, 1 valid, 2 test, -1 LUM pretrain only (train events before the
    cutoff)."""
    offsets = data["users/offsets"]
    user = data["events/user"].astype(np.int64)
    j = np.arange(len(user)) - offsets[user]                           # position within the user
    sp = data["users/split"][user]
    split = np.where(j < sp[:, 0], 0, np.where(j < sp[:, 1], 1, 2)).astype(np.int8)
    if "users/pretrain_end" in data:  # cutoff: train events before it are the LUM's, not samples
        split[j < data["users/pretrain_end"][user]] = -1
    return split


def behavior_positive(data: dict, fs: FuseSpec, cond_names: list[str]) -> np.ndarray:
    """[E] bool: the event's behaviour (condition field `behavior_field`) is one of `positive`."""
    if fs.behavior_field not in cond_names:
        raise InputError("[fuse].behavior_field", f"'{fs.behavior_field}' is not a [tokenize] condition field "
                         f"(fields: {cond_names})")
    vocab = [str(v) for v in data[f"vocab/cond_{fs.behavior_field}"]]
    ids = [k for k, v in enumerate(vocab) if v in fs.positive]
    if not ids:
        raise InputError("[fuse].positive", f"none of {fs.positive} is a value of '{fs.behavior_field}' "
                         f"(values: {vocab[2:]})")
    return np.isin(data["events/cond"][:, cond_names.index(fs.behavior_field)], ids)


def event_labels(data: dict, fs: FuseSpec | None = None, cond_names: list[str] = ()) -> np.ndarray | None:
    """[E] float32 like/dislike of every event (rating >= 4, or a positive behaviour), None when unknown."""
    if fs is not None and fs.protocol == "behavior":
        return behavior_positive(data, fs, list(cond_names)).astype(np.float32)
    if "events/rating" in data:
        return (data["events/rating"] >= 4).astype(np.float32)
    if fs is not None and fs.behavior_field in cond_names:
        return behavior_positive(data, fs, list(cond_names)).astype(np.float32)
    return None


def samples(data: dict, fs: FuseSpec | None = None, cond_names: list[str] = ()) -> dict[str, np.ndarray]:
    """The samples derived from the tokenize store: user, item, label, split (0 train, 1 valid, 2 test, -1 LUM
    pretrain only), ts, event (the sample's event index), history bounds [user_start, hist_end).

    protocol "rating": one sample per event, label = rating >= 4. protocol "behavior": one sample per
    (user, item, part) at the pair's first event of the part, label 1 when any of the pair's events in
    the part has a positive behaviour (cart / fav / buy), 0 when the item was only viewed."""
    protocol = fs.protocol if fs is not None else "rating"
    if protocol == "rating" and "events/rating" not in data:
        raise InputError("[fuse]", "the CTR protocol needs ratings (label = rating >= 4); the log has none "
                         "(protocol = \"behavior\" labels by behaviour type)")
    offsets, ts = data["users/offsets"], data["events/timestamp"]
    user = data["events/user"].astype(np.int64)
    item = data["events/item"].astype(np.int64)
    split = event_parts(data)
    tie_first, _ = tokenize.tie_groups(offsets, ts)
    if protocol == "rating":
        ev = np.arange(len(ts))
        label = (data["events/rating"] >= 4).astype(np.float32)
    else:  # one sample per (user, part, item): sort by it, first event and any-positive per group
        pos = behavior_positive(data, fs, list(cond_names))
        order = np.lexsort((np.arange(len(ts)), item, split, user))
        ou, op, oi = user[order], split[order], item[order]
        start = np.flatnonzero(np.r_[True, (ou[1:] != ou[:-1]) | (op[1:] != op[:-1]) | (oi[1:] != oi[:-1])])
        first = order[start]
        label_g = np.maximum.reduceat(pos[order], start).astype(np.float32)
        keep = np.argsort(first, kind="stable")                        # back to event order
        ev, label = first[keep], label_g[keep]
    return {"user": user[ev], "item": item[ev], "label": label, "split": split[ev], "event": ev.astype(np.int64),
            "hist_end": tie_first[ev].astype(np.int64),                # history = [user start, hist_end)
            "user_start": offsets[user[ev]].astype(np.int64), "ts": ts[ev].astype(np.int64)}


def search_category(data: dict) -> np.ndarray | None:
    """[I] the category sim searches by: items/category, else the first genre (+2; 0 = none)."""
    if "items/category" in data:
        return data["items/category"].astype(np.int64)
    if "items/genres" in data:
        g = data["items/genres"]
        return np.where(g.any(1), g.argmax(1) + 2, 0).astype(np.int64)
    return None


def history(ev_item: np.ndarray, start: np.ndarray, end: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """The last L events of [start, end) per sample, right-aligned: items (B, L) and mask (B, L)."""
    idx = end[:, None] - L + np.arange(L)                              # (B, L)
    ok = idx >= start[:, None]
    return np.where(ok, ev_item[np.clip(idx, 0, None)], 0), ok


def hard_search(ev_item: np.ndarray, cat: np.ndarray, start: np.ndarray, end: np.ndarray, target: np.ndarray,
                W: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """SIM hard search: among the last W events of [start, end), the last L whose item shares the
    target's category; right-aligned (B, L)."""
    items, ok = history(ev_item, start, end, W)                        # (B, W)
    keep = ok & (cat[items] == cat[target][:, None]) & (cat[target][:, None] > 0)
    key = np.where(keep, np.arange(W), -1)
    sel = np.sort(key, 1)[:, -L:]                                      # (B, L) positions, kept ones last
    got = sel >= 0
    return np.where(got, np.take_along_axis(items, np.clip(sel, 0, None), 1), 0), got


# ------------------------------------------------------------------------------------ LUM join
def load_answers(store: Path) -> dict[str, np.ndarray]:
    """The query store as fuse reads it, keyed by its array paths (lumctl.stages.query has the layout;
    query.compute returns the same dict): users/snap_offsets [U+1] and user_index [U] per answers row,
    snap/ts [S] and snap/emb [S, N, d] per snapshot row (a user's rows oldest first), item_emb [I, d]
    from the checkpoint's item store that the answers name."""
    g = zarrio.open_read(Path(store) / "answers.zarr")
    items = Path(store) / g.attrs["items"]
    require_store(items, "query")                                       # the checkpoint's item store
    return {**{k: zarrio.get(g, k) for k in ("users/snap_offsets", "user_index", "snap/ts", "snap/emb")},
            "item_emb": zarrio.get(zarrio.open_read(items / "item_emb.zarr"), "item_emb")}


def answers_shape(ans: dict) -> tuple[int, int]:
    """(N queries, d) of the answers."""
    _, N, D = ans["snap/emb"].shape
    return int(N), int(D)


def snapshot_answers(ans: dict, row: np.ndarray) -> np.ndarray:
    """The answers [B, N, d] of snapshot rows `row` [B] (from join_snapshots)."""
    if not len(ans["snap/emb"]):  # a store without snapshots: every sample has none
        return np.zeros((len(row), *ans["snap/emb"].shape[1:]), np.float32)
    return ans["snap/emb"][row]


def join_snapshots(ans: dict, user: np.ndarray, ts: np.ndarray, n_users: int, chunk: int = 1 << 18):
    """Per sample (tokenize-store user, timestamp): (snapshot row, has) of the user's latest snapshot
    with timestamp < ts (row 0 where it has none). A vectorised binary search over each user's rows."""
    so, snap_ts = ans["users/snap_offsets"], ans["snap/ts"]
    row_of = np.full(n_users, -1, np.int64)
    row_of[ans["user_index"]] = np.arange(len(ans["user_index"]))
    row = np.zeros(len(user), np.int64)
    has = np.zeros(len(user), bool)
    for a in range(0, len(user), chunk):
        r, t = row_of[user[a:a + chunk]], ts[a:a + chunk]
        lo = np.where(r >= 0, so[np.maximum(r, 0)], 0)
        first = lo.copy()
        hi = np.where(r >= 0, so[np.maximum(r, 0) + 1], 0)               # rows [lo, hi) of the user
        while (active := lo < hi).any():                                # first row with snap_ts >= t
            mid = (lo + hi) // 2
            before = active & (snap_ts[np.minimum(mid, len(snap_ts) - 1)] < t)
            lo = np.where(before, mid + 1, lo)
            hi = np.where(active & ~before, mid, hi)
        has[a:a + chunk] = lo > first
        row[a:a + chunk] = np.where(lo > first, lo - 1, 0)
    return row, has


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.nan_to_num(x.astype(np.float32))
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


# ------------------------------------------------------------------------------------ features
class Features:
    """Builds model batches for sample indices (numpy in, torch out). `s` is a sample table's samples
    (lumctl.samples.read_samples: user -1 = unseen, item 1 = unknown, extra_* features); by default the
    samples the rating protocol derives from the store."""

    def __init__(self, data: dict, fs: FuseSpec, ans: dict | None = None, s: dict | None = None,
                 cond_names: list[str] = ()):
        self.fs, self.ans = fs, ans
        self.s = s if s is not None else samples(data)
        self.ev_item = data["events/item"].astype(np.int64)
        like = event_labels(data, fs, cond_names) if fs.backbone == "hstu" else None
        self.ev_action = (like.astype(np.int64) + 1 if like is not None      # past labels: 1 not liked, 2 liked
                          else np.ones(len(self.ev_item), np.int64))
        self.attrs = [a for a in USER_ATTRS if f"users/{a}" in data]
        self.user_attr = (np.stack([data[f"users/{a}"] for a in self.attrs], 1).astype(np.int64)
                          if self.attrs else np.zeros((len(data["users/offsets"]) - 1, 0), np.int64))
        self.cat = search_category(data)
        S = len(self.s["item"])
        self.sim_hist = None
        if fs.backbone == "sim" and self.cat is None:
            raise InputError("[fuse].backbone", "sim searches by item category or genre; the store has neither")
        if fs.backbone == "sim" and S * fs.history_len * 5 <= fs.cache_mib << 20:
            # the hard search is a pure function of the sample: run it once, not per epoch (when it fits)
            L = fs.history_len
            self.sim_hist, self.sim_mask = np.zeros((S, L), np.int32), np.zeros((S, L), bool)
            for a in range(0, S, 1 << 14):
                i = np.arange(a, min(S, a + (1 << 14)))
                self.sim_hist[i], self.sim_mask[i] = hard_search(
                    self.ev_item, self.cat, self.s["user_start"][i], self.s["hist_end"][i], self.s["item"][i],
                    fs.sim_search_len, L)
        if ans is not None:
            known = self.s["user"] >= 0                                     # unseen users have no answers
            self.lum_row, self.lum_has = join_snapshots(
                ans, np.where(known, self.s["user"], 0), self.s["ts"], len(data["users/offsets"]) - 1)
            self.lum_has &= known
            self.item_lum = _unit(ans["item_emb"])                          # (I, D)

    def numpy(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        s, fs = self.s, self.fs
        start, end = s["user_start"][idx], s["hist_end"][idx]
        target = s["item"][idx]
        hist, hmask = history(self.ev_item, start, end, fs.history_len)
        u = s["user"][idx]
        attr = np.where((u >= 0)[:, None], self.user_attr[np.maximum(u, 0)], 1)    # unseen user: unknown profile
        out = {"user_attr": attr, "item": target, "hist": hist, "hist_mask": hmask}
        if fs.backbone == "hstu":  # the actions of the history events (1 not liked, 2 liked; 0 pad)
            act, _ = history(self.ev_action, start, end, fs.history_len)
            out["hist_action"] = act
        if fs.backbone == "sim" and self.sim_hist is not None:
            out["sim_hist"], out["sim_mask"] = self.sim_hist[idx].astype(np.int64), self.sim_mask[idx]
        elif fs.backbone == "sim":
            h, m = hard_search(self.ev_item, self.cat, start, end, target, fs.sim_search_len, fs.history_len)
            out["sim_hist"], out["sim_mask"] = h.astype(np.int64), m
        for k in ("extra_cat", "extra_multi"):
            if k in s:
                out[k] = s[k][idx].astype(np.int64)
        if "extra_num" in s:
            out["extra_num"] = s["extra_num"][idx]
        if fs.backbone == "twin":  # the long history the GSU searches
            out["long_hist"], out["long_mask"] = history(self.ev_item, start, end, fs.twin_search_len)
        if self.ans is not None:
            has = self.lum_has[idx]
            o = _unit(snapshot_answers(self.ans, self.lum_row[idx]))           # (B, N, D)
            out["lum"] = np.where(has[:, None, None], o, 0).astype(np.float32)
            out["lum_item"] = self.item_lum[target]
            out["lum_missing"] = (~has).astype(np.float32)
        return out

    def without_lum(self) -> Features:
        """The same samples and features without the LUM answers (the base model's batches)."""
        base = copy.copy(self)
        base.fs, base.ans = self.fs.model_copy(update={"lum": "none"}), None
        return base

    def batch(self, idx: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in self.numpy(idx).items()}


# ------------------------------------------------------------------------------------ model
def model_config(data: dict, fs: FuseSpec, feats: Features) -> DLRMConfig:
    N = D = 0
    if feats.ans is not None:
        N, D = answers_shape(feats.ans)
    return DLRMConfig(backbone=fs.backbone, n_items=len(data["vocab/item"]),
                      n_categories=len(data["vocab/category"]) if "items/category" in data else 0,
                      n_genres=int(data["items/genres"].shape[1]) if "items/genres" in data else 0,
                      user_vocab=[len(data[f"vocab/user_{a}"]) for a in feats.attrs], d_emb=fs.d_emb,
                      mlp=list(fs.mlp), lum=fs.lum, n_queries=int(N), d_lum=int(D), temperature=fs.temperature,
                      activation=fs.activation, att_norm=fs.att_norm, history_len=fs.history_len,
                      twin_top_k=fs.twin_top_k, twin_heads=fs.twin_heads)


def build_model(cfg: DLRMConfig, data: dict) -> DLRM:
    cat = torch.from_numpy(data["items/category"].astype(np.int64)) if "items/category" in data else None
    gen = torch.from_numpy(data["items/genres"].astype(np.float32)) if "items/genres" in data else None
    return dlrm.build(cfg, cat, gen)


NO_WARM = "[fuse].init_from: no fuse checkpoint here (model.pt + config.json)"


def warm_checkpoint(path: Path, seed: int) -> Path:
    """The checkpoint that warm-starts seed `seed`: when `path` is the final/ of a fuse store that also
    trained this seed (seeds/seed-<seed>), that seed's model, so seed k continues base seed k; else `path`."""
    require_checkpoint(path, NO_WARM)
    own = path.parent / "seeds" / f"seed-{seed}"
    if path.name == "final" and json.loads((path / "config.json").read_text()).get("seed") != seed \
            and (own / "model.pt").is_file():
        return own
    return path


def warm_start(model: DLRM, path: Path) -> None:
    """Load a (base) fuse checkpoint; only the zero-initialised lum_* layers may be absent from it."""
    path = require_checkpoint(Path(path), NO_WARM)
    base = json.loads((path / "config.json").read_text())["model"]
    mine, default = model.cfg.to_dict(), DLRMConfig().to_dict()   # a key the base predates: its default
    diff = [k for k in mine if k not in ("lum", "n_queries", "d_lum") and base.get(k, default[k]) != mine[k]]
    if diff:
        raise InputError(str(path), f"[fuse].init_from: checkpoint differs in {diff} "
                         f"({', '.join(f'{k}: {base.get(k)} vs {mine[k]}' for k in diff)})")
    state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("lum_")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("lum_")] + list(unexpected)
    if bad:
        raise InputError(str(path), f"[fuse].init_from: state does not fit the model ({bad[:3]})")


@torch.no_grad()
def predict(model: DLRM, feats: Features, idx: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    was = model.training
    model.eval()
    out = [model(feats.batch(idx[a:a + batch_size], device)).float().cpu().numpy()
           for a in range(0, len(idx), batch_size)]
    model.train(was)
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def train(model: DLRM, feats: Features, fs: FuseSpec, seed: int, device: torch.device) -> tuple[DLRM, dict]:
    """AdamW, BCE; early stopping on valid AUC. Returns the best-valid model and its metrics."""
    s = feats.s
    grp = s.get("group", s["user"])                                     # GAUC's users (unseen ones by raw id)
    tr, va, te = (np.flatnonzero(s["split"] == k) for k in (0, 1, 2))
    gen = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=fs.lr, weight_decay=fs.weight_decay)
    label = torch.from_numpy(s["label"])
    best, best_state, best_epoch, bad = -np.inf, copy.deepcopy(model.state_dict()), 0, 0
    history_ = []
    if fs.init_from:  # step 0 of a warm start predicts as the base: log it as epoch 0
        m = ctr_metrics(grp[va], s["label"][va], predict(model, feats, va, 4 * fs.batch_size, device))
        best = m["auc"] if np.isfinite(m["auc"]) else -float(m["logloss"])
        history_.append({"epoch": 0, "loss": None, "valid": m})
        say(f"fuse: seed {seed} epoch 0 (warm start) valid auc {m['auc']:.4f} gauc {m['gauc']:.4f} "
            f"logloss {m['logloss']:.4f}")
    for epoch in range(1, fs.epochs + 1):
        t0 = time.time()
        perm = gen.permutation(tr)
        losses = []
        model.train()
        for a in range(0, len(perm), fs.batch_size):
            idx = perm[a:a + fs.batch_size]
            loss = model.loss(feats.batch(idx, device), label[idx].to(device), fs.aux_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        m = ctr_metrics(grp[va], s["label"][va], predict(model, feats, va, 4 * fs.batch_size, device))
        v = m["auc"] if np.isfinite(m["auc"]) else -float(m["logloss"])
        history_.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else None, "valid": m})
        say(f"fuse: seed {seed} epoch {epoch} loss {history_[-1]['loss']:.4f} valid auc {m['auc']:.4f} "
            f"gauc {m['gauc']:.4f} logloss {m['logloss']:.4f} ({time.time() - t0:.1f}s)")
        if v > best:
            best, best_state, best_epoch, bad = v, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            bad += 1
            if bad > fs.patience:
                break
    model.load_state_dict(best_state)
    res = {"best_epoch": best_epoch, "epochs": history_}
    for name, idx in (("valid", va), ("test", te)):
        logit = predict(model, feats, idx, 4 * fs.batch_size, device)
        res[name] = ctr_metrics(grp[idx], s["label"][idx], logit)
        res[f"{name}_logit"] = logit
        if fs.backbone == "two_tower":
            res[name]["retrieval"] = retrieval(model, feats, 1 if name == "valid" else 2, fs.retrieval_ks, device)
    return model, res


@torch.no_grad()
def retrieval(model: DLRM, feats: Features, part: int, ks: list[int], device: torch.device,
              users_per_batch: int = 256) -> dict:
    """two_tower retrieval: each user's positives (label 1) in split `part` (1 valid, 2 test) ranked over the
    full catalogue from the user's state at its first event of the part (history and LUM snapshot strictly
    before it); items the user rated before that event are filtered. Recall@K = mean over users with a
    positive of |top-K & positives| / |positives|."""
    s = feats.s
    ev = np.flatnonzero(s["split"] == part)                             # grouped by user, time ordered
    pos_ev = ev[s["label"][ev] > 0.5]
    users, first = np.unique(s["user"][ev], return_index=True)
    keep = np.isin(users, s["user"][pos_ev])
    users, q = users[keep], ev[first[keep]]                             # q: the query event of each user
    n_items = model.cfg.n_items
    items = torch.arange(n_items, device=device)
    lum_items = torch.from_numpy(feats.item_lum).to(device) if feats.ans is not None else None
    was = model.training
    model.eval()
    hits = {k: [] for k in ks}
    for a in range(0, len(users), users_per_batch):
        qb = q[a:a + users_per_batch]
        scores = model.retrieval_scores(feats.batch(qb, device), items, lum_items).float()  # (B, I)
        scores[:, :2] = -float("inf")                                   # pad, unknown
        target = np.zeros((len(qb), n_items), bool)                     # (B, I) the positives
        seen = np.zeros((len(qb), n_items), bool)
        for r, e in enumerate(qb):
            u = s["user"][e]
            target[r, s["item"][pos_ev[s["user"][pos_ev] == u]]] = True
            seen[r, feats.ev_item[s["user_start"][e]:s["event"][e]]] = True
        scores[torch.from_numpy(seen & ~target).to(device)] = -float("inf")
        top = scores.topk(max(ks), dim=1).indices.cpu().numpy()         # (B, K)
        got = np.take_along_axis(target, top, 1)                        # (B, K)
        for k in ks:
            hits[k].append(got[:, :k].sum(1) / target.sum(1))
    model.train(was)
    out = {f"recall@{k}": float(np.concatenate(hits[k]).mean()) if len(users) else 0.0 for k in ks}
    return {**out, "users": len(users)}


# ------------------------------------------------------------------------------------ run
def _finite(x):
    """NaN (e.g. GAUC when no user has both classes) -> null, so metrics.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not np.isfinite(x) else x


def summarize(runs: list[dict]) -> dict:
    """mean and std (ddof 0) over seeds of every valid/test metric."""
    out = {}
    for part in ("valid", "test"):
        out[part] = {}
        for k in ("auc", "gauc", "logloss"):
            x = np.array([r[part][k] for r in runs], np.float64)
            out[part][k] = {"mean": float(np.mean(x)), "std": float(np.std(x))}
        for k in runs[0][part].get("retrieval", {}):
            if k.startswith("recall@"):
                x = np.array([r[part]["retrieval"][k] for r in runs], np.float64)
                out[part][k] = {"mean": float(np.mean(x)), "std": float(np.std(x))}
    return out


def seed_metrics(runs: list[dict], first_seed: int) -> list[dict]:
    """metrics.json "seeds": each run's best epoch, valid and test metrics and epoch history."""
    return [{"seed": first_seed + k, "best_epoch": r["best_epoch"], "valid": r["valid"], "test": r["test"],
             "epochs": r["epochs"]} for k, r in enumerate(runs)]


# keys that do not change what fuse computes, and keys added later that leave, at their default, the
# spec hash of older stores as it was (so they stay up to date)
NO_HASH = ("cache_mib",)
LATER_KEYS = ("samples", "protocol", "behavior_field", "positive", "compare_base")


def fuse_spec_hash(fs: FuseSpec) -> str:
    d = fs.model_dump(mode="json")
    for k in NO_HASH:
        d.pop(k)
    for k in LATER_KEYS:
        if d[k] == FuseSpec.model_fields[k].get_default(call_default_factory=True):
            d.pop(k)
    return hash_obj(d)


def run(spec: Spec, force: bool = False, seeds: int | None = None) -> Path:
    fs = spec.fuse
    if fs is None:
        raise InputError("[fuse]", "section missing; nothing to fuse")
    if seeds is not None:
        fs = fs.model_copy(update={"seeds": int(seeds)})
    out = spec.store("fuse")
    started = time.time()
    tok_store = spec.input_store("tokenize")
    inputs = {"tokenize": store_hash(require_store(tok_store, "tokenize"))}
    if fs.lum != "none":
        inputs["query"] = store_hash(require_store(spec.store("query"), "query"))
    if fs.init_from:
        warm = [warm_checkpoint(Path(fs.init_from), fs.seed + k) for k in range(fs.seeds)]
        hashes = [hash_file(p / "model.pt") for p in warm]
        inputs["init_from"] = hashes[0] if len(set(warm)) == 1 else hash_obj(hashes)
    if fs.samples is not None:
        inputs["samples"] = sample_table_hash(fs.samples.path)
    spec_hash = fuse_spec_hash(fs)
    if not force and is_up_to_date(out, spec_hash, inputs):
        say(f"fuse: {out} is up to date")
        return out

    device = resolve_device(fs.device, "[fuse].device")
    data = tokenize.load(tok_store)
    ans = load_answers(spec.store("query")) if fs.lum != "none" else None
    if ans is not None and len(ans["item_emb"]) != len(data["vocab/item"]):
        raise InputError(str(spec.store("query")), "query store's items do not match the tokenize store "
                         f"({len(ans['item_emb'])} vs {len(data['vocab/item'])}); rerun `lumctl query`")
    cond_names = [c.name for c in spec.tokenize.conditions]
    table = read_samples(fs.samples, data) if fs.samples is not None else None
    s = table.arrays if table is not None else samples(data, fs, cond_names)
    feats = Features(data, fs, ans, s, cond_names)
    cfg = model_config(data, fs, feats)
    if table is not None:  # the sample table's own feature columns
        cfg = dataclasses.replace(cfg, extra_cat=table.cat_vocab, extra_multi=table.multi_vocab,
                                  extra_numeric=len(fs.samples.numeric))
    runs, models, base_runs = [], [], []
    for k in range(fs.seeds):
        seed = fs.seed + k
        torch.manual_seed(seed)
        model = build_model(cfg, data).to(device)
        if fs.init_from:
            warm_start(model, warm[k])
            say(f"fuse: seed {seed} warm-starts from {warm[k]}")
        model, res = train(model, feats, fs, seed, device)
        runs.append(res)
        models.append({k_: v.cpu() for k_, v in model.state_dict().items()})
    if fs.compare_base:  # the same backbone, samples and seeds without the LUM answers
        base_feats = feats.without_lum()
        base_cfg = dataclasses.replace(cfg, lum="none", n_queries=0, d_lum=0)
        for k in range(fs.seeds):
            seed = fs.seed + k
            torch.manual_seed(seed)
            say(f"fuse: seed {seed} base ({fs.backbone}, lum=none)")
            _, res = train(build_model(base_cfg, data).to(device), base_feats, base_feats.fs, seed, device)
            base_runs.append(res)
    s = feats.s
    ev = np.concatenate([np.flatnonzero(s["split"] == 1), np.flatnonzero(s["split"] == 2)])
    logit = np.stack([np.concatenate([r["valid_logit"], r["test_logit"]]) for r in runs]).astype(np.float32)
    metrics = {"seeds": seed_metrics(runs, fs.seed), **summarize(runs), "backbone": fs.backbone, "lum": fs.lum,
               "samples": table.counts if table is not None else {"protocol": fs.protocol},
               "lum_coverage": {name: float(feats.lum_has[s["split"] == k].mean()) if ans is not None else 0.0
                                for k, name in enumerate(("train", "valid", "test"))}}
    if base_runs:
        metrics["base"] = {"seeds": seed_metrics(base_runs, fs.seed), **summarize(base_runs),
                           "backbone": fs.backbone, "lum": "none"}
    config_json = {"model": cfg.to_dict(), "spec": fs.model_dump(mode="json"), "inputs": inputs,
                   "tokenize": spec.tokenize.model_dump(mode="json")}
    with atomic_dir(out) as tmp:
        g = zarrio.create(tmp / "predictions.zarr")
        zarrio.put(g, "event", s["event"][ev])                        # event index (sample table: row)
        zarrio.put(g, "user", s.get("group", s["user"])[ev])           # sample table: unseen users from U on
        zarrio.put(g, "split", s["split"][ev])
        zarrio.put(g, "label", s["label"][ev].astype(np.int8))
        zarrio.put(g, "logit", logit)
        (tmp / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2))
        for k, state in enumerate(models):
            d = tmp / "final" if k == 0 else tmp / "seeds" / f"seed-{fs.seed + k}"
            d.mkdir(parents=True)
            torch.save(state, d / "model.pt")
            (d / "config.json").write_text(json.dumps({**config_json, "seed": fs.seed + k}, indent=2))
        counts = {"samples": len(s["label"]), "lum_pretrain_only": int((s["split"] == -1).sum()),
                  "train": int((s["split"] == 0).sum()),
                  "valid": int((s["split"] == 1).sum()), "test": int((s["split"] == 2).sum()),
                  "seeds": fs.seeds, "device": device.type}
        if table is not None:
            counts["sample_table"] = table.counts
        write_manifest(tmp, stage="fuse", spec_hash=spec_hash, inputs=inputs, counts=counts, started=started)
    t = metrics["test"]
    say(f"fuse: {fs.backbone} lum={fs.lum} test auc {t['auc']['mean']:.4f} ± {t['auc']['std']:.4f}, "
        f"gauc {t['gauc']['mean']:.4f}, logloss {t['logloss']['mean']:.4f}"
        + "".join(f", {k} {v['mean']:.4f}" for k, v in t.items() if k.startswith("recall@")) +
        f" ({fs.seeds} seed(s), {time.time() - started:.1f}s) -> {out}")
    if base_runs:
        b = metrics["base"]["test"]["auc"]["mean"]
        say(f"fuse: base {fs.backbone} lum=none test auc {b:.4f}; + LUM {t['auc']['mean'] - b:+.4f}")
    return out
