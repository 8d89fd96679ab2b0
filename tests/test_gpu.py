"""CUDA checks (run with `pytest -m gpu` on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lumctl.attention import make_mask
from lumctl.models.lum import LUM, LUMConfig
from lumctl.ops.packing import pack_sequences
from lumctl.stages.pretrain import to_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("S", [256, 2048])
def test_flex_matches_sdpa_forward_and_backward_on_cuda(S):
    rng = np.random.default_rng(0)
    cnt = rng.integers(5, min(200, S // 2), 40)
    cnt = cnt[np.cumsum(2 * cnt) <= 3 * S][:30]
    first = np.concatenate([[0], np.cumsum(cnt)[:-1]])
    E = int(cnt.sum())
    rows = pack_sequences(rng.integers(2, 500, E), rng.integers(2, 6, (E, 2)), first, cnt, S)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = LUM(LUMConfig(n_items=500, cond_vocab=[6, 6], d_model=128, n_heads=4, d_ff=256)).to(dev)
    b = to_batch(rows, np.arange(len(rows["type"])), dev, dense_mask=True)
    real = b["type"] > 0
    outs, grads = [], []
    for backend in ("sdpa", "flex"):
        model.config.attention = backend
        model.zero_grad()
        o = model(b, make_mask(b, backend))
        (o[real] ** 2).sum().backward()
        outs.append(o[real].detach())
        grads.append(model.blocks[0].attn.qkv.weight.grad.clone())
    rel = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert rel < 1e-4, rel
    relg = (grads[0] - grads[1]).norm() / grads[0].norm()
    assert relg < 1e-3, relg
