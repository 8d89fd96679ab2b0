"""Experiment specs: one TOML file per experiment, one section per stage.

Every model forbids unknown keys, documents each field and has defaults that work, so a
minimal spec is short and a typo fails at validation with a one-line message such as
`specs/ml-1m.toml: [pack].seq_len: must be > 0 (got -4)`. Reading files (`extends`, `--set`,
`${VAR}`) and error lines live in lumctl/spec_io.py; report specs in lumctl/report_specs.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lumctl.errors import InputError
from lumctl.spec_io import deep_merge, expand_vars, is_report, load_toml, read_toml, validate  # noqa: F401


def _is_tuple(annotation) -> bool:
    """tuple[...], or an optional one (tuple[...] | None)."""
    return get_origin(annotation) is tuple or any(get_origin(a) is tuple for a in get_args(annotation))


class Strict(BaseModel):
    """Base of every spec model: unknown keys are errors, and types are strict, so `max_items = true`
    or `lr = "3e-3"` is an error rather than 1 or 0.003 (an integer is still a valid float)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _arrays_to_tuples(cls, data):
        """TOML has arrays, not tuples: accept an array for a tuple field (strict mode alone would not)."""
        if isinstance(data, dict):
            fix = {k: tuple(v) for k, v in data.items() if isinstance(v, list) and k in cls.model_fields
                   and _is_tuple(cls.model_fields[k].annotation)}
            if fix:
                data = {**data, **fix}
        return data


# --------------------------------------------------------------------------------------- synth
class SynthSpec(Strict):
    """A synthetic behaviour log with known structure (see lumctl/synth.py).

    kind = "scenarios" (default): a small log with scenario-dependent tastes, read by tokenize
    with format = "synth". kind = "taobao": a Taobao UserBehavior-shaped CSV of `rows` events,
    written in chunks, read by tokenize with format = "taobao" and path = <synth store>/UserBehavior.csv.
    users / items / categories default by kind: 2000 / 1000 / 20 for scenarios; for taobao
    they follow `rows` as in the real 100M-row log: rows / 101.4 users, a catalogue of 0.05 * rows
    items (about 0.0415 * rows of them occur), 9.4k * sqrt(rows / 100M) categories (at least 20)."""

    kind: Literal["scenarios", "taobao"] = Field("scenarios", description="shape of the log (see above)")
    users: int | None = Field(None, gt=0, description="number of users (default by kind)")
    items: int | None = Field(None, gt=1, description="number of items; taobao: the catalogue, not all occur (default by kind)")
    categories: int | None = Field(None, gt=0, description="item categories, an item attribute (default by kind)")
    scenarios: int = Field(3, gt=0, description="scenarios: a user's taste depends on the scenario")
    events_per_user: tuple[int, int] = Field((20, 120), description="scenarios: [min, max] events per user")
    tastes: int = Field(2, gt=0, description="scenarios: preferred categories per user and scenario")
    focus: float = Field(0.8, ge=0, le=1, description="scenarios: share of events drawn from the user's preferred categories")
    zipf: float = Field(1.1, ge=0, description="scenarios: popularity skew of items within a category")
    rows: int | None = Field(None, gt=0, description="taobao: total events in the log (required)")
    chunk_rows: int = Field(4_000_000, ge=10_000, description=(
        "taobao: events generated and written per chunk; bounds memory (~100 bytes per row), not the output"))
    seed: int = Field(0, description="random seed; the log is a pure function of the spec")

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "scenarios":
            only_taobao = self._changed("rows", "chunk_rows")
            if only_taobao:
                raise ValueError(f"{only_taobao[0]} only applies to kind = 'taobao'")
            self.users = 2000 if self.users is None else self.users
            self.items = 1000 if self.items is None else self.items
            self.categories = 20 if self.categories is None else self.categories
            lo, hi = self.events_per_user
            if not 3 <= lo <= hi:
                raise ValueError(f"events_per_user must be [min, max] with 3 <= min <= max (got {[lo, hi]})")
        else:
            only_scen = self._changed("scenarios", "events_per_user", "tastes", "focus", "zipf")
            if only_scen:
                raise ValueError(f"{only_scen[0]} only applies to kind = 'scenarios'")
            if self.rows is None:
                raise ValueError("rows is required for kind = 'taobao'")
            if self.seed < 0:
                raise ValueError(f"seed must be >= 0 for kind = 'taobao' (got {self.seed})")
            n = self.rows
            self.users = max(1, round(n / 101.4)) if self.users is None else self.users
            self.items = max(2, round(0.05 * n)) if self.items is None else self.items
            if self.categories is None:
                self.categories = min(self.items, max(20, round(9439 * (n / 1e8) ** 0.5)))
            if self.users > n:
                raise ValueError(f"users must be <= rows: every user has an event (got {self.users} > {n})")
        if self.categories > self.items:
            raise ValueError(f"categories must be <= items (got {self.categories} > {self.items})")
        return self

    def _changed(self, *names: str) -> list[str]:
        """Fields given a value other than their default (a resolved dump, all defaults, reads back)."""
        return [n for n in names if n in self.model_fields_set and getattr(self, n) != type(self).model_fields[n].default]


