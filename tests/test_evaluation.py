"""Retrieval evaluation in item blocks (lumctl.evaluation) and the blocked full-softmax loss."""

from __future__ import annotations

import contextlib
import resource
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lumctl import evaluation as ev
from lumctl.loss import info_nce, sampling_logq
from lumctl.specs import PackSpec, PretrainSpec


def _history(rng, U, I):
    seen = [rng.choice(np.arange(2, I), rng.integers(0, I - 1), replace=False) for _ in range(U)]
    off = np.r_[0, np.cumsum([len(s) for s in seen])].astype(np.int64)
    flat = np.concatenate(seen) if off[-1] else np.zeros(0, np.int64)
    return seen, off, flat


# ------------------------------------------------------------------------------------ ranking
def test_rank_by_hand():
    # one user, items 0..5; ids 0 and 1 never count; item 4 is in the history; the target is 3
    scores = torch.tensor([[9.0, 9.0, 0.5, 0.2, 0.9, 0.2]])
    # candidates 2, 3 (target), 5: only item 2 (0.5) beats 0.2; item 5 ties and does not count
    for block in (1, 2, 4, 6, 100):
        r = ev.rank_in_blocks(lambda u, i0, i1: scores[u, i0:i1].clone(), np.array([3]), np.array([0, 1]), np.array([4]),
                              6, block, 1, "cpu")
        assert r.tolist() == [1]
    assert ev.rank_full_ref(scores, np.array([3]), [np.array([4])]).tolist() == [1]


@settings(max_examples=60, deadline=None)
@given(U=st.integers(1, 9), I=st.integers(3, 40), D=st.integers(1, 4), block=st.integers(1, 45),
       user_batch=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_blocks_equal_the_full_matrix(U, I, D, block, user_batch, seed):
    # small integer vectors: every product is exact, so ties are real and the order of sums cannot matter
    rng = np.random.default_rng(seed)
    q = torch.as_tensor(rng.integers(-2, 3, (U, D)), dtype=torch.float32)
    keys = torch.as_tensor(rng.integers(-2, 3, (I, D)), dtype=torch.float32)
    target = rng.integers(2, I, U)
    seen, off, flat = _history(rng, U, I)
    want = ev.rank_full_ref(q @ keys.T, target, seen)
    got = ev.rank_in_blocks(ev.dot_scores(q, keys), target, off, flat, I, block, user_batch, "cpu")
    assert got.tolist() == want.tolist()


@settings(max_examples=25, deadline=None)
@given(U=st.integers(1, 30), I=st.integers(3, 300), D=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_one_block_is_the_full_matrix_product_on_floats(U, I, D, seed):
    rng = np.random.default_rng(seed)
    q = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(U, D)), dtype=torch.float32), dim=-1)
    keys = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(I, D)), dtype=torch.float32), dim=-1)
    keys[rng.integers(2, I)] = keys[rng.integers(2, I)]  # a duplicated item: an exact tie for someone
    target = rng.integers(2, I, U)
    seen, off, flat = _history(rng, U, I)
    want = ev.rank_full_ref(q @ keys.T, target, seen)
    got = ev.rank_in_blocks(ev.dot_scores(q, keys), target, off, flat, I, I, U, "cpu")
    assert got.tolist() == want.tolist()


def test_the_history_filter_matters():
    keys = torch.eye(4)
    q = torch.tensor([[0.0, 0.0, 0.5, 0.1]])  # item 2 beats the target 3
    score = ev.dot_scores(q, keys)
    assert ev.rank_in_blocks(score, np.array([3]), np.array([0, 0]), np.zeros(0, np.int64), 4, 2, 1, "cpu").tolist() == [1]
    assert ev.rank_in_blocks(score, np.array([3]), np.array([0, 1]), np.array([2]), 4, 2, 1, "cpu").tolist() == [0]
    # the target in its own history is still a candidate
    assert ev.rank_in_blocks(score, np.array([2]), np.array([0, 1]), np.array([2]), 4, 1, 1, "cpu").tolist() == [0]


