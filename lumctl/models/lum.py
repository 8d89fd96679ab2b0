"""LUM user encoder (Large User Model, Alibaba 2025, arXiv 2502.08309), nanoGPT style.

A user's behaviour is `c_1 i_1 c_2 i_2 ... c_L i_L` (condition, item). Each token type has its
own token encoder: its features are embedded, concatenated and projected to d_model. A pre-norm
causal transformer (RMSNorm, RoPE with positions restarting per user, SwiGLU) reads packed rows
with a document-causal mask; the output at a condition token `c_l` is trained (InfoNCE, see
lumctl/loss.py) to retrieve the item `i_l` through the item token encoder's embedding `e^i`.
Optionally (`lowpass_bins`) each block mixes attention with BSARec's low-pass filter branch, read causally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lumctl.attention import attend, dense_document_causal

# name -> (d_model, n_layers, n_heads, d_ff); transformer parameters ~ 12 d^2 L (SwiGLU d_ff ~ 2.75 d)
PRESETS = {
    "tiny": (64, 2, 2, 192),        # CI
    "small": (128, 2, 2, 384),      # CPU experiments on ML-1M
    "19m": (512, 6, 8, 1408),       # 19.3M transformer params
    "100m": (768, 14, 12, 2048),    # 99M
    "300m": (1024, 24, 16, 2816),   # 308M
    "1b": (2048, 20, 16, 5632),     # 1.03B
}


@dataclass
class LUMConfig:
    n_items: int                     # item vocab size (0 = pad, 1 = unknown)
    cond_vocab: list[int] = field(default_factory=list)  # vocab size of each condition field
    n_genres: int = 0                # multi-hot genre width (0 = none)
    n_categories: int = 0            # category vocab size (0 = none)
    n_popularity: int = 0            # popularity bucket vocab size (0 = none)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int = 192
    d_feat: int = 0                  # width of each feature embedding (0 = d_model)
    dropout: float = 0.0             # residual and attention dropout (attention: sdpa only; flex has none)
    embed_dropout: float = 0.0       # dropout on the token embeddings (input of the first block)
    item_proj: bool = True           # False: e^i is the id embedding itself (no side features, d_feat = d_model)
    rope_base: float = 10000.0
    attention: str = "sdpa"          # "sdpa" (dense mask) | "flex" (block mask)
    lowpass_bins: int = 0            # > 0: BSARec's low-pass branch beside attention, keeping this many Fourier bins
    lowpass_window: int = 50         # tokens the low-pass filter spans (its causal kernel's length)
    lowpass_alpha: float = 0.7       # the low-pass branch's weight; attention gets 1 - alpha


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding. x (B, H, S, Dh), pos (B, S) per-user positions."""
    Dh = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, Dh, 2, device=x.device, dtype=torch.float32) / Dh))  # (Dh/2,)
    ang = pos.float()[:, None, :, None] * inv                                                  # (B, 1, S, Dh/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, c: LUMConfig):
        super().__init__()
        assert c.d_model % c.n_heads == 0
        self.n_heads, self.base, self.dropout = c.n_heads, c.rope_base, c.dropout
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.proj = nn.Linear(c.d_model, c.d_model, bias=False)

    def forward(self, x, pos, mask):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, S, Dh)
        q, k = rope(q, pos, self.base), rope(k, pos, self.base)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)    # dense mask (sdpa) or BlockMask (flex)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))  # (B, S, D)


def lowpass_kernel(window: int, bins: int) -> torch.Tensor:
    """(window,) weights by lag: the last output of BSARec's low-pass filter (rfft over `window` positions,
    keep the first `bins` bins, irfft) is sum_d kernel[d] x[-1 - d]. It is the filter read causally."""
    lag = torch.arange(window, dtype=torch.float64)
    freq = torch.arange(1, bins, dtype=torch.float64)[:, None]
    return ((1 + 2 * torch.cos(2 * math.pi * freq * lag / window).sum(0)) / window).float()


def lowpass_matrix(pos: torch.Tensor, allowed: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The low-pass filter as a (B, S, S) matrix: token t takes kernel[pos_t - pos_s] of each token s it may
    attend to (allowed (B, S, S) bool) that lies 0 .. window - 1 positions before it; pos (B, S)."""
    W = len(kernel)
    p = pos.to(torch.int32)
    lag = p[:, :, None] - p[:, None, :]                                   # (B, S, S)
    lag = torch.where(allowed & (lag >= 0) & (lag < W), lag, W)          # W: the zero weight appended below
    return torch.cat([kernel, kernel.new_zeros(1)])[lag]


class LowPass(nn.Module):
    """BSARec's frequency branch (arXiv 2312.10325), causal: low(x) + beta^2 (x - low(x)), the low-pass part
    of each token's recent past and its own high-frequency rest rescaled per channel."""

    def __init__(self, c: LUMConfig):
        super().__init__()
        self.sqrt_beta = nn.Parameter(torch.randn(c.d_model))

    def forward(self, x, lp):  # x (B, S, D), lp (B, S, S) from lowpass_matrix -> (B, S, D)
        low = torch.bmm(lp.to(x.dtype), x)
        return low + self.sqrt_beta ** 2 * (x - low)


class SwiGLU(nn.Module):
    def __init__(self, c: LUMConfig):
        super().__init__()
        self.gate = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.up = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.down = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, c: LUMConfig):
        super().__init__()
        self.norm1, self.attn = RMSNorm(c.d_model), Attention(c)
        self.norm2, self.mlp = RMSNorm(c.d_model), SwiGLU(c)
        self.drop = nn.Dropout(c.dropout)
        self.lowpass, self.alpha = (LowPass(c), c.lowpass_alpha) if c.lowpass_bins else (None, 0.0)

    def forward(self, x, pos, mask, lp=None):
        h = self.norm1(x)
        a = self.attn(h, pos, mask)
        if self.lowpass is not None:  # BSARec's mix of the two branches
            a = self.alpha * self.lowpass(h, lp) + (1 - self.alpha) * a
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.norm2(x)))