# ------------------------------------------------------------------------------------ tokenize
Format = Literal[
    "synth",           # the synth store of this experiment
    "movielens-1m",    # folder with ratings.dat[.gz] (or ratings.users-1-2999.dat.gz), movies.dat, users.dat
    "movielens-100k",  # folder with u.data, u.item, u.user
    "movielens-csv",   # MovieLens 20M/25M folder with ratings.csv, movies.csv
    "amazon-json",     # Amazon raw 5-core review JSON lines (reviewerID, asin, overall, unixReviewTime)
    "amazon-csv",      # Amazon ratings CSV: user,item,rating,timestamp (no header)
    "seq-lines",       # S3-Rec: `user item item ...` per line, time ordered
    "seq-pairs",       # SASRec/BERT4Rec: `user item` per line, grouped by user, time ordered
    "taobao",          # Taobao UserBehavior CSV: user_id,item_id,category_id,behavior_type,timestamp
    "table",           # any CSV/parquet with a column mapping
]


class ConditionField(Strict):
    """One field of the condition token. Several fields make a multi-condition token."""

    name: str = Field(description="field name, e.g. 'rating' or 'genre'")
    source: Literal["column", "bucket", "item_attr"] = Field(
        description="column: an event column's values; bucket: a numeric event column cut at `edges`; "
        "item_attr: an attribute of the event's item (first value of a multi-valued one)")
    column: str = Field(description="event column (column/bucket) or item attribute (item_attr)")
    edges: list[float] = Field(default_factory=list, description="bucket edges: value < edges[0] -> labels[0], ...")
    labels: list[str] = Field(default_factory=list, description="bucket labels, len(edges) + 1")

    @model_validator(mode="after")
    def _check(self):
        if self.source == "bucket":
            if not self.edges:
                raise ValueError("bucket conditions need `edges`")
            if sorted(self.edges) != self.edges:
                raise ValueError(f"edges must be increasing (got {self.edges})")
            if self.labels and len(self.labels) != len(self.edges) + 1:
                raise ValueError(f"labels must have len(edges) + 1 = {len(self.edges) + 1} entries (got {len(self.labels)})")
        elif self.edges or self.labels:
            raise ValueError("edges/labels only apply to source = 'bucket'")
        return self

    def bucket_labels(self) -> list[str]:
        return self.labels or [f"b{k}" for k in range(len(self.edges) + 1)]


