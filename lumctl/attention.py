"""Attention masks for packed rows, on the two backends.

- sdpa: a dense bool mask (B, S, S) built by Numba (`lumctl.ops.packing.document_causal_mask`)
- flex: a `torch.nn.attention.flex_attention` BlockMask from segment ids (document-causal),
  with the kernel and the block-mask construction compiled on CUDA (eager elsewhere)
- dense: no mask is passed; the model builds one from segment ids on its device (HSTU;
  `dense_document_causal`, also LUM's low-pass branch under flex)
"""

from __future__ import annotations

import functools

import torch


def document_causal_block_mask(segment: torch.Tensor):
    """segment (B, S) int, -1 at padding -> BlockMask: same user and causal; padding sees itself."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, S = segment.shape

    def mask_mod(b, h, q, kv):
        same = (segment[b, q] == segment[b, kv]) & (segment[b, q] >= 0)
        return (same & (kv <= q)) | (q == kv)

    return create_block_mask(mask_mod, B, None, S, S, device=segment.device, _compile=segment.is_cuda)


def dense_document_causal(segment: torch.Tensor) -> torch.Tensor:
    """segment (B, S) -> bool (B, S, S): same user, key not after query; padding rows all False."""
    S = segment.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=segment.device).tril()           # (S, S)
    return (segment[:, :, None] == segment[:, None, :]) & causal & (segment >= 0)[:, :, None]


def query_block_mask(segment: torch.Tensor, is_query: torch.Tensor):
    """Grouped queries: like document-causal, but a query token sees its user's prefix and
    itself, never the other queries (used by `lumctl query`)."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, S = segment.shape

    def mask_mod(b, h, q, kv):
        same = (segment[b, q] == segment[b, kv]) & (segment[b, q] >= 0)
        return (same & (kv <= q) & ~is_query[b, kv]) | (q == kv)

    return create_block_mask(mask_mod, B, None, S, S, device=segment.device, _compile=segment.is_cuda)


def query_dense_mask(segment: torch.Tensor, is_query: torch.Tensor) -> torch.Tensor:
    """The mask of `query_block_mask` as a dense bool (B, S, S) on the tensors' device (True = may
    attend), for sdpa: the same user's earlier non-query tokens, and itself."""
    S = segment.shape[1]
    same = (segment[:, :, None] == segment[:, None, :]) & (segment >= 0)[:, :, None]      # (B, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=segment.device).tril()
    return (same & causal & ~is_query[:, None, :]) | torch.eye(S, dtype=torch.bool, device=segment.device)


def query_backend(attention: str, device: torch.device, seq_len: int) -> str:
    """The attention kernel of a query: sdpa on the CPU; on CUDA flex or sdpa, 'auto' = sdpa for rows of
    at most 2048 tokens (its dense mask is B x S x S; measured faster than flex there), else flex."""
    if device.type != "cuda":
        return "sdpa"
    if attention == "auto":
        return "sdpa" if seq_len <= 2048 else "flex"
    return attention


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, block_mask):
    from torch.nn.attention.flex_attention import flex_attention
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask)


def attend(q, k, v, mask, dropout_p: float = 0.0):
    """Masked attention on either backend. q, k, v (B, H, S, Dh); mask a dense bool (B, S, S)
    (True = may attend; sdpa, with dropout_p) or a flex BlockMask -> (B, H, S, Dh)."""
    if isinstance(mask, torch.Tensor):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=dropout_p)
    return flex(q, k, v, block_mask=mask)


def make_mask(batch: dict, backend: str):
    """The mask a model's forward expects for `batch` on `backend`: a BlockMask (flex), the
    batch's dense Numba mask (sdpa), or None (dense: the model builds its own from segments)."""
    if backend == "flex":
        return document_causal_block_mask(batch["segment"])
    if backend == "sdpa":
        return batch["mask"]
    return None
