"""TWIN (lumctl/models/dlrm/twin.py): the general search unit scores with the exact search unit's own
parameters, top-k picks the highest-scoring behaviours, pads never matter."""

from __future__ import annotations

import math

import pytest
import torch
from test_fuse import item_tables, toy_batch, toy_config

from lumctl.models.dlrm import BACKBONES, DLRMConfig, build
from lumctl.models.dlrm.twin import TWIN, recency_buckets


def test_registry_builds_every_backbone():
    for name, cls in BACKBONES.items():
        assert type(build(toy_config(name), *item_tables())) is cls


def test_recency_buckets_by_hand():
    # slots of a right-aligned history of 6: events ago 5 4 3 2 1 0 -> floor(log2(ago + 1))
    assert recency_buckets(6).tolist() == [2, 2, 2, 1, 1, 0]


def test_gsu_and_esu_share_parameters():
    torch.manual_seed(0)
    model = build(toy_config("twin"), *item_tables()).eval()
    batch = toy_batch()
    with torch.no_grad():
        out = model.run(batch)
        gsu, top = out["gsu"], out["top"]                                    # (B, W), (B, K)
        # the GSU score of each picked behaviour is the ESU's attention logit averaged over heads
        t = model.item_vec(batch["item"])
        picked = torch.gather(batch["long_hist"], 1, top)
        rec = recency_buckets(batch["long_hist"].shape[1])[top]
        esu_alpha = model.twin.scores(model.item_vec(picked), t, rec)        # (B, H, K)
        real = torch.gather(batch["long_mask"], 1, top)
        torch.testing.assert_close(esu_alpha.mean(1)[real], torch.gather(gsu, 1, top)[real])
        # changing an ESU projection changes the GSU scores (no separate GSU parameters exist)
        model.twin.w_h.weight.mul_(-2.0)
        gsu2 = model.run(batch)["gsu"]
    m = batch["long_mask"]
    assert not torch.allclose(gsu[m], gsu2[m])
    assert not any("gsu" in n for n, _ in model.named_parameters())


def hand_model() -> TWIN:
    """d = 2, one head, identity projections, no cross term, no category/genre: alpha = k . t / sqrt(2)."""
    cfg = DLRMConfig(backbone="twin", n_items=7, d_emb=2, mlp=[4], twin_top_k=2, twin_heads=1)
    model = build(cfg)
    with torch.no_grad():
        model.item.weight.copy_(torch.tensor([[0, 0], [0, 0], [0.5, 0], [2, 0], [-1, 0], [1, 0], [3, 0]]))
        model.twin.w_q.weight.copy_(torch.eye(2))
        model.twin.w_h.weight.copy_(torch.eye(2))
        model.twin.w_c.weight.zero_()
        model.twin.w_v.weight.copy_(torch.cat([torch.eye(2), torch.zeros(2, 2)], 1))  # V = inherent features
        model.twin.w_o.weight.copy_(torch.eye(2))
    return model.eval()


def test_top_k_picks_the_highest_scoring_behaviours_by_hand():
    model = hand_model()
    t = torch.tensor([[1.0, 0.0]])                                           # target vector
    # slots 0..4 hold items 2 3 4 5 6 (scores .5 2 -1 1 3 / sqrt 2); item 6 (score 3) sits under a pad
    long_hist = torch.tensor([[2, 3, 4, 5, 6]])
    long_mask = torch.tensor([[True, True, True, True, False]])
    with torch.no_grad():
        s, top = model.search(long_hist, long_mask, t)
    torch.testing.assert_close(s[0, :4], torch.tensor([0.5, 2, -1, 1]) / math.sqrt(2))
    assert s[0, 4] == float("-inf")
    assert top.tolist() == [[1, 3]]                                          # items 3 and 5, best first
    # the ESU: softmax over the two picks of 2/sqrt2 and 1/sqrt2, values = the item vectors
    batch = {"item": torch.tensor([5]), "hist": torch.zeros(1, 3, dtype=torch.long),
             "hist_mask": torch.zeros(1, 3, dtype=torch.bool), "user_attr": torch.zeros(1, 0, dtype=torch.long),
             "long_hist": long_hist, "long_mask": long_mask}
    with torch.no_grad():
        model.item.weight[5] = torch.tensor([1.0, 0.0])                      # the target is item 5 = t
        pooled, _ = model.interest(batch, t)
    w = torch.softmax(torch.tensor([2.0, 1.0]) / math.sqrt(2), 0)
    torch.testing.assert_close(pooled[1][0], torch.tensor([w[0] * 2 + w[1] * 1, 0.0]))


def test_fewer_events_than_k_and_pads_do_not_matter():
    torch.manual_seed(0)
    model = build(toy_config("twin"), *item_tables()).eval()                # top-k 3
    batch = toy_batch()
    batch["long_mask"][:, :-2] = False                                       # 2 real events (or fewer)
    batch["long_mask"][0] = False                                            # no long history at all
    batch["long_hist"] = batch["long_hist"] * batch["long_mask"]
    with torch.no_grad():
        base = model(batch)
        garbage = dict(batch, long_hist=torch.where(batch["long_mask"], batch["long_hist"], 7))
        torch.testing.assert_close(model(garbage), base)
    assert torch.isfinite(base).all()


@pytest.mark.parametrize("lum", ["none", "direct+match"])
def test_twin_trains(lum):
    torch.manual_seed(0)
    model = build(toy_config("twin", lum), *item_tables())
    batch, label = toy_batch(), (torch.arange(7) % 2).float()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = model.loss(batch, label)
    first.backward()
    assert model.twin.w_h.weight.grad.abs().sum() > 0                        # the ESU's logits train W^h
    for _ in range(10):
        opt.step()
        opt.zero_grad()
        model.loss(batch, label).backward()
    assert model.loss(batch, label).item() < 0.5 * first.item()
