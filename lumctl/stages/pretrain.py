"""Stage `pretrain`: train the user encoder on packed rows (next-condition-item InfoNCE).

Output (`stores/<experiment>/pretrain/`):
  checkpoints/step-%08d/   model.pt, optim.pt, state.json, config.json   (resume points)
  checkpoints/best/        weights of the best validation step so far
  final/                   the best-validation model: model.pt + config.json (resolved spec,
                           model config, upstream store hashes) + metrics.json (valid and test)
                           + test_rank.npy, test_target.npy (int32 [U]: each test user's 0-based
                           rank of the held-out item, and the item; for paired tests in `lumctl eval`)
                           + test_requests_<field>.npz per [pretrain.eval].requests task (per request:
                           user, value, pos_off; per positive: item, rank)
  metrics.jsonl            one JSON object per log/eval step;  loss.png  the loss curve
  manifest.json            written last
Validation (lumctl.evaluation) picks the checkpoint (EvalSpec.select); the test item is scored once at the end.
With [pretrain.eval] patience = N the run ends early once N evaluations in a row bring no better score.
`init_from` starts from another run's weights (continued pretraining, e.g. a LUM refreshed on newer
events; the model config and vocabularies must match, config.json records `vocab_hash`).

Under torchrun (lumctl.dist) every rank takes its part of each global micro-batch of
`batch_rows` rows; the loss is the one of the whole global micro-batch (in-batch negatives
and trained positions of all ranks' rows), so W ranks follow the curve of one process with the
same spec. Rank 0 writes checkpoints (whole-model state dicts, also under
FSDP), metrics and the store; a checkpoint resumes on any number of ranks.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path
from queue import Queue

import numpy as np
import torch

from lumctl import dist, models
from lumctl.attention import make_mask
from lumctl.batch import TENSOR_KEYS, to_batch  # noqa: F401  (TENSOR_KEYS: read by benchmarks from here)
from lumctl.checks import check_vocabularies
from lumctl.errors import InputError
from lumctl.evaluation import eval_rows, evaluate, evaluate_requests, open_store  # noqa: F401  (eval_rows: read by tests from here)
from lumctl.loss import info_nce, sampling_logq
from lumctl.progress import progress, say
from lumctl.specs import PretrainSpec, Spec
from lumctl.stages import pack as pack_stage
from lumctl.store import (
    atomic_dir,
    begin_store,
    hash_file,
    is_up_to_date,
    join,
    require_checkpoint,
    require_store,
    store_hash,
    write_manifest,
)


# ------------------------------------------------------------------------------------ setup
def resolve_device(choice: str, where: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> a device; `where` names the spec key in the error."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError(where, "cuda requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def model_config(p: PretrainSpec, data: dict, cond_names: list[str], device: torch.device) -> dict:
    """The family's config as a plain dict (stored in checkpoints; downstream rebuilds from it)."""
    m = p.model
    attention = m.attention if m.attention != "auto" else ("flex" if device.type == "cuda" else "sdpa")
    if m.kind != "lum":  # item-only baselines (sasrec, hstu) build their own from their PRESETS
        return models.module(m.kind).config_from_spec(m, data, cond_names, attention)
    from lumctl.models.lum import PRESETS
    d, L, H, ff = PRESETS[m.preset]
    feats = m.item_features
    return {
        "n_items": int(len(data["vocab/item"])),
        "cond_vocab": [len(data[f"vocab/cond_{n}"]) for n in cond_names],
        "n_genres": int(data["items/genres"].shape[1]) if feats and "items/genres" in data else 0,
        "n_categories": int(len(data["vocab/category"])) if feats and "items/category" in data else 0,
        "n_popularity": int(data["items/popularity"].max()) + 1 if feats else 0,
        "d_model": m.d_model or d, "n_layers": m.n_layers or L, "n_heads": m.n_heads or H, "d_ff": m.d_ff or ff,
        "d_feat": m.d_feat, "dropout": m.dropout, "embed_dropout": m.embed_dropout, "attention": attention,
        "item_proj": m.item_proj, "lowpass_bins": m.lowpass_bins, "lowpass_window": m.lowpass_window,
        "lowpass_alpha": m.lowpass_alpha,
    }


