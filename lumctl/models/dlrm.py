"""DLRM backbones for CTR prediction, optionally enriched with LUM knowledge (Step 3).

Backbones (all share one feature embedding: user profile attributes, the target item as id +
category + genres, the behaviour history as item vectors):
  dnn        Embedding & MLP, history mean-pooled (Covington et al. 2016, "YouTube DNN" style)
  din        target attention over the history (Zhou et al. 2018, "Deep Interest Network")
  dien       GRU interest extractor + attention-update GRU (AUGRU) (Zhou et al. 2019, "DIEN"), with
             the auxiliary loss: GRU state h_l tells the next behaviour from a sampled item (weight
             `aux_weight` of `loss`)
  sim        hard search: history items sharing the target's category, then target attention, next to
             DIN over the recent history (Pi et al. 2020, "Search-based Interest Model")
  two_tower  user tower . item tower (cosine / tau), BCE plus an in-batch softmax over positives
Activations of the ranking MLP and the attention MLP: ReLU, PReLU or DIN's Dice (`activation`);
target attention weights un-normalised as in DIN or softmax-normalised (`att_norm`).

LUM fusion (Yan et al. 2025, "Unlocking Scaling Law in Industrial Recommendation Systems with a
Three-step Paradigm based Large User Model"): `direct` feeds the N query answers o_q1..o_qN and the
target's LUM item embedding e^i (both L2-normalised) plus a "missing" flag; `match` feeds the N
scalars cos(o_qn, e^i). They enter through their own linear layers (`lum_*`) whose weights start at
zero, so a model warm-started from a base checkpoint predicts exactly as the base at step 0.

Batch (tensors, B samples, L = history_len, A user attributes, N queries, D = LUM width):
  user_attr [B, A] long   item [B] long   hist [B, L] long (0 = pad, right-aligned)   hist_mask [B, L] bool
  sim_hist [B, L] long, sim_mask [B, L] bool (sim)   lum [B, N, D], lum_item [B, D], lum_missing [B] (lum)
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lumctl.models.hstu import HSTUConfig, HSTULayer, dense_document_causal, relative_buckets
from lumctl.models.sample_features import SampleFeatures


@dataclass
class DLRMConfig:
    backbone: str = "din"           # dnn | din | dien | sim | two_tower | hstu
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
    extra_cat: list[int] = field(default_factory=list)    # sample table: vocab of each categorical column
    extra_multi: list[int] = field(default_factory=list)  # sample table: vocab of each multi-valued column
    extra_numeric: int = 0                                 # sample table: numeric columns

    def to_dict(self) -> dict:
        return asdict(self)


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


def act(kind: str, n: int) -> nn.Module:
    return {"relu": nn.ReLU, "prelu": PReLU, "dice": Dice}[kind](*(() if kind == "relu" else (n,)))


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


class DLRM(nn.Module):
    def __init__(self, cfg: DLRMConfig, item_category: torch.Tensor | None = None,
                 item_genres: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_emb
        # ---- shared feature embedding
        self.item = nn.Embedding(cfg.n_items, d, padding_idx=0)
        self.category = nn.Embedding(cfg.n_categories, d, padding_idx=0) if cfg.n_categories else None
        self.genres = nn.Linear(cfg.n_genres, d, bias=False) if cfg.n_genres else None
        self.register_buffer("item_category", item_category.long() if item_category is not None
                             else torch.zeros(cfg.n_items, dtype=torch.long), persistent=False)
        g = item_genres.float() if item_genres is not None else torch.zeros(cfg.n_items, max(cfg.n_genres, 1))
        self.register_buffer("item_genres", g / g.sum(-1, keepdim=True).clamp(min=1), persistent=False)
        self.user = nn.ModuleList(nn.Embedding(v, d) for v in cfg.user_vocab)
        A = len(cfg.user_vocab)
        # ---- backbone
        b = cfg.backbone
        if b in ("din", "sim", "dien"):
            self.att = TargetAttention(d, activation=cfg.activation, norm=cfg.att_norm)
        if b == "sim":
            self.att_long = TargetAttention(d, activation=cfg.activation, norm=cfg.att_norm)
        if b == "dien":
            self.gru = nn.GRUCell(d, d)
            self.augru = AUGRUCell(d)
        if b == "hstu":  # end-to-end generative ranker: HSTU over (item, action) history tokens + the target
            hc = HSTUConfig(n_items=cfg.n_items, d_model=d, n_layers=cfg.seq_layers, n_heads=cfg.seq_heads,
                            max_len=cfg.history_len + 1, dropout=0.0)
            self.action = nn.Embedding(4, d)         # 0 pad, 1 not liked, 2 liked (rating >= 4), 3 the target
            self.seq = nn.ModuleList(HSTULayer(hc) for _ in range(cfg.seq_layers))
            self.seq_cfg = hc
        pooled = {"dnn": 1, "din": 1, "dien": 1, "sim": 2, "two_tower": 1, "hstu": 1}[b]
        # ---- LUM inputs (zero-initialised)
        N, D = cfg.n_queries, cfg.d_lum
        self.direct = "direct" in cfg.lum
        self.match = "match" in cfg.lum
        n_lum = (N * D + D if self.direct else 0) + (N if self.match else 0) + (1 if cfg.lum != "none" else 0)
        h0 = cfg.mlp[0]
        if b == "two_tower":
            self.user_in = nn.Linear(d * (A + pooled), h0)
            self.user_tower = mlp(cfg.mlp)
            self.item_in = nn.Linear(d, h0)
            self.item_tower = mlp(cfg.mlp)
            self.bias = nn.Parameter(torch.zeros(()))
            if self.direct:
                self.lum_user = zero_linear(N * D + 1, h0)
                self.lum_item = zero_linear(D, h0)
            if self.match:
                self.lum_match = zero_linear(N + 1, 1)
        else:
            self.fc_in = nn.Linear(d * (A + 1 + pooled), h0)
            self.act_in = act(cfg.activation, h0)
            self.hidden = mlp(cfg.mlp, cfg.activation)
            self.out = nn.Linear(cfg.mlp[-1], 1)
            self.extra = SampleFeatures(d, cfg.extra_cat, cfg.extra_multi, cfg.extra_numeric)
            if self.extra.out_dim:  # the sample table's own features (lumctl/models/sample_features.py)
                self.extra_in = nn.Linear(self.extra.out_dim, h0, bias=False)
            if cfg.lum != "none":
                self.lum_in = zero_linear(n_lum, h0)

    # ------------------------------------------------------------------ features
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

    # ------------------------------------------------------------------ backbones
    def interest(self, batch: dict, t: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Pooled history representations, each (B, d), and the GRU states (B, L, d) of dien (else None).
        t (B, d) is the target item (None for two_tower, whose user side never sees it)."""
        h = self.item_vec(batch["hist"])                                    # (B, L, d)
        m = batch["hist_mask"].float()                                      # (B, L)
        b = self.cfg.backbone
        if b in ("dnn", "two_tower"):
            return [(h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)], None
        if b == "din":
            return [self.att(h, t, m)], None
        if b == "hstu":
            # tokens: history item + its action (right-aligned, pads 0), then the target with action 3;
            # the output at the target attends causally to the history (no timestamps: one time bucket)
            x = torch.cat([h + self.action(batch["hist_action"]), (t + self.action.weight[3])[:, None]], 1)  # (B, L+1, d)
            valid = torch.cat([batch["hist_mask"], torch.ones_like(batch["hist_mask"][:, :1])], 1)         # (B, L+1)
            mask = dense_document_causal(torch.where(valid, 0, -1))                                         # (B, S, S)
            pos = torch.arange(x.shape[1], device=x.device).expand(len(x), -1)                              # (B, S)
            dist, tb = relative_buckets(pos, torch.zeros_like(pos), self.seq_cfg.max_len, self.seq_cfg.time_buckets)
            for layer in self.seq:
                x = layer(x, mask, dist, tb)
            return [x[:, -1]], None                                         # (B, d) at the target
        if b == "sim":
            hs = self.item_vec(batch["sim_hist"])                           # (B, L, d)
            return [self.att(h, t, m), self.att_long(hs, t, batch["sim_mask"].float())], None
        states = self.extract(h, m)                                         # (B, L, d)
        return [self.evolve(states, t, m)], states

    def extract(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """DIEN interest extractor: a GRU over the history h (B, L, d) -> states (B, L, d); pads keep the
        state (zero before the first event). A step loop: on CPU it beats nn.GRU on packed sequences."""
        B, L, d = h.shape
        s = h.new_zeros(B, d)
        states = []
        for l in range(L):
            s = torch.where(m[:, l:l + 1] > 0, self.gru(h[:, l], s), s)
            states.append(s)
        return torch.stack(states, 1)                                       # (B, L, d)

    def evolve(self, states: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """DIEN interest evolving: AUGRU driven by softmax target attention on the states -> (B, d)."""
        a = self.att.scores(states, t).masked_fill(m == 0, float("-inf"))
        a = torch.nan_to_num(torch.softmax(a, -1))                          # (B, L); all-pad rows -> 0
        z = states.new_zeros(states.shape[0], states.shape[2])
        for l in range(states.shape[1]):
            z = torch.where(m[:, l:l + 1] > 0, self.augru(states[:, l], z, a[:, l]), z)
        return z

    def aux_loss(self, states: torch.Tensor, hist: torch.Tensor, mask: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """DIEN's auxiliary loss: -log sigmoid(h_l . e(hist_{l+1})) - log(1 - sigmoid(h_l . e(neg_{l+1}))),
        averaged over the positions l where l and l+1 are both real events.
        states (B, L, d), hist (B, L), mask (B, L) bool, neg (B, L) sampled item ids (column 0 unused)."""
        h = states[:, :-1]                                                  # (B, L-1, d)
        pos = (h * self.item_vec(hist[:, 1:])).sum(-1)                      # (B, L-1)
        negl = (h * self.item_vec(neg[:, 1:])).sum(-1)
        ok = (mask[:, :-1] & mask[:, 1:]).float()
        per = F.softplus(-pos) + F.softplus(negl)                          # -log s(pos) - log(1 - s(neg))
        return (per * ok).sum() / ok.sum().clamp(min=1)

    def user_side(self, batch: dict) -> torch.Tensor:
        """two_tower: the unit user tower (B, h) from profile, history and the direct LUM answers."""
        pooled, _ = self.interest(batch, None)
        hu = self.user_in(torch.cat(self.user_vec(batch["user_attr"]) + pooled, -1))  # (B, h0)
        if self.direct:
            miss = batch["lum_missing"].float()[:, None]
            hu = hu + self.lum_user(torch.cat([batch["lum"].flatten(1), miss], -1))
        return F.normalize(self.user_tower(F.relu(hu)), dim=-1)

    def item_side(self, item: torch.Tensor, lum_item: torch.Tensor | None) -> torch.Tensor:
        """two_tower: the unit item tower (B, h) from item ids (B,) and their LUM embeddings (B, D)."""
        hi = self.item_in(self.item_vec(item))                              # (B, h0)
        if self.direct:
            hi = hi + self.lum_item(lum_item)
        return F.normalize(self.item_tower(F.relu(hi)), dim=-1)

    def retrieval_scores(self, batch: dict, items: torch.Tensor, lum_items: torch.Tensor | None) -> torch.Tensor:
        """two_tower: (B, I) scores of every user of `batch` against `items` (I,) with LUM embeddings
        (I, D). Equal to the logit up to a per-user constant: the match term sum_n w_n cos(o_qn, e^i)
        is the dot product (sum_n w_n o_qn) . e^i, so the full catalogue is one matrix product."""
        s = self.user_side(batch) @ self.item_side(items, lum_items).T / self.cfg.temperature  # (B, I)
        if self.match:
            s = s + self.match_query(batch) @ lum_items.T
        return s

    def match_query(self, batch: dict) -> torch.Tensor:
        """two_tower: (B, D) sum_n w_n o_qn, so the match term of user b and item i is match_query[b] . e^i."""
        w = self.lum_match.weight[0, :self.cfg.n_queries]                   # (N,)
        return (batch["lum"] * w[None, :, None]).sum(1)

    def run(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"logit": (B,)}, plus "u", "i" (two_tower unit towers, (B, h)) or "states" (dien GRU states, (B, L, d))."""
        if self.cfg.backbone == "two_tower":
            u = self.user_side(batch)
            i = self.item_side(batch["item"], batch.get("lum_item"))
            logit = (u * i).sum(-1) / self.cfg.temperature + self.bias
            if self.match:
                _, match, miss = self.lum_features(batch)
                logit = logit + self.lum_match(torch.cat([match, miss], -1)).squeeze(-1)
            return {"logit": logit, "u": u, "i": i}
        t = self.item_vec(batch["item"])                                    # (B, d)
        pooled, states = self.interest(batch, t)
        direct, match, miss = self.lum_features(batch)
        x = self.fc_in(torch.cat(self.user_vec(batch["user_attr"]) + [t] + pooled, -1))  # (B, h0)
        if self.extra.out_dim:
            x = x + self.extra_in(self.extra(batch))
        if self.cfg.lum != "none":
            x = x + self.lum_in(torch.cat([v for v in (direct, match, miss) if v is not None], -1))
        return {"logit": self.out(self.hidden(self.act_in(x))).squeeze(-1), "states": states}  # (B,)

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits (B,)."""
        return self.run(batch)["logit"]

    def loss(self, batch: dict, label: torch.Tensor, aux_weight: float = 0.0) -> torch.Tensor:
        """BCE; two_tower adds an in-batch softmax over the positives (each positive user against the
        batch's positive items, scored as retrieval_scores scores the catalogue); dien adds aux_weight x
        its auxiliary loss (negatives drawn uniformly from the item vocabulary, torch's global generator)."""
        out = self.run(batch)
        loss = F.binary_cross_entropy_with_logits(out["logit"], label)
        if self.cfg.backbone == "dien" and aux_weight > 0:
            hist = batch["hist"]
            neg = torch.randint(2, self.cfg.n_items, hist.shape, device=hist.device)  # (B, L)
            loss = loss + aux_weight * self.aux_loss(out["states"], hist, batch["hist_mask"], neg)
        if self.cfg.backbone == "two_tower":
            pos = label > 0.5
            if pos.sum() > 1:
                u, i = out["u"][pos], out["i"][pos]
                sim = u @ i.T / self.cfg.temperature                        # (P, P)
                if self.match:  # the retrieval score (retrieval_scores) of every pair, match term included
                    sim = sim + self.match_query(batch)[pos] @ batch["lum_item"][pos].T
                loss = loss + F.cross_entropy(sim, torch.arange(len(sim), device=sim.device))
        return loss
