"""What every DLRM backbone shares: the config, the feature embedding, the MLP and its activations
(ReLU, PReLU, Dice), DIN's target attention, the zero-initialised LUM input head and the loss.

Feature embedding (Covington et al. 2016; Zhou et al. 2018): user profile attributes, the target
item as id + category + mean genre embedding, the behaviour history as the same item vectors.

LUM fusion (Yan et al. 2025, "Unlocking Scaling Law in Industrial Recommendation Systems with a
Three-step Paradigm based Large User Model"): `direct` feeds the N query answers o_q1..o_qN and the
target's LUM item embedding e^i (both L2-normalised) plus a "missing" flag; `match` feeds the N
scalars cos(o_qn, e^i). They enter through their own linear layers (`lum_*`) whose weights start at
zero, so a model warm-started from a base checkpoint predicts exactly as the base at step 0.

Batch (tensors, B samples, L = history_len, A user attributes, N queries, D = LUM width):
  user_attr (B, A) long   item (B,) long   hist (B, L) long (0 = pad, right-aligned)   hist_mask (B, L) bool
  lum (B, N, D), lum_item (B, D), lum_missing (B,)   (lum != "none")
  plus what a backbone reads on top: sim_hist / sim_mask (sim), long_hist / long_mask (twin),
  hist_action (hstu).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lumctl.models.sample_features import SampleFeatures


@dataclass
class DLRMConfig:
    backbone: str = "din"           # a key of lumctl.models.dlrm.BACKBONES
    n_items: int = 2                # item vocab (0 pad, 1 unknown)
    n_categories: int = 0           # category vocab (0 = no category feature)
    n_genres: int = 0               # genre multi-hot width (0 = none)
    user_vocab: list[int] = field(default_factory=list)  # vocab size of each user attribute
    d_emb: int = 16
    mlp: list[int] = field(default_factory=lambda: [200, 80])
    lum: str = "none"               # none | direct | match | direct+match
    n_queries: int = 0              # N
    d_lum: int = 0                  # D
    temperature: float = 0.1        # two_tower
    activation: str = "relu"        # relu | prelu | dice: the ranking MLP's and the attention MLP's
    att_norm: str = "none"          # none (DIN: weighted sum) | softmax (weights sum to 1 over the history)
    history_len: int = 50           # hstu: history tokens (+ 1 target token) = its positions
    seq_layers: int = 2             # hstu: HSTU layers
    seq_heads: int = 1              # hstu: heads
    twin_top_k: int = 50            # twin: behaviours the GSU passes to the ESU
    twin_heads: int = 4             # twin: ESU attention heads (the GSU scores with their mean)
    extra_cat: list[int] = field(default_factory=list)    # sample table: vocab of each categorical column
    extra_multi: list[int] = field(default_factory=list)  # sample table: vocab of each multi-valued column
    extra_numeric: int = 0                                 # sample table: numeric columns

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------ layers
class PReLU(nn.Module):
    """max(x, 0) + alpha min(x, 0), alpha learned per unit of the last dimension (any leading shape)."""

    def __init__(self, n: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((n,), 0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, self.alpha * x)


class Dice(nn.Module):
    """DIN's data-adaptive activation: p = sigmoid((x - E[x]) / sqrt(Var[x] + eps)), f = p x + (1 - p) alpha x,
    moments per unit over all leading dimensions (running averages at eval), alpha learned per unit."""

    def __init__(self, n: int, momentum: float = 0.01, eps: float = 1e-8):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(n))
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            flat = x.reshape(-1, x.shape[-1])                               # (B*..., n)
            mean, var = flat.mean(0), flat.var(0, unbiased=False)
            with torch.no_grad():
                self.mean.lerp_(mean, self.momentum)
                self.var.lerp_(var, self.momentum)
        else:
            mean, var = self.mean, self.var
        p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))
        return p * x + (1 - p) * self.alpha * x


ACTIVATIONS = {"relu": nn.ReLU, "prelu": PReLU, "dice": Dice}


def act(kind: str, n: int) -> nn.Module:
    return ACTIVATIONS[kind](*(() if kind == "relu" else (n,)))


def mlp(sizes: list[int], activation: str = "relu") -> nn.Sequential:
    layers = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), act(activation, b)]
    return nn.Sequential(*layers)


def zero_linear(n_in: int, n_out: int) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=False)
    nn.init.zeros_(lin.weight)
    return lin


class TargetAttention(nn.Module):
    """DIN's activation unit: weight_l = MLP([h_l, t, h_l - t, h_l * t]); pooled = sum_l weight_l h_l
    (norm "none", as in DIN: the sum keeps the intensity of interest) or with softmax weights (norm "softmax")."""

    def __init__(self, d: int, hidden: int = 36, activation: str = "relu", norm: str = "none"):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4 * d, hidden), act(activation, hidden), nn.Linear(hidden, 1))
        self.norm = norm

    def scores(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t[:, None].expand_as(h)                                       # (B, L, d)
        return self.net(torch.cat([h, t, h - t, h * t], -1)).squeeze(-1)  # (B, L)

    def forward(self, h: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = self.scores(h, t)                                             # (B, L)
        if self.norm == "softmax":
            w = torch.nan_to_num(torch.softmax(w.masked_fill(mask == 0, float("-inf")), -1))  # all-pad rows -> 0
        w = w * mask
        return (w[..., None] * h).sum(1)                                  # (B, d)


def masked_mean(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of h (B, L, d) over the real events of m (B, L) float -> (B, d); zeros without any."""
    return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)


