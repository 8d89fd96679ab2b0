"""TWIN (Chang et al., KDD 2023, "TWIN: TWo-stage Interest Network for Lifelong User Behavior Modeling
in CTR Prediction at Kuaishou").

SIM's general search unit (GSU) picks long-history behaviours by a rule (same category) or by an
embedding of its own, so it and the exact search unit (ESU) that attends over the picks disagree on
what is relevant. TWIN makes the two stages consistent: the GSU scores every behaviour of the long
history with the ESU's own target-attention parameters and passes the top-k to the ESU, which runs
multi-head target attention over them. Each head i scores a behaviour l for the target t as

    alpha_il = (k_l W^h_i) . (t W^q_i) / sqrt(d_k)  +  (c_l W^c_i) beta_i

k_l: the behaviour's inherent features (the item vector: id + category + genres; per item, so a
server caches k W^h); c_l: its cross features with the user (here the recency bucket, log2 of how
many events ago; the paper compresses each cross feature to one dimension per head, W^c_i beta_i here
one projection as there is one cross feature). The GSU score of a behaviour is alpha_il averaged over
heads (no gradient: top-k is a hard choice); the ESU recomputes alpha on the top-k with gradient and
returns W^o [softmax_k(alpha_1) V_1; ...; softmax_k(alpha_H) V_H], V_i = [k_l, c_l] W^v_i.

Where the paper caches k W^h per item, the GSU here folds W^h into the query instead: (k W^h_i) . (t W^q_i)
= k . (W^h_i (t W^q_i)), and averaged over heads that is one d-vector per sample, so scoring W behaviours
costs W dot products of width d (the same numbers as the ESU's; tests/test_dlrm_twin.py checks it).

At this scale the long history is the last `twin_search_len` events before the sample (lumctl.stages.
fuse builds `long_hist`); as SIM here, DIN over the recent `history_len` events runs next to it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lumctl.models.dlrm.common import DLRMConfig, Ranker, TargetAttention

RECENCY_BUCKETS = 16  # floor(log2(1 + events ago)), the last bucket holds everything older


def recency_buckets(W: int, device: torch.device | None = None) -> torch.Tensor:
    """(W,) bucket of each slot of a right-aligned history of W slots: slot W-1 is the latest event."""
    ago = torch.arange(W - 1, -1, -1, device=device)                        # (W,) events between it and the sample
    return torch.log2(ago.float() + 1).floor().long().clamp(max=RECENCY_BUCKETS - 1)


class TwinAttention(nn.Module):
    """The target-attention parameters the GSU and the ESU share (W^q, W^h, W^c beta, W^v, W^o)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.d_k = heads, d
        self.cross = nn.Embedding(RECENCY_BUCKETS, d)                        # cross feature c_l
        self.w_q = nn.Linear(d, heads * d, bias=False)                       # W^q, all heads
        self.w_h = nn.Linear(d, heads * d, bias=False)                       # W^h on inherent features
        self.w_c = nn.Linear(d, heads, bias=False)                           # W^c beta on cross features
        self.w_v = nn.Linear(2 * d, heads * d, bias=False)                   # W^v on [inherent, cross]
        self.w_o = nn.Linear(heads * d, d, bias=False)                       # W^o

    def scores(self, k: torch.Tensor, t: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """alpha (B, H, L) for behaviours k (B, L, d) with recency buckets rec (B, L), target t (B, d)."""
        B, L, _ = k.shape
        q = self.w_q(t).view(B, self.heads, self.d_k)                        # (B, H, d_k)
        kh = self.w_h(k).view(B, L, self.heads, self.d_k)                    # (B, L, H, d_k)
        inherent = torch.einsum("bhd,blhd->bhl", q, kh) / math.sqrt(self.d_k)  # (B, H, L)
        cross = self.w_c(self.cross(rec)).transpose(1, 2)                    # (B, H, L)
        return inherent + cross

    def gsu(self, k: torch.Tensor, t: torch.Tensor, rec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """General search unit scores (B, L): alpha averaged over heads, -inf on pads. k (B, L, d),
        rec (L,) recency buckets. W^h folded into the query: mean_i W^h_i (t W^q_i) / sqrt(d_k)."""
        B, H = len(t), self.heads
        q = self.w_q(t).view(B, H, self.d_k)                                 # (B, H, d_k)
        wh = self.w_h.weight.view(H, self.d_k, -1)                           # (H, d_k, d)
        qk = torch.einsum("bhe,hed->bd", q, wh) / (H * math.sqrt(self.d_k))  # (B, d)
        cross = self.w_c(self.cross(rec)).mean(-1)                           # (L,) head mean of (c_l W^c_i) beta_i
        s = torch.bmm(k, qk[:, :, None]).squeeze(-1) + cross                 # (B, L)
        return s.masked_fill(~mask, float("-inf"))

    def esu(self, k: torch.Tensor, t: torch.Tensor, rec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Exact search unit: multi-head target attention over the picked behaviours k (B, K, d) -> (B, d)."""
        B, K, _ = k.shape
        a = self.scores(k, t, rec).masked_fill(~mask[:, None], float("-inf"))  # (B, H, K)
        a = torch.nan_to_num(torch.softmax(a, -1))                           # all-pad rows -> 0
        v = self.w_v(torch.cat([k, self.cross(rec)], -1)).view(B, K, self.heads, self.d_k)  # (B, K, H, d_k)
        out = torch.einsum("bhk,bkhd->bhd", a, v)                            # (B, H, d_k)
        return self.w_o(out.reshape(B, self.heads * self.d_k))               # (B, d)


class TWIN(Ranker):
    n_pooled = 2

    def __init__(self, cfg: DLRMConfig, item_category: torch.Tensor | None = None,
                 item_genres: torch.Tensor | None = None):
        super().__init__(cfg, item_category, item_genres)
        self.att = TargetAttention(cfg.d_emb, activation=cfg.activation, norm=cfg.att_norm)  # recent (DIN)
        self.twin = TwinAttention(cfg.d_emb, cfg.twin_heads)                                 # long (GSU + ESU)
        self.init_head()

    def search(self, long_hist: torch.Tensor, long_mask: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GSU over the long history (B, W): scores (B, W) and the top-k slots (B, K), best first."""
        rec = recency_buckets(long_hist.shape[1], long_hist.device)          # (W,)
        with torch.no_grad():
            ids, inv = torch.unique(long_hist, return_inverse=True)         # (U,), (B, W): each item's vector once
            s = self.twin.gsu(self.item_vec(ids)[inv], t, rec, long_mask)   # (B, W)
        top = s.topk(min(self.cfg.twin_top_k, s.shape[1]), dim=1).indices   # (B, K)
        return s, top

    def interest(self, batch: dict, t: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        h = self.item_vec(batch["hist"])                                    # (B, L, d) recent
        short = self.att(h, t, batch["hist_mask"].float())                  # (B, d)
        long_hist, long_mask = batch["long_hist"], batch["long_mask"]       # (B, W)
        gsu, top = self.search(long_hist, long_mask, t)
        rec = recency_buckets(long_hist.shape[1], long_hist.device)[top]    # (B, K)
        picked = torch.gather(long_hist, 1, top)                            # (B, K) item ids
        mask = torch.gather(long_mask, 1, top)                              # (B, K); pads when fewer than K events
        long = self.twin.esu(self.item_vec(picked), t, rec, mask)           # (B, d)
        return [short, long], {"gsu": gsu, "top": top}
