"""Packed rows -> model inputs: the tensors a forward pass reads, on the training device."""

from __future__ import annotations

import numpy as np
import torch

from lumctl.ops.packing import document_causal_mask

TENSOR_KEYS = {"type": torch.int8, "item": torch.long, "cond": torch.long, "segment": torch.int32,
               "pos": torch.int32, "loss_mask": torch.bool, "target": torch.long, "ts": torch.long}


def to_batch(rows: dict[str, np.ndarray], idx: np.ndarray, device: torch.device, dense_mask: bool) -> dict:
    """Select rows `idx` and move them to `device` as tensors (with the Numba dense mask for sdpa)."""
    b = {k: torch.from_numpy(np.ascontiguousarray(rows[k][idx])).to(TENSOR_KEYS[k]) for k in TENSOR_KEYS}
    if dense_mask:
        b["mask"] = torch.from_numpy(document_causal_mask(rows["segment"][idx]))
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in b.items()}
