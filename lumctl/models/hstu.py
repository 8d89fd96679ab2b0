"""HSTU baseline (Zhai et al., "Actions Speak Louder than Words: Trillion-Parameter Sequential
Transducers for Generative Recommendations", ICML 2024, arXiv 2402.17152), nanoGPT style, following
the reference `generative_recommenders/modeling/sequential/hstu.py` used for its ML-1M numbers.

Item-only: a user is `i_1 i_2 ... i_L` (packs made with `[pack] conditions = false`); the output
at `i_l` is trained to retrieve `i_{l+1}`. Condition tokens (type 1) are refused with a
ValueError, never silently ignored.

    x = dropout(E[item] * sqrt(d) + P[pos])                      E shared with item_table
    per layer (a Hierarchical Sequential Transduction Unit):
      U, V, Q, K = split(SiLU(LN(x) W_uvqk))                     LN without affine, W without bias
      A = SiLU(Q K^T + rab_pos + rab_time) / n  * mask           pointwise, NO softmax
      x = W_o dropout(LN(A V) * U) + x
    out = x / ||x||                                              L2 norm, as the reference

- `n` is the fixed `max_len` (the reference divides by its padded length, max_seq_len + outputs),
  not the number of attended keys, so a token's attention mass grows with its history.
- rab_pos: one learned scalar per distance `pos_q - pos_k` (positions restart per user; distances
  >= max_len share the last one). rab_time: one learned scalar per bucket
  `floor(ln(max(|ts_q - ts_k|, 1)) / 0.301)`, clamped to [0, time_buckets]. Both shared by the
  heads, one pair per layer. The reference takes ts_q from the *next* event (the time of the
  request); we take the query token's own timestamp, so the held-out event's time is never read
  and a user's outputs never depend on the token packed after them.
- Attention is SiLU, not softmax, so there is no flex kernel for it: HSTU always runs explicit
  (B, H, S, S) matmuls with a dense mask. With `attention = "sdpa"` it uses the dense mask it is
  given; otherwise (`"dense"`, which is what `"flex"`/`"auto"` on CUDA resolve to, so no block
  mask is built for nothing) it builds the mask on the device from `batch["segment"]`:
  `(seg_q == seg_k) & (k <= q) & (seg_q >= 0)`. Memory is O(B H S^2): keep rows short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lumctl.attention import dense_document_causal

# name -> (d_model, n_layers, n_heads); per-head widths d_qk = d_v = d_model // n_heads unless set
PRESETS = {
    "tiny": (32, 2, 2),                  # CI
    "small": (64, 2, 2),                 # CPU experiments
    "hstu-ml1m": (50, 2, 1),             # generative-recommenders configs/ml-1m/hstu-sampled-softmax-n128-final.gin
    "hstu-large-ml1m": (50, 8, 2),       # ... hstu-sampled-softmax-n128-large-final.gin (dqk = dv = 25)
}


@dataclass
class HSTUConfig:
    n_items: int                     # item vocab size (0 = pad, 1 = unknown)
    d_model: int = 50
    n_layers: int = 2
    n_heads: int = 1
    d_qk: int = 0                    # per-head query/key width (0 = d_model // n_heads)
    d_v: int = 0                     # per-head value/U width (0 = d_model // n_heads)
    max_len: int = 256               # positions (>= [pack].max_items) and the attention normaliser n
    time_buckets: int = 128          # log-scale buckets of |ts_q - ts_k| (seconds)
    dropout: float = 0.2             # input embedding dropout and the "linear" dropout before W_o
    eps: float = 1e-6                # LayerNorm / L2-norm epsilon
    attention: str = "sdpa"          # "sdpa" (Numba mask given) | "dense" (mask from segments); see docstring


def relative_buckets(pos: torch.Tensor, ts: torch.Tensor, max_len: int, time_buckets: int):
    """pos, ts (B, S) -> distance and time bucket indices (B, S, S) for query q, key k."""
    dist = (pos[:, :, None] - pos[:, None, :]).clamp(0, max_len - 1).long()            # (B, S, S)
    dt = (ts[:, :, None] - ts[:, None, :]).abs().clamp(min=1).float()                    # (B, S, S)
    tb = (torch.log(dt) / 0.301).long().clamp(0, time_buckets)                          # (B, S, S)
    return dist, tb


class _BiasGather(torch.autograd.Function):
    """w[idx] for a small bias table w (n,) and B·S² indices. Backward is a weighted histogram
    (`bincount`), which on CUDA sums in shared memory; plain indexing's backward (index_put_
    accumulate) serialises the millions of duplicates of a few buckets: 203 ms vs 6 ms
    (F.embedding) per call at B·S² = 13.6M on an H100 (benchmarks/bench_gather.py)."""

    @staticmethod
    def forward(ctx, w, idx):
        ctx.save_for_backward(idx)
        ctx.n = w.shape[0]
        return w[idx]

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        g = torch.bincount(idx.flatten(), weights=grad.flatten().float(), minlength=ctx.n)
        return g.to(grad.dtype), None


def bias_gather(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """w (n,), idx (...) long -> w[idx] (...), with a histogram backward."""
    return _BiasGather.apply(w, idx)


class HSTULayer(nn.Module):
    def __init__(self, c: HSTUConfig):
        super().__init__()
        self.H, self.dqk, self.dv = c.n_heads, c.d_qk or c.d_model // c.n_heads, c.d_v or c.d_model // c.n_heads
        self.n, self.eps = c.max_len, c.eps
        self.uvqk = nn.Linear(c.d_model, 2 * self.H * (self.dv + self.dqk), bias=False)
        self.o = nn.Linear(self.H * self.dv, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.rab_pos = nn.Parameter(torch.empty(c.max_len))                 # bias per distance
        self.rab_time = nn.Parameter(torch.empty(c.time_buckets + 1))      # bias per log time bucket
        nn.init.normal_(self.uvqk.weight, std=0.02)
        nn.init.xavier_uniform_(self.o.weight)
        nn.init.normal_(self.rab_pos, std=0.02)
        nn.init.normal_(self.rab_time, std=0.02)

    def forward(self, x, mask, dist, tb):
        B, S, D = x.shape
        h = F.silu(self.uvqk(F.layer_norm(x, (D,), eps=self.eps)))                       # (B, S, 2H(dv+dqk))
        u, v, q, k = h.split([self.H * self.dv, self.H * self.dv, self.H * self.dqk, self.H * self.dqk], -1)
        q = q.view(B, S, self.H, self.dqk).transpose(1, 2)                                 # (B, H, S, dqk)
        k = k.view(B, S, self.H, self.dqk).transpose(1, 2)                                 # (B, H, S, dqk)
        v = v.view(B, S, self.H, self.dv).transpose(1, 2)                                  # (B, H, S, dv)
        rab = bias_gather(self.rab_pos, dist) + bias_gather(self.rab_time, tb)            # (B, S, S)
        a = F.silu(q @ k.transpose(-1, -2) + rab[:, None]) / self.n                        # (B, H, S, S)
        a = a * mask[:, None].to(a.dtype)
        y = (a @ v).transpose(1, 2).reshape(B, S, self.H * self.dv)                        # (B, S, H*dv)
        y = F.layer_norm(y, (self.H * self.dv,), eps=self.eps) * u
        return self.o(self.drop(y)) + x                                                   # (B, S, D)


class HSTU(nn.Module):
    def __init__(self, c: HSTUConfig):
        super().__init__()
        assert c.d_model % c.n_heads == 0 or (c.d_qk and c.d_v), "d_model must be divisible by n_heads"
        self.config = c
        self.item_emb = nn.Embedding(c.n_items, c.d_model, padding_idx=0)  # input and output (item_table)
        self.pos_emb = nn.Embedding(c.max_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(HSTULayer(c) for _ in range(c.n_layers))
        # init as the reference: item table trunc-normal(0.02), position table xavier-normal
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02, a=-0.04, b=0.04)
        self.item_emb.weight.data[0].zero_()
        nn.init.xavier_normal_(self.pos_emb.weight)

    def embed(self, batch) -> torch.Tensor:
        """(B, S) item ids and per-user positions -> (B, S, D) input embeddings, 0 at padding."""
        typ = batch["type"]
        if (typ == 1).any():
            raise ValueError("HSTU is item-only: the batch has condition tokens; pack with [pack] conditions = false")
        pos = batch["pos"].long().clamp(max=self.config.max_len - 1)           # (B, S)
        x = self.item_emb(batch["item"]) * math.sqrt(self.config.d_model) + self.pos_emb(pos)  # (B, S, D)
        return self.drop(x) * (typ > 0)[..., None]

    def forward(self, batch, mask) -> torch.Tensor:
        c = self.config
        if not isinstance(mask, torch.Tensor):  # None (or a BlockMask): SiLU attention needs the dense mask
            mask = dense_document_causal(batch["segment"])                     # (B, S, S)
        dist, tb = relative_buckets(batch["pos"], batch["ts"], c.max_len, c.time_buckets)
        x = self.embed(batch)
        for layer in self.layers:
            x = layer(x, mask, dist, tb)
        return F.normalize(x, dim=-1, eps=c.eps)                               # (B, S, D)

    def item_table(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids is None:
            return self.item_emb.weight                                        # (N, D)
        return self.item_emb(ids)                                              # (N, D)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.item_emb.weight.numel() + self.pos_emb.weight.numel()
        return n


def config_from_spec(m, data: dict, cond_names: list[str], attention: str) -> dict:
    """HSTUConfig as a plain dict from `[pretrain.model]` (a ModelSpec) and the tokenize store."""
    from lumctl.models import item_only_config
    return item_only_config("hstu", PRESETS[m.preset], m, data, cond_names, "sdpa" if attention == "sdpa" else "dense")