# ------------------------------------------------------------------------------------ models
class DLRM(nn.Module):
    """The shared feature embedding and LUM feature preparation of every backbone."""

    def __init__(self, cfg: DLRMConfig, item_category: torch.Tensor | None = None,
                 item_genres: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_emb
        self.item = nn.Embedding(cfg.n_items, d, padding_idx=0)
        self.category = nn.Embedding(cfg.n_categories, d, padding_idx=0) if cfg.n_categories else None
        self.genres = nn.Linear(cfg.n_genres, d, bias=False) if cfg.n_genres else None
        self.register_buffer("item_category", item_category.long() if item_category is not None
                             else torch.zeros(cfg.n_items, dtype=torch.long), persistent=False)
        g = item_genres.float() if item_genres is not None else torch.zeros(cfg.n_items, max(cfg.n_genres, 1))
        self.register_buffer("item_genres", g / g.sum(-1, keepdim=True).clamp(min=1), persistent=False)
        self.user = nn.ModuleList(nn.Embedding(v, d) for v in cfg.user_vocab)
        self.direct = "direct" in cfg.lum
        self.match = "match" in cfg.lum

    def item_vec(self, ids: torch.Tensor) -> torch.Tensor:
        """(...,) item ids -> (..., d): id + category + mean genre embedding; pads stay 0 in the id part."""
        v = self.item(ids)
        if self.category is not None:
            v = v + self.category(self.item_category[ids])
        if self.genres is not None:
            v = v + self.genres(self.item_genres[ids])
        return v

    def user_vec(self, user_attr: torch.Tensor) -> list[torch.Tensor]:
        return [emb(user_attr[:, a]) for a, emb in enumerate(self.user)]  # A x (B, d)

    def lum_features(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(direct inputs (B, N*D + D), match inputs (B, N), missing (B, 1)) from normalised answers."""
        if self.cfg.lum == "none":
            return None, None, None
        o, e = batch["lum"], batch["lum_item"]                              # (B, N, D), (B, D)
        miss = batch["lum_missing"].float()[:, None]                        # (B, 1)
        direct = torch.cat([o.flatten(1), e], -1) if self.direct else None  # (B, N*D + D)
        match = (o * e[:, None]).sum(-1) if self.match else None            # (B, N) cosines (inputs are unit)
        return direct, match, miss

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits (B,)."""
        return self.run(batch)["logit"]


class Ranker(DLRM):
    """A ranking DLRM: [user attributes, target, pooled interests] -> MLP -> logit, the LUM answers
    added to the first layer through the zero-initialised `lum_in`.

    A backbone sets `n_pooled` and `interest(batch, t) -> (pooled, extra)`, then calls `init_head()`
    last (so a seed draws the same weights for the layers every backbone shares)."""

    n_pooled = 1  # (B, d) vectors interest() returns

    def init_head(self) -> None:
        cfg, d, h0 = self.cfg, self.cfg.d_emb, self.cfg.mlp[0]
        self.fc_in = nn.Linear(d * (len(cfg.user_vocab) + 1 + self.n_pooled), h0)
        self.act_in = act(cfg.activation, h0)
        self.hidden = mlp(cfg.mlp, cfg.activation)
        self.out = nn.Linear(cfg.mlp[-1], 1)
        self.extra = SampleFeatures(d, cfg.extra_cat, cfg.extra_multi, cfg.extra_numeric)
        if self.extra.out_dim:  # the sample table's own features (lumctl/models/sample_features.py)
            self.extra_in = nn.Linear(self.extra.out_dim, h0, bias=False)
        if cfg.lum != "none":
            N, D = cfg.n_queries, cfg.d_lum
            n_lum = (N * D + D if self.direct else 0) + (N if self.match else 0) + 1   # + missing
            self.lum_in = zero_linear(n_lum, h0)

    def interest(self, batch: dict, t: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
        """Pooled history representations, n_pooled x (B, d), for the target t (B, d); extra outputs."""
        raise NotImplementedError

    def run(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"logit": (B,)} plus the backbone's extra outputs (dien: "states", twin: "gsu", "top")."""
        t = self.item_vec(batch["item"])                                    # (B, d)
        pooled, extra = self.interest(batch, t)
        direct, match, miss = self.lum_features(batch)
        x = self.fc_in(torch.cat(self.user_vec(batch["user_attr"]) + [t] + pooled, -1))  # (B, h0)
        if self.extra.out_dim:
            x = x + self.extra_in(self.extra(batch))
        if self.cfg.lum != "none":
            x = x + self.lum_in(torch.cat([v for v in (direct, match, miss) if v is not None], -1))
        return {"logit": self.out(self.hidden(self.act_in(x))).squeeze(-1), **extra}  # (B,)

    def loss(self, batch: dict, label: torch.Tensor, aux_weight: float = 0.0) -> torch.Tensor:
        """BCE of the logits against the 0/1 labels (B,) (aux_weight: dien's auxiliary loss)."""
        return F.binary_cross_entropy_with_logits(self.run(batch)["logit"], label)