class SplitSpec(Strict):
    """How each user's time-ordered events are split into train / valid / test."""

    kind: Literal["leave_one_out", "fraction", "time"] = Field(
        "leave_one_out", description="leave_one_out: valid = second-to-last, test = last event; "
        "fraction: per-user chronological fractions; time: global timestamp cutoffs")
    train: float = Field(0.8, gt=0, lt=1, description="fraction: share of each user's events in train")
    valid: float = Field(0.1, ge=0, lt=1, description="fraction: share in valid (the rest is test)")
    valid_from: int | None = Field(None, description="time: events at or after this timestamp are valid")
    test_from: int | None = Field(None, description="time: events at or after this timestamp are test")
    # leak-free LUM (Step 1 before Step 3 in time): a cutoff splits the train events in two, at one
    # timestamp T0 (pretrain_before / pretrain_quantile) or per user (pretrain_fraction)
    pretrain_before: int | None = Field(None, description=(
        "cutoff T0 (a timestamp): pack/pretrain keep only train events before T0; fuse trains the DLRM on the "
        "train events at/after T0 (valid/test unchanged), so no LUM ever trained on a fuse sample or a later event"))
    pretrain_quantile: float | None = Field(None, gt=0, lt=1, description=(
        "T0 as this quantile of the train events' timestamps (instead of pretrain_before)"))
    pretrain_fraction: float | None = Field(None, gt=0, lt=1, description=(
        "per-user cutoff instead of a global T0: the LUM pretrains on the first pretrain_fraction of each user's "
        "train events (moved back to a timestamp boundary), the DLRM trains on the rest; every user then has both "
        "a pretrained prefix and DLRM samples, and no LUM trained on a fuse sample or a later event of its user"))

    @model_validator(mode="after")
    def _check(self):
        given = [k for k in ("pretrain_before", "pretrain_quantile", "pretrain_fraction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of pretrain_before, pretrain_quantile, pretrain_fraction, not {' and '.join(given)}")
        if self.kind == "fraction" and self.train + self.valid >= 1:
            raise ValueError(f"train + valid must be < 1 (got {self.train + self.valid})")
        if self.kind == "time":
            if self.valid_from is None or self.test_from is None:
                raise ValueError("time split needs valid_from and test_from")
            if self.valid_from > self.test_from:
                raise ValueError("valid_from must be <= test_from")
        return self


class TokenizeSpec(Strict):
    """Raw behaviour log -> vocabularies, feature tables, per-user sequences, splits."""

    RESOURCES: ClassVar[tuple[str, ...]] = ("memory_gb", "threads", "batch_events")  # not part of the store's hash

    format: Format = Field(description="raw log format")
    path: str = Field("", description="file or folder of the raw log; `${VAR:-default}` is expanded")
    items_path: str = Field("", description="table format: optional item attribute table (CSV/parquet)")
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "table format: standard name -> file column; needs user, item, timestamp; optional rating"))
    item_columns: dict[str, str] = Field(default_factory=dict, description="table format: item table, needs item")
    delimiter: str = Field(",", min_length=1, max_length=1, description="table format CSV delimiter")
    header: bool = Field(True, description="table format: the CSV has a header row")
    conditions: list[ConditionField] = Field(default_factory=list, description="condition fields (empty = no conditions)")
    split: SplitSpec = Field(default_factory=SplitSpec)
    min_user_events: int = Field(3, ge=1, description="drop users with fewer events (leave-one-out needs 3)")
    min_item_events: int = Field(1, ge=1, description="drop items with fewer events (one pass)")
    popularity_buckets: int = Field(16, gt=0, description="log2 buckets of item popularity (training events)")
    strict: bool = Field(False, description=(
        "stop at the first malformed row (with its line number) instead of skipping and counting it; "
        "also drop events outside `time_range` instead of only counting them"))
    duplicates: Literal["drop", "keep"] = Field("drop", description=(
        "events with the same (user, item, timestamp): drop keeps the first in file order (the count is in the "
        "manifest), keep keeps them all"))
    time_range: tuple[int, int] | None = Field(None, description=(
        "[first, last] plausible timestamps: events outside are counted (and dropped with strict = true)"))
    memory_gb: float = Field(4.0, gt=0, description=(
        "memory of the relational engine (DuckDB); past it, it spills to disk in the store's temporary folder"))
    threads: int | None = Field(None, ge=1, description="engine threads (default: the CPUs this process may use)")
    batch_events: int = Field(1 << 22, ge=1024, description="events per streamed batch (memory: ~40 bytes each)")

    @field_validator("path", "items_path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_vars(v)

    @model_validator(mode="after")
    def _check(self):
        if self.format != "synth" and not self.path:
            raise ValueError(f"path is required for format '{self.format}'")
        if self.format == "table":
            missing = {"user", "item", "timestamp"} - set(self.columns)
            if missing:
                raise ValueError(f"columns must map {sorted(missing)} for format 'table'")
        if self.time_range is not None and self.time_range[0] > self.time_range[1]:
            raise ValueError(f"time_range must be [first, last] with first <= last (got {list(self.time_range)})")
        names = [c.name for c in self.conditions]
        if len(set(names)) != len(names):
            raise ValueError(f"condition names must be unique (got {names})")
        return self


# ---------------------------------------------------------------------------------------- pack
class PackSpec(Strict):
    """Per-user token sequences -> packed rows of `seq_len` tokens (Numba)."""

    seq_len: int = Field(4096, gt=0, description="tokens per packed row")
    max_items: int = Field(200, gt=0, description="keep each user's most recent `max_items` events")
    conditions: bool = Field(True, description="write condition tokens (false = item-only ablation)")
    strategy: Literal["best_fit", "first_fit"] = Field("best_fit", description="bin packing, longest users first")
    chunk_rows: int = Field(64, gt=0, description="rows per Zarr chunk")
    block_mib: float = Field(256, gt=0, description=(
        "memory bound of one block of users packed at a time (MiB): its rows (30 + 4F bytes a token) and its "
        "events read from the tokenize store (12 + 4F bytes an event) each stay within it; peak memory is about "
        "3x this plus the per-user arrays, whatever the log size. Smaller blocks cost a little packing efficiency"))

    @model_validator(mode="after")
    def _check(self):
        need = self.max_items * (2 if self.conditions else 1)
        if self.seq_len < need:
            raise ValueError(f"seq_len must be >= {need} tokens to hold max_items = {self.max_items} (got {self.seq_len})")
        return self



# ------------------------------------------------------------------------------------ pretrain
# the presets of each family (lumctl/models/<kind>.py PRESETS; a test keeps them in sync)
FAMILY_PRESETS = {
    "lum": ("tiny", "small", "19m", "100m", "300m", "1b"),
    "sasrec": ("tiny", "small", "sasrec-ml1m"),
    "hstu": ("tiny", "small", "hstu-ml1m", "hstu-large-ml1m"),
}


class ModelSpec(Strict):
    """The user encoder: a named preset, single dimensions overridable."""

    kind: Literal["lum", "sasrec", "hstu"] = Field("lum", description=(
        "model family: lum, or the item-only baselines sasrec / hstu (need [pack] conditions = false)"))
    preset: Literal["tiny", "small", "19m", "100m", "300m", "1b", "sasrec-ml1m", "hstu-ml1m", "hstu-large-ml1m"] = Field(
        "tiny", description="size preset of the family (see FAMILY_PRESETS); *-ml1m are generative-recommenders' ML-1M sizes")
    d_model: int | None = Field(None, gt=0, description="override the preset's width")
    n_layers: int | None = Field(None, gt=0, description="override the preset's depth")
    n_heads: int | None = Field(None, gt=0, description="override the preset's heads")
    d_ff: int | None = Field(None, gt=0, description="override the preset's SwiGLU (lum) / FFN (sasrec) width; hstu has none")
    d_feat: int = Field(0, ge=0, description="lum: width of each token feature embedding (0 = d_model)")
    dropout: float = Field(0.0, ge=0, lt=1, description=(
        "lum: residual/attention dropout; sasrec: embedding, attention and FFN dropout; hstu: embedding and linear dropout. "
        "Attention weights are dropped on the sdpa kernel only: flex (the 'auto' choice on CUDA) has no attention dropout"))
    embed_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "lum: dropout on the token embeddings, the input of the first block (sasrec and hstu drop theirs with "
        "`dropout`); 0 = none"))
    attention: Literal["auto", "flex", "sdpa"] = Field("auto", description=(
        "auto = flex on CUDA, sdpa elsewhere; hstu's SiLU attention always runs dense (flex: mask from segments)"))
    item_features: bool = Field(True, description="lum: use item side features (genres, category, popularity); baselines ignore it")
    item_proj: bool = Field(True, description=(
        "lum: project the item token's features to d_model; false = the item id embedding is the token and the "
        "retrieval key as it is (as SASRec's shared table; needs item_features = false and d_feat = 0)"))
    lowpass_bins: int = Field(0, ge=0, description=(
        "lum: > 0 adds BSARec's frequency branch beside attention in every block, read causally: each token's "
        "low-pass filter over its last `lowpass_window` tokens (the first `lowpass_bins` Fourier bins) plus its "
        "high-frequency rest scaled by a learned beta^2 per channel; 0 = attention only. Costs a (B, S, S) "
        "matrix a step, as the sdpa mask"))
    lowpass_window: int = Field(50, ge=2, description="lum: tokens the low-pass filter spans (BSARec: the max length)")
    lowpass_alpha: float = Field(0.7, gt=0, le=1, description=(
        "lum: weight of the low-pass branch; attention gets 1 - alpha (BSARec's alpha)"))

    @model_validator(mode="after")
    def _check(self):
        if self.preset not in FAMILY_PRESETS[self.kind]:
            raise ValueError(f"preset '{self.preset}' is not a {self.kind} preset "
                             f"({self.kind} presets: {', '.join(FAMILY_PRESETS[self.kind])})")
        if self.kind != "lum" and self.embed_dropout:
            raise ValueError(f"embed_dropout is a lum option; {self.kind} drops its embeddings with `dropout`")
        if self.kind != "lum" and self.d_feat:
            raise ValueError(f"d_feat is a lum option; {self.kind} has no token feature encoder")
        if self.kind != "lum" and not self.item_proj:
            raise ValueError(f"item_proj is a lum option; {self.kind} has no item projection")
        if not self.item_proj and (self.item_features or self.d_feat):
            raise ValueError("item_proj = false needs item_features = false and d_feat = 0 "
                             "(the id embedding alone is the item token)")
        if self.kind != "lum" and self.lowpass_bins:
            raise ValueError(f"lowpass_bins is a lum option; {self.kind} has no low-pass branch")
        if self.lowpass_bins > self.lowpass_window // 2:
            raise ValueError(f"lowpass_bins must be <= lowpass_window // 2 = {self.lowpass_window // 2} "
                             f"(got {self.lowpass_bins})")
        if self.kind == "hstu" and self.d_ff is not None:
            raise ValueError("d_ff does not apply to hstu (it has no feed-forward layer)")
        d, h = self.d_model, self.n_heads
        if d is not None and h is not None and d % h:
            raise ValueError(f"d_model must be divisible by n_heads (got {d} and {h})")
        return self


