"""Step 3 (`lumctl fuse`): warm start predicts as the base at step 0, no leakage
from a sample's own or later events, the stage through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import invoke

from lumctl.models.dlrm import DLRM, DLRMConfig
from lumctl.specs import FuseSpec, load_spec
from lumctl.stages import fuse as f

BACKBONES = ["dnn", "din", "dien", "sim", "two_tower", "hstu"]


# ------------------------------------------------------------------------------ warm start
def toy_config(backbone: str, lum: str = "none") -> DLRMConfig:
    return DLRMConfig(backbone=backbone, n_items=12, n_categories=5, n_genres=3, user_vocab=[4, 6], d_emb=8,
                      mlp=[16, 8], lum=lum, n_queries=3, d_lum=6)


def toy_batch(B: int = 7, L: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) > 0.3
    lum = torch.nn.functional.normalize(torch.randn(B, 3, 6, generator=g), dim=-1)
    return {"user_attr": torch.stack([torch.randint(0, 4, (B,), generator=g), torch.randint(0, 6, (B,), generator=g)], 1),
            "item": torch.randint(2, 12, (B,), generator=g),
            "hist": torch.randint(2, 12, (B, L), generator=g) * mask, "hist_mask": mask,
            "hist_action": torch.randint(1, 3, (B, L), generator=g) * mask,
            "sim_hist": torch.randint(2, 12, (B, L), generator=g) * mask, "sim_mask": mask,
            "lum": lum, "lum_item": torch.nn.functional.normalize(torch.randn(B, 6, generator=g), dim=-1),
            "lum_missing": (torch.rand(B, generator=g) > 0.7).float()}


def item_tables():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 5, (12,), generator=g), (torch.rand(12, 3, generator=g) > 0.5).float()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_warm_start_predicts_as_the_base_at_step_0(backbone, tmp_path):
    torch.manual_seed(0)
    base = DLRM(toy_config(backbone), *item_tables())
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.3)
    torch.save(base.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model": base.cfg.to_dict()}))
    torch.manual_seed(1)
    fused = DLRM(toy_config(backbone, "direct+match"), *item_tables())
    f.warm_start(fused, tmp_path)
    batch = toy_batch()
    base.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(base(batch), fused(batch))
    # the LUM layers do learn: one step moves the prediction
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused.train()
    fused.loss(batch, (torch.arange(7) % 2).float()).backward()
    grads = [p.grad for n, p in fused.named_parameters() if n.startswith("lum_")]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    opt.step()
    # a different backbone is refused
    other = DLRM(toy_config("dnn" if backbone != "dnn" else "din", "direct"), *item_tables())
    with pytest.raises(Exception, match="backbone"):
        f.warm_start(other, tmp_path)


# ------------------------------------------------------------------------------ leakage
def data_dict(n_events=(12, 9, 15), seed=0) -> dict:
    rng = np.random.default_rng(seed)
    E = sum(n_events)
    ts = np.concatenate([np.sort(rng.integers(0, 3 * n, n)) for n in n_events]).astype(np.int64)  # many ties
    offsets = np.concatenate([[0], np.cumsum(n_events)]).astype(np.int64)
    n = np.asarray(n_events)
    return {"events/item": rng.integers(2, 12, E).astype(np.int32), "events/timestamp": ts,
            "events/user": np.repeat(np.arange(len(n)), n).astype(np.int32),
            "events/rating": rng.integers(1, 6, E).astype(np.float32), "users/offsets": offsets,
            "users/split": np.stack([n - 4, n - 2], 1).astype(np.int64),
            "users/gender": rng.integers(2, 4, len(n)).astype(np.int32), "vocab/user_gender": np.array(["<pad>", "<unk>", "F", "M"]),
            "items/category": rng.integers(2, 5, 12).astype(np.int32), "vocab/category": np.array(["<pad>", "<unk>", "a", "b", "c"]),
            "vocab/item": np.array([str(i) for i in range(12)])}


def answers(data: dict, seed=0, T=6) -> dict:
    """A fake query store: snapshots of each user at increasing timestamps."""
    rng = np.random.default_rng(seed)
    U = len(data["users/offsets"]) - 1
    ts = np.sort(rng.integers(0, 40, (U, T)), 1).astype(np.int64)
    valid = rng.random((U, T)) > 0.2
    return {"user_emb": rng.normal(size=(U, T, 3, 6)).astype(np.float32), "snapshot_valid": valid,
            "snapshot_ts": np.where(valid, ts, -1), "user_index": np.arange(U), "item_emb": rng.normal(size=(12, 6))}


@pytest.mark.parametrize("backbone", ["sim", "din", "hstu"])
def test_features_do_not_change_when_own_and_later_events_change(backbone):
    fs = FuseSpec(backbone=backbone, lum="direct+match", history_len=6, sim_search_len=8)
    data, ans = data_dict(), answers(data_dict())
    rng = np.random.default_rng(5)
    u, off = 2, data["users/offsets"]
    for e in range(off[u], off[u + 1]):
        before = f.Features(data, fs, ans).numpy(np.arange(off[-1]))
        d2 = {k: v.copy() for k, v in data.items()}
        a2 = {k: v.copy() for k, v in ans.items()}
        later = slice(e, off[u + 1])
        d2["events/rating"][later] = rng.integers(1, 6, later.stop - e)
        d2["events/item"][e + 1:off[u + 1]] = rng.integers(2, 12, off[u + 1] - e - 1)
        d2["events/timestamp"][e + 1:off[u + 1]] += rng.integers(0, 3)        # later events move later
        t = data["events/timestamp"][e]
        future = a2["snapshot_ts"][u] >= t                                      # snapshots not before the sample
        a2["user_emb"][u, future] = rng.normal(size=a2["user_emb"][u, future].shape)
        a2["snapshot_valid"][u, future] = rng.random(future.sum()) > 0.5
        after = f.Features(d2, fs, a2).numpy(np.arange(off[-1]))
        extra = {"sim": ("sim_hist", "sim_mask"), "hstu": ("hist_action",)}.get(backbone, ())
        for k in ("hist", "hist_mask", "lum", "lum_missing", "user_attr") + extra:
            np.testing.assert_array_equal(after[k][e], before[k][e], err_msg=f"{k} of event {e}")
        # earlier samples of the user are unaffected too; the change is visible to a later sample
        np.testing.assert_array_equal(after["hist"][off[u]:e], before["hist"][off[u]:e])


def test_history_is_strictly_before_the_sample_time():
    data = data_dict()
    feats = f.Features(data, FuseSpec(history_len=50), None)
    b = feats.numpy(np.arange(len(data["events/item"])))
    ts, off = data["events/timestamp"], data["users/offsets"]
    for e in range(len(ts)):
        u = data["events/user"][e]
        want = [data["events/item"][j] for j in range(off[u], off[u + 1]) if ts[j] < ts[e]]
        assert b["hist"][e][b["hist_mask"][e]].tolist() == want


def test_point_in_time_join_by_hand():
    ans = {"snapshot_valid": np.array([[True, True, False, True]]), "snapshot_ts": np.array([[5, 9, -1, 20]]),
           "user_index": np.array([0])}
    _, slot, has = f.join_snapshots(ans, np.zeros(5, np.int64), np.array([3, 5, 6, 20, 21]), 1)
    assert has.tolist() == [False, False, True, True, True]
    assert slot[has].tolist() == [0, 1, 3]


# ------------------------------------------------------------------------------ the stage via the CLI
QUERY_FUSE = """
[query]
each = ["scenario"]
snapshot = "every_n_events"
every_n_events = 4
dtype = "float32"