class ItemEncoder(nn.Module):
    """e^i = proj(concat(id emb, genre bag, category emb, popularity emb)); with `item_proj = False`
    (an item with no side features) e^i = id emb, the token and the retrieval key alike."""

    def __init__(self, c: LUMConfig):
        super().__init__()
        d = c.d_feat or c.d_model
        self.id = nn.Embedding(c.n_items, d, padding_idx=0)
        self.genre = nn.Linear(c.n_genres, d // 2, bias=False) if c.n_genres else None
        self.category = nn.Embedding(c.n_categories, d // 2, padding_idx=0) if c.n_categories else None
        self.popularity = nn.Embedding(c.n_popularity, d // 4, padding_idx=0) if c.n_popularity else None
        width = d + (d // 2 if self.genre else 0) + (d // 2 if self.category else 0) + (d // 4 if self.popularity else 0)
        if not c.item_proj and width != c.d_model:
            raise ValueError("item_proj = False needs an item of its id embedding only, d_model wide "
                             f"(got {width} feature dims for d_model {c.d_model}: side features or d_feat)")
        self.proj = nn.Linear(width, c.d_model, bias=False) if c.item_proj else nn.Identity()
        # item side-feature tables, indexed by item id (filled by set_features)
        self.register_buffer("genres", torch.zeros(c.n_items, c.n_genres), persistent=True)
        self.register_buffer("categories", torch.zeros(c.n_items, dtype=torch.long), persistent=True)
        self.register_buffer("pops", torch.zeros(c.n_items, dtype=torch.long), persistent=True)

    def set_features(self, genres=None, categories=None, popularity=None):
        if genres is not None and self.genre is not None:
            g = torch.as_tensor(genres, dtype=torch.float32)
            self.genres.copy_(g / g.sum(1, keepdim=True).clamp(min=1))  # mean over the item's genres
        if categories is not None and self.category is not None:
            self.categories.copy_(torch.as_tensor(categories, dtype=torch.long))
        if popularity is not None and self.popularity is not None:
            self.pops.copy_(torch.as_tensor(popularity, dtype=torch.long))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids (...) -> (..., D)
        feats = [self.id(ids)]
        if self.genre is not None:
            feats.append(self.genre(self.genres[ids]))
        if self.category is not None:
            feats.append(self.category(self.categories[ids]))
        if self.popularity is not None:
            feats.append(self.popularity(self.pops[ids]))
        return self.proj(torch.cat(feats, -1))


class ConditionEncoder(nn.Module):
    """e^c = proj(concat(one embedding per condition field))."""

    def __init__(self, c: LUMConfig):
        super().__init__()
        d = c.d_feat or c.d_model
        self.fields = nn.ModuleList(nn.Embedding(n, d, padding_idx=0) for n in c.cond_vocab)
        self.proj = nn.Linear(d * max(1, len(c.cond_vocab)), c.d_model, bias=False)
        self.empty = nn.Parameter(torch.zeros(d)) if not c.cond_vocab else None  # a condition token with no fields

    def forward(self, cond: torch.Tensor) -> torch.Tensor:  # cond (B, S, F) -> (B, S, D)
        if self.empty is not None:
            return self.proj(self.empty.expand(*cond.shape[:2], -1))
        return self.proj(torch.cat([emb(cond[..., f]) for f, emb in enumerate(self.fields)], -1))


class LUM(nn.Module):
    def __init__(self, c: LUMConfig):
        super().__init__()
        self.config = c
        self.items = ItemEncoder(c)
        self.conds = ConditionEncoder(c)
        self.embed_drop = nn.Dropout(c.embed_dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model)
        if c.lowpass_bins:
            self.register_buffer("lowpass_kernel", lowpass_kernel(c.lowpass_window, c.lowpass_bins), persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 style scaled init of residual projections
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()

    def embed(self, batch) -> torch.Tensor:
        """Token encoder: (B, S) types -> (B, S, D) input embeddings."""
        typ = batch["type"]
        x_item = self.items(batch["item"])                    # (B, S, D)
        x_cond = self.conds(batch["cond"])                    # (B, S, D)
        x = torch.where((typ == 1)[..., None], x_cond, x_item)
        return x * (typ > 0)[..., None]                       # padding -> 0

    def forward(self, batch, mask) -> torch.Tensor:
        x = self.embed_drop(self.embed(batch))                # (B, S, D)
        lp = self.lowpass_weights(batch, mask) if self.config.lowpass_bins else None
        for block in self.blocks:
            x = block(x, batch["pos"], mask, lp)
        return self.norm(x)                                   # (B, S, D)

    def lowpass_weights(self, batch, mask) -> torch.Tensor:
        """(B, S, S) low-pass weights over what each token may attend to: the dense mask (sdpa), or a
        document-causal one from the rows' segments (flex)."""
        if isinstance(mask, torch.Tensor):
            allowed = mask
        elif "segment" in batch:
            allowed = dense_document_causal(batch["segment"])
        else:
            raise ValueError("the low-pass branch needs a dense mask or the rows' segments")
        return lowpass_matrix(batch["pos"], allowed, self.lowpass_kernel)

    def item_table(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids is None:
            ids = torch.arange(self.config.n_items, device=self.norm.weight.device)
        return self.items(ids)                                # (N, D)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(p.numel() for mod in self.modules() if isinstance(mod, nn.Embedding) for p in mod.parameters())
        return n
