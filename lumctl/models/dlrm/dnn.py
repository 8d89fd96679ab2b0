"""DNN: embedding & MLP over the mean-pooled behaviour history (Covington et al., RecSys 2016, "Deep
Neural Networks for YouTube Recommendations": the watch history averaged into one vector)."""

from __future__ import annotations

import torch

from lumctl.models.dlrm.common import DLRMConfig, Ranker, masked_mean


class DNN(Ranker):
    def __init__(self, cfg: DLRMConfig, item_category: torch.Tensor | None = None,
                 item_genres: torch.Tensor | None = None):
        super().__init__(cfg, item_category, item_genres)
        self.init_head()

    def interest(self, batch: dict, t: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        h = self.item_vec(batch["hist"])                                    # (B, L, d)
        return [masked_mean(h, batch["hist_mask"].float())], {}             # [(B, d)]
