"""Multi-process runs under `torchrun`: process group, rank/world, small collectives.

Without torchrun (no WORLD_SIZE in the environment, or WORLD_SIZE=1) nothing here creates a
process group: rank 0 of world 1, every collective is the identity, and the stages run exactly
as in a single process. Under torchrun each process calls `init(device)` once; the backend is
NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK) and gloo on CPU.

    torchrun --standalone --nproc-per-node 2 -m lumctl pretrain specs/demo.toml
"""

from __future__ import annotations

import atexit
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as td


def env_world() -> int:
    """World size torchrun asked for (1 without torchrun); readable before `init`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device) -> torch.device:
    """Join the process group of this torchrun job (once); return this rank's device."""
    if env_world() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
        atexit.register(close)
    return device


def close() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def active() -> bool:
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    return td.get_rank() if active() else 0


def world() -> int:
    return td.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        td.barrier()


def all_reduce_sum(x: float) -> float:
    """Sum of a Python number over ranks (float64 on the CPU of gloo, on the GPU for NCCL)."""
    if not active():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device())
    td.all_reduce(t)
    return float(t.item())


def all_reduce_max(x: int) -> int:
    if not active():
        return x
    t = torch.tensor([int(x)], dtype=torch.int64, device=_comm_device())
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return int(t.item())


def all_reduce_mean_tensor(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (a copy)."""
    if not active():
        return t
    t = t.clone()
    td.all_reduce(t)
    return t / world()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def shard(idx: np.ndarray, r: int | None = None, w: int | None = None) -> np.ndarray:
    """Rank r's contiguous part of `idx` (parts differ in size by at most one)."""
    r, w = (rank() if r is None else r), (world() if w is None else w)
    return np.array_split(idx, w)[r]


# ------------------------------------------------------------------------------------ models
def wrap(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """The module the training loop calls: `model` itself in world 1, else DDP(model) or the
    model with its blocks, item encoder and root sharded by FSDP2 (`fully_shard`, in place)."""
    if not active():
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in getattr(model, "blocks", []):
            fully_shard(block)
        if hasattr(model, "items"):  # the loss calls model.item_table() outside forward: its own unit
            fully_shard(model.items)
        fully_shard(model)
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    # buffers (item feature tables) are equal on all ranks: no broadcast before every forward
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=ids, **{quiet: False})


def no_sync(wrapped: torch.nn.Module, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an optimizer step."""
    if not active():
        return nullcontext()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else wrapped.no_sync()


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """(model, optimizer) state dicts of the whole model on rank 0 (a collective under FSDP; empty
    dicts on the other ranks there). Same keys as the single-process model."""
    if not (active() and hasattr(model, "set_requires_gradient_sync")):
        return model.state_dict(), (opt.state_dict() if opt is not None else None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), (get_optimizer_state_dict(model, opt, options=o) if opt is not None else None)


def load_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load whole-model state dicts, as a single-process run (optimizer state keyed by parameter
    index) or an FSDP run (keyed by parameter name) saved them, into any of the three set-ups."""
    fsdp = active() and hasattr(model, "set_requires_gradient_sync")
    by_name = any(isinstance(k, str) for k in optim_sd["state"])
    if not fsdp and not by_name:
        model.load_state_dict(model_sd)
        opt.load_state_dict(optim_sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    if not by_name:  # index i = the i-th parameter of the optimizer's groups, in order
        names = {id(q): n for n, q in model.named_parameters()}
        order = [names[id(q)] for g in opt.param_groups for q in g["params"]]
        optim_sd = {"state": {order[i]: v for i, v in optim_sd["state"].items()},
                    "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optim_sd["param_groups"]]}
    o = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=o)
    set_optimizer_state_dict(model, opt, optim_sd, options=o)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")
