"""What each process of the gloo tests runs (module-level functions: `spawn.run_processes`
pickles them by reference). Each returns CPU tensors and plain values for the parent to check."""

from __future__ import annotations

import torch
import torch.distributed as dist

from nsa_impl.parallel import all_gather

from . import cases


def attention(rank: int, world: int, problems: list, dtypes: list) -> list:
    """This rank's `cases.on_rank` result for every (case, dtype)."""
    return [[cases.on_rank(case, dtype, rank) for dtype in dtypes] for case in problems]


def collectives(rank: int, world: int) -> dict:
    """`all_gather` forward and backward for float64 and bfloat16 inputs of rank-dependent
    values, with rank-dependent upstream gradients."""
    out = {}
    for dtype in (torch.float64, torch.bfloat16):
        x = (torch.arange(6, dtype=torch.float64).view(3, 2) + 10 * rank).to(dtype)
        x.requires_grad_()
        y = all_gather(x)
        weight = torch.arange(y.numel(), dtype=torch.float64).view(y.shape) * (rank + 1)
        (y.double() * weight).sum().backward()
        out[str(dtype)] = (y.detach(), x.grad, x.grad.dtype)
    dist.barrier()
    return out


# ---------------------------------------------------------------------------------------------
# Training: FSDP2 + context parallelism against one process.

#: The model of the training checks: two blocks, GQA, RoPE, a learnable phi, separate branch
#: K/V off (the attention checks cover it), the toy NSA config; float64 for exact comparisons.
TRAIN = dict(layers=2, hidden=16, heads=2, kv_heads=1, head_dim=8, nsa_config="toy", rope=True,
             phi="mlp", lr=1e-2, weight_decay=0.1, grad_clip=0.0, seed=3)  # fmt: skip


def train_batches(T: int, count: int, seed: int = 5) -> list:
    """``count`` packed rows of ``T`` random bytes with documents that cross chunk boundaries
    (labels: next byte of the same document, ignored at document ends)."""
    from nsa_impl.data import IGNORE_INDEX
    from nsa_impl.parallel.train import Batch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, 256, (1, T), generator=gen)
        cuts = sorted({int(c) for c in torch.randint(1, T, (2,), generator=gen)})
        cu = torch.tensor([0, *cuts, T], dtype=torch.int32)
        labels = torch.cat([tokens[:, 1:], tokens.new_full((1, 1), IGNORE_INDEX)], 1)
        labels[0, (cu[1:] - 1).long()] = IGNORE_INDEX
        out.append(Batch(tokens, labels, cu, int((labels != IGNORE_INDEX).sum())))
    return out


def _full_parameters(model) -> dict:
    """Every parameter gathered whole (a collective: every rank calls it)."""
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def training(rank: int, world: int, tmp: str, T: int, checkpoint: bool, mixed: bool) -> dict:
    """Two FSDP2 + CP steps in float64 (losses and whole parameters after each); with
    ``checkpoint``, a DCP save after step 1, a load into a differently initialised model and its
    step 2; with ``mixed``, one step under MixedPrecisionPolicy(bf16 params, fp32 reduce)."""
    import dataclasses
    from pathlib import Path

    from torch.distributed.device_mesh import init_device_mesh

    from nsa_impl.parallel import fsdp, train

    mesh = init_device_mesh("cpu", (world,))
    group = dist.new_group(list(range(world)))
    cfg = train.CPTrainConfig(seq_len=T, dtype="fp64", **TRAIN)
    model, opt = train.build(cfg, mesh, torch.device("cpu"))
    batches = train_batches(T, 2)
    out = {"losses": [], "params": []}
    for step, batch in enumerate(batches):
        out["losses"].append(float(train.train_step(model, opt, batch, group)))
        out["params"].append(_full_parameters(model))
        if checkpoint and step == 0:
            fsdp.save_checkpoint(Path(tmp) / "ckpt", model, opt, step=1)
    if checkpoint:
        fresh, fresh_opt = train.build(dataclasses.replace(cfg, seed=cfg.seed + 1), mesh,
                                       torch.device("cpu"))  # fmt: skip
        out["init_differs"] = any(
            not torch.equal(a, out["params"][0][n]) for n, a in _full_parameters(fresh).items()
        )
        out["loaded_step"] = fsdp.load_checkpoint(Path(tmp) / "ckpt", fresh, fresh_opt)
        out["loaded"] = _full_parameters(fresh)
        out["resumed_loss"] = float(train.train_step(fresh, fresh_opt, batches[1], group))
        out["resumed"] = _full_parameters(fresh)
        # the command line on the same process group: 2 steps with checkpoints, then a resume
        args = ["--steps", "2", "--seq-len", "48", "--layers", "1", "--hidden", "16", "--heads",
                "2", "--head-dim", "8", "--ckpt-every", "1", "--out", str(Path(tmp) / "cli")]
        out["cli"] = train.main(args)
        out["cli_resumed"] = train.main([*args[:1], "3", *args[2:], "--resume"])
    if mixed:
        cfg32 = dataclasses.replace(cfg, dtype="fp32", param_dtype="bf16", reduce_dtype="fp32")
        model, opt = train.build(cfg32, mesh, torch.device("cpu"))
        loss = train.train_step(model, opt, batches[0], group, dtype=torch.bfloat16)
        p = next(iter(model.parameters()))
        out["mixed"] = (float(loss), p.dtype, p.to_local().dtype, _full_parameters(model))
    dist.barrier()
    return out if rank == 0 else {"losses": out["losses"]}


def suite(rank: int, world: int, tmp: str, problems: list, dtypes: list, T: int,
          full: bool) -> dict:  # fmt: skip
    """Everything one spawn checks (process start-up dominates on a 2-core machine): the
    attention cases, the collectives, and the training steps (with ``full``: checkpoints, the
    command line and mixed precision too)."""
    out = {
        "attention": attention(rank, world, problems, dtypes),
        "collectives": collectives(rank, world),
        "training": training(rank, world, tmp, T, checkpoint=full, mixed=full),
    }
    if full:  # the GPU benchmark's measuring code, on tiny shapes (it must not rot on the CPU)
        from bench import cp_bench

        cfg = cases.EDGE_CFG
        out["bench"] = cp_bench.measure(40, cfg=cfg, H=4, G=2, Dk=8, Dv=8, dtype=torch.float32,
                                        reps=1, budget_s=1.0, baseline=False)  # fmt: skip
    return out
