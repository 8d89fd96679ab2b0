"""Pretrain numerics: InfoNCE by hand, accidental hits, flex == sdpa, resume equivalence, eval."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lumctl.loss import info_nce, sampling_logq
from lumctl.models.lum import LUM, LUMConfig
from lumctl.ops.packing import pack_sequences
from lumctl.specs import load_spec
from lumctl.stages import pretrain as pt
from lumctl.stages import run_all


def _table(E):
    E = torch.as_tensor(E, dtype=torch.float32)
    return lambda ids: E if ids is None else E[ids]


def _hand_nce(o, pos_key, neg_keys, tau):
    """-log(exp(s+/tau) / (exp(s+/tau) + sum exp(s-/tau))) with cosine s, in plain Python."""
    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    pos = math.exp(cos(o, pos_key) / tau)
    neg = sum(math.exp(cos(o, k) / tau) for k in neg_keys)
    return -math.log(pos / (pos + neg))


# items 0 (pad), 1 (unk), 2, 3, 4
ITEMS = [[0, 0], [0, 0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]


def test_info_nce_two_users_by_hand():
    # user A's condition position wants item 2, user B's two positions want items 3 and 2
    o = torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.5, -0.5]])
    target = torch.tensor([2, 3, 2])
    tau = 0.5
    # in-batch: candidates = distinct targets {2, 3}
    got = info_nce(o, target, _table(ITEMS), negatives="in_batch", tau=tau)
    want = np.mean([
        _hand_nce([1.0, 0.2], ITEMS[2], [ITEMS[3]], tau),
        _hand_nce([0.1, 1.0], ITEMS[3], [ITEMS[2]], tau),
        _hand_nce([0.5, -0.5], ITEMS[2], [ITEMS[3]], tau),
    ])
    assert got.item() == pytest.approx(want, rel=1e-5)
    # full catalogue: every real item (2, 3, 4) but the positive is a negative
    got = info_nce(o, target, _table(ITEMS), negatives="full", tau=tau)
    want = np.mean([
        _hand_nce([1.0, 0.2], ITEMS[2], [ITEMS[3], ITEMS[4]], tau),
        _hand_nce([0.1, 1.0], ITEMS[3], [ITEMS[2], ITEMS[4]], tau),
        _hand_nce([0.5, -0.5], ITEMS[2], [ITEMS[3], ITEMS[4]], tau),
    ])
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_in_batch_duplicate_targets_are_not_their_own_negatives():
    o = torch.tensor([[1.0, 0.2], [0.9, 0.3]])
    # both positions want item 2: with accidental hits masked there is no negative at all
    loss = info_nce(o, torch.tensor([2, 2]), _table(ITEMS), negatives="in_batch", tau=0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_sampled_negatives_mask_accidental_hits_and_correct_log_q():
    o = torch.tensor([[1.0, 0.2]])
    target = torch.tensor([2])
    tau = 0.5
    logq = sampling_logq(torch.tensor([0, 0, 1, 1, 2]), "popularity")  # weights 0,0,2,2,3 -> q = 2/7,2/7,3/7
    assert torch.allclose(logq[2:].exp(), torch.tensor([2 / 7, 2 / 7, 3 / 7]))
    assert torch.isinf(logq[:2]).all()
    # force the draw: a generator that only yields items 2 (the positive) and 4
    only = torch.full((5,), float("-inf"))
    only[2], only[4] = math.log(0.5), math.log(0.5)
    gen = torch.Generator().manual_seed(0)
    loss = info_nce(o, target, _table(ITEMS), negatives="sampled", tau=tau, num_sampled=64,
                    sample_logq=only, generator=gen)
    gen = torch.Generator().manual_seed(0)
    neg = torch.multinomial(only.exp(), 64, replacement=True, generator=gen)  # one position: its 64 draws
    n4 = int((neg == 4).sum())  # draws of the positive (item 2) are masked
    s_pos = F.cosine_similarity(o, torch.tensor([ITEMS[2]]))[0].item() / tau
    s4 = F.cosine_similarity(o, torch.tensor([ITEMS[4]]))[0].item() / tau - math.log(0.5)
    want = -(s_pos - math.log(math.exp(s_pos) + n4 * math.exp(s4)))
    assert 0 < n4 < 64
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # without the correction: the plain (1 + K)-way softmax of generative-recommenders
    gen = torch.Generator().manual_seed(0)
    plain = info_nce(o, target, _table(ITEMS), negatives="sampled", tau=tau, num_sampled=64,
                     sample_logq=only, generator=gen, logq_correction=False)
    s4 = s4 + math.log(0.5)
    assert plain.item() == pytest.approx(-(s_pos - math.log(math.exp(s_pos) + n4 * math.exp(s4))), rel=1e-5)


def test_flex_matches_sdpa_on_cpu():
    rng = np.random.default_rng(0)
    cnt = rng.integers(2, 20, 10)
    first = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    E = int(cnt.sum())
    rows = pack_sequences(rng.integers(2, 50, E), rng.integers(2, 5, (E, 2)), first, cnt, 128)
    torch.manual_seed(0)
    model = LUM(LUMConfig(n_items=50, cond_vocab=[5, 5], d_model=32, n_heads=2, d_ff=64)).eval()
    b = pt.to_batch(rows, np.arange(len(rows["type"])), torch.device("cpu"), dense_mask=True)
    real = b["type"] > 0
    with torch.no_grad():
        dense = model(b, pt.make_mask(b, "sdpa"))
        flex = model(b, pt.make_mask(b, "flex"))
    assert torch.allclose(dense[real], flex[real], atol=1e-5)


def test_outputs_of_one_user_do_not_depend_on_row_neighbours():
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    model = LUM(LUMConfig(n_items=50, cond_vocab=[5], d_model=32, n_heads=2, d_ff=64)).eval()
    items, conds = rng.integers(2, 50, 12), rng.integers(2, 5, (12, 1))
    alone = pack_sequences(items[:5], conds[:5], [0], [5], 64)
    packed = pack_sequences(items, conds, [0, 5], [5, 7], 64)
    outs = []
    for rows in (alone, packed):
        b = pt.to_batch(rows, np.arange(len(rows["type"])), torch.device("cpu"), dense_mask=True)
        with torch.no_grad():
            o = model(b, b["mask"])
        r, s = rows["row"][0], rows["start"][0]
        outs.append(o[r, s:s + 10])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_eval_rows_replace_the_held_out_condition_and_filter_history():
    # one user, 5 events; leave-one-out: train = events 0..2, valid = 3, test = 4
    data = {
        "users/offsets": np.array([0, 5]), "users/split": np.array([[3, 4]]),
        "events/item": np.array([2, 3, 4, 5, 6], np.int32),
        "events/cond": np.array([[2], [3], [2], [4], [3]], np.int32),
        "events/timestamp": np.arange(5),
    }
    rows, where, target, seen = pt.eval_rows(data, "valid", max_items=10, seq_len=32, conditions=True,
                                             query_cond=np.array([1], np.int32))
    assert target.tolist() == [5] and seen[0].tolist() == [2, 3, 4]
    r, p = where[0]
    assert rows["type"][r, p] == 1 and rows["cond"][r, p, 0] == 1  # '<any>', not the held-out 4
    assert rows["target"][r, p] == 5 and rows["item"][r, p + 1] == 5
    rows, where, target, seen = pt.eval_rows(data, "test", 3, 32, True, np.array([1], np.int32))
    assert target.tolist() == [6] and seen[0].tolist() == [2, 3, 4, 5]
    assert rows["item"][rows["type"] == 2].tolist() == [4, 5, 6]  # the most recent max_items - 1 + held-out


def _final_weights(store):
    return torch.load(store / "final" / "model.pt", weights_only=True)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_spec, tmp_path):
    spec = load_spec(tiny_spec(steps=6, every=3, ckpt=2))
    run_all(spec, upto="pack")
    out = pt.run(spec)
    full = _final_weights(out)
    full_metrics = json.loads((out / "final" / "metrics.json").read_text())
    pt.run(spec, force=True, until_step=3)
    assert not (out / "final").exists() and (out / "checkpoints" / "step-00000003").exists()
    pt.run(spec, resume=True)
    resumed = _final_weights(out)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert json.loads((out / "final" / "metrics.json").read_text()) == full_metrics


def test_keep_checkpoints_0_writes_no_step_checkpoint_and_the_same_model(tiny_spec, tmp_path):
    """keep_checkpoints = 0: no step-* folder (no optimizer state on disk), final/model.pt is the best
    checkpoint's file (one inode), and the model equals a run that kept checkpoints."""
    from lumctl.errors import InputError
    spec = load_spec(tiny_spec(steps=6, every=3, ckpt=2))
    run_all(spec, upto="pack")
    want = _final_weights(pt.run(spec))
    lean = spec.model_copy(update={"pretrain": spec.pretrain.model_copy(update={"keep_checkpoints": 0})})
    out = pt.run(lean, force=True)
    assert not list((out / "checkpoints").glob("step-*"))
    final, best = out / "final" / "model.pt", out / "checkpoints" / "best" / "model.pt"
    assert final.stat().st_ino == best.stat().st_ino
    got = _final_weights(out)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    with pytest.raises(InputError, match="keep_checkpoints"):
        pt.run(lean, resume=True)


