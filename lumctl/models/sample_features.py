"""The extra feature columns of a sample table ([fuse.samples]) as one vector per sample.

categorical: one embedding per column (0 pad, 1 unknown, values from 2); multi-valued: the mean of
its values' embeddings (0 = pad, ignored); numeric: the normalised values as they are. The DLRMs add
`Linear(out_dim -> h0)` of this vector to their first hidden layer, which equals concatenating it to
the MLP input.

Batch: extra_cat [B, C] long, extra_multi [B, M, K] long (0 pad), extra_num [B, R] float.
"""

from __future__ import annotations

import torch
from torch import nn


class SampleFeatures(nn.Module):
    def __init__(self, d: int, cat_vocab: list[int], multi_vocab: list[int], n_numeric: int):
        super().__init__()
        self.cat = nn.ModuleList(nn.Embedding(v, d, padding_idx=0) for v in cat_vocab)
        self.multi = nn.ModuleList(nn.Embedding(v, d, padding_idx=0) for v in multi_vocab)
        self.n_numeric = n_numeric
        self.out_dim = d * (len(cat_vocab) + len(multi_vocab)) + n_numeric

    def forward(self, batch: dict) -> torch.Tensor:
        """(B, out_dim)."""
        parts = [emb(batch["extra_cat"][:, c]) for c, emb in enumerate(self.cat)]         # C x (B, d)
        for m, emb in enumerate(self.multi):
            ids = batch["extra_multi"][:, m]                                               # (B, K)
            keep = (ids > 0).float()[..., None]                                            # (B, K, 1)
            parts.append((emb(ids) * keep).sum(1) / keep.sum(1).clamp(min=1))              # (B, d)
        if self.n_numeric:
            parts.append(batch["extra_num"].float())                                       # (B, R)
        return torch.cat(parts, -1)