class LossSpec(Strict):
    """InfoNCE at condition positions: the output at c_l against the embedding of item i_l."""

    negatives: Literal["in_batch", "sampled", "full"] = Field("in_batch", description=(
        "in_batch: the other items of the batch; sampled: `num_sampled` drawn items with log-Q correction; "
        "full: the whole catalogue (a softmax over every item, computed `item_block` items at a time)"))
    item_block: int = Field(262144, gt=0, description=(
        "full: items scored at once; the loss's memory is trained positions x item_block logits (their "
        "backward recomputes each block). A catalogue of at most item_block items is one product"))
    num_sampled: int = Field(128, gt=0, description="sampled: negatives drawn for each trained position")
    sampler: Literal["uniform", "popularity"] = Field("uniform", description="sampled: item distribution")
    logq_correction: bool = Field(True, description=(
        "sampled: subtract log Q from the negatives' logits (an estimate of the full softmax); false = the "
        "plain (1 + num_sampled)-way softmax of generative-recommenders' SampledSoftmaxLoss"))
    similarity: Literal["cosine", "dot"] = Field("cosine", description=(
        "s(o, e) of the logits s / tau: cosine = the L2-normalised output and item embedding (InfoNCE); dot = "
        "their plain inner product (the cross-entropy of SASRec / BSARec codebases; use temperature = 1). "
        "The evaluation ranks items by the same s"))
    temperature: float = Field(0.05, gt=0, description="tau: the logits are s(o, e) / tau")
    learn_temperature: bool = Field(False, description="learn tau (initialised at `temperature`)")


class OptimSpec(Strict):
    """AdamW with linear warmup and cosine decay."""

    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr = lr * min_lr_ratio")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.98))
    warmup_steps: int = Field(100, ge=0)
    epochs: float = Field(10, gt=0, description="passes over the packed rows (ignored when max_steps > 0)")
    max_steps: int = Field(0, ge=0, description="optimizer steps (0 = from epochs)")
    batch_rows: int = Field(4, gt=0, description=(
        "packed rows per micro-batch, all ranks together: under torchrun each of W ranks takes batch_rows / W, "
        "so global rows per optimizer step = batch_rows x grad_accum whatever W is"))
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    clip: float = Field(1.0, ge=0, description="max grad norm (0 = off)")
    ema: float = Field(0.0, ge=0, lt=1, description=(
        "exponential moving average of the weights, decay per optimizer step (e.g. 0.999; warmed up as "
        "min(ema, (1 + t) / (10 + t))): validation, the best checkpoint and the published model use the averaged "
        "weights, training goes on with the raw ones; one process only. 0 = off"))


class RequestSpec(Strict):
    """A retrieval task whose condition is part of the request (a search or browse filter): for each
    evaluated user, requests `(user, c)` for values c of one condition field chosen from the user's
    history only; the positives of a request are the user's test-window events whose condition is c.
    LUM with conditions queries with c; an item-only model scores with its unconditioned user vector.
    An item-attribute field (`source = "item_attr"`, e.g. genre) also restricts the candidates of every
    model to the items with value c; an event field (e.g. rating bucket) keeps every item a candidate.
    See lumctl/evaluation.py (`evaluate_requests`)."""

    field: str = Field(min_length=1, description="the condition field of the request, e.g. 'genre'")
    values: Literal["history", "all"] = Field("history", description=(
        "which values a user requests: those of the field in the user's events before the test window, or every "
        "value of the field (never read from the test window)"))
    top_k: int = Field(0, ge=0, description="values = 'history': only the k most frequent values (0 = all)")
    window: int = Field(10, ge=0, description=(
        "the positives' pool: the user's first `window` test events (0 = every test event)"))


