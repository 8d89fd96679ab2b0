"""Numbers of pretrain by hand: the learning-rate schedule, the FLOP count behind the MFU figures, the
history weights and scoring of mixture evaluation, and the oracle condition."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lumctl import evaluation
from lumctl.specs import OptimSpec, PackSpec, PretrainSpec
from lumctl.stages import pretrain as pt


# ------------------------------------------------------------------------------ lr schedule
def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    o = OptimSpec(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    total = 12
    got = [pt.lr_at(s, total, o) for s in range(14)]
    want = [0.25, 0.5, 0.75, 1.0,            # warmup: lr (step + 1) / warmup_steps
            1.0,                             # t = 0: the peak
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 8)),
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
            0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 8)),
            0.55,                            # t = 1/2: halfway between lr and the floor
            0.1 + 0.9 * 0.5 * (1 + math.cos(5 * math.pi / 8)),
            0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)),
            0.1 + 0.9 * 0.5 * (1 + math.cos(7 * math.pi / 8)),
            0.1, 0.1]                        # t >= 1: the floor lr * min_lr_ratio, held
    assert got == pytest.approx(want)


def test_lr_without_warmup_and_constant():
    assert pt.lr_at(0, 10, OptimSpec(lr=2e-3, warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(2e-3)
    assert pt.lr_at(5, 10, OptimSpec(lr=2e-3, warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(1e-3)
    assert pt.lr_at(10, 10, OptimSpec(lr=2e-3, warmup_steps=0, min_lr_ratio=0.0)) == pytest.approx(0.0)
    const = OptimSpec(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0)
    assert [pt.lr_at(s, 100, const) for s in (0, 37, 99, 500)] == pytest.approx([1e-3] * 4)


# ------------------------------------------------------------------------------ FLOPs (MFU)
def test_row_costs_by_hand():
    # row 0: users of 3 and 2 tokens, one pad; row 1: one user of 4 tokens
    seg = np.array([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, -1, -1]])
    tokens, pairs = pt.row_costs(seg)
    assert tokens.tolist() == [5, 4]
    assert pairs.tolist() == [3 * 4 + 2 * 3, 4 * 5]          # sum of L (L + 1) over the row's users


def test_train_flops_by_hand():
    # weights: 6 N per token = 6 * 1000 * 9 = 54,000; attention per layer forward: QK^T and AV over the
    # L (L + 1) / 2 causal pairs of each user, 2 d FLOPs each for QK^T and again for AV -> 4 d * (18 + 20) / 2
    # = 608 at d = 8; forward + backward = 3x, 2 layers -> 3,648
    assert pt.train_flops(1000, 8, 2, tokens=9, pairs=38) == pytest.approx(54_000 + 3_648)
    assert pt.train_flops(1000, 8, 0, tokens=9, pairs=38) == pytest.approx(54_000)


# ------------------------------------------------------------------------------ mixture / oracle
# two users, one condition field with values 2, 3, 4 (0 pad, 1 '<any>'); the held-out (valid) event
# of both is item 4 with condition 4. History items 6 and 7 are filtered from the ranking.
DATA = {
    "users/offsets": np.array([0, 7, 12]),
    "users/split": np.array([[6, 7], [4, 5]]),
    "events/item": np.array([6, 7, 6, 7, 6, 7, 4, 6, 7, 6, 7, 4], np.int32),
    "events/cond": np.array([[3], [3], [3], [4], [4], [2], [4], [2], [2], [2], [3], [4]], np.int32),
    "events/timestamp": np.arange(12),
}


def test_history_weights_by_hand():
    # user 0 before its valid event: values 3, 3, 3, 4, 4, 2 -> counts (v2, v3, v4) = (1, 3, 2), + 1 each
    # user 1: 2, 2, 2, 3 -> (3, 1, 0) + 1
    w = evaluation.history_weights(DATA, "valid", 0, 5, 1.0)
    assert w == pytest.approx(np.array([[2 / 9, 4 / 9, 3 / 9], [4 / 7, 2 / 7, 1 / 7]]))
    w = evaluation.history_weights(DATA, "valid", 0, 5, 0.5)
    assert w[1] == pytest.approx(np.array([3.5, 1.5, 0.5]) / 5.5)


class CondModel(torch.nn.Module):
    """The output at a position is a fixed vector per condition value: what the scoring sees."""

    # item keys (I = 8, D = 2): item 2 -> (1, 0), 3 -> (0, 1), 4 -> (-1, 0), 5 -> (0, -1); 6, 7 history
    KEYS = torch.tensor([[0, 0], [0, 0], [1, 0], [0, 1], [-1, 0], [0, -1], [0.6, -0.8], [-0.6, -0.8]])
    # condition value -> output: '<any>' (1) and value 2 point at item 2, value 3 at item 3, 4 at item 4
    OUT = torch.tensor([[0, 0], [1, 0], [1, 0], [0, 1], [-1, 0]], dtype=torch.float32)

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(attention="sdpa", d_model=2, cond_vocab=[5], n_items=len(self.KEYS))

    def item_table(self, ids=None):
        return self.KEYS if ids is None else self.KEYS[ids]

    def forward(self, batch, mask):
        return self.OUT[batch["cond"][..., 0]]                                      # (B, S, D)


def _evaluate(query_cond, mixture=None, tau=1.0):
    p = PretrainSpec(eval={"ks": [1, 2, 3], "mixture": mixture})
    ranks = []
    m = pt.evaluate(CondModel(), DATA, "valid", p, PackSpec(seq_len=64, max_items=16), torch.device("cpu"),
                    query_cond, contextlib.nullcontext, tau=tau, cond_names=["rating"], ranks_out=ranks)
    return ranks[0][0].tolist(), m


def test_any_condition_scores_by_the_any_output():
    # '<any>' points at item 2: item 2 (cos 1) > items 3, 5 (0) > item 4 (-1): rank 3 for both users
    ranks, m = _evaluate(np.array([1], np.int32))
    assert ranks == [3, 3] and m["hr@3"] == 0.0 and m["mrr"] == pytest.approx(1 / 4)


def test_oracle_uses_the_held_out_events_own_condition():
    # the held-out condition 4 points at item 4: rank 0 for both users
    ranks, m = _evaluate(None)
    assert ranks == [0, 0] and m["hr@1"] == 1.0


def test_mixture_ranks_items_by_the_users_condition_weights():
    # tau 0.01: p(item | v) is ~1 for the item value v points at, so score(item) ~ log w(v of item).
    # user 0: w = (2, 4, 3) / 9 -> items 3 > 4 > 2 > 5: the target 4 has rank 1
    # user 1: w = (4, 2, 1) / 7 -> items 2 > 3 > 4 > 5: rank 2
    ranks, m = _evaluate(np.array([1], np.int32), mixture="rating", tau=0.01)
    assert ranks == [1, 2]
    assert (m["hr@1"], m["hr@2"], m["hr@3"]) == (0.0, 0.5, 1.0)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
