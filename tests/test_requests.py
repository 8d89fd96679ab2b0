"""Conditioned-request retrieval (lumctl.evaluation.evaluate_requests): requests from the history only,
positives from the test window, candidates filtered by an item attribute, metrics by hand."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from lumctl import evaluation as ev
from lumctl import metrics
from lumctl.specs import EvalSpec, PackSpec, PretrainSpec, RequestSpec

V = 6  # values of each condition field: 0 pad, 1 '<any>', 2..5
FIELDS = [{"name": "rating", "source": "bucket"}, {"name": "genre", "source": "item_attr"}]


def _log(rng, U=30, I=25, test=4):
    """Users with 6..20 events; the last `test` are the test window (valid: the one before). Field 0 is an
    event field (random), field 1 an item attribute (a function of the item)."""
    n = rng.integers(6, 21, U)
    off = np.r_[0, np.cumsum(n)].astype(np.int64)
    E = int(off[-1])
    item = rng.integers(2, I, E).astype(np.int32)
    genre = 2 + item % 4
    cond = np.stack([rng.integers(2, V, E), genre], 1).astype(np.int32)
    split = np.stack([n - test - 1, n - test], 1).astype(np.int64)
    return {"users/offsets": off, "users/split": split, "events/item": item, "events/cond": cond,
            "events/timestamp": np.arange(E, dtype=np.int64),
            "vocab/cond_rating": np.array(["<pad>", "<any>", "a", "b", "c", "d"]),
            "vocab/cond_genre": np.array(["<pad>", "<any>", "w", "x", "y", "z"])}


# ------------------------------------------------------------------------------------ metrics
def test_request_metrics_by_hand():
    # request A (user 0): positives ranked 0 and 3; B (user 0): one positive ranked 2;
    # C (user 1): two positives tied at rank 1 -> positions 1 and 2
    rank, pos_off, user = np.array([3, 0, 2, 1, 1]), np.array([0, 2, 3, 5]), np.array([0, 0, 1])
    assert metrics.request_positions(rank, pos_off).tolist() == [0, 3, 2, 1, 2]
    idcg2 = 1 + 1 / np.log2(3)
    assert np.allclose(metrics.request_values(rank, pos_off, "hr@2"), [1, 0, 1])
    assert np.allclose(metrics.request_values(rank, pos_off, "ndcg@2"), [1 / idcg2, 0, (1 / np.log2(3)) / idcg2])
    assert np.allclose(metrics.request_values(rank, pos_off, "mrr"), [1, 1 / 3, 1 / 2])
    m = metrics.request_metrics(rank, pos_off, user, ks=(2,))
    # mean over users of the mean over their requests: user 0 (A, B), user 1 (C)
    assert m["hr@2"] == pytest.approx((0.5 + 1) / 2)
    assert m["ndcg@2"] == pytest.approx((1 / idcg2 / 2 + (1 / np.log2(3)) / idcg2) / 2)
    assert m["ndcg@2"] == pytest.approx(0.346713, abs=1e-6)  # (0.613147 / 2 + 0.386853) / 2
    assert m["mrr"] == pytest.approx(((1 + 1 / 3) / 2 + 0.5) / 2) and m["users"] == 2
    # a single positive is the next-item metric
    one = metrics.request_metrics(np.array([0, 4, 12]), np.array([0, 1, 2, 3]), np.array([0, 1, 2]), ks=(10,))
    ref = metrics.retrieval_metrics(np.array([0, 4, 12]), ks=(10,))
    assert all(one[k] == pytest.approx(ref[k]) for k in ("hr@10", "ndcg@10", "mrr"))


@pytest.mark.parametrize("item_block", [1, 3, 100])
@pytest.mark.parametrize("user_batch", [1, 2])
def test_rank_positives_by_hand(item_block, user_batch):
    # items 0..7; one-hot keys, so a user's score of item i is q[u, i]
    keys = torch.eye(8)
    q = torch.tensor([[9, 9, .8, .95, .9, .5, .99, .6]])
    item_value = np.array([0, 0, 2, 2, 3, 2, 3, 2])
    seen_off, seen = np.array([0, 1]), np.array([3])                         # item 3 is in the history
    req = ev.Requests(user=np.array([0]), value=np.array([2]), pos_off=np.array([0, 2]), item=np.array([5, 7]), formed=1)
    # filtered: candidates 2 (.8), 5 (.5), 7 (.6); 4 and 6 have value 3, 3 is in the history
    r = ev.rank_positives(lambda c: q, req, seen_off, seen, keys, item_value, item_block, user_batch, "cpu")
    assert r.tolist() == [2, 1]
    m = metrics.request_metrics(r, req.pos_off, req.user, ks=(2,))
    assert m["hr@2"] == 1.0 and m["ndcg@2"] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    # unfiltered (an event field): 4 (.9) and 6 (.99) compete too
    r = ev.rank_positives(lambda c: q, req, seen_off, seen, keys, None, item_block, user_batch, "cpu")
    assert r.tolist() == [4, 3]
    assert metrics.request_metrics(r, req.pos_off, req.user, ks=(2,))["hr@2"] == 0.0


def test_rank_positives_equal_a_loop():
    rng = np.random.default_rng(3)
    U, I, D = 7, 30, 4
    keys = torch.nn.functional.normalize(torch.randn(I, D), dim=-1)
    qs = {c: torch.nn.functional.normalize(torch.randn(U, D), dim=-1) for c in range(2, V)}
    item_value = 2 + np.arange(I) % 4
    seen_l = [rng.choice(np.arange(2, I), rng.integers(0, 8), replace=False) for _ in range(U)]
    seen_off = np.r_[0, np.cumsum([len(s) for s in seen_l])]
    seen = np.concatenate(seen_l)
    users, values, items, off = [], [], [], [0]
    for u in range(U):
        for c in rng.choice(np.arange(2, V), 2, replace=False):
            pool = [i for i in range(2, I) if item_value[i] == c and i not in seen_l[u]]
            pos = sorted(rng.choice(pool, rng.integers(1, 4), replace=False))
            users.append(u), values.append(c), items.extend(pos), off.append(len(items))
    req = ev.Requests(np.array(users), np.array(values), np.array(off), np.array(items), len(users))
    for filt in (item_value, None):
        got = ev.rank_positives(lambda c: qs[c], req, seen_off, seen, keys, filt, 7, 3, "cpu")
        want = []
        for r, (u, c) in enumerate(zip(users, values)):
            s = (qs[c][u] @ keys.T).numpy()
            cand = [i for i in range(2, I) if i not in seen_l[u] and (filt is None or filt[i] == c)]
            for t in items[off[r]:off[r + 1]]:
                want.append(sum(s[i] > s[t] for i in cand if i != t))
        assert got.tolist() == want


# ------------------------------------------------------------------------------------ requests and positives
def test_requests_and_positives_equal_a_loop():
    data = _log(np.random.default_rng(1))
    off, cond, item = data["users/offsets"], data["events/cond"], data["events/item"]
    users, end = ev.held_out_users(data, "test")
    held = ev.read_held_out(data, "test", 8)
    iv = ev.item_values(data, 1, 25)
    assert all(iv[i] == 2 + i % 4 for i in range(2, 25) if (item == i).any())
    for values, top_k, window, f in [("history", 0, 0, 1), ("history", 2, 3, 1), ("all", 0, 2, 0), ("history", 1, 0, 0)]:
        u, v = ev.form_requests(data, "test", f, V, values, top_k, users)
        cnt, w_item, w_cond = ev.window_events(data, "test", users, window)
        req = ev.request_positives(u, v, cnt, w_item, w_cond[:, f], held.seen_off, held.seen, V, iv if f == 1 else None)
        want_req, want_pos = [], []
        for k, (uu, e) in enumerate(zip(users, end)):
            hist = cond[off[uu]:off[uu] + e, f]
            c = np.bincount(hist, minlength=V)[2:]
            if values == "all":
                vals = list(range(2, V))
            else:
                order = sorted((v for v in range(2, V) if c[v - 2] > 0), key=lambda v: (-c[v - 2], v))
                vals = sorted(order[:top_k] if top_k else order)
            last = off[uu + 1] if not window else min(off[uu + 1], off[uu] + e + window)
            seen_u = set(item[off[uu]:off[uu] + e].tolist())
            for val in vals:
                pos = sorted({int(i) for i, cc in zip(item[off[uu] + e:last], cond[off[uu] + e:last, f])
                              if cc == val and i not in seen_u})
                if pos:
                    want_req.append((k, val))
                    want_pos.append(pos)
        assert list(zip(req.user.tolist(), req.value.tolist())) == want_req
        assert [req.item[a:b].tolist() for a, b in zip(req.pos_off[:-1], req.pos_off[1:])] == want_pos
        assert req.formed == len(u) and req.formed >= len(want_req)


def test_requests_never_read_the_test_window():
    """The requests a user makes come from the history only: rewriting every event from the held-out
    one on leaves them unchanged, rewriting one history event does not (the guard)."""
    data = _log(np.random.default_rng(2))
    off = data["users/offsets"]
    users, end = ev.held_out_users(data, "test")
    base = ev.form_requests(data, "test", 1, V, "history", 0, users)
    future = {**data, "events/cond": data["events/cond"].copy(), "events/item": data["events/item"].copy()}
    for u, e in zip(users, end):
        future["events/cond"][off[u] + e:off[u + 1]] = 2 + (future["events/cond"][off[u] + e:off[u + 1]] + 1) % 4
        future["events/item"][off[u] + e:off[u + 1]] = 2
    again = ev.form_requests(data | future, "test", 1, V, "history", 0, users)
    assert all(np.array_equal(a, b) for a, b in zip(base, again))
    past = {**data, "events/cond": data["events/cond"].copy()}
    u0 = users[0]
    past["events/cond"][off[u0]:off[u0] + end[0], 1] = 5                      # the first user's history: all 'z'
    changed = ev.form_requests(past, "test", 1, V, "history", 0, users)
    assert not all(np.array_equal(a, b) for a, b in zip(base, changed))


# ------------------------------------------------------------------------------------ evaluate_requests
def _tiny_model(conditions: bool, n_items=25, d=16):
    from lumctl.models import build
    cfg = {"n_items": n_items, "cond_vocab": [V, V] if conditions else [], "n_genres": 0, "n_categories": 0,
           "n_popularity": 0, "d_model": d, "n_layers": 1, "n_heads": 2, "d_ff": 32, "d_feat": 0, "dropout": 0.0,
           "attention": "sdpa"}
    torch.manual_seed(0)
    return build("lum", cfg)


def _requests(model, data, conditions, task, **eval_kw):
    p = PretrainSpec(eval=EvalSpec(batch_rows=4, ks=[2, 10], **eval_kw))
    out: dict = {}
    m = ev.evaluate_requests(model, data, task, p, PackSpec(seq_len=64, max_items=12), torch.device("cpu"),
                             np.array([1, 1], np.int32), contextlib.nullcontext, FIELDS, conditions, out)
    return m, out


@pytest.mark.parametrize("conditions", [True, False])
def test_the_held_out_condition_is_never_read(conditions):
    """Rewriting the held-out events' rating (a field the genre requests do not ask about) changes no
    request, positive or rank: the query condition comes from the request, never from the event."""
    data = _log(np.random.default_rng(5))
    model = _tiny_model(conditions)
    task = RequestSpec(field="genre", window=3)
    m, out = _requests(model, data, conditions, task)
    assert m["requests"] == len(out["user"]) > 0 and m["positives"] == len(out["item"])
    assert m["candidates"] == "items with the requested value"
    users, end = ev.held_out_users(data, "test")
    off = data["users/offsets"]
    other = {**data, "events/cond": data["events/cond"].copy()}
    for u, e in zip(users, end):
        other["events/cond"][off[u] + e:off[u + 1], 0] = 2 + (other["events/cond"][off[u] + e:off[u + 1], 0] - 1) % 4
    m2, out2 = _requests(model, other, conditions, task)
    assert m2 == m and all(np.array_equal(out[k], out2[k]) for k in out)


def test_conditioned_queries_differ_by_request_and_item_only_do_not():
    data = _log(np.random.default_rng(6))
    task = RequestSpec(field="rating", values="all", window=0)
    cond_m, cond_out = _requests(_tiny_model(True), data, True, task)
    item_m, item_out = _requests(_tiny_model(False), data, False, task)
    assert cond_m["candidates"] == "all items" and cond_m["skipped_no_positive"] > 0
    for k in ("user", "value", "pos_off", "item"):                              # the same requests for every model
        assert np.array_equal(cond_out[k], item_out[k])
    # item-only: one user vector, so a positive's rank is the same whichever value the user requests
    key = {}
    for r, (u, c) in enumerate(zip(item_out["user"], item_out["value"])):
        for i in range(item_out["pos_off"][r], item_out["pos_off"][r + 1]):
            key.setdefault((u, item_out["item"][i]), set()).add(int(item_out["rank"][i]))
    assert all(len(s) == 1 for s in key.values())
    # sampled users: a subset of the requests
    some, some_out = _requests(_tiny_model(True), data, True, task, users=10)
    assert some["users_sampled"].startswith("10 of ") and set(some_out["user"]) < set(cond_out["user"])


# ------------------------------------------------------------------------------------ end to end
def test_request_table_end_to_end(tmp_path):
    """A fraction split, [pretrain.eval].requests on an item attribute, LUM with conditions vs item-only
    (one seed each), trained in-process; the report table reads test_requests.<field> and pairs the
    runs request by request."""
    import json

    from conftest import TINY
    from test_eval import report_in

    from lumctl.report_specs import load_report
    from lumctl.stages import eval as rep_eval
    from lumctl.stages import run_all
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY.format(root=tmp_path / "unused", steps=4, every=4, ckpt=4, conditions="true")
                    + '\n[tokenize.split]\nkind = "fraction"\n')
    req = {"pretrain": {"eval": {"requests": [{"field": "category", "window": 5}, {"field": "scenario", "values": "all"}]}}}
    lum = {"label": "LUM", "spec": str(spec), "name": "req", "seeds": [0], "set": req}
    item = {"label": "item-only", "spec": str(spec), "name": "req-nocond", "seeds": [0], "vs": ["LUM"],
            "set": {**req, "pack": {"conditions": False}}}
    rep = report_in(tmp_path, [{"name": "req", "title": "Requests", "kind": "retrieval", "source": "test_requests.category",
                                "metrics": ["hr@10", "ndcg@10"], "rows": [lum, item]}])
    for run in rep_eval.unique_runs(rep_eval.plan(load_report(rep), rep)):
        run_all(run.spec)
    rep_eval.run(load_report(rep), path=rep)
    res = json.loads((tmp_path / "stores" / "rep" / "eval" / "results.json").read_text())
    t = res["tables"][0]
    final = [tmp_path / "stores" / f"tiny-req{v}-s0" / "pretrain" / "final" for v in ("", "-nocond")]
    met = [json.loads((f / "metrics.json").read_text())["test_requests"] for f in final]
    assert set(met[0]) == {"category", "scenario"} and met[0]["scenario"]["candidates"] == "all items"
    assert [r["values"]["ndcg@10"]["mean"] for r in t["rows"]] == pytest.approx([m["category"]["ndcg@10"] for m in met])
    arr = dict(np.load(final[0] / "test_requests_category.npz"))
    assert metrics.request_metrics(arr["rank"], arr["pos_off"], arr["user"])["hr@10"] == pytest.approx(met[0]["category"]["hr@10"])
    assert t["requests"]["requests"] == met[0]["category"]["requests"] == len(arr["user"]) > 0
    c = t["comparisons"][0]
    assert (c["row"], c["vs"]) == ("item-only", "LUM") and c["bootstrap"] is not None
    assert c["bootstrap"]["delta"] == pytest.approx(c["delta"])                    # paired on the same requests
    md = (tmp_path / "stores" / "rep" / "eval" / "results.md").read_text()
    assert "Conditioned requests on `category` (metrics.json `test_requests.category`)" in md
    # `lumctl run`'s summary names the task; --export carries the per-request ranks
    from lumctl import runs
    from lumctl.summary import lines
    runs_ = rep_eval.unique_runs(rep_eval.plan(load_report(rep), rep))
    assert any(x.strip().startswith(f"requests by category: {len(arr['user'])} of ") for x in lines(runs_[0].spec))
    runs.export(runs_, tmp_path / "stores", tmp_path / "export")
    assert (tmp_path / "export" / "tiny-req-s0" / "pretrain" / "final" / "test_requests_scenario.npz").is_file()


def test_take_users_reads_what_a_sample_reads():
    data = _log(np.random.default_rng(7))
    held = ev.read_held_out(data, "test", 8)
    some = ev.read_held_out(data, "test", 8, n_users=9, seed=1)
    sub = ev.take_users(held, np.searchsorted(held.users, some.users))
    for k in ("users", "count", "items", "conds", "ts", "target", "seen_off", "seen"):
        assert np.array_equal(getattr(sub, k), getattr(some, k)), k