class EvalSpec(Strict):
    """Next-item retrieval: full ranking over all items, items in the history filtered."""

    every_steps: int = Field(0, ge=0, description="validate every N steps (0 = once per epoch)")
    ks: list[int] = Field([10, 50, 200], min_length=1)
    select: str = Field("ndcg@10", description="validation metric that picks the best checkpoint")
    patience: int = Field(0, ge=0, description=(
        "early stopping: stop once this many evaluations in a row bring no better `select` than the best so far "
        "(the best checkpoint is the model, as always); 0 = train all steps"))
    condition: dict[str, str] = Field(default_factory=dict, description=(
        "query condition at the held-out position, field -> value (e.g. rating = 'high'); "
        "fields not named are '<any>'. Never taken from the held-out interaction."))
    oracle: bool = Field(False, description="also report the score with the held-out event's own condition (labelled oracle)")
    mixture: str | None = Field(None, description=(
        "a condition field whose every value is queried; items are scored by sum_v p(v | user history) "
        "p(item | user, v) (history-only weights, no held-out information)"))
    mixture_smoothing: float = Field(1.0, gt=0, description="additive smoothing of p(v | user history)")
    requests: list[RequestSpec] = Field(default_factory=list, description=(
        "conditioned-request retrieval tasks scored on the test split with the chosen checkpoint, e.g. "
        "[{ field = 'genre' }] (metrics.json test_requests.<field>); empty = none"))
    batch_rows: int = Field(16, gt=0, description="packed rows per evaluation batch")
    users: int = Field(0, ge=0, description=(
        "score a fixed random sample of this many users (the same sample at every evaluation, and in every "
        "run on the same data with the same `sample_seed`, so runs compare user by user; metrics say "
        "users_sampled = 'N of M'); 0 = every user"))
    sample_seed: int = Field(0, description="seed of the `users` sample")
    user_batch: int = Field(512, gt=0, description="users scored at once")
    item_block: int = Field(262144, gt=0, le=1 << 24, description=(
        "items scored at once: scores take user_batch x item_block floats, never users x items"))

    @field_validator("select")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not re.fullmatch(r"(hr|ndcg)@\d+|mrr", v):
            raise ValueError(f"select must be hr@K, ndcg@K or mrr (got {v!r})")
        return v

    @field_validator("requests")
    @classmethod
    def _one_task_per_field(cls, v: list) -> list:
        fields = [r.field for r in v]
        dup = sorted({f for f in fields if fields.count(f) > 1})
        if dup:
            raise ValueError(f"one request task per field (got {dup} twice)")
        return v


