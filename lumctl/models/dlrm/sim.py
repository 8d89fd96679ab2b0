"""SIM with hard search (Pi et al., CIKM 2020, "Search-based User Interest Modeling with Lifelong
Sequential Behavior Data for Click-Through Rate Prediction"): the general search unit keeps the
history items that share the target's category (done in the data path, lumctl.stages.fuse.hard_search,
over the last `sim_search_len` events), the exact search unit runs target attention over them, next
to DIN over the recent history."""

from __future__ import annotations

import torch

from lumctl.models.dlrm.common import DLRMConfig, Ranker, TargetAttention


class SIM(Ranker):
    n_pooled = 2

    def __init__(self, cfg: DLRMConfig, item_category: torch.Tensor | None = None,
                 item_genres: torch.Tensor | None = None):
        super().__init__(cfg, item_category, item_genres)
        self.att = TargetAttention(cfg.d_emb, activation=cfg.activation, norm=cfg.att_norm)       # recent
        self.att_long = TargetAttention(cfg.d_emb, activation=cfg.activation, norm=cfg.att_norm)  # searched
        self.init_head()

    def interest(self, batch: dict, t: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        h = self.item_vec(batch["hist"])                                    # (B, L, d) recent
        hs = self.item_vec(batch["sim_hist"])                               # (B, L, d) searched
        return [self.att(h, t, batch["hist_mask"].float()),
                self.att_long(hs, t, batch["sim_mask"].float())], {}        # 2 x (B, d)
