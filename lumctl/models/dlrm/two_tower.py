"""Two-tower retrieval model (Yi et al., RecSys 2019, "Sampling-Bias-Corrected Neural Modeling for
Large Corpus Item Recommendations"; Covington et al. 2016): a user tower (profile + mean-pooled
history + the direct LUM answers) and an item tower (item vector + its LUM embedding), scored by
cosine / tau. Trained with BCE plus an in-batch softmax over the positives; the LUM interest-matching
term sum_n w_n cos(o_qn, e^i) stays a dot product, so the full catalogue is one matrix product."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lumctl.models.dlrm.common import DLRM, DLRMConfig, masked_mean, mlp, zero_linear


class TwoTower(DLRM):
    def __init__(self, cfg: DLRMConfig, item_category: torch.Tensor | None = None,
                 item_genres: torch.Tensor | None = None):
        super().__init__(cfg, item_category, item_genres)
        d, h0, N, D = cfg.d_emb, cfg.mlp[0], cfg.n_queries, cfg.d_lum
        self.user_in = nn.Linear(d * (len(cfg.user_vocab) + 1), h0)
        self.user_tower = mlp(cfg.mlp)
        self.item_in = nn.Linear(d, h0)
        self.item_tower = mlp(cfg.mlp)
        self.bias = nn.Parameter(torch.zeros(()))
        if self.direct:
            self.lum_user = zero_linear(N * D + 1, h0)                      # answers + missing
            self.lum_item = zero_linear(D, h0)
        if self.match:
            self.lum_match = zero_linear(N + 1, 1)                          # cosines + missing

    def user_side(self, batch: dict) -> torch.Tensor:
        """The unit user tower (B, h) from profile, history and the direct LUM answers."""
        pooled = masked_mean(self.item_vec(batch["hist"]), batch["hist_mask"].float())  # (B, d)
        hu = self.user_in(torch.cat(self.user_vec(batch["user_attr"]) + [pooled], -1))  # (B, h0)
        if self.direct:
            miss = batch["lum_missing"].float()[:, None]
            hu = hu + self.lum_user(torch.cat([batch["lum"].flatten(1), miss], -1))
        return F.normalize(self.user_tower(F.relu(hu)), dim=-1)

    def item_side(self, item: torch.Tensor, lum_item: torch.Tensor | None) -> torch.Tensor:
        """The unit item tower (B, h) from item ids (B,) and their LUM embeddings (B, D)."""
        hi = self.item_in(self.item_vec(item))                              # (B, h0)
        if self.direct:
            hi = hi + self.lum_item(lum_item)
        return F.normalize(self.item_tower(F.relu(hi)), dim=-1)

    def retrieval_scores(self, batch: dict, items: torch.Tensor, lum_items: torch.Tensor | None) -> torch.Tensor:
        """(B, I) scores of every user of `batch` against `items` (I,) with LUM embeddings (I, D).
        Equal to the logit up to a per-user constant: the match term sum_n w_n cos(o_qn, e^i) is the
        dot product (sum_n w_n o_qn) . e^i, so the full catalogue is one matrix product."""
        s = self.user_side(batch) @ self.item_side(items, lum_items).T / self.cfg.temperature  # (B, I)
        if self.match:
            s = s + self.match_query(batch) @ lum_items.T
        return s

    def match_query(self, batch: dict) -> torch.Tensor:
        """(B, D) sum_n w_n o_qn, so the match term of user b and item i is match_query[b] . e^i."""
        w = self.lum_match.weight[0, :self.cfg.n_queries]                   # (N,)
        return (batch["lum"] * w[None, :, None]).sum(1)

    def run(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"logit": (B,), "u", "i": the unit towers (B, h)}."""
        u = self.user_side(batch)
        i = self.item_side(batch["item"], batch.get("lum_item"))
        logit = (u * i).sum(-1) / self.cfg.temperature + self.bias
        if self.match:
            _, match, miss = self.lum_features(batch)
            logit = logit + self.lum_match(torch.cat([match, miss], -1)).squeeze(-1)
        return {"logit": logit, "u": u, "i": i}

    def loss(self, batch: dict, label: torch.Tensor, aux_weight: float = 0.0) -> torch.Tensor:
        """BCE plus an in-batch softmax over the positives: each positive user against the batch's
        positive items, scored as retrieval_scores scores the catalogue (aux_weight unused)."""
        out = self.run(batch)
        loss = F.binary_cross_entropy_with_logits(out["logit"], label)
        pos = label > 0.5
        if pos.sum() > 1:
            u, i = out["u"][pos], out["i"][pos]
            sim = u @ i.T / self.cfg.temperature                            # (P, P)
            if self.match:  # the retrieval score of every pair, match term included
                sim = sim + self.match_query(batch)[pos] @ batch["lum_item"][pos].T
            loss = loss + F.cross_entropy(sim, torch.arange(len(sim), device=sim.device))
        return loss
