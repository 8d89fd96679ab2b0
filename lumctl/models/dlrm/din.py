"""DIN: target attention over the behaviour history (Zhou et al., KDD 2018, "Deep Interest Network
for Click-Through Rate Prediction"): each behaviour weighted by an MLP of (behaviour, target)."""

from __future__ import annotations

import torch

from lumctl.models.dlrm.common import DLRMConfig, Ranker, TargetAttention


class DIN(Ranker):
    def __init__(self, cfg: DLRMConfig, item_category: torch.Tensor | None = None,
                 item_genres: torch.Tensor | None = None):
        super().__init__(cfg, item_category, item_genres)
        self.att = TargetAttention(cfg.d_emb, activation=cfg.activation, norm=cfg.att_norm)
        self.init_head()

    def interest(self, batch: dict, t: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        h = self.item_vec(batch["hist"])                                    # (B, L, d)
        return [self.att(h, t, batch["hist_mask"].float())], {}             # [(B, d)]
