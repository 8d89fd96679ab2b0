"""SASRec baseline (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018,
arXiv 1808.09781), nanoGPT style, as trained in generative-recommenders (Zhai et al. 2024):
sampled-softmax / InfoNCE loss on L2-normalised embeddings instead of the paper's BCE.

Item-only: a user is `i_1 i_2 ... i_L` (packs made with `[pack] conditions = false`); the output
at `i_l` is trained to retrieve `i_{l+1}`. Condition tokens (type 1) are refused with a
ValueError, never silently ignored.

    x   = dropout(E[item] * sqrt(d) + P[pos])      E shared with item_table, pos restarts per user
    x   = x + dropout(MHA(LN(x)))                  document-causal mask (dense sdpa or flex)
    x   = x + FFN(LN(x))                           Linear -> ReLU/GELU -> dropout -> Linear -> dropout
    out = LN(x)

Differences from Kang's code, kept small on purpose: standard pre-LN blocks (Kang normalises the
query only and feeds the un-normalised sequence as keys/values), and positions beyond `max_len`
share the last position embedding. The flex backend has no attention dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from lumctl.attention import attend

# name -> (d_model, n_layers, n_heads, d_ff)
PRESETS = {
    "tiny": (32, 2, 2, 32),          # CI
    "small": (64, 2, 2, 64),         # CPU experiments
    "sasrec-ml1m": (50, 2, 1, 50),   # generative-recommenders configs/ml-1m/sasrec-sampled-softmax-n128-final.gin
}


@dataclass
class SASRecConfig:
    n_items: int                     # item vocab size (0 = pad, 1 = unknown)
    d_model: int = 50
    n_layers: int = 2
    n_heads: int = 1
    d_ff: int = 50                   # FFN hidden width (the reference uses d_ff = d_model)
    max_len: int = 256               # position embeddings (>= [pack].max_items; larger positions clamp)
    dropout: float = 0.2             # embedding, attention and FFN dropout
    activation: str = "relu"         # "relu" | "gelu"
    attention: str = "sdpa"          # "sdpa" (dense mask) | "flex" (block mask)


class Attention(nn.Module):
    def __init__(self, c: SASRecConfig):
        super().__init__()
        assert c.d_model % c.n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads, self.dropout = c.n_heads, c.dropout
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)

    def forward(self, x, mask):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, Dh)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)    # dense mask (sdpa) or BlockMask (flex)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))  # (B, S, D)


class FFN(nn.Module):
    def __init__(self, c: SASRecConfig):
        super().__init__()
        if c.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu' (got {c.activation!r})")
        self.up = nn.Linear(c.d_model, c.d_ff)
        self.act = nn.ReLU() if c.activation == "relu" else nn.GELU()
        self.down = nn.Linear(c.d_ff, c.d_model)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x):  # (B, S, D) -> (B, S, D)
        return self.drop(self.down(self.drop(self.act(self.up(x)))))


class Block(nn.Module):
    def __init__(self, c: SASRecConfig):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(c.d_model, eps=1e-8), Attention(c)
        self.norm2, self.ffn = nn.LayerNorm(c.d_model, eps=1e-8), FFN(c)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, mask):
        x = x + self.drop(self.attn(self.norm1(x), mask))
        return x + self.ffn(self.norm2(x))


class SASRec(nn.Module):
    def __init__(self, c: SASRecConfig):
        super().__init__()
        self.config = c
        self.item_emb = nn.Embedding(c.n_items, c.d_model, padding_idx=0)  # input and output (item_table)
        self.pos_emb = nn.Embedding(c.max_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model, eps=1e-8)
        # init as generative-recommenders: item table trunc-normal(0.02), positions trunc-normal(1/sqrt(d)),
        # transformer matrices xavier-normal, biases zero
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02, a=-0.04, b=0.04)
        self.item_emb.weight.data[0].zero_()
        s = 1 / math.sqrt(c.d_model)
        nn.init.trunc_normal_(self.pos_emb.weight, std=s, a=-2 * s, b=2 * s)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def embed(self, batch) -> torch.Tensor:
        """(B, S) item ids and per-user positions -> (B, S, D) input embeddings, 0 at padding."""
        typ = batch["type"]
        if (typ == 1).any():
            raise ValueError("SASRec is item-only: the batch has condition tokens; pack with [pack] conditions = false")
        pos = batch["pos"].long().clamp(max=self.config.max_len - 1)           # (B, S)
        x = self.item_emb(batch["item"]) * math.sqrt(self.config.d_model) + self.pos_emb(pos)  # (B, S, D)
        return self.drop(x) * (typ > 0)[..., None]

    def forward(self, batch, mask) -> torch.Tensor:
        x = self.embed(batch)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)                                                    # (B, S, D)

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
    """SASRecConfig as a plain dict from `[pretrain.model]` (a ModelSpec) and the tokenize store."""
    from lumctl.models import item_only_config
    cfg = item_only_config("sasrec", PRESETS[m.preset], m, data, cond_names, attention)
    return cfg | {"d_ff": m.d_ff or PRESETS[m.preset][3]}