class PretrainSpec(Strict):
    """Step 1: train the user encoder on packed rows."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    condition_dropout: float | dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(0.1, description=(
        "train probability of replacing a condition field by '<any>' (one number, or field -> probability)"))

    seed: int = 0
    init_from: str | None = Field(None, description=(
        "a pretrain checkpoint folder (model.pt + config.json, e.g. another experiment's pretrain/final) whose "
        "weights start this run: continued pretraining, e.g. refreshing a LUM on newer events. Its model "
        "config and vocabularies must equal this run's; the optimizer and the lr schedule start afresh; "
        "`${VAR:-default}` is expanded"))
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the model")
    rows_from: Literal["memory", "store"] = Field("memory", description=(
        "memory: load every packed row into memory (on every rank); store: keep only type, segment, loss_mask "
        "and target in memory and read the other columns of each batch's rows from the pack store (under "
        "torchrun each rank reads only its own rows; a small [pack] chunk_rows makes these reads cheap)"))
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description=(
        "under torchrun: ddp = a full model copy per rank (DistributedDataParallel); fsdp = FSDP2 "
        "(fully_shard) shards parameters, gradients and optimizer state over the ranks (large presets)"))
    checkpoint_every: int = Field(0, ge=0, description="write step-%08d/ every N steps (0 = once per epoch)")
    keep_checkpoints: int = Field(2, ge=0, description=(
        "step checkpoints kept on disk (model + AdamW state, the resume points); 0 = none: no --resume, but "
        "no write of the optimizer state (three copies of every parameter: ~25 GB for 19m at 4M items)"))
    log_every: int = Field(10, gt=0)

    @field_validator("init_from")
    @classmethod
    def _expand_init(cls, v: str | None) -> str | None:
        return expand_vars(v) if v else v

    @field_validator("condition_dropout")
    @classmethod
    def _dropout(cls, v):
        if isinstance(v, float) and not 0 <= v <= 1:
            raise ValueError(f"must be in [0, 1] (got {v})")
        return v


# --------------------------------------------------------------------------------------- query
class QuerySpec(Strict):
    """Step 2: grouped conditional queries of a pretrained LUM at point-in-time snapshots.

    The query list is the cartesian product, in this order, of `conditions` (or one all-'<any>'
    condition when empty), every value of each field in `each`, and the ranks 1..k of each
    field in `top_k`; condition fields not named are '<any>'. Example, 3 rating buckets x the
    user's 2 most frequent genres = 6 queries:  each = ["rating"]  top_k = { genre = 2 }
    """

    checkpoint: str = Field("final", description=(
        "checkpoint folder: a path under <store_root>/<experiment>/pretrain/ (final, checkpoints/best, "
        "checkpoints/step-00001000) or an absolute path; the model is rebuilt from its config.json"))
    conditions: list[dict[str, str]] = Field(default_factory=list, description=(
        "explicit query conditions, each field -> value (a vocabulary value or '<any>'); empty = one "
        "all-'<any>' condition"))
    each: list[str] = Field(default_factory=list, description=(
        "fields queried at every value of their vocabulary: one query per value (cartesian product over fields)"))
    top_k: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict, description=(
        "field -> k: one query per rank 1..k holding the user's k most frequent values of the field in the "
        "snapshot's prefix (ties: the most recent first); '<any>' where the user has fewer than k values"))
    snapshot: Literal["split", "every_n_events"] = Field("split", description=(
        "split: one snapshot per split boundary (the prefix before the first valid event, used for valid, "
        "and before the first test event, used for test); every_n_events: one after every K events of a user"))
    every_n_events: int | None = Field(None, gt=0, description="K of snapshot = 'every_n_events'")
    dtype: Literal["float16", "float32"] = Field("float16", description="storage dtype of the answers and item_emb")
    batch_rows: int = Field(8, gt=0, description="packed query rows per forward pass")
    batch_snapshots: int = Field(8192, gt=0, description=(
        "snapshots answered and written per batch (rounded to whole chunks of the store); bounds memory: "
        "three batches are in flight (read, answered, written), each about batch_snapshots x queries x d x 6 "
        "bytes plus the events of the batch's users"))
    seq_len: int | None = Field(None, gt=0, description=(
        "tokens per packed query row (default: the checkpoint's seq_len, enlarged to fit the longest prefix "
        "plus all queries)"))
    max_items: int | None = Field(None, gt=1, description=(
        "a snapshot's model input is its most recent max_items - 1 events plus the queries, as in pretrain's "
        "evaluation (default: the checkpoint's max_items)"))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description=(
        "auto = CUDA (bf16 autocast) when available, else CPU (sdpa, fp32)"))
    attention: Literal["auto", "flex", "sdpa"] = Field("auto", description=(
        "attention kernel on CUDA: flex (a BlockMask) or sdpa (a dense mask built on the device; the forward "
        "is ~3x faster than flex on rows of 1,024-2,048 tokens on an H200, docs/performance.md section 7); "
        "auto = sdpa when a row holds <= 2048 tokens, else flex. The CPU always runs sdpa"))

    @model_validator(mode="after")
    def _check(self):
        if (self.snapshot == "every_n_events") != (self.every_n_events is not None):
            raise ValueError("snapshot = 'every_n_events' and every_n_events = K go together "
                             f"(got snapshot = '{self.snapshot}', every_n_events = {self.every_n_events})")
        if len(set(self.each)) != len(self.each):
            raise ValueError(f"each lists a field twice (got {self.each})")
        both = sorted(set(self.each) & set(self.top_k))
        if both:
            raise ValueError(f"a field is either in each or in top_k, not both (got {both})")
        named = sorted({f for c in self.conditions for f in c} & (set(self.each) | set(self.top_k)))
        if named:
            raise ValueError(f"fields in each/top_k cannot also be fixed in conditions (got {named})")
        return self


# ---------------------------------------------------------------------------------------- fuse
class SamplesSpec(Strict):
    """A labelled sample table (impression log) for fuse and export: one row per (user, item, time),
    a 0/1 label and the extra features the ranker already uses. Raw ids map through the tokenize
    vocabularies (unseen ones to the unknown id, counted); the history and the LUM answers of a sample
    are the user's events and snapshots strictly before its timestamp."""

    path: str = Field(description=(
        "CSV or parquet file or folder of files (.gz CSV accepted; a path or an fsspec URL such as "
        "s3://bucket/samples/); `${VAR:-default}` is expanded"))
    format: Literal["auto", "csv", "parquet"] = Field("auto", description="auto: by the file name (.parquet/.pq)")
    delimiter: str = Field(",", min_length=1, max_length=1, description="CSV delimiter (a header row is required)")
    user: str = Field("user_id", min_length=1, description="column of the raw user id")
    item: str = Field("item_id", min_length=1, description="column of the raw item id")
    timestamp: str = Field("timestamp", min_length=1, description=(
        "column of the impression time: integer seconds (as the tokenize store), a timestamp type, or ISO 8601 text"))
    label: str = Field("label", min_length=1, description="column of the 0/1 label (fuse; export copies it when present)")
    categorical: list[str] = Field(default_factory=list, description=(
        "categorical feature columns: one embedding each; the vocabulary is the train rows' values, others unknown"))
    numeric: dict[str, Literal["none", "standard", "log"]] = Field(default_factory=dict, description=(
        "numeric feature columns -> normalisation: none, standard ((x - mean) / std of the train rows) or "
        "log (sign(x) log(1 + |x|)); missing values are 0"))
    multi_valued: dict[str, str] = Field(default_factory=dict, description=(
        "multi-valued feature columns -> the delimiter of their values (e.g. genres = '|'): a mean-pooled embedding"))
    max_values: int = Field(8, gt=0, description="multi-valued: the first max_values values of a row are read")
    split_column: str = Field("", description=(
        "column naming each row's part: train/valid/test (or 0/1/2); empty = the cutoffs valid_from/test_from "
        "(fuse needs one of the two; export needs neither)"))
    valid_from: int | None = Field(None, description="rows at or after this timestamp are valid (without split_column)")
    test_from: int | None = Field(None, description="rows at or after this timestamp are test (without split_column)")
    batch_rows: int = Field(1 << 16, gt=0, description="rows read per batch (bounds the reader's memory)")

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_vars(v)

    @model_validator(mode="after")
    def _check(self):
        if self.split_column and (self.valid_from is not None or self.test_from is not None):
            raise ValueError("give split_column or valid_from/test_from, not both")
        if (self.valid_from is None) != (self.test_from is None):
            raise ValueError("valid_from and test_from go together")
        if self.valid_from is not None and self.valid_from > self.test_from:
            raise ValueError("valid_from must be <= test_from")
        cols = [self.user, self.item, self.timestamp, self.label, *self.categorical, *self.numeric,
                *self.multi_valued] + ([self.split_column] if self.split_column else [])
        dup = sorted({c for c in cols if cols.count(c) > 1})
        if dup:
            raise ValueError(f"a column has one role (got {dup} twice)")
        return self

    def feature_columns(self) -> list[str]:
        return [*self.categorical, *self.numeric, *self.multi_valued]


