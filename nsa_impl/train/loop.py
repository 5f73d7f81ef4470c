"""The training loop behind ``python -m nsa_impl.train``: config, data, model, optimiser, logs.

Reads top to bottom as a run goes: `TrainConfig` -> corpus (`corpus.load_corpus`) -> packed,
length-bucketed batches (`BatchStream`, `nsa_impl.data`) -> `NSAToyLM` with NSA or dense
attention -> AdamW with linear warmup and cosine decay, gradient clipping, ``torch.autocast``
(bf16/fp16, fp16 with ``torch.amp.GradScaler``) -> metrics (`metrics.MetricsWriter`) and
checkpoints.

Host syncs: a training step reads nothing from the device; losses, gradient norms and clip
events accumulate in device tensors and are read on logging steps only, when the
`nsa_impl.observe.Collector` is also active for that one step.

Checkpoints (``DIR/checkpoint.pt``) hold the model, optimiser, scheduler, grad scaler, the
step, the data position (epoch, batch), the open logging window and every RNG state; resuming
on the CPU continues bit for bit (``tests/test_train.py`` checks parameters and losses).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nsa_ref.config import NSAConfig

from .. import observe, routing
from ..data import IGNORE_INDEX, PackedBatch, bucket_batches, length_histogram, split_document
from ..model import NSAToyLM
from ..model.block import ATTENTIONS
from ..model.toy import TOY_CONFIG
from .corpus import VOCAB_SIZE, load_corpus
from .metrics import MetricsWriter
from .progress import Progress

#: Named NSA configurations (``--nsa-config``); single fields can be overridden by flags.
NSA_CONFIGS = {
    "toy": TOY_CONFIG,  # every branch active from ~64 tokens: tiny CPU runs
    "small": NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_top_n=8, window=128),
    "paper": NSAConfig(),  # paper section 4.1: l=32, d=16, l'=64, n=16, w=512
}
#: ``--dtype`` -> autocast dtype (``None``: plain float32).
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Fields of `TrainConfig` that a resumed run may change; everything else must match.
RUN_CONTROL = frozenset(
    {"steps", "stop_at", "log_every", "eval_every", "ckpt_every", "time_limit", "progress",
     "tensorboard", "threads", "device", "out"}
)  # fmt: skip
_NSA_FIELDS = (
    "cmp_block", "cmp_stride", "sel_block", "sel_top_n", "sel_init_blocks", "sel_local_blocks",
    "window",
)  # fmt: skip
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"


@dataclass
class TrainConfig:
    """Everything a run depends on (the CLI flags of ``python -m nsa_impl.train``).

    Model: ``attention`` (``"nsa"``/``"dense"``), ``layers``, ``hidden``, ``heads``, ``kv_heads``,
    ``head_dim``, ``intermediate`` (MLP width, default ``4 * hidden``), ``rope``, ``phi`` and
    ``gate_hidden`` (NSA only), ``nsa_config`` (a name in `NSA_CONFIGS`) with per-field overrides
    (``cmp_block`` ... ``window``; ``None`` keeps the named value).

    Data: ``data`` (paths; ``None``: the standard library sources), ``seq_len`` (longest
    document piece), ``batch_tokens`` (tokens per packed batch, padding included),
    ``eval_fraction``, ``train_bytes`` (cap for quick runs), ``eval_batches``.

    Optimisation: ``steps``, ``lr`` (peak), ``min_lr_ratio`` (cosine floor), ``warmup`` (steps),
    ``weight_decay``, ``beta1``, ``beta2``, ``grad_clip`` (max global norm; 0 disables).

    Run: ``device``, ``dtype`` (``fp32``/``bf16``/``fp16``), ``seed``, ``out`` (directory),
    ``log_every``, ``eval_every``, ``ckpt_every`` (default ``eval_every``), ``stop_at`` (stop
    after this step with a checkpoint, keeping the schedule of ``steps``: a job split into
    several), ``time_limit`` (seconds of training, then the same clean stop), ``threads``,
    ``progress``, ``tensorboard``, ``deterministic`` (``torch.use_deterministic_algorithms``
    for the run, warn-only, and cuBLAS's fixed workspace: docs/determinism.md).
    """

    attention: str = "nsa"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 16
    intermediate: int | None = None
    rope: bool = True
    phi: str = "mean"
    gate_hidden: int | None = None
    nsa_config: str = "toy"
    cmp_block: int | None = None
    cmp_stride: int | None = None
    sel_block: int | None = None
    sel_top_n: int | None = None
    sel_init_blocks: int | None = None
    sel_local_blocks: int | None = None
    window: int | None = None

    data: list[str] | None = None
    seq_len: int = 256
    batch_tokens: int = 1024
    eval_fraction: float = 0.02
    train_bytes: int | None = None
    eval_batches: int = 4

    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 0
    out: str = "runs/train"
    log_every: int = 10
    eval_every: int = 100
    ckpt_every: int | None = None
    stop_at: int | None = None
    time_limit: float | None = None
    threads: int | None = None
    progress: bool = True
    tensorboard: bool | None = None
    deterministic: bool = False

    def validate(self) -> TrainConfig:
        """Raise ``ValueError``/``TypeError`` naming the first bad field; return ``self``."""
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.nsa_config not in NSA_CONFIGS:
            raise ValueError(
                f"nsa_config must be one of {sorted(NSA_CONFIGS)}, got {self.nsa_config!r}"
            )
        positive = ["layers", "hidden", "heads", "kv_heads", "head_dim", "seq_len"]
        positive += ["batch_tokens", "eval_batches", "steps", "log_every", "eval_every"]
        optional_positive = ["intermediate", "gate_hidden", "train_bytes", "ckpt_every"]
        optional_positive += ["threads", "stop_at"]
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is None and name in optional_positive:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (one next-token pair), got {self.seq_len}")
        if self.batch_tokens < self.seq_len:
            raise ValueError(
                f"batch_tokens={self.batch_tokens} must be >= seq_len={self.seq_len} "
                "(a batch holds at least one full piece)"
            )
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        for name in ("lr", "beta1", "beta2", "min_lr_ratio", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0 or not self.beta1 < 1 or not self.beta2 < 1 or self.min_lr_ratio > 1:
            raise ValueError("need lr > 0, beta1 < 1, beta2 < 1 and min_lr_ratio <= 1")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be positive seconds, got {self.time_limit}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.dtype == "fp16" and torch.device(self.device).type not in ("cuda", "cpu"):
            raise ValueError(f"fp16 with GradScaler needs a cuda or cpu device, got {self.device}")
        self.nsa()  # NSAConfig's own checks
        return self

    def nsa(self) -> NSAConfig:
        """The `NSAConfig`: the named one with the per-field overrides applied."""
        base = NSA_CONFIGS[self.nsa_config]
        changes = {n: getattr(self, n) for n in _NSA_FIELDS if getattr(self, n) is not None}
        return dataclasses.replace(base, **changes)

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Data.


class BatchStream:
    """Shuffled, length-bucketed packed batches of a document set, epoch after epoch.

    Documents are cut into pieces of at most ``seq_len`` tokens (`nsa_impl.data.split_document`,
    no next-token pair lost or repeated). Epoch ``e`` permutes the pieces with a generator seeded
    by ``(seed, e)``, packs them with `nsa_impl.data.bucket_batches` into batches of exactly
    ``batch_tokens`` tokens (the rest is a masked pad sequence), and permutes the batches. So
    ``(epoch, index)`` identifies a batch on every run with the same seed: the data position of a
    checkpoint.
    """

    def __init__(self, documents: list[torch.Tensor], seq_len: int, batch_tokens: int, seed: int):
        self.seq_len, self.batch_tokens, self.seed = seq_len, batch_tokens, seed
        self.pieces = [
            p for d in documents for p in split_document(d, seq_len, vocab_size=VOCAB_SIZE)
        ]
        if not self.pieces:
            raise ValueError("no training documents")
        self._cache: tuple[int, list[PackedBatch]] | None = None

    @property
    def tokens(self) -> int:
        """Tokens in one epoch (pieces overlap by one token per cut)."""
        return sum(int(p.numel()) for p in self.pieces)

    def epoch(self, e: int) -> list[PackedBatch]:
        """The batches of epoch ``e`` in training order."""
        if self._cache is not None and self._cache[0] == e:
            return self._cache[1]
        gen = torch.Generator().manual_seed((self.seed << 20) + e)
        order = torch.randperm(len(self.pieces), generator=gen).tolist()
        batches = bucket_batches(
            [self.pieces[i] for i in order],
            self.batch_tokens,
            vocab_size=VOCAB_SIZE,
            pad_to_multiple=self.batch_tokens,
        )
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        self._cache = (e, batches)
        return batches


def eval_set(documents: list[torch.Tensor], cfg: TrainConfig) -> list[PackedBatch]:
    """The fixed evaluation batches: the held-out documents packed like training batches,
    shuffled with a constant seed (the same set for every run and seed), the first
    ``eval_batches`` of them."""
    batches = BatchStream(documents, cfg.seq_len, cfg.batch_tokens, seed=0).epoch(0)
    return batches[: cfg.eval_batches]


# ---------------------------------------------------------------------------------------------
# Model, optimiser, schedule.


def build_model(cfg: TrainConfig) -> NSAToyLM:
    """`NSAToyLM` over bytes with the configured attention, sizes and options."""
    options = dict(rope=cfg.rope, attention=cfg.attention, intermediate_size=cfg.intermediate)
    if cfg.attention == "nsa":
        options.update(phi=cfg.phi, gate_hidden=cfg.gate_hidden)
    return NSAToyLM(
        VOCAB_SIZE,
        cfg.hidden,
        cfg.heads,
        cfg.kv_heads,
        cfg.head_dim,
        cfg.nsa(),
        num_layers=cfg.layers,
        **options,
    )


class Schedule:
    """LR multiplier: linear warmup from 0 over ``warmup`` steps, then cosine to ``min_ratio``.

    ``factor(s)`` is the multiplier of the update taken at step ``s + 1`` (``LambdaLR``'s count).
    """

    def __init__(self, steps: int, warmup: int, min_ratio: float):
        self.steps, self.warmup, self.min_ratio = steps, warmup, min_ratio

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (s - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices of the projections only (not norms, biases or the
    embedding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed") else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _autocast(device: torch.device, dtype: str):
    amp_dtype = DTYPES[dtype]
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def batch_loss(model, batch: PackedBatch, device: torch.device, dtype: str) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's real labels (a 0-d float32 tensor)."""
    with _autocast(device, dtype):
        logits = model(batch.tokens, cu_seqlens=batch.cu_seqlens)
    loss = F.cross_entropy(
        logits.float().flatten(0, 1),
        batch.labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss / max(batch.num_labels, 1)  # the count is known on the host: no sync


def evaluate(model, batches: list[PackedBatch], device, dtype: str) -> float:
    """Cross-entropy per real label over ``batches`` (nats per byte), one read at the end."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    labels = 0
    with torch.no_grad():
        for b in batches:
            b = b.to(device)
            total += batch_loss(model, b, device, dtype).double() * max(b.num_labels, 1)
            labels += b.num_labels
    model.train(was_training)
    return float(total) / max(labels, 1)


# ---------------------------------------------------------------------------------------------
# The logging window (device accumulators) and checkpoints.


class Window:
    """What accumulates between two logging steps; tensors stay on the device until `read`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start an empty window now."""
        zero = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.sums = zero  # loss, gradient norm, clip events
        self.steps, self.tokens, self.lengths = 0, 0, []
        self.t0 = time.perf_counter()

    def add(self, loss, grad_norm, clip: float, batch: PackedBatch) -> None:
        """One step's values (device ops only, no sync)."""
        clipped = grad_norm > clip if clip > 0 else torch.zeros_like(grad_norm, dtype=torch.bool)
        step = torch.stack([loss.detach().double(), grad_norm.detach().double(), clipped.double()])
        self.sums = self.sums + step
        self.steps += 1
        self.tokens += batch.num_tokens - batch.pad
        self.lengths += batch.lengths[: batch.num_docs]

    def read(self) -> dict:
        """The window's means and throughput (one device read); then a fresh window starts."""
        loss, grad_norm, clipped = self.sums.tolist()
        elapsed = time.perf_counter() - self.t0
        n = max(self.steps, 1)
        hist = length_histogram(self.lengths) if self.lengths else {}
        out = {
            "loss": loss / n,
            "grad_norm": grad_norm / n,
            "clip_frac": clipped / n,
            "tokens_per_s": self.tokens / elapsed if elapsed > 0 else 0.0,
            "window_steps": self.steps,
            "len_hist": {str(k): v for k, v in hist.items()},
        }
        self.reset()
        return out

    def state(self) -> dict:
        """Checkpoint form (the clock restarts on resume)."""
        return {"sums": self.sums.cpu(), "steps": self.steps, "tokens": self.tokens,
                "lengths": list(self.lengths)}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict, device) -> Window:
        """Inverse of `state`."""
        w = cls(device)
        w.sums = state["sums"].to(device)
        w.steps, w.tokens, w.lengths = state["steps"], state["tokens"], list(state["lengths"])
        return w


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **state) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by `save_checkpoint` (our own file: full unpickling)."""
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    """Raise ``ValueError`` naming every field that differs from the checkpoint's config and is
    not a run-control field (`RUN_CONTROL`)."""
    current = cfg.to_dict()
    differ = sorted(k for k, v in saved.items() if k not in RUN_CONTROL and current.get(k, v) != v)
    if differ:
        pairs = ", ".join(f"{k}: checkpoint {saved[k]!r} vs {current[k]!r}" for k in differ)
        raise ValueError(f"--resume: the run's config differs from the checkpoint's ({pairs})")


# ---------------------------------------------------------------------------------------------
# The run.


@dataclass
class TrainResult:
    """What `train` returns (and writes to ``DIR/summary.json``)."""

    step: int
    eval_losses: list[tuple[int, float]]
    train_losses: list[tuple[int, float]]
    tokens_per_s: float
    stopped_early: bool
    parameters: int
    out: str


def _device(cfg: TrainConfig) -> torch.device:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but no CUDA GPU is available")
    return device


def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Run (or, with ``resume``, continue) the training described by ``cfg``.

    Writes ``cfg.out``: ``metrics.jsonl``, ``checkpoint.pt``, ``summary.json`` (and ``tb/`` with
    TensorBoard). Returns the `TrainResult`.
    """
    cfg.validate()
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
    try:  # the process-wide settings a run changes are restored after it
        with contextlib.ExitStack() as stack:
            if cfg.threads is not None:
                torch.set_num_threads(cfg.threads)
            if cfg.deterministic:
                stack.enter_context(_deterministic(cfg))
            return _train(cfg, resume)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


@contextlib.contextmanager
def _deterministic(cfg: TrainConfig):
    """``--deterministic``: deterministic algorithms (warn-only), cuBLAS's fixed workspace and
    SDPA's math backend (docs/determinism.md)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # cuBLAS needs a fixed workspace for reproducible GEMMs; read when CUDA starts its handle.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.device(cfg.device).type == "cuda" and routing.settings().use_fa2:
        warnings.warn(
            "--deterministic: NSA's FlashAttention-2 paths have a nondeterministic backward; "
            "set NSA_USE_FA2=0 for a reproducible run (docs/determinism.md)",
            RuntimeWarning,
            stacklevel=3,
        )
    torch.use_deterministic_algorithms(True, warn_only=True)
    # SDPA's math backend (plain matmuls and softmax) instead of FlashAttention/cuDNN, whose
    # backward accumulates with atomics: the dense baseline's and NSA's own SDPA calls.
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _train(cfg: TrainConfig, resume: bool) -> TrainResult:
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    state = None
    if resume:
        state = load_checkpoint(ckpt_path)
        check_resume_config(state["config"], cfg)
    device = _device(cfg)
    ckpt_every = cfg.ckpt_every or cfg.eval_every

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    corpus = load_corpus(cfg.data, eval_fraction=cfg.eval_fraction, max_train_bytes=cfg.train_bytes)
    stream = BatchStream(corpus.train, cfg.seq_len, cfg.batch_tokens, cfg.seed)
    eval_batches = eval_set(corpus.eval, cfg)
    model = build_model(cfg).to(device)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, Schedule(cfg.steps, cfg.warmup, cfg.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "fp16")
    params = sum(p.numel() for p in model.parameters())

    step, epoch, index = 0, 0, 0
    window = Window(device)
    history = {"eval": [], "train": []}
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, (epoch, index) = state["step"], state["data_pos"]
        window = Window.from_state(state["window"], device)
        history = state["history"]
        _set_rng_state(state["rng"], device)
        # The schedule follows this run's step count (a longer --steps extends the cosine).
        sched.lr_lambdas[0] = Schedule(cfg.steps, cfg.warmup, cfg.min_lr_ratio)

    writer = MetricsWriter(out, tensorboard=cfg.tensorboard, resume_step=step if resume else None)
    collector = observe.Collector()
    collector.attach(model)
    progress = Progress(cfg.steps, step, enabled=cfg.progress, desc=f"{cfg.attention}")
    if state is None:
        _write_run_info(out, cfg, corpus, stream, params, device)
        loss0 = evaluate(model, eval_batches, device, cfg.dtype)
        writer.write({"kind": "eval", "step": 0, "eval_loss": loss0})
        history["eval"].append((0, loss0))

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_path,
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
            scaler=scaler.state_dict(),
            step=step,
            data_pos=(epoch, index),
            window=window.state(),
            history=history,
            rng=_rng_state(device),
            config=cfg.to_dict(),
        )

    model.train()
    start = time.perf_counter()
    stopped_early = False
    rates = []
    batches = stream.epoch(epoch)
    while step < cfg.steps:
        if index >= len(batches):
            epoch, index = epoch + 1, 0
            batches = stream.epoch(epoch)
        batch = batches[index].to(device, non_blocking=True)
        index += 1
        log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        observing = collector if log_now and cfg.attention == "nsa" else contextlib.nullcontext()
        with observing:
            loss = batch_loss(model, batch, device, cfg.dtype)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # clip and report the true gradient norm (no-op without fp16)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        window.add(loss, grad_norm, cfg.grad_clip, batch)
        progress.advance()

        if log_now:
            record = {"kind": "train", "step": step, "lr": sched.get_last_lr()[0]}
            record.update(window.read())
            record.update({f"nsa/{k}": v for k, v in collector.summary().items()})
            collector.reset()
            if scaler.is_enabled():
                record["grad_scale"] = float(scaler.get_scale())
            if device.type == "cuda":
                record["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            writer.write(record)
            history["train"].append((step, record["loss"]))
            if record["window_steps"] == cfg.log_every:  # full windows only (no resume stub)
                rates.append(record["tokens_per_s"])
            progress.show(loss=record["loss"], tok_s=round(record["tokens_per_s"]),
                          lr=record["lr"])  # fmt: skip
        stop_now = cfg.time_limit is not None and time.perf_counter() - start > cfg.time_limit
        stop_now = stop_now or (cfg.stop_at is not None and step >= cfg.stop_at)
        if step % cfg.eval_every == 0 or step == cfg.steps or stop_now:
            loss_e = evaluate(model, eval_batches, device, cfg.dtype)
            writer.write({"kind": "eval", "step": step, "eval_loss": loss_e})
            history["eval"].append((step, loss_e))
            progress.show(eval_loss=loss_e)
        if step % ckpt_every == 0 or step == cfg.steps or stop_now:
            checkpoint()
        if stop_now and step < cfg.steps:
            stopped_early = True
            break
    progress.close()
    writer.close()
    # Steady-state throughput: the median full window, without the first (compilation, warmup).
    steady = sorted(rates[1:] or rates)
    result = TrainResult(
        step=step,
        eval_losses=[tuple(x) for x in history["eval"]],
        train_losses=[tuple(x) for x in history["train"]],
        tokens_per_s=steady[len(steady) // 2] if steady else 0.0,
        stopped_early=stopped_early,
        parameters=params,
        out=str(out),
    )
    summary = json.loads((out / SUMMARY).read_text()) if (out / SUMMARY).exists() else {}
    summary.update(result=dataclasses.asdict(result))
    (out / SUMMARY).write_text(json.dumps(summary, indent=1))
    return result


def _write_run_info(out: Path, cfg, corpus, stream: BatchStream, params: int, device) -> None:
    """``summary.json`` at the start: config, model size, corpus, machine."""
    info = {
        "config": cfg.to_dict(),
        "nsa_config": dataclasses.asdict(cfg.nsa()) if cfg.attention == "nsa" else None,
        "parameters": params,
        "corpus": {
            "source": corpus.source,
            "train_documents": len(corpus.train),
            "eval_documents": len(corpus.eval),
            "train_bytes": corpus.train_bytes,
            "eval_bytes": corpus.eval_bytes,
            "pieces": len(stream.pieces),
        },
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).write_text(json.dumps(info, indent=1))
