"""``torchrun`` training of the NSA decoder with context parallelism and FSDP2.

    torchrun --nproc-per-node=N -m nsa_impl.parallel.train --seq-len 4096 --steps 100 --out DIR

Every rank holds two chunks of each packed row (`CPLayout`), the attention all-gathers K/V
(`cp_nsa_attention`), the parameters are sharded per block by FSDP2 (`shard_model`, an optional
mixed-precision policy), and checkpoints are ``torch.distributed.checkpoint`` directories
(``DIR/step<k>``, ``DIR/latest`` names the newest; ``--resume`` continues from it and gives the
same parameters as an uninterrupted run). On the CPU it uses gloo, on GPUs NCCL (one GPU per
rank, ``LOCAL_RANK``).

Data: `ByteBatches`, byte-level documents (the given ``--data`` files, by default the library's
own sources) read as one stream; step ``s`` trains on a window of ``--seq-len`` tokens at a
seeded offset, packed with ``cu_seqlens`` at the document boundaries inside it (documents cross
rank boundaries), labels the next byte of the same document (the last byte of a document and
the padding are ignored). The batch is a `Batch`, the same fields as the training command's
``nsa_impl.data.PackedBatch`` (``tokens``, ``labels``, ``cu_seqlens``, ``num_labels``), so that
command's ``BatchStream`` can feed `train_step` unchanged (docs/parallel.md, merge notes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from nsa_ref.config import NSAConfig

from ..data import IGNORE_INDEX
from ..model import NSAToyLM
from ..model.toy import TOY_CONFIG
from .fsdp import DTYPES, load_checkpoint, mixed_precision, save_checkpoint, shard_model
from .model import CPToyLM, cp_loss

#: Named NSA configurations (``--nsa-config``).
NSA_CONFIGS = {
    "toy": TOY_CONFIG,
    "small": NSAConfig(cmp_block=16, cmp_stride=8, sel_block=32, sel_top_n=8, window=128),
    "paper": NSAConfig(),
}
VOCAB_SIZE = 256  # bytes


@dataclass(frozen=True)
class Batch:
    """One packed row: ``tokens``/``labels`` int64 ``[1, T]``, int32 ``cu_seqlens``, and the
    number of labelled positions ``num_labels`` (host int)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    num_labels: int


class ByteBatches:
    """Deterministic packed byte batches of a document set (module docstring).

    Args:
        paths: files, each one document (``None``: the ``.py`` files of ``nsa_impl``).
        seq_len: tokens per batch.
        seed: offsets of step ``s`` come from a generator seeded with ``(seed, s)``.
    """

    def __init__(self, paths=None, seq_len: int = 256, seed: int = 0):
        if paths is None:
            paths = sorted(Path(__file__).resolve().parents[1].rglob("*.py"))
        docs = [Path(p).read_bytes() for p in paths]
        docs = [d for d in docs if len(d) >= 2]
        if not docs:
            raise ValueError("no documents of at least 2 bytes in the data files")
        self.data = torch.tensor(list(b"".join(docs)), dtype=torch.int64)
        lens = torch.tensor([len(d) for d in docs])
        self.doc = torch.repeat_interleave(torch.arange(len(docs)), lens)
        if self.data.numel() <= seq_len:
            raise ValueError(f"the data ({self.data.numel()} bytes) must be longer than "
                             f"seq_len={seq_len}")  # fmt: skip
        self.seq_len, self.seed = seq_len, seed

    def batch(self, step: int) -> Batch:
        """The batch of step ``step`` (the same on every rank and every run)."""
        T = self.seq_len
        gen = torch.Generator().manual_seed((self.seed << 32) + step)
        off = int(torch.randint(0, self.data.numel() - T, (1,), generator=gen))
        tokens = self.data[off : off + T]
        doc = self.doc[off : off + T + 1]
        labels = torch.where(doc[1:] == doc[:-1], self.data[off + 1 : off + T + 1], IGNORE_INDEX)
        cuts = (torch.nonzero(doc[1:T] != doc[: T - 1]).flatten() + 1).tolist()
        cu = torch.tensor([0, *cuts, T], dtype=torch.int32)
        return Batch(tokens[None], labels[None], cu, int((labels != IGNORE_INDEX).sum()))