@settings(max_examples=20, deadline=None)
@given(U=st.integers(1, 6), I=st.integers(3, 60), V=st.integers(1, 4), block=st.integers(1, 70),
       seed=st.integers(0, 2**31 - 1))
def test_mixture_in_blocks_matches_the_full_softmax(U, I, V, block, seed):
    rng = np.random.default_rng(seed)
    D, tau = 8, 0.3
    norm = torch.nn.functional.normalize
    qs = [norm(torch.as_tensor(rng.normal(size=(U, D)), dtype=torch.float32), dim=-1) for _ in range(V)]
    keys = norm(torch.as_tensor(rng.normal(size=(I, D)), dtype=torch.float32), dim=-1)
    w = torch.as_tensor(rng.dirichlet(np.ones(V), U), dtype=torch.float32)
    # the former one-matrix computation: log_softmax over items 2.. for every value, mixed by the weights
    lp = torch.stack([torch.log_softmax(qv @ keys[2:].T / tau, -1) for qv in qs], 1)   # (U, V, I - 2)
    full = torch.full((U, I), float("-inf"))
    full[:, 2:] = torch.logsumexp(lp + w.log()[:, :, None], 1)
    score = ev.mixture_scores(qs, keys, w.log(), tau, block, 2)
    got = torch.cat([score(slice(0, U), i0, min(I, i0 + block)) for i0 in range(0, I, block)], 1)
    assert torch.allclose(got[:, 2:], full[:, 2:], atol=1e-5)
    target = rng.integers(2, I, U)
    seen, off, flat = _history(rng, U, I)
    want = ev.rank_full_ref(full, target, seen)
    ranks = ev.rank_in_blocks(score, target, off, flat, I, block, 2, "cpu")
    # equal up to float rounding: only items within 1e-4 of the target's score may move
    pos = full.gather(1, torch.as_tensor(target)[:, None])
    near = ((full - pos).abs() < 1e-4).sum(1).numpy() - 1
    assert (np.abs(ranks - want) <= near).all()


# ------------------------------------------------------------------------------------ users, rows
def test_user_sample_is_fixed_by_the_seed():
    users = np.arange(100, 1100)
    a, b = ev.sample_users(users, 50, 7), ev.sample_users(users, 50, 7)
    assert a.tolist() == b.tolist() and len(set(a)) == 50 and set(a) <= set(users) and (np.diff(a) > 0).all()
    assert ev.sample_users(users, 50, 8).tolist() != a.tolist()
    assert ev.sample_users(users, 0, 7) is users and ev.sample_users(users, 5000, 7) is users


def _log(rng, U=40, I=30, F=2):
    n = rng.integers(2, 25, U)
    off = np.r_[0, np.cumsum(n)].astype(np.int64)
    E = int(off[-1])
    split = np.stack([n - 2, n - 1], 1)
    split[::7] = n[::7, None]  # some users have no held-out event
    return {"users/offsets": off, "users/split": split.astype(np.int64),
            "events/item": rng.integers(2, I, E).astype(np.int32),
            "events/cond": rng.integers(1, 5, (E, F)).astype(np.int32),
            "events/timestamp": np.arange(E, dtype=np.int64)}


def test_read_ranges_from_zarr_equals_numpy(tmp_path):
    from lumctl import zarrio
    rng = np.random.default_rng(0)
    a = rng.integers(0, 1000, (5000, 3)).astype(np.int32)
    g = zarrio.create(tmp_path / "z.zarr")
    zarrio.put(g, "a", a, chunk_rows=256)
    count = rng.integers(0, 40, 60)
    start = np.sort(rng.choice(4900, 60, replace=False))
    want = np.concatenate([a[s:s + c] for s, c in zip(start, count)])
    for window in (1, 100, 1 << 22):
        assert np.array_equal(ev.read_ranges(zarrio.open_read(tmp_path / "z.zarr")["a"], start, count, window), want)
        assert np.array_equal(ev.read_ranges(a, start, count, window), want)