[fuse]
backbone = "din"
lum = "{lum}"
history_len = 10
d_emb = 8
mlp = [16, 8]
batch_size = 64
epochs = 2
init_from = "{init}"
"""


def test_fuse_stage_end_to_end(tiny_spec, tmp_path):
    import zarr
    path = tiny_spec(steps=4, every=4, ckpt=4)
    base_text = path.read_text()
    path.write_text(base_text + QUERY_FUSE.format(lum="none", init=""))
    r = invoke("run", path)                                     # synth ... query, fuse (base)
    assert r.exit_code == 0, r.output
    spec = load_spec(path)
    out = spec.store("fuse")
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["test"]["auc"]["mean"] <= 1 and m["lum"] == "none"
    assert {"model.pt", "config.json"} <= {p.name for p in (out / "final").iterdir()}
    g = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert g["logit"].shape == (1, counts["valid"] + counts["test"]) and set(np.unique(g["split"][...])) == {1, 2}
    # warm start from the base (two seeds), LUM direct+match, two seeds: seed k continues base seed k
    r = invoke("fuse", path, "--seeds", "2")
    assert r.exit_code == 0, r.output
    base = tmp_path / "base"
    out.rename(base)
    path.write_text(base_text + QUERY_FUSE.format(lum="direct+match", init=base / "final"))
    r = invoke("fuse", path, "--seeds", "2")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["seeds"]) == 2 and m["lum_coverage"]["test"] > 0.9
    per_seed = [s["test"]["auc"] for s in m["seeds"]]
    assert per_seed[0] != per_seed[1]                                 # two seeds, two models
    assert m["test"]["auc"]["mean"] == pytest.approx(np.mean(per_seed))
    assert m["test"]["auc"]["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2)   # ddof 0 of two values
    # step 0 of the warm start (logged as epoch 0) scores valid exactly as the trained base seed did
    base_seeds = json.loads((base / "metrics.json").read_text())["seeds"]
    assert base_seeds[0]["valid"]["logloss"] != base_seeds[1]["valid"]["logloss"]
    for k in (0, 1):
        step0 = m["seeds"][k]["epochs"][0]
        assert step0["epoch"] == 0
        assert step0["valid"]["auc"] == pytest.approx(base_seeds[k]["valid"]["auc"], abs=1e-12)
        assert step0["valid"]["logloss"] == pytest.approx(base_seeds[k]["valid"]["logloss"], abs=1e-9)
    assert (out / "seeds" / "seed-1" / "model.pt").is_file()
    r = invoke("fuse", path, "--seeds", "2")
    assert r.exit_code == 0 and "is up to date" in r.stderr, r.output


def test_fuse_spec_errors(tiny_spec):
    path = tiny_spec()
    text = path.read_text()
    path.write_text(text + '\n[fuse]\nlum = "direct"\n')
    r = invoke("fuse", path)
    assert r.exit_code == 2 and "needs a [query] section" in r.stderr
    path.write_text(text + '\n[fuse]\nbackbone = "dcn"\n')
    r = invoke("spec", "validate", path)
    assert r.exit_code == 2 and "[fuse].backbone" in r.stderr
    path.write_text(text)
    r = invoke("fuse", path)
    assert r.exit_code == 2 and "[fuse]: section missing" in r.stderr


def test_history_and_hard_search_by_hand():
    ev_item = np.array([2, 3, 4, 5, 6, 7])
    cat = np.array([0, 0, 2, 3, 2, 3, 2, 0])                   # item -> category (0 = none)
    items, mask = f.history(ev_item, np.array([0, 2]), np.array([4, 3]), 3)
    np.testing.assert_array_equal(items, [[3, 4, 5], [0, 0, 4]])
    np.testing.assert_array_equal(mask, [[True, True, True], [False, False, True]])
    # target 6 (category 2): category-2 items among events [0, 5) are 2, 4, 6 -> the last two, right-aligned
    items, mask = f.hard_search(ev_item, cat, np.array([0]), np.array([5]), np.array([6]), W=5, L=2)
    np.testing.assert_array_equal(items, [[4, 6]])
    items, mask = f.hard_search(ev_item, cat, np.array([0]), np.array([5]), np.array([7]), W=5, L=3)
    np.testing.assert_array_equal(items, [[0, 0, 0]])          # target without a category: nothing found
    assert not mask.any()


# ------------------------------------------------------------------------------ dien auxiliary loss
def test_dien_aux_loss_by_hand():
    torch.manual_seed(0)
    model = DLRM(toy_config("dien"), *item_tables())
    batch = toy_batch()
    states = model.run(batch)["states"]                                  # (B, L, d)
    neg = torch.randint(2, 12, batch["hist"].shape)
    terms = []
    for b in range(7):
        for l in range(4):
            if batch["hist_mask"][b, l] and batch["hist_mask"][b, l + 1]:
                h = states[b, l]
                p = torch.sigmoid(h @ model.item_vec(batch["hist"][b, l + 1]))
                q = torch.sigmoid(h @ model.item_vec(neg[b, l + 1]))
                terms.append(-torch.log(p) - torch.log(1 - q))
    want = torch.stack(terms).mean()
    assert model.aux_loss(states, batch["hist"], batch["hist_mask"], neg).item() == pytest.approx(want.item(), rel=1e-5)
    # loss = BCE + weight x aux (same negatives: same generator state)
    label = (torch.arange(7) % 2).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), label)
    assert model.loss(batch, label, aux_weight=0.0).item() == pytest.approx(bce.item(), rel=1e-6)
    torch.manual_seed(3)
    neg = torch.randint(2, 12, batch["hist"].shape)
    torch.manual_seed(3)
    got = model.loss(batch, label, aux_weight=0.5)
    assert got.item() == pytest.approx(bce.item() + 0.5 * model.aux_loss(states, batch["hist"], batch["hist_mask"], neg).item(), rel=1e-5)


def test_dien_aux_loss_learns_the_next_behaviour():
    # histories walk the items in order (i -> i + 1): the auxiliary loss alone teaches the GRU states that
    torch.manual_seed(0)
    model = DLRM(toy_config("dien"), *item_tables())
    start = torch.randint(2, 6, (64,))
    hist = start[:, None] + torch.arange(5)                              # (64, 5) items 2..10
    mask = torch.ones(64, 5, dtype=torch.bool)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)

    def aux():
        return model.aux_loss(model.extract(model.item_vec(hist), mask.float()), hist, mask,
                              torch.randint(2, 12, hist.shape))
    first = aux().item()
    for _ in range(60):
        opt.zero_grad()
        loss = aux()
        loss.backward()
        opt.step()
    assert aux().item() < 0.5 * first


# ------------------------------------------------------------------------------ two-tower retrieval
def active_two_tower(lum: str) -> DLRM:
    """A toy two_tower in eval mode whose zero-initialised LUM layers are made active (random weights)."""
    torch.manual_seed(0)
    model = DLRM(toy_config("two_tower", lum), *item_tables())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("lum_"):
                p.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("lum", ["none", "direct+match"])
def test_retrieval_scores_rank_as_the_logits(lum):
    model = active_two_tower(lum)
    batch = toy_batch()
    lum_items = torch.nn.functional.normalize(torch.randn(12, 6), dim=-1)
    items = torch.arange(12)
    with torch.no_grad():
        scores = model.retrieval_scores(batch, items, lum_items)        # (B, I)
        for j in range(12):
            b = {**batch, "item": torch.full((7,), j), "lum_item": lum_items[j].expand(7, 6)}
            logit = model(b)
            if j == 0:
                const = logit - scores[:, 0]
            torch.testing.assert_close(logit - scores[:, j], const, rtol=0, atol=1e-4)


@pytest.mark.parametrize("lum", ["none", "direct+match"])
def test_in_batch_softmax_scores_pairs_as_retrieval_does(lum):
    """Every user positive: loss - BCE = cross-entropy of retrieval_scores over the batch's own items."""
    model = active_two_tower(lum)
    batch = toy_batch()
    batch["item"] = torch.arange(2, 9)                                   # 7 distinct items
    label = torch.ones(7)
    with torch.no_grad():
        bce = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), label)
        scores = model.retrieval_scores(batch, batch["item"], batch.get("lum_item"))  # (7, 7)
        want = bce + torch.nn.functional.cross_entropy(scores, torch.arange(7))
        torch.testing.assert_close(model.loss(batch, label), want, rtol=0, atol=1e-5)