@dataclass
class CPTrainConfig:
    """The flags of ``python -m nsa_impl.parallel.train`` (``--help``)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 16
    nsa_config: str = "toy"
    rope: bool = True
    phi: str = "mean"
    seq_len: int = 256
    steps: int = 20
    lr: float = 3e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dtype: str = "fp32"
    param_dtype: str | None = None
    reduce_dtype: str | None = None
    seed: int = 0
    data: list[str] | None = None
    out: str = "runs/cp"
    ckpt_every: int = 0
    log_every: int = 1
    resume: bool = False


def build_model(cfg: CPTrainConfig, device="cpu") -> NSAToyLM:
    """The `NSAToyLM` of ``cfg`` (seeded with ``cfg.seed``: the same on every rank and in a
    single process; parameters in ``cfg.dtype``)."""
    if cfg.nsa_config not in NSA_CONFIGS:
        raise ValueError(f"nsa_config must be one of {sorted(NSA_CONFIGS)}, got "
                         f"{cfg.nsa_config!r}")  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = NSAToyLM(VOCAB_SIZE, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim,
                         NSA_CONFIGS[cfg.nsa_config], num_layers=cfg.layers, rope=cfg.rope,
                         phi=cfg.phi)  # fmt: skip
    return model.to(device, DTYPES[cfg.dtype])


def make_optimizer(model: torch.nn.Module, cfg: CPTrainConfig) -> torch.optim.AdamW:
    """AdamW over every parameter."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def build(cfg: CPTrainConfig, mesh, device) -> tuple[CPToyLM, torch.optim.Optimizer]:
    """`build_model` wrapped by `CPToyLM` and sharded by FSDP2 over ``mesh`` (with the
    mixed-precision policy of ``cfg``), and its optimiser."""
    model = CPToyLM(build_model(cfg, device))
    shard_model(model, mesh, mp_policy=mixed_precision(cfg.param_dtype, cfg.reduce_dtype))
    return model, make_optimizer(model, cfg)


def train_step(model: CPToyLM, opt, batch, group, *, dtype: torch.dtype | None = None,
               grad_clip: float = 0.0) -> torch.Tensor:  # fmt: skip
    """One optimiser step on the packed row ``batch`` (a `Batch` or ``PackedBatch``); returns
    the row's mean loss (summed over the ranks of ``group``, a detached device scalar).

    ``dtype``: the attention's compute dtype (the mixed-precision ``param_dtype``; default the
    parameters'). ``grad_clip > 0`` clips the global gradient norm.
    """
    T = batch.tokens.shape[1]
    cp = model.context_parallel(group, T, cu_seqlens=batch.cu_seqlens, dtype=dtype)
    device = cp.plan.device
    tokens = cp.layout.shard(batch.tokens, cp.rank).to(device)
    labels = cp.layout.shard(batch.labels, cp.rank, value=IGNORE_INDEX).to(device)
    loss = cp_loss(model(tokens, cp), labels, cp, num_labels=batch.num_labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    return total


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nsa_impl.parallel.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    for f in dataclasses.fields(CPTrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "data":
            p.add_argument(flag, nargs="+", default=None)
        elif f.name in ("dtype", "param_dtype", "reduce_dtype"):
            p.add_argument(flag, choices=sorted(DTYPES), default=f.default)
        else:  # int, float and str fields, typed by their default
            p.add_argument(flag, type=type(f.default), default=f.default)
    return p


def _setup():
    """Process group (``torchrun``'s environment; kept when already initialised) and device."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return device


def main(argv=None) -> list[float]:
    """Run the training; returns the losses (every rank). ``argv``: the flags (``--help``)."""
    cfg = CPTrainConfig(**vars(_parser().parse_args(argv)))
    device = _setup()
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(device.type, (world,))
    group = dist.new_group(list(range(world)))  # the CP collectives: their own communicator
    model, opt = build(cfg, mesh, device)
    data = ByteBatches(cfg.data, cfg.seq_len, cfg.seed)
    out = Path(cfg.out)
    start = 0
    if cfg.resume:
        latest = (out / "latest").read_text().strip()
        start = load_checkpoint(out / latest, model, opt)
    dtype = None if cfg.param_dtype is None else DTYPES[cfg.param_dtype]
    losses, t0 = [], time.perf_counter()
    for step in range(start, cfg.steps):
        loss = float(train_step(model, opt, data.batch(step), group, dtype=dtype,
                                grad_clip=cfg.grad_clip))  # fmt: skip
        losses.append(loss)
        if rank == 0 and (step + 1) % cfg.log_every == 0:
            rate = (step + 1 - start) * cfg.seq_len / (time.perf_counter() - t0)
            print(json.dumps({"step": step + 1, "loss": round(loss, 5),
                              "tokens_per_s": round(rate, 1), "world": world}), flush=True)
        if cfg.ckpt_every and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(out / f"step{step + 1}", model, opt, step=step + 1)
            if rank == 0:
                (out / "latest").write_text(f"step{step + 1}\n")
            dist.barrier()
    return losses


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
