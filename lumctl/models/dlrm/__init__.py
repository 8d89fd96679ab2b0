"""DLRM backbones for CTR prediction, optionally enriched with LUM answers (Step 3).

One file per backbone, the shared parts in `common` (config, feature embedding, MLP, Dice/PReLU,
target attention, the zero-initialised LUM input head, the loss):

  dnn        embedding & MLP over the mean-pooled history (dnn.py)
  din        target attention over the history (din.py)
  dien       GRU interest extractor + AUGRU, auxiliary loss (dien.py)
  sim        hard search by category + target attention, next to DIN (sim.py)
  twin       GSU scoring the long history with the ESU's own attention, top-k, multi-head ESU (twin.py)
  hstu       HSTU layers over (item, action) tokens and the target, end to end (hstu.py)
  two_tower  user tower . item tower, BCE + in-batch softmax; retrieval over the catalogue (two_tower.py)

`build(cfg, item_category, item_genres)` picks the class by `cfg.backbone` (a small explicit dict).
"""

from __future__ import annotations

import torch

from lumctl.models.dlrm.common import DLRM, DLRMConfig, Dice, PReLU, Ranker, TargetAttention
from lumctl.models.dlrm.dien import DIEN
from lumctl.models.dlrm.din import DIN
from lumctl.models.dlrm.dnn import DNN
from lumctl.models.dlrm.hstu import HSTURanker
from lumctl.models.dlrm.sim import SIM
from lumctl.models.dlrm.twin import TWIN
from lumctl.models.dlrm.two_tower import TwoTower

BACKBONES: dict[str, type[DLRM]] = {
    "dnn": DNN,
    "din": DIN,
    "dien": DIEN,
    "sim": SIM,
    "twin": TWIN,
    "hstu": HSTURanker,
    "two_tower": TwoTower,
}


def build(cfg: DLRMConfig, item_category: torch.Tensor | None = None,
          item_genres: torch.Tensor | None = None) -> DLRM:
    """The backbone `cfg.backbone` with item category ids (I,) and genre multi-hots (I, G)."""
    return BACKBONES[cfg.backbone](cfg, item_category, item_genres)


__all__ = ["BACKBONES", "DLRM", "DLRMConfig", "Dice", "PReLU", "Ranker", "TargetAttention", "build"]