def test_retrieval_recall_by_hand():
    data = data_dict()
    fs = FuseSpec(backbone="two_tower", history_len=6, mlp=[8])
    feats = f.Features(data, fs, None)
    model = DLRM(f.model_config(data, fs, feats), None, None)
    s = feats.s
    # a model that scores items by a fixed preference: item 11 > 10 > ... > 2
    model.retrieval_scores = lambda batch, items, lum: items.float()[None].expand(len(batch["item"]), -1).clone()
    got = f.retrieval(model, feats, 2, [1, 3], torch.device("cpu"))
    want1, want3 = [], []
    for u in range(3):
        ev = np.flatnonzero((s["split"] == 2) & (s["user"] == u))
        pos = set(feats.ev_item[ev[s["label"][ev] > 0.5]].tolist())
        if not pos:
            continue
        seen = set(feats.ev_item[s["user_start"][ev[0]]:ev[0]].tolist()) - pos
        ranked = [i for i in range(11, 1, -1) if i not in seen]
        want1.append(len(pos & set(ranked[:1])) / len(pos))
        want3.append(len(pos & set(ranked[:3])) / len(pos))
    assert got["users"] == len(want1) > 0
    assert got["recall@1"] == pytest.approx(np.mean(want1)) and got["recall@3"] == pytest.approx(np.mean(want3))


