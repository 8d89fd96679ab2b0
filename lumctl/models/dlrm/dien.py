"""DIEN (Zhou et al., AAAI 2019, "Deep Interest Evolution Network for Click-Through Rate Prediction"):
a GRU interest extractor over the history, with the auxiliary loss (GRU state h_l tells the next
behaviour from a sampled item; weight `aux_weight` of `loss`), then an attention-update GRU (AUGRU)
driven by softmax target attention on the states evolves the interest towards the target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lumctl.models.dlrm.common import DLRMConfig, Ranker, TargetAttention


class AUGRUCell(nn.Module):
    """GRU cell whose update gate is scaled by the attention score a: u' = a * u."""

    def __init__(self, d: int):
        super().__init__()
        self.x2h = nn.Linear(d, 3 * d)
        self.h2h = nn.Linear(d, 3 * d)

    def forward(self, x: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        xr, xu, xn = self.x2h(x).chunk(3, -1)                             # (B, d) each
        hr, hu, hn = self.h2h(h).chunk(3, -1)
        r = torch.sigmoid(xr + hr)
        u = torch.sigmoid(xu + hu) * a[:, None]
        n = torch.tanh(xn + r * hn)
        return (1 - u) * h + u * n


class DIEN(Ranker):
    def __init__(self, cfg: DLRMConfig, item_category: torch.Tensor | None = None,
                 item_genres: torch.Tensor | None = None):
        super().__init__(cfg, item_category, item_genres)
        d = cfg.d_emb
        self.att = TargetAttention(d, activation=cfg.activation, norm=cfg.att_norm)
        self.gru = nn.GRUCell(d, d)
        self.augru = AUGRUCell(d)
        self.init_head()

    def interest(self, batch: dict, t: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        h = self.item_vec(batch["hist"])                                    # (B, L, d)
        m = batch["hist_mask"].float()                                      # (B, L)
        states = self.extract(h, m)                                         # (B, L, d)
        return [self.evolve(states, t, m)], {"states": states}

    def extract(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Interest extractor: a GRU over the history h (B, L, d) -> states (B, L, d); pads keep the
        state (zero before the first event). A step loop: on CPU it beats nn.GRU on packed sequences."""
        B, L, d = h.shape
        s = h.new_zeros(B, d)
        states = []
        for l in range(L):
            s = torch.where(m[:, l:l + 1] > 0, self.gru(h[:, l], s), s)
            states.append(s)
        return torch.stack(states, 1)                                       # (B, L, d)

    def evolve(self, states: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Interest evolving: AUGRU driven by softmax target attention on the states -> (B, d)."""
        a = self.att.scores(states, t).masked_fill(m == 0, float("-inf"))
        a = torch.nan_to_num(torch.softmax(a, -1))                          # (B, L); all-pad rows -> 0
        z = states.new_zeros(states.shape[0], states.shape[2])
        for l in range(states.shape[1]):
            z = torch.where(m[:, l:l + 1] > 0, self.augru(states[:, l], z, a[:, l]), z)
        return z                                                            # (B, d)

    def aux_loss(self, states: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """-log sigmoid(h_l . e(hist_{l+1})) - log(1 - sigmoid(h_l . e(neg_{l+1}))), averaged over the
        positions l where l and l+1 are both real events.
        states (B, L, d), hist (B, L), mask (B, L) bool, neg (B, L) sampled item ids (column 0 unused)."""
        h = states[:, :-1]                                                  # (B, L-1, d)
        pos = (h * self.item_vec(hist[:, 1:])).sum(-1)                      # (B, L-1)
        negl = (h * self.item_vec(neg[:, 1:])).sum(-1)
        ok = (mask[:, :-1] & mask[:, 1:]).float()
        per = F.softplus(-pos) + F.softplus(negl)                          # -log s(pos) - log(1 - s(neg))
        return (per * ok).sum() / ok.sum().clamp(min=1)

    def loss(self, batch: dict, label: torch.Tensor, aux_weight: float = 0.0) -> torch.Tensor:
        """BCE + aux_weight x the auxiliary loss (negatives drawn uniformly from the item vocabulary,
        torch's global generator)."""
        out = self.run(batch)
        loss = F.binary_cross_entropy_with_logits(out["logit"], label)
        if aux_weight > 0:
            hist = batch["hist"]
            neg = torch.randint(2, self.cfg.n_items, hist.shape, device=hist.device)  # (B, L)
            loss = loss + aux_weight * self.aux_loss(out["states"], hist, batch["hist_mask"], neg)
        return loss