class FuseSpec(Strict):
    """Step 3: DLRM backbones on the CTR protocol (every rated event an impression, label = rating >= 4,
    the tokenize store's per-user split; `protocol = "behavior"` for behaviour logs; or a labelled sample
    table, `samples`), optionally enriched with the query store's LUM answers.

    LUM inputs are joined point in time: a sample at time t reads the latest snapshot with timestamp < t
    (zeros and a "missing" flag when there is none). [query] snapshot = "split" only has snapshots at the
    valid/test boundaries, so train samples get almost no answers (the fusion layer barely trains);
    snapshot = "every_n_events" gives train samples real point-in-time answers too. With a cutoff
    ([tokenize.split] pretrain_fraction per user, or pretrain_before / pretrain_quantile at one timestamp)
    the train samples are the train events after it and the LUM never trained on one of them (leak-free answers).
    """

    backbone: Literal["dnn", "din", "dien", "sim", "twin", "two_tower", "hstu"] = Field("din", description=(
        "dnn: embedding + MLP over the mean-pooled history; din: target attention; dien: GRU + AUGRU "
        "(+ auxiliary loss, aux_weight); sim: hard search (history items of the target's category) + target attention; "
        "twin: TWIN, the last twin_search_len events scored with the exact-search attention's own parameters, "
        "multi-head target attention over the top twin_top_k (+ DIN over the recent history); "
        "two_tower: user tower . item tower, BCE plus an in-batch softmax over positives; hstu: end-to-end "
        "generative ranker, HSTU layers over the history (item + past like/dislike) and the target token"))
    lum: Literal["none", "direct", "match", "direct+match"] = Field("none", description=(
        "none: the base model; direct: the N query answers o_qn and the target's LUM embedding e^i as MLP "
        "inputs; match: the N scalars cos(o_qn, e^i); direct+match: both (needs a query store)"))
    history_len: int = Field(50, gt=0, description="most recent events (strictly before the sample's timestamp) read")
    sim_search_len: int = Field(500, gt=0, description="sim: events searched for the target's category")
    twin_search_len: int = Field(500, gt=0, description="twin: the long history the general search unit scores (latest events)")
    twin_top_k: int = Field(50, gt=0, description="twin: behaviours the general search unit passes to the exact search unit")
    twin_heads: int = Field(4, gt=0, description="twin: heads of the exact search unit's target attention (TWIN paper: 4)")
    d_emb: int = Field(16, gt=0, description="width of every feature embedding")
    mlp: list[Annotated[int, Field(gt=0)]] = Field([200, 80], min_length=1, description="hidden sizes of the MLP")
    activation: Literal["relu", "prelu", "dice"] = Field("relu", description=(
        "activation of the ranking MLP and the target-attention MLP (DIN paper: dice)"))
    att_norm: Literal["none", "softmax"] = Field("none", description=(
        "target attention weights: none = DIN's un-normalised weighted sum; softmax = normalised over the history"))
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    batch_size: int = Field(1024, gt=0, description="samples per step")
    epochs: int = Field(5, gt=0, description="passes over the train samples")
    patience: int = Field(1, ge=0, description="epochs without a better valid AUC tolerated before stopping")
    temperature: float = Field(0.1, gt=0, description="two_tower: tau of the in-batch softmax")
    retrieval_ks: list[Annotated[int, Field(gt=0)]] = Field([10, 50], min_length=1, description=(
        "two_tower: Recall@K of each user's valid/test positives over the full catalogue (seen items filtered)"))
    aux_weight: float = Field(1.0, ge=0, description=(
        "dien: weight of the auxiliary loss (GRU state h_l tells the next behaviour from a sampled item; "
        "DIEN paper: 1; 0 = off)"))
    seeds: int = Field(1, gt=0, description="independent runs (seed, seed+1, ...); metrics.json reports mean and std")
    seed: int = Field(0, description="first seed")
    init_from: str = Field("", description=(
        "warm start: a fuse checkpoint folder (model.pt + config.json) of the same backbone, e.g. a base "
        "run's final/ (then seed k starts from the base's seed k where the base trained it); LUM layers "
        "absent there start at zero, so step 0 predicts as the base"))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when available")
    cache_mib: int = Field(2048, ge=0, description=(
        "sim: the hard search of every sample is computed once and kept when it fits in this many MiB "
        "(5 bytes x samples x history_len), else it runs per batch, so memory stays bounded on large logs"))
    samples: SamplesSpec | None = Field(None, description=(
        "train on this labelled sample table (its features plus the LUM answers joined point in time) "
        "instead of the samples derived from the log by `protocol`"))
    protocol: Literal["rating", "behavior"] = Field("rating", description=(
        "the samples derived from the tokenize store (without `samples`): rating = every rated event an "
        "impression, label = rating >= 4; behavior = one sample per (user, item, split part) at the pair's "
        "first event, label 1 when the user took a `positive` behaviour on it in that part, 0 when it was "
        "only viewed (Taobao: pv vs cart / fav / buy)"))
    compare_base: bool = Field(False, description=(
        "also train the same backbone with lum = 'none' on the same samples and seeds; metrics.json then holds "
        "the base's metrics under `base` beside this model's (the store's models and predictions stay this model's)"))
    behavior_field: str = Field("behavior", min_length=1, description=(
        "behavior: the condition field of [tokenize] holding the behaviour type"))
    positive: list[str] = Field(["cart", "fav", "buy"], min_length=1, description=(
        "behavior: the behaviour types that make a positive"))

    @field_validator("init_from")
    @classmethod
    def _expand(cls, v: str) -> str:
        return expand_vars(v)

    @model_validator(mode="after")
    def _check(self):
        if self.samples is not None and self.backbone == "two_tower":
            raise ValueError("two_tower ranks the catalogue from the derived samples; it does not read a sample table")
        if self.compare_base and self.lum == "none":
            raise ValueError("compare_base trains a base beside a model with LUM answers; it needs lum != 'none'")
        if self.compare_base and self.init_from:
            raise ValueError("compare_base trains its base from scratch; it does not go with init_from")
        return self