# ------------------------------------------------------------------------------ activations, attention norm
def test_dice_and_prelu_by_hand():
    from lumctl.models.dlrm import Dice, PReLU
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-1.0, 0.5]])
    d = Dice(2, momentum=0.5)
    with torch.no_grad():
        d.alpha.copy_(torch.tensor([0.1, -0.3]))
    m, v = x.mean(0), x.var(0, unbiased=False)
    p = torch.sigmoid((x - m) / torch.sqrt(v + 1e-8))
    torch.testing.assert_close(d(x), p * x + (1 - p) * d.alpha * x)
    torch.testing.assert_close(d.mean, 0.5 * m)                          # running moments (from 0 and 1)
    torch.testing.assert_close(d.var, 0.5 + 0.5 * v)
    d.eval()
    p = torch.sigmoid((x - d.mean) / torch.sqrt(d.var + 1e-8))
    torch.testing.assert_close(d(x), p * x + (1 - p) * d.alpha * x)
    assert d(x[:1]).shape == (1, 2) and d(x[None]).shape == (1, 3, 2)    # any leading shape, batch of one
    pr = PReLU(2)
    torch.testing.assert_close(pr(x), torch.where(x > 0, x, 0.25 * x))


def test_softmax_target_attention_is_a_weighted_mean_of_the_real_events():
    from lumctl.models.dlrm import TargetAttention
    torch.manual_seed(0)
    att = TargetAttention(4, norm="softmax")
    h, t = torch.randn(3, 5, 4), torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]).float()
    got = att(h, t, mask)
    s = att.scores(h, t)
    for b in range(2):
        w = torch.softmax(s[b][mask[b] > 0], 0)
        torch.testing.assert_close(got[b], (w[:, None] * h[b][mask[b] > 0]).sum(0))
    torch.testing.assert_close(got[2], torch.zeros(4))                   # no history -> zeros