def build_model(kind: str, config: dict, data: dict | None = None) -> torch.nn.Module:
    model = models.build(kind, config)
    if data is not None and hasattr(model, "items"):
        model.items.set_features(data.get("items/genres"), data.get("items/category"), data.get("items/popularity"))
    return model


# ------------------------------------------------------------------------------------ data
class Batches:
    """Deterministic stream of row batches: epoch e visits rows in permutation(seed, e).
    Batch number `step` is a pure function of (seed, step), so resuming needs no loader state.
    A background thread prepares the next batches (mask building, host->device copy)."""

    def __init__(self, rows: dict, batch_rows: int, seed: int, device: torch.device, dense_mask: bool,
                 rank: int = 0, world: int = 1):
        self.rows, self.b, self.seed, self.device, self.dense = rows, batch_rows, seed, device, dense_mask
        self.rank, self.world = rank, world  # torchrun: this rank reads its contiguous part of each batch
        self.n = len(rows["type"])
        self.per_epoch = math.ceil(self.n / batch_rows)

    def indices(self, k: int) -> np.ndarray:
        """Rows of micro-batch k read by this rank (all of them in world 1)."""
        idx = self.global_indices(k)
        return dist.shard(idx, self.rank, self.world) if self.world > 1 else idx

    def global_indices(self, k: int) -> np.ndarray:
        """Rows of global micro-batch k; always `batch_rows` of them (the last batch of an epoch is
        topped up from the start of the epoch's permutation), so compiled kernels see one shape."""
        epoch, j = divmod(k, self.per_epoch)
        perm = _permutation(self.seed, epoch, self.n)
        idx = perm[j * self.b:(j + 1) * self.b]
        if len(idx) < self.b and self.n >= self.b:
            idx = np.concatenate([idx, perm[:self.b - len(idx)]])
        return np.sort(idx)

    def shard(self, k: int) -> tuple[int, int]:
        """(first row of this rank's part within global micro-batch k, rows of global micro-batch k)."""
        n_k = len(self.global_indices(k))
        q, r = divmod(n_k, self.world)  # as dist.shard / np.array_split: the first r parts have q + 1 rows
        return self.rank * q + min(self.rank, r), n_k

    def stream(self, start: int, stop: int):
        q: Queue = Queue(maxsize=3)

        def work():
            for k in range(start, stop):
                q.put(to_batch(self.rows, self.indices(k), self.device, self.dense))
            q.put(None)
        threading.Thread(target=work, daemon=True).start()
        while (b := q.get()) is not None:
            yield b


@functools.lru_cache(maxsize=4)  # the loader thread and the training loop ask for the same epochs
@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The row order of an epoch, computed once: the loader thread, the training loop (token and
    FLOP counts) and the rank split all ask for it every micro-batch. Read-only: callers slice it."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.flags.writeable = False
    return perm


def drop_conditions(cond: torch.Tensor, typ: torch.Tensor, p: torch.Tensor, gen: torch.Generator,
                    shard: tuple[int, int] | None = None) -> torch.Tensor:
    """Replace condition field f by 1 ('<any>') with probability p[f], so '<any>' is learned.
    shard = (first row, rows of the global batch) under torchrun: the draw is made for the
    global batch and this rank keeps its rows, so W ranks drop what one process drops."""
    if cond.shape[-1] == 0 or not (p > 0).any():
        return cond
    u = torch.rand(cond.shape if shard is None else (shard[1], *cond.shape[1:]), generator=gen, device="cpu")
    if shard is not None:
        u = u[shard[0]:shard[0] + len(cond)]                                          # (B, S, F)
    drop = u.to(cond.device) < p.to(cond.device)
    return torch.where(drop & (typ == 1)[..., None], torch.ones_like(cond), cond)