@pytest.mark.parametrize("conditions", [True, False])
def test_streamed_rows_equal_the_rows_packed_at_once(conditions):
    data = _log(np.random.default_rng(1))
    qc = np.array([1, 3], np.int32)
    rows, where, target, seen = ev.eval_rows(data, "test", 10, 48, conditions, qc)
    held = ev.read_held_out(data, "test", 10)
    plan = ev.plan_rows(held, 48, conditions)
    assert plan.n_rows == len(rows["type"]) and held.target.tolist() == target.tolist()
    for r0 in range(0, plan.n_rows, 3):
        part, us = ev.fill_rows(held, plan, r0, min(plan.n_rows, r0 + 3), 48, conditions, qc)
        for k in ("type", "item", "cond", "segment", "pos", "loss_mask", "target", "ts"):
            assert np.array_equal(part[k], rows[k][r0:r0 + 3]), k
        assert np.array_equal(plan.row[us], where[us, 0]) and np.array_equal(plan.out_pos[us], where[us, 1])
    # a sample reads the same events for its users
    some = ev.read_held_out(data, "test", 10, n_users=5, seed=3)
    assert some.n_total == len(held.users) and len(some.users) == 5
    k = np.searchsorted(held.users, some.users)
    assert some.target.tolist() == held.target[k].tolist()
    assert [some.seen[a:b].tolist() for a, b in zip(some.seen_off[:-1], some.seen_off[1:])] == [seen[i].tolist() for i in k]


def test_history_weights_equal_a_per_user_count():
    data = _log(np.random.default_rng(4))
    off, cond = data["users/offsets"], data["events/cond"]
    for split in ("valid", "test"):
        users, end = ev.held_out_users(data, split)
        ref = np.stack([np.bincount(cond[off[u]:off[u] + e, 1], minlength=6)[2:6] for u, e in zip(users, end)]) + 0.5
        ref = (ref / ref.sum(1, keepdims=True)).astype(np.float32)
        assert np.array_equal(ev.history_weights(data, split, 1, 6, 0.5), ref)
        assert np.array_equal(ev.history_weights(data, split, 1, 6, 0.5, users[::3]), ref[::3])


# ------------------------------------------------------------------------------------ evaluate
def _tiny_model(n_items, n_cond=(6, 6), d=16):
    from lumctl.models import build
    cfg = {"n_items": n_items, "cond_vocab": list(n_cond), "n_genres": 0, "n_categories": 0, "n_popularity": 0,
           "d_model": d, "n_layers": 1, "n_heads": 2, "d_ff": 32, "d_feat": 0, "dropout": 0.0, "attention": "sdpa"}
    torch.manual_seed(0)
    return build("lum", cfg)


def _evaluate(model, data, **eval_kw):
    p = PretrainSpec(eval={"batch_rows": 4, **eval_kw})
    out: list = []
    m = ev.evaluate(model, data, "valid", p, PackSpec(seq_len=64, max_items=12), torch.device("cpu"),
                    np.array([1, 1], np.int32), contextlib.nullcontext, {}, 1.0, ["a", "b"], out)
    return m, out[0]


def test_evaluate_blocks_and_samples():
    data = _log(np.random.default_rng(2), U=50, I=30)
    model = _tiny_model(30)
    whole, (r_whole, t_whole) = _evaluate(model, data)
    blocked, (r_blocked, _) = _evaluate(model, data, item_block=7, user_batch=5)
    assert "users_sampled" not in whole and whole["n"] == len(r_whole)
    assert np.abs(r_blocked - r_whole).max() <= 1 and abs(blocked["mrr"] - whole["mrr"]) < 1e-3
    sample, (r_sample, t_sample) = _evaluate(model, data, users=10)
    assert sample["n"] == 10 and sample["users_sampled"] == f"10 of {whole['n']}"
    again, (r_again, _) = _evaluate(model, data, users=10)
    assert again == sample and r_again.tolist() == r_sample.tolist()


