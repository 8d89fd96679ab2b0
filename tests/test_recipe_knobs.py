"""Recipe knobs of pretrain: dot-product logits, LUM embedding dropout, early stopping on validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lumctl.evaluation import dot_scores, item_keys, rank_full_ref
from lumctl.loss import info_nce
from lumctl.models.lum import LUM, LUMConfig
from lumctl.specs import deep_merge, load_spec, parse_spec, read_toml
from lumctl.stages import pretrain as pt
from lumctl.stages import run_all

# items 0 (pad), 1 (unk), 2, 3, 4: item 4 is item 2 scaled by 3 (same direction, longer)
ITEMS = [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.0]]


def _table(E):
    E = torch.as_tensor(E, dtype=torch.float32)
    return lambda ids: E if ids is None else E[ids]


def _hand_ce(o, pos, negs, tau):
    """-log softmax of the plain inner products / tau, in Python."""
    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))
    p = math.exp(dot(o, pos) / tau)
    return -math.log(p / (p + sum(math.exp(dot(o, k) / tau) for k in negs)))


def test_dot_similarity_full_softmax_by_hand():
    o = torch.tensor([[2.0, 0.5], [0.1, 1.0]])
    target = torch.tensor([2, 3])
    got = info_nce(o, target, _table(ITEMS), negatives="full", tau=1.0, similarity="dot")
    want = np.mean([_hand_ce([2.0, 0.5], ITEMS[2], [ITEMS[3], ITEMS[4]], 1.0),
                    _hand_ce([0.1, 1.0], ITEMS[3], [ITEMS[2], ITEMS[4]], 1.0)])
    assert got.item() == pytest.approx(want, rel=1e-5)
    # cosine sees items 2 and 4 as the same direction; the inner product does not
    cos = info_nce(o, target, _table(ITEMS), negatives="full", tau=1.0)
    assert abs(cos.item() - got.item()) > 0.1


def test_dot_similarity_in_blocks_equals_one_product():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(40, 8, generator=g)
    o = torch.randn(6, 8, generator=g)
    t = torch.randint(2, 40, (6,), generator=g)
    one = info_nce(o, t, _table(E), negatives="full", tau=0.7, similarity="dot")
    blocks = info_nce(o, t, _table(E), negatives="full", tau=0.7, similarity="dot", n_items=40, item_block=7)
    assert blocks.item() == pytest.approx(one.item(), rel=1e-5)
    with pytest.raises(ValueError, match="similarity"):
        info_nce(o, t, _table(E), negatives="full", tau=1.0, similarity="l2")


def test_dot_evaluation_ranks_by_the_inner_product():
    class M(torch.nn.Module):
        config = type("C", (), {"n_items": 5, "d_model": 2})

        def item_table(self, ids):
            return torch.tensor(ITEMS)[ids]

    keys_cos = item_keys(M(), 3, "cpu", lambda: torch.autocast("cpu", enabled=False))
    keys_dot = item_keys(M(), 3, "cpu", lambda: torch.autocast("cpu", enabled=False), normalize=False)
    q = torch.tensor([[1.0, 0.1]])
    target, seen = np.array([2]), [np.array([], np.int64)]
    # cosine: item 4 ties item 2 (same direction), a tie counts for the target -> rank 0
    s = torch.zeros(1, 5)
    s[:, :] = dot_scores(q, keys_cos)(slice(0, 1), 0, 5)
    assert rank_full_ref(s, target, seen)[0] == 0
    # inner product: item 4 (3x longer) scores 3.0 > 1.0 -> rank 1
    s[:, :] = dot_scores(q, keys_dot)(slice(0, 1), 0, 5)
    assert rank_full_ref(s, target, seen)[0] == 1


def test_lum_embed_dropout_acts_on_the_inputs_only_in_training():
    c = LUMConfig(n_items=10, d_model=16, n_layers=1, n_heads=2, d_ff=32, embed_dropout=0.5)
    m = LUM(c)
    b = {"type": torch.full((1, 4), 2), "item": torch.tensor([[2, 3, 4, 5]]), "cond": torch.zeros(1, 4, 0, dtype=torch.long),
         "pos": torch.arange(4)[None]}
    mask = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None]          # (B, S, S)
    m.eval()
    ref = m(b, mask)
    assert torch.equal(ref, m(b, mask))                       # no dropout at evaluation
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m(b, mask), ref)
    m0 = LUM(LUMConfig(n_items=10, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    m0.load_state_dict(m.state_dict())
    m0.train()
    assert torch.allclose(m0(b, mask), ref)                  # embed_dropout 0 (the default): training = evaluation


def test_embed_dropout_is_a_lum_option():
    from lumctl.specs import ModelSpec
    assert ModelSpec(kind="lum", embed_dropout=0.3).embed_dropout == 0.3
    with pytest.raises(ValueError, match="embed_dropout is a lum option"):
        ModelSpec(kind="sasrec", preset="sasrec-ml1m", embed_dropout=0.3)


def test_lum_item_proj_false_uses_the_id_embedding_as_token_and_key():
    c = LUMConfig(n_items=10, d_model=16, n_layers=1, n_heads=2, d_ff=32, item_proj=False)
    m = LUM(c)
    ids = torch.tensor([2, 3, 9])
    assert torch.equal(m.item_table(ids), m.items.id.weight[ids])            # the key is the id embedding
    b = {"type": torch.full((1, 3), 2), "item": ids[None], "cond": torch.zeros(1, 3, 0, dtype=torch.long)}
    assert torch.equal(m.embed(b)[0], m.items.id.weight[ids])                # and so is the input token
    assert not any(k.startswith("items.proj") for k in m.state_dict())
    assert "items.proj.weight" in LUM(LUMConfig(n_items=10, d_model=16, n_layers=1, n_heads=2, d_ff=32)).state_dict()
    with pytest.raises(ValueError, match="item_proj = False needs"):          # side features need the projection
        LUM(LUMConfig(n_items=10, n_popularity=4, d_model=16, n_layers=1, n_heads=2, d_ff=32, item_proj=False))


def test_item_proj_is_a_lum_option_without_side_features():
    from lumctl.specs import ModelSpec
    assert not ModelSpec(kind="lum", item_features=False, item_proj=False).item_proj
    with pytest.raises(ValueError, match="item_proj = false needs item_features = false"):
        ModelSpec(kind="lum", item_proj=False)
    with pytest.raises(ValueError, match="item_proj = false needs"):
        ModelSpec(kind="lum", item_features=False, d_feat=32, item_proj=False)
    with pytest.raises(ValueError, match="item_proj is a lum option"):
        ModelSpec(kind="sasrec", preset="sasrec-ml1m", item_proj=False)


def test_early_stop_counts_evaluations_since_the_best():
    assert not pt.early_stop(step=30, best_step=10, eval_every=10, patience=0)   # off
    assert not pt.early_stop(step=20, best_step=10, eval_every=10, patience=2)   # 1 evaluation without gain
    assert pt.early_stop(step=30, best_step=10, eval_every=10, patience=2)       # 2
    assert not pt.early_stop(step=30, best_step=30, eval_every=10, patience=1)   # this one was the best


def test_patience_stops_training_and_keeps_the_best_checkpoint(tiny_spec):
    base = read_toml(tiny_spec(steps=40, every=2, ckpt=100))
    # lr 0: the validation score never changes, so the first evaluation stays the best
    spec = parse_spec(deep_merge(base, {"pretrain": {"optim": {"lr": 1e-12, "warmup_steps": 0},
                                                     "eval": {"patience": 3}}}))
    run_all(spec, upto="pretrain")
    out = spec.store("pretrain")
    m = json.loads((out / "final" / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert m["best_step"] == 2
    assert manifest["counts"]["steps"] == 8                  # evaluations at 2 (best), 4, 6, 8 -> stop
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert max(steps) == 8
    # patience 0: all 40 steps
    spec0 = parse_spec(deep_merge(base, {"experiment": "tiny-all", "pretrain": {"optim": {"lr": 1e-12, "warmup_steps": 0}}}))
    run_all(spec0, upto="pretrain")
    assert json.loads((spec0.store("pretrain") / "manifest.json").read_text())["counts"]["steps"] == 40


def test_defaults_keep_cosine_no_embed_dropout_no_patience(tiny_spec):
    spec = load_spec(tiny_spec())
    assert spec.pretrain.loss.similarity == "cosine"
    assert spec.pretrain.model.embed_dropout == 0.0
    assert spec.pretrain.eval.patience == 0


def test_ema_update_by_hand():
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        a.weight.fill_(1.0), a.bias.fill_(0.0), b.weight.fill_(3.0), b.bias.fill_(2.0)
    pt.ema_update(a, b, 0.75)                                   # 0.75 * 1 + 0.25 * 3 = 1.5; 0.25 * 2 = 0.5
    assert torch.allclose(a.weight, torch.full((1, 2), 1.5)) and torch.allclose(a.bias, torch.tensor([0.5]))
    assert pt.ema_decay(1, 0.999) == pytest.approx(2 / 11)     # warm-up: (1 + t) / (10 + t)
    assert pt.ema_decay(100_000, 0.999) == 0.999


def test_ema_publishes_the_averaged_weights_and_resumes(tiny_spec):
    base = read_toml(tiny_spec(steps=6, every=3, ckpt=3))
    spec = parse_spec(deep_merge(base, {"pretrain": {"optim": {"ema": 0.9}}}))
    run_all(spec, upto="pretrain")
    out = spec.store("pretrain")
    final = torch.load(out / "final" / "model.pt", weights_only=True)
    raw = torch.load(out / "checkpoints" / "step-00000006" / "model.pt", weights_only=True)
    avg = torch.load(out / "checkpoints" / "step-00000006" / "ema.pt", weights_only=True)
    best = json.loads((out / "final" / "metrics.json").read_text())["best_step"]
    k = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(avg[k], raw[k])                  # the average is not the raw weights
    if best == 6:
        assert torch.equal(final[k], avg[k])
    # a run stopped at step 3 and resumed ends with the same published weights
    pt.run(spec, force=True, until_step=3)
    pt.run(spec, resume=True)
    again = torch.load(out / "final" / "model.pt", weights_only=True)
    for name in final:
        assert torch.equal(final[name], again[name]), name