# ------------------------------------------------------------------------------------ evaluation
def query_condition(p: PretrainSpec, data: dict, cond_names: list[str]) -> np.ndarray:
    """Condition ids for the held-out position from [pretrain.eval].condition; unnamed -> '<any>'."""
    out = np.ones(len(cond_names), np.int32)
    if p.eval.mixture is not None and p.eval.mixture not in cond_names:
        raise InputError("[pretrain.eval].mixture", f"unknown condition field '{p.eval.mixture}' (fields: {cond_names})")
    for field, value in p.eval.condition.items():
        if field not in cond_names:
            raise InputError("[pretrain.eval].condition", f"unknown condition field '{field}' (fields: {cond_names})")
        vocab = list(data[f"vocab/cond_{field}"])
        if value not in vocab:
            raise InputError(f"[pretrain.eval].condition.{field}", f"unknown value '{value}' (values: {vocab[1:]})")
        out[cond_names.index(field)] = vocab.index(value)
    return out


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, model, opt=None, state: dict | None = None, config: dict | None = None,
                    ema: torch.nn.Module | None = None) -> None:
    """Rank 0 writes the whole model (every rank calls this: FSDP gathers its shards); the others wait.
    `ema`: the weight average, written beside the raw weights as ema.pt (a resume point)."""
    model_sd, optim_sd = dist.full_state(model, opt)
    if dist.is_main():
        with atomic_dir(path) as tmp:
            torch.save(model_sd, tmp / "model.pt")
            if ema is not None:
                torch.save(ema.state_dict(), tmp / "ema.pt")
            if opt is not None:
                torch.save(optim_sd, tmp / "optim.pt")
            if state is not None:
                (tmp / "state.json").write_text(json.dumps(state, indent=2))
            if config is not None:
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
    dist.barrier()


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    steps = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.json").is_file())
    return steps[-1] if steps else None


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from a self-describing checkpoint folder (config.json + model.pt)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    state = torch.load(Path(path) / "model.pt", map_location=device, weights_only=True, mmap=True)
    with torch.device("meta"):  # no random init of (and no copy into) weights that are replaced at once
        model = build_model(cfg["kind"], cfg["model"])
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):  # state the checkpoint lacks
        model = build_model(cfg["kind"], cfg["model"])
        model.load_state_dict(state)
    return model.to(device), cfg


NO_INIT = "[pretrain].init_from: no pretrain checkpoint here (model.pt + config.json)"


def vocab_hash(data: dict, cond_names: list[str]) -> str:
    """Identity of the item and condition vocabularies (id -> value): a checkpoint's embedding rows mean
    the same items only under the same vocabularies."""
    h = hashlib.sha256()
    for k in ["vocab/item"] + [f"vocab/cond_{n}" for n in cond_names]:
        h.update(k.encode())
        h.update("\x00".join(map(str, data[k])).encode())
    return h.hexdigest()


def init_weights(model: torch.nn.Module, path: Path, kind: str, cfg: dict, vocab: str, device: torch.device) -> None:
    """Start from another run's weights (init_from): same model family and config (attention kernel and
    dropout may differ), same vocabularies."""
    ck = json.loads((require_checkpoint(path, NO_INIT) / "config.json").read_text())
    same = ("attention", "dropout", "embed_dropout")
    diff = sorted(k for k in set(cfg) | set(ck["model"]) if k not in same and cfg.get(k) != ck["model"].get(k))
    if ck.get("kind", "lum") != kind or diff:
        raise InputError(str(path), f"[pretrain].init_from: checkpoint is a {ck.get('kind')} model that differs "
                         f"in {diff or 'kind'}; init_from needs this run's model")
    if ck.get("vocab_hash", vocab) != vocab:
        raise InputError(str(path), "[pretrain].init_from: checkpoint was trained on other item or condition "
                         "vocabularies (another dataset or [tokenize] section)")
    if "vocab_hash" not in ck:
        say(f"pretrain: {path} records no vocabularies; init_from trusts they equal this run's")
    model.load_state_dict(torch.load(path / "model.pt", map_location=device, weights_only=True))
    say(f"pretrain: weights from {path}")


def ema_decay(step: int, decay: float) -> float:
    """Decay of the weight average after optimizer step `step` (1-based): min(decay, (1 + t) / (10 + t)),
    so the first steps are not averaged with the random initialisation."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are constants)."""
    for e, q in zip(ema.parameters(), model.parameters()):
        e.lerp_(q.detach().to(e.dtype), 1 - decay)