# ------------------------------------------------------------------------------------ full softmax loss
@pytest.mark.parametrize("block", [1, 3, 7, 40])
def test_full_softmax_in_blocks_equals_one_product(block):
    torch.manual_seed(0)
    table = torch.nn.Embedding(23, 8)
    o = torch.randn(11, 8, requires_grad=True)
    target = torch.randint(2, 23, (11,))
    tau = torch.tensor(0.2, requires_grad=True)
    grads = []
    for n_items in (None, 23):
        table.zero_grad(); o.grad = None; tau.grad = None
        loss = info_nce(o, target, lambda ids: table.weight if ids is None else table(ids), negatives="full",
                        tau=tau, n_items=n_items, item_block=block)
        loss.backward()
        grads.append((loss.detach(), o.grad.clone(), table.weight.grad.clone(), tau.grad.clone()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_full_softmax_loss_by_hand():
    # two items from id 2 with orthogonal unit keys; o points at item 2: loss = log(e^{1/tau} + 1) - 1/tau
    keys = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    o = torch.tensor([[1.0, 0.0]])
    loss = info_nce(o, torch.tensor([2]), lambda ids: keys if ids is None else keys[ids], negatives="full",
                    tau=0.5, n_items=4, item_block=1)
    assert float(loss) == pytest.approx(np.log(np.exp(2.0) + 1.0) - 2.0, abs=1e-6)


# ------------------------------------------------------------------------------------ catalogue scale
@pytest.mark.slow
def test_a_step_and_a_sampled_evaluation_at_four_million_items():
    n_items = 4_200_000
    rng = np.random.default_rng(0)
    data = _log(rng, U=3000, I=n_items)
    model = _tiny_model(n_items, d=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, S = 4, 64
    batch = {"type": torch.tensor([1, 2] * (S // 2)).repeat(B, 1).to(torch.int8),
             "item": torch.as_tensor(rng.integers(2, n_items, (B, S))),
             "cond": torch.ones(B, S, 2, dtype=torch.long), "segment": torch.zeros(B, S, dtype=torch.int32),
             "pos": torch.arange(S, dtype=torch.int32).repeat(B, 1),
             "target": torch.as_tensor(rng.integers(2, n_items, (B, S)))}
    batch["loss_mask"] = batch["type"] == 1
    from lumctl.attention import make_mask
    from lumctl.ops.packing import document_causal_mask
    batch["mask"] = torch.from_numpy(document_causal_mask(batch["segment"].numpy()))
    logq = sampling_logq(torch.zeros(n_items), "uniform")
    t0 = time.time()
    for negatives in ("in_batch", "sampled"):
        o = model(batch, make_mask(batch, "sdpa"))
        m = batch["loss_mask"]
        loss = info_nce(o[m], batch["target"][m], model.item_table, negatives=negatives, tau=0.05,
                        sample_logq=logq, generator=torch.Generator().manual_seed(0), n_items=n_items)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
    t_train = time.time() - t0
    t0 = time.time()
    metrics, (ranks, _) = _evaluate(model, data, users=1000, user_batch=128)
    t_eval = time.time() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"4.2M items: two training steps {t_train:.1f}s, 1k-user evaluation {t_eval:.1f}s, peak RSS {peak_gib:.2f} GiB")
    assert metrics["n"] == 1000 and metrics["users_sampled"].startswith("1000 of ")
    assert (ranks >= 0).all() and (ranks < n_items).all()
    # the table, its gradient and AdamW moments are 4 x 0.27 GB; a users x items matrix alone would be 16.8 GB
    assert peak_gib < 4
    assert t_train < 120 and t_eval < 300  # loose: the 2-core machine is shared
