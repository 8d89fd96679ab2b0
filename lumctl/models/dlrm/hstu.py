"""HSTU as an end-to-end ranker (Zhai et al., ICML 2024, "Actions Speak Louder than Words: Trillion-
Parameter Sequential Transducers for Generative Recommendations"): HSTU layers over the history's
(item + past like/dislike action) tokens and the target token; the output at the target attends
causally to the history and is the pooled interest."""

from __future__ import annotations

import torch
from torch import nn

from lumctl.attention import dense_document_causal
from lumctl.models.dlrm.common import DLRMConfig, Ranker
from lumctl.models.hstu import HSTUConfig, HSTULayer, relative_buckets


class HSTURanker(Ranker):
    def __init__(self, cfg: DLRMConfig, item_category: torch.Tensor | None = None,
                 item_genres: torch.Tensor | None = None):
        super().__init__(cfg, item_category, item_genres)
        d = cfg.d_emb
        hc = HSTUConfig(n_items=cfg.n_items, d_model=d, n_layers=cfg.seq_layers, n_heads=cfg.seq_heads,
                        max_len=cfg.history_len + 1, dropout=0.0)
        self.action = nn.Embedding(4, d)         # 0 pad, 1 not liked, 2 liked (rating >= 4), 3 the target
        self.seq = nn.ModuleList(HSTULayer(hc) for _ in range(cfg.seq_layers))
        self.seq_cfg = hc
        self.init_head()

    def interest(self, batch: dict, t: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        # tokens: history item + its action (right-aligned, pads 0), then the target with action 3;
        # no timestamps: one time bucket
        h = self.item_vec(batch["hist"])                                                                # (B, L, d)
        x = torch.cat([h + self.action(batch["hist_action"]), (t + self.action.weight[3])[:, None]], 1)  # (B, L+1, d)
        valid = torch.cat([batch["hist_mask"], torch.ones_like(batch["hist_mask"][:, :1])], 1)         # (B, L+1)
        mask = dense_document_causal(torch.where(valid, 0, -1))                                         # (B, S, S)
        pos = torch.arange(x.shape[1], device=x.device).expand(len(x), -1)                              # (B, S)
        dist, tb = relative_buckets(pos, torch.zeros_like(pos), self.seq_cfg.max_len, self.seq_cfg.time_buckets)
        for layer in self.seq:
            x = layer(x, mask, dist, tb)
        return [x[:, -1]], {}                                               # [(B, d)] at the target