def lr_at(step: int, total: int, o) -> float:
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def row_costs(segment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """segment (R, S) -> per row: real tokens (R,) and sum over its user segments of L(L+1) (R,),
    computed once so the training loop never reads a batch back from the device to count."""
    tokens = (segment >= 0).sum(1).astype(np.int64)
    pairs = np.zeros(len(segment), np.float64)
    for r, row in enumerate(segment):
        lens = np.bincount(row[row >= 0]).astype(np.float64)
        pairs[r] = float((lens * (lens + 1)).sum())
    return tokens, pairs


def train_flops(n_params: int, d_model: int, n_layers: int, tokens: float, pairs: float) -> float:
    """Training FLOPs of a batch: 6·N per token for the weights, plus causal attention per user
    segment (QK^T and AV: 2·2·d·L(L+1)/2 per layer forward = 2·d·L(L+1)), times 3 for forward + backward."""
    return 6.0 * n_params * tokens + 3 * n_layers * 2 * d_model * pairs


# ------------------------------------------------------------------------------------ run
def run(spec: Spec, force: bool = False, resume: bool = False, until_step: int | None = None) -> Path:
    p = spec.pretrain
    device = dist.init(resolve_device(p.device, "[pretrain].device"))  # torchrun: joins the process group
    world = dist.world()
    if p.optim.batch_rows < world:
        raise InputError("[pretrain.optim].batch_rows", f"must be >= the number of ranks ({world}): it counts the "
                         f"rows of all ranks together (got {p.optim.batch_rows})")
    if world > 1 and p.parallel == "fsdp" and (p.loss.learn_temperature or p.model.kind != "lum"):
        raise InputError("[pretrain].parallel", "fsdp is for lum models with a fixed temperature (got kind = "
                         f"'{p.model.kind}', learn_temperature = {p.loss.learn_temperature}); use ddp")
    if (resume or until_step is not None) and p.keep_checkpoints == 0:
        raise InputError("[pretrain].keep_checkpoints", "is 0: no step checkpoint is written, so --resume and "
                         "--until-step have nothing to continue from; set it to >= 1")
    out = spec.store("pretrain")
    tok_store, pack_store = spec.input_store("tokenize"), spec.input_store("pack")  # paths or URLs
    inputs = {"tokenize": store_hash(require_store(tok_store, "tokenize")),
              "pack": store_hash(require_store(pack_store, "pack"))}
    if p.init_from:
        inputs["init_from"] = hash_file(require_checkpoint(Path(p.init_from), NO_INIT) / "model.pt")
    spec_hash = spec.section_hash("pretrain")
    if not force and is_up_to_date(out, spec_hash, inputs):
        say(f"pretrain: {out} is up to date")
        return out
    check_vocabularies(spec)  # a bad [pretrain.eval].condition fails before the store is touched
    started = time.time()
    ckpt_dir = out / "checkpoints"
    resume_from = newest_checkpoint(ckpt_dir) if resume else None
    if resume_from is not None:
        st = json.loads((resume_from / "state.json").read_text())
        if st.get("spec_hash") != spec_hash or st.get("inputs") != inputs:
            raise InputError(str(resume_from), "checkpoint was made from another spec or other inputs; rerun without --resume")
    elif out.exists() and dist.is_main():
        shutil.rmtree(out)  # a fresh run never mixes with an older one
    dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        begin_store(out, "pretrain")  # final/ and the rest are not usable downstream until the manifest says so

    torch.manual_seed(p.seed)
    data = open_store(tok_store)  # events stay on disk: the evaluation reads its users' slices
    cond_fields = _cond_fields(tok_store)
    cond_names = [c["name"] for c in cond_fields]
    for task in p.eval.requests:
        if task.field not in cond_names:
            raise InputError("[pretrain.eval].requests", f"unknown condition field '{task.field}' (fields: {cond_names})")
    # rows_from = "store": only the small columns in memory; each rank reads the rest of its own rows per batch
    rows = pack_stage.load(pack_store, lazy=("item", "cond", "pos", "ts", "user") if p.rows_from == "store" else ())
    if not rows["loss_mask"].any():
        raise InputError(str(pack_store), "the packed rows have no loss position: nothing to train on (see [pack] "
                         "seq_len, max_items, conditions)")
    conditions = bool(rows["type"].max() == 2 and (rows["type"] == 1).any())
    if not conditions:
        rows["cond"] = rows["cond"][..., :0]
    data_c = data if conditions else {k: v for k, v in data.items() if k != "events/cond"}  # no condition fields
    cfg = model_config(p, data, cond_names if conditions else [], device)
    model = build_model(p.model.kind, cfg, data).to(device)
    vocab = vocab_hash(data, cond_names)
    if p.init_from and resume_from is None:
        init_weights(model, Path(p.init_from), p.model.kind, cfg, vocab, device)
    if p.optim.ema and world > 1:
        raise InputError("[pretrain.optim].ema", f"the weight average runs in one process (got {world} ranks)")
    ema = copy.deepcopy(model).requires_grad_(False) if p.optim.ema else None
    scored = ema if ema is not None else model  # the weights validation scores and the best checkpoint keeps
    wrapped = dist.wrap(model, p.parallel, device)  # world 1: model itself; else DDP or FSDP2 (shards in place)
    if cfg["attention"] == "flex" and device.type == "cpu" and p.model.kind == "lum":
        raise InputError("[pretrain.model].attention", "flex attention has no backward pass on CPU; use 'sdpa' or 'auto'")
    if cfg["attention"] == "flex" and p.model.dropout > 0 and p.model.kind in ("lum", "sasrec"):
        say(f"pretrain: flex attention has no dropout: dropout {p.model.dropout} is not applied to attention weights "
            "([pretrain.model] attention = 'sdpa' applies it there too)")
    log_tau = torch.nn.Parameter(torch.tensor(math.log(p.loss.temperature), device=device),
                                 requires_grad=p.loss.learn_temperature)
    # weight decay on matrices, never on embedding tables, norms or biases
    tables = {id(q) for mod in model.modules() if isinstance(mod, torch.nn.Embedding) for q in mod.parameters()}
    decay = [q for q in model.parameters() if q.ndim >= 2 and id(q) not in tables]
    no_decay = [q for q in model.parameters() if not (q.ndim >= 2 and id(q) not in tables)]
    groups = [{"params": decay, "weight_decay": p.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if p.loss.learn_temperature:
        groups.append({"params": [log_tau], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=p.optim.lr, betas=p.optim.betas, fused=device.type == "cuda")
    fwd = torch.compile(wrapped) if p.compile else wrapped
    bf16 = p.dtype == "bf16" or (p.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else (lambda: torch.autocast(device.type, enabled=False))

    micro = Batches(rows, p.optim.batch_rows, p.seed, device, cfg["attention"] == "sdpa", dist.rank(), world)
    steps_per_epoch = math.ceil(micro.per_epoch / p.optim.grad_accum)
    total = p.optim.max_steps or max(1, round(p.optim.epochs * steps_per_epoch))
    eval_every = p.eval.every_steps or steps_per_epoch
    ckpt_every = p.checkpoint_every or steps_per_epoch
    counts = torch.from_numpy(np.bincount(rows["target"][rows["loss_mask"]], minlength=cfg["n_items"]))
    logq = sampling_logq(counts, p.loss.sampler).to(device)
    qcond = query_condition(p, data, cond_names) if conditions else None
    cd = p.condition_dropout
    drop_p = torch.tensor([cd.get(n, 0.0) if isinstance(cd, dict) else cd for n in cond_names])
    n_params = model.num_params()
    row_tokens, row_pairs = row_costs(rows["segment"])
    # sampled negatives are drawn on the training device (no host sampling or copy in the step)
    neg_gen = torch.Generator(device=device) if device.type == "cuda" else None
    config_json = {"kind": p.model.kind, "model": cfg, "spec": spec.model_dump(mode="json"), "inputs": inputs,
                   "condition_fields": cond_names if conditions else [], "conditions": conditions,
                   "max_items": spec.pack.max_items, "seq_len": spec.pack.seq_len, "n_params": n_params,
                   "vocab_hash": vocab}

    step, best, best_step = 0, -float("inf"), -1
    eval_cache: dict = {}
    if resume_from is not None:
        dist.load_full_state(model, opt, torch.load(resume_from / "model.pt", map_location=device, weights_only=True),
                             torch.load(resume_from / "optim.pt", map_location=device, weights_only=True))
        st = json.loads((resume_from / "state.json").read_text())
        step, best, best_step = st["step"], st["best"], st["best_step"]
        if ema is not None:
            ema.load_state_dict(torch.load(resume_from / "ema.pt", map_location=device, weights_only=True))
        log_tau.data.fill_(st["log_tau"])
        say(f"pretrain: resuming from {resume_from.name} (step {step})")
        if dist.is_main():
            truncate_metrics(out / "metrics.jsonl", step)  # the replayed steps are logged again
    say(f"pretrain: {p.model.kind} {p.model.preset} ({n_params / 1e6:.2f}M non-embedding params, d={cfg['d_model']}, "
        f"L={cfg['n_layers']}), {len(micro.rows['type'])} rows x {spec.pack.seq_len}, {total} steps, "
        f"{cfg['attention']} attention, {'bf16' if bf16 else 'fp32'}, {device}")
    metrics_f = open(out / "metrics.jsonl", "a") if dist.is_main() else open(os.devnull, "w")  # rank 0 logs
    stop = min(total, until_step) if until_step is not None else total
    stream = micro.stream(step * p.optim.grad_accum, stop * p.optim.grad_accum)
    t_last, tok_last, flops_last = time.time(), 0, 0.0
    with progress() as bar:
        task = bar.add_task("pretrain", total=total, completed=step, info="")
        while step < stop:
            gen = torch.Generator().manual_seed(p.seed * 1_000_003 + step)
            torch.manual_seed((p.seed * 1_000_003 + step) * world + dist.rank())  # dropout: (seed, step, rank)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, p.optim)
            if neg_gen is not None:
                neg_gen.manual_seed(p.seed * 1_000_003 + step)
            loss_sum = torch.zeros((), device=device)
            for a in range(p.optim.grad_accum):
                b = next(stream)
                k = step * p.optim.grad_accum + a                                   # micro-batch number
                idx = micro.indices(k)
                if conditions:
                    b["cond"] = drop_conditions(b["cond"], b["type"], drop_p, gen,
                                                micro.shard(k) if world > 1 else None)
                spread, positions = global_loss_terms(rows, micro.global_indices(k), p.loss.negatives,
                                                      device) if world > 1 else ({}, 1)
                with dist.no_sync(wrapped, last=a == p.optim.grad_accum - 1):
                    with autocast():
                        o = fwd(b, make_mask(b, cfg["attention"]))                  # (B, S, D)
                        loss = info_nce(o[b["loss_mask"]], b["target"][b["loss_mask"]], model.item_table,
                                        negatives=p.loss.negatives, tau=log_tau.exp(), num_sampled=p.loss.num_sampled,
                                        sample_logq=logq, generator=neg_gen or gen,
                                        logq_correction=p.loss.logq_correction, n_items=cfg["n_items"],
                                        similarity=p.loss.similarity,
                                        item_block=p.loss.item_block, **spread)
                    if world > 1:  # this rank's share of the global micro-batch's mean loss
                        loss = loss / positions
                    # DDP / FSDP average gradients over ranks; x world makes that the global mean's gradient
                    (loss * world / p.optim.grad_accum).backward()
                loss_sum += loss.detach() / p.optim.grad_accum
                tok_last += int(row_tokens[idx].sum())
                flops_last += train_flops(n_params, cfg["d_model"], cfg["n_layers"], row_tokens[idx].sum(), row_pairs[idx].sum())
            if world > 1 and log_tau.grad is not None:  # log_tau lives outside the wrapped model
                log_tau.grad.copy_(dist.all_reduce_mean_tensor(log_tau.grad))
            if p.optim.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), p.optim.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if ema is not None:
                ema_update(ema, model, ema_decay(step, p.optim.ema))
            if step % p.log_every == 0 or step == stop:
                loss_sum = float(loss_sum)  # the only host sync of a step, every log_every steps
                dt = max(1e-9, time.time() - t_last)
                loss_sum = dist.all_reduce_sum(loss_sum)  # metrics of all ranks together
                if not math.isfinite(loss_sum):
                    raise InputError("[pretrain.optim].lr", f"the loss is {loss_sum} at step {step}: training "
                                     "diverged (try a lower lr, warmup_steps or clip); no model is published")
                tok_last, flops_last = dist.all_reduce_sum(tok_last), dist.all_reduce_sum(flops_last)
                rec = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": round(loss_sum, 5),
                       "lr": opt.param_groups[0]["lr"], "tau": float(log_tau.exp()), "tokens_per_s": round(tok_last / dt, 1),
                       "tflops": round(flops_last / dt / 1e12, 3)}
                metrics_f.write(json.dumps(rec) + "\n"); metrics_f.flush()
                t_last, tok_last, flops_last = time.time(), 0, 0.0
                bar.update(task, completed=step, info=f"loss {loss_sum:.4f} {rec['tokens_per_s']:,.0f} tok/s")
            else:
                bar.update(task, completed=step)
            if step % eval_every == 0 or step == total:
                t_eval = time.time()
                val = evaluate(scored, data_c, "valid", p, spec.pack, device, qcond, autocast, eval_cache,
                               float(log_tau.exp()), cond_names)
                t_eval = round(time.time() - t_eval, 2)
                score = dist.broadcast_object(val[p.eval.select])  # every rank takes the same "best" branch
                metrics_f.write(json.dumps({"step": step, "split": "valid", **val, "eval_s": t_eval}) + "\n")
                metrics_f.flush()
                if score > best:
                    best, best_step = score, step
                    save_checkpoint(ckpt_dir / "best", scored, config={**config_json, "tau": float(log_tau.exp())})
                say(f"pretrain: step {step} valid " + " ".join(f"{k}={v:.4f}" for k, v in val.items() if isinstance(v, float))
                    + (" (best)" if best_step == step else "") + f" in {t_eval:.1f}s")
                t_last = time.time()
                if early_stop(step, best_step, eval_every, p.eval.patience):
                    say(f"pretrain: early stop at step {step}: {p.eval.patience} evaluations without a better "
                        f"{p.eval.select} than step {best_step}")
                    stop = total = step  # the run is complete: the best checkpoint is the model
            if p.keep_checkpoints and (step % ckpt_every == 0 or step == stop):
                state = {"step": step, "best": best, "best_step": best_step, "log_tau": float(log_tau),
                         "spec_hash": spec_hash, "inputs": inputs}
                save_checkpoint(ckpt_dir / f"step-{step:08d}", model, opt, state, config_json, ema)
                for old in sorted(ckpt_dir.glob("step-*"))[:-p.keep_checkpoints] if dist.is_main() else []:
                    shutil.rmtree(old, ignore_errors=True)
    metrics_f.close()
    dist.barrier()
    recs = [json.loads(x) for x in open(out / "metrics.jsonl") if '"tokens_per_s"' in x]
    speed = {}
    if len(recs) > 1:  # the first interval holds compilation and warm-up
        tps = float(np.median([r["tokens_per_s"] for r in recs[1:]]))
        tfl = float(np.median([r["tflops"] for r in recs[1:]]))
        speed = {"tokens_per_s": round(tps, 1), "model_tflops": round(tfl, 2)}
        say(f"pretrain: median {tps:,.0f} tokens/s, {tfl:.3g} TFLOP/s of model FLOPs (attention included)")
    if step < total:
        say(f"pretrain: stopped at step {step} of {total} (--until-step); continue with --resume")
        return out
    if not dist.is_main():  # rank 0 scores the best checkpoint and writes the store
        return out

    # the best validation checkpoint is the model; the test item is scored once, here
    best_model, best_cfg = load_model(ckpt_dir / "best", device)
    tau = best_cfg.get("tau", float(log_tau.exp()))
    test_ranks: list = []  # per-user test ranks, for paired bootstraps in `lumctl eval`
    results = {"best_step": best_step, "select": p.eval.select,
               "valid": evaluate(best_model, data_c, "valid", p, spec.pack, device, qcond, autocast, eval_cache, tau, cond_names),
               "test": evaluate(best_model, data_c, "test", p, spec.pack, device, qcond, autocast, None, tau, cond_names,
                                test_ranks),
               "query_condition": {n: str(data[f"vocab/cond_{n}"][i]) for n, i in zip(cond_names, qcond)} if conditions else {}}
    if p.eval.oracle and conditions:
        results["test_oracle_condition"] = evaluate(best_model, data_c, "test", p, spec.pack, device, None, autocast)
    request_ranks = {t.field: {} for t in p.eval.requests}  # per request: user, value, positives and their ranks
    if p.eval.requests:
        results["test_requests"] = {t.field: evaluate_requests(best_model, data, t, p, spec.pack, device, qcond, autocast,
                                                               cond_fields, conditions, request_ranks[t.field])
                                    for t in p.eval.requests}
    with atomic_dir(out / "final") as tmp:
        link_or_copy(ckpt_dir / "best" / "model.pt", tmp / "model.pt")  # the same bytes: no second write
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2))
        (tmp / "metrics.json").write_text(json.dumps(results, indent=2))
        np.save(tmp / "test_rank.npy", test_ranks[0][0].astype(np.int32))   # [U], users in eval_rows order
        np.save(tmp / "test_target.npy", test_ranks[0][1].astype(np.int32))  # [U] held-out item ids
        for field, arrays in request_ranks.items():
            np.savez(tmp / f"test_requests_{field}.npz", **arrays)
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    write_manifest(out, stage="pretrain", spec_hash=spec_hash, inputs=inputs, started=started,
                   counts={"steps": total, "best_step": best_step, "n_params": n_params, **speed,
                           "test": results["test"], "valid": results["valid"]})
    t = results["test"]
    say(f"pretrain: test hr@10={t['hr@10']:.4f} ndcg@10={t['ndcg@10']:.4f} mrr={t['mrr']:.4f} "
        f"(best step {best_step}) in {time.time() - started:.0f}s -> {out}")
    return out


def link_or_copy(src: Path, dst: Path) -> None:
    """dst as a hard link to src (a checkpoint replaced later gets a new file, so the link stays
    valid), or a copy where the filesystem has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def early_stop(step: int, best_step: int, eval_every: int, patience: int) -> bool:
    """True when the last `patience` evaluations (one every `eval_every` steps, the latest at `step`)
    brought no better validation score than the one of `best_step`; never with patience 0. A pure
    function of the checkpoint's state, so a resumed run stops where an uninterrupted one does."""
    return patience > 0 and best_step >= 0 and (step - best_step) // eval_every >= patience


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step` (those the checkpoint had seen); a killed run may
    have logged later steps, which the resumed run logs again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a line cut short by the kill
            pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(x + "\n" for x in keep))
    os.replace(tmp, path)


def global_loss_terms(rows: dict, idx: np.ndarray, negatives: str, device: torch.device) -> tuple[dict, int]:
    """(info_nce arguments, trained positions of the global micro-batch `idx` (all ranks' rows))
    that make each rank's loss, divided by those positions, its part of the global micro-batch's
    mean loss: a sum over this rank's positions, with the in-batch candidates of all ranks. Read
    from the rows in memory, so no collective and no device sync."""
    mask = rows["loss_mask"][idx]                                                     # (B_all, S)
    terms: dict = {"reduction": "sum"}
    if negatives == "in_batch":  # sorted distinct targets (M,); a pinned copy does not wait for the GPU
        cand = torch.from_numpy(np.unique(rows["target"][idx][mask]).astype(np.int64))
        terms["candidates"] = cand.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else cand
    return terms, max(1, int(mask.sum()))


def _cond_fields(tok_store: Path) -> list[dict]:
    from lumctl import zarrio
    return list(zarrio.open_read(join(tok_store, "data.zarr")).attrs["conditions"])


def plot_loss(metrics_path: Path, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(line) for line in open(metrics_path)]
    tr = [r for r in recs if "loss" in r]
    va = [r for r in recs if r.get("split") == "valid"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr])
    ax[0].set(xlabel="step", ylabel="InfoNCE loss", title="training loss")
    if va:
        for k in ("hr@10", "ndcg@10"):
            ax[1].plot([r["step"] for r in va], [r[k] for r in va], marker="o", label=k)
        ax[1].legend()
    ax[1].set(xlabel="step", title="validation")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