@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_warm_start_with_other_activations(activation, tmp_path):
    cfg = toy_config("din")
    cfg.activation = activation
    base = DLRM(cfg, *item_tables())
    base.train()
    base(toy_batch(seed=3))                                              # move Dice's running moments
    torch.save(base.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({"model": base.cfg.to_dict()}))
    cfg2 = toy_config("din", "direct+match")
    cfg2.activation = activation
    fused = DLRM(cfg2, *item_tables())
    f.warm_start(fused, tmp_path)
    base.eval(), fused.eval()
    with torch.no_grad():
        assert torch.equal(base(toy_batch()), fused(toy_batch()))



def test_hstu_ranker_reads_the_history_actions_causally():
    """The target's score depends on the past like/dislike actions, and padding never matters."""
    torch.manual_seed(0)
    model = DLRM(toy_config("hstu"), *item_tables()).eval()
    b = toy_batch()
    with torch.no_grad():
        base = model(b)
        flipped = dict(b, hist_action=torch.where(b["hist_mask"], 3 - b["hist_action"], 0))  # 1 <-> 2 on real events
        assert not torch.allclose(model(flipped), base)
        padded = dict(b, hist=torch.where(b["hist_mask"], b["hist"], 7))                      # garbage under the mask
        padded["hist_action"] = torch.where(b["hist_mask"], b["hist_action"], 2)
        torch.testing.assert_close(model(padded), base)
