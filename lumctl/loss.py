"""InfoNCE for next-condition-item prediction.

    L = -mean_l log( exp(s(o_l, e_{i_l})/tau) / (exp(s(o_l, e_{i_l})/tau) + sum_k exp(s(o_l, e_k)/tau)) )

with s the cosine similarity (`similarity = "cosine"`, the default) or the plain inner product
(`"dot"`, the cross-entropy of the SASRec / BSARec codebases, usually with tau = 1), o_l the output at a trained (condition) position and e the item
token encoder's embedding. Negatives: the other items of the batch (`in_batch`; each distinct
item counted once, so a negative equal to the positive — an accidental hit — cannot occur),
`sampled` items (`num_sampled` per position, log-Q corrected, accidental hits masked), or the
`full` catalogue. The full softmax over a catalogue larger than `item_block` items is computed a
block at a time: log sum_k exp(.) is accumulated over blocks, and each block's logits are
recomputed in the backward pass (activation checkpointing), so memory is positions x item_block,
not positions x items.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

FIRST_ITEM = 2  # ids 0 and 1 are padding and unknown


def info_nce(o: torch.Tensor, target: torch.Tensor, item_table, *, negatives: str, tau: torch.Tensor | float,
             num_sampled: int = 128, sample_logq: torch.Tensor | None = None,
             generator: torch.Generator | None = None, logq_correction: bool = True,
             candidates: torch.Tensor | None = None, reduction: str = "mean",
             n_items: int | None = None, item_block: int = 262144, similarity: str = "cosine") -> torch.Tensor:
    """o (N, D) outputs at trained positions, target (N,) item ids; `item_table(ids) -> (M, D)`.
    `sample_logq` (I,) log sampling probability of each item (sampled negatives); negatives are
    drawn on the generator's device. `logq_correction = False` is the plain (1 + K)-way softmax of
    generative-recommenders' SampledSoftmaxLoss.
    `candidates` (M,) in_batch: the batch's distinct item ids, sorted, when `target` is only part
    of the batch (the targets of all ranks under torchrun); default the distinct `target`s.
    reduction: 'mean' or 'sum' over N.
    full: `n_items` (the catalogue size) above `item_block` scores the catalogue in blocks.
    similarity: 'cosine' (outputs and item embeddings L2-normalised) or 'dot' (used as they are)."""
    if similarity not in ("cosine", "dot"):
        raise ValueError(f"similarity must be 'cosine' or 'dot' (got {similarity!r})")
    norm = _unit if similarity == "cosine" else _plain
    o = norm(o)                                                               # (N, D)
    if negatives == "full" and n_items is not None and n_items > item_block:
        return _full_in_blocks(o, target, lambda ids: norm(item_table(ids)), tau, n_items, item_block, reduction)
    if negatives == "full":
        keys = norm(item_table(None))                                         # (I, D)
        logits = o @ keys.T / tau                                             # (N, I)
        logits[:, :FIRST_ITEM] = float("-inf")
        return F.cross_entropy(logits, target, reduction=reduction)
    if negatives == "in_batch":
        if candidates is None:
            cand, label = torch.unique(target, return_inverse=True)           # (M,), (N,)
        else:
            cand = candidates                                                 # (M,) sorted, holds every target
            label = torch.searchsorted(cand, target)                          # (N,)
        keys = norm(item_table(cand))                                         # (M, D)
        return F.cross_entropy(o @ keys.T / tau, label, reduction=reduction)
    # sampled: K negatives per position from Q, logits corrected by -log Q (Bengio & Senecal; Yi et al. 2019)
    N = len(target)
    where = generator.device if generator is not None else torch.device("cpu")
    neg = torch.multinomial(sample_logq.exp().to(where), N * num_sampled, replacement=True,
                            generator=generator).view(N, num_sampled).to(target.device)  # (N, K)
    pos_keys = norm(item_table(target))                                       # (N, D)
    neg_keys = norm(item_table(neg.flatten())).view(N, num_sampled, -1)       # (N, K, D)
    pos = (o * pos_keys).sum(-1, keepdim=True) / tau                          # (N, 1)
    neg_logits = torch.einsum("nd,nkd->nk", o, neg_keys) / tau                 # (N, K)
    if logq_correction:
        neg_logits = neg_logits - sample_logq.to(o.device)[neg]
    neg_logits = neg_logits.masked_fill(neg == target[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([pos, neg_logits], 1)
    return F.cross_entropy(logits, torch.zeros_like(target), reduction=reduction)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def _block_lse(o: torch.Tensor, ids: torch.Tensor, tau, item_table) -> torch.Tensor:
    """log sum_k exp(s(o, e_k) / tau) over the items `ids` -> (N,); item_table(ids) gives the keys as scored."""
    keys = item_table(ids)                                                    # (B, D)
    return torch.logsumexp((o @ keys.T).float() / tau, -1)                    # (N,)


def _full_in_blocks(o, target, item_table, tau, n_items: int, item_block: int, reduction: str) -> torch.Tensor:
    """The `full` loss with the catalogue in blocks of `item_block` items (ids from FIRST_ITEM);
    item_table(ids) gives the keys as scored (normalised or not)."""
    lse = []
    for i0 in range(FIRST_ITEM, n_items, item_block):
        ids = torch.arange(i0, min(n_items, i0 + item_block), device=o.device)
        lse.append(checkpoint(_block_lse, o, ids, tau, item_table, use_reentrant=False))  # (N,)
    pos_keys = item_table(target)                                             # (N, D)
    pos = torch.bmm(o[:, None, :], pos_keys[:, :, None])[:, 0, 0].float() / tau  # (N,) at the blocks' precision
    loss = torch.logsumexp(torch.stack(lse, 1), 1) - pos
    return loss.mean() if reduction == "mean" else loss.sum()


def sampling_logq(popularity_counts: torch.Tensor, sampler: str) -> torch.Tensor:
    """log Q over item ids for sampled negatives; padding/unknown never drawn."""
    if sampler == "uniform":
        w = torch.ones_like(popularity_counts, dtype=torch.float64)
    else:
        w = popularity_counts.double().clamp(min=0) + 1.0
    w[:FIRST_ITEM] = 0
    return (w / w.sum()).log().float()