# ---------------------------------------------------------------------------------------- spec
PATH_KEYS = {"tokenize": {"path", "items_path"}}  # where the inputs lie, not what they are


class Spec(Strict):
    """One experiment."""

    experiment: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$", description="name; outputs go to <store_root>/<experiment>/")]
    store_root: str = Field("stores", description="root folder of all stores; `${VAR:-default}` is expanded")
    inputs_root: str | None = Field(None, description=(
        "where pretrain, query and fuse read the tokenize and pack stores (<inputs_root>/<experiment>/<stage>), "
        "when they were published elsewhere: a path or an fsspec URL such as s3://bucket/stores "
        "(lumctl.store.copy_store publishes a store); default store_root"))
    synth: SynthSpec | None = Field(None, description="generate the raw log (format = 'synth')")
    tokenize: TokenizeSpec
    pack: PackSpec = Field(default_factory=PackSpec)
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)
    query: QuerySpec | None = Field(None, description="Step 2: grouped queries into a point-in-time feature store")
    fuse: FuseSpec | None = Field(None, description="Step 3: DLRM backbones (CTR) with LUM answers fused in")

    @field_validator("store_root", "inputs_root")
    @classmethod
    def _expand(cls, v: str | None) -> str | None:
        return expand_vars(v) if v is not None else None

    @model_validator(mode="after")
    def _check(self):
        if self.tokenize.format == "synth" and self.synth is None:
            raise ValueError("tokenize.format = 'synth' needs a [synth] section")
        if self.tokenize.format == "synth" and self.synth.kind == "taobao":
            raise ValueError("[synth] kind = 'taobao' writes UserBehavior.csv: read it with tokenize.format = 'taobao' "
                             f"and path = '{self.store('synth') / 'UserBehavior.csv'}'")
        if self.fuse is not None and self.fuse.lum != "none" and self.query is None:
            raise ValueError(f"[fuse] lum = '{self.fuse.lum}' reads the query store and needs a [query] section")
        self._check_training_positions()
        return self

    def _check_training_positions(self) -> None:
        """Cross-section: the packed rows must hold at least one trained position. With conditions an event is
        two tokens (c_l, i_l) and the loss sits at c_l; item-only (sasrec, hstu, [pack] conditions = false) the
        loss at i_l predicts i_(l+1), so a row needs two events of one user."""
        pk = self.pack
        item_only = not pk.conditions or self.pretrain.model.kind != "lum"
        if item_only and pk.max_items < 2:
            raise ValueError(f"[pack].max_items: item-only rows need >= 2 events per user to train on "
                             f"(got {pk.max_items}); no row would have a loss position")
        if pk.seq_len < 2:  # one trained position: (c_1, i_1) or (i_1, i_2)
            raise ValueError(f"[pack].seq_len: must be >= 2 tokens to hold one trained position "
                             f"(got {pk.seq_len})")

    def store(self, stage: str) -> Path:
        return Path(self.store_root) / self.experiment / stage

    def input_store(self, stage: str) -> str | Path:
        """An upstream store (tokenize, pack) as the reading stages find it: under inputs_root when set."""
        if self.inputs_root is None:
            return self.store(stage)
        from lumctl.store import join
        return join(self.inputs_root, self.experiment, stage)

    def section_hash(self, *sections: str) -> str:
        """Identity of spec sections. Left out: settings that change how, not what, a stage computes
        (RESOURCES), and where the raw log lies ([tokenize] path, items_path): the tokenize store records the
        data files' content hashes as its inputs, so moved data is the same data."""
        def content(s, sec):
            if sec is None:
                return None
            return sec.model_dump(mode="json", exclude=set(getattr(type(sec), "RESOURCES", ())) | PATH_KEYS.get(s, set()))
        d = {s: content(s, getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


STAGES = ("synth", "tokenize", "pack", "pretrain", "query", "fuse")  # the order `lumctl run` follows


def parse_spec(data: dict, path: str = "<spec>") -> Spec:
    return validate(Spec, data, path)


def load_spec(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read (extends merged, `--set` overrides applied) and validate a TOML spec; any problem becomes
    one InputError line."""
    data = load_toml(path, sets)
    if is_report(data):
        raise InputError(str(path), "this is a report spec ([report]); run it with `lumctl eval`")
    return parse_spec(data, str(path))