def test_init_from_starts_from_another_runs_weights(tiny_spec, tmp_path):
    """Continued pretraining: a run with init_from starts at the other run's weights (a 1e-9 lr keeps
    them), records the checkpoint as an input, and refuses a checkpoint of another model config."""
    from lumctl.errors import InputError
    from lumctl.specs import deep_merge, parse_spec, read_toml

    base = read_toml(tiny_spec(steps=4, every=2))
    spec_a = parse_spec(base)
    run_all(spec_a, upto="pretrain")
    init = spec_a.store("pretrain") / "final"
    b = deep_merge(base, {"experiment": "tiny-b",
                          "pretrain": {"init_from": str(init), "optim": {"lr": 1e-9, "max_steps": 1, "warmup_steps": 0}}})
    spec_b = parse_spec(b)
    run_all(spec_b, upto="pretrain")
    wa, wb = _final_weights(spec_a.store("pretrain")), _final_weights(spec_b.store("pretrain"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    manifest = json.loads((spec_b.store("pretrain") / "manifest.json").read_text())
    assert "init_from" in manifest["inputs"]
    # a fresh model from the same seed is far from A's trained weights (so the check above can fail)
    assert any(not torch.allclose(wa[k], v, atol=1e-3) for k, v in pt.build_model("lum", json.loads(
        (init / "config.json").read_text())["model"]).state_dict().items() if k in wa)
    c = parse_spec(deep_merge(b, {"experiment": "tiny-c", "pretrain": {"model": {"d_model": 16}}}))
    run_all(c, upto="pack")
    with pytest.raises(InputError, match="init_from.*d_model"):
        pt.run(c)
