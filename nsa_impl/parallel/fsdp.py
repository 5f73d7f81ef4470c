"""FSDP2 for the context-parallel model, and distributed checkpoints.

* `shard_model`: ``torch.distributed.fsdp.fully_shard`` on every `CPDecoderBlock` and then on
  the root (embedding, final norm and head), with an optional `MixedPrecisionPolicy`
  (`mixed_precision`). The ranks that share one row under context parallelism each hold a share
  of its loss (`nsa_impl.parallel.model.cp_loss`), so the gradient reduce-scatter must *sum*
  over them: the divide factor is the data-parallel degree only (``1`` when every rank works on
  the same row).
* `save_checkpoint` / `load_checkpoint`: ``torch.distributed.checkpoint`` (DCP) of the sharded
  model and optimiser state (``get_state_dict``/``set_state_dict``: each rank writes and reads
  its own shards; the files load into any world size) plus the training step.

Works on the CPU with gloo (tested in ``tests/parallel``) and on GPUs with NCCL.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .model import CPToyLM

#: ``--param-dtype`` / ``--reduce-dtype`` names.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}  # fmt: skip


def mixed_precision(param_dtype: str | None = None, reduce_dtype: str | None = None):
    """FSDP2's `MixedPrecisionPolicy`: parameters all-gathered (and computed) in
    ``param_dtype``, gradients reduce-scattered in ``reduce_dtype`` (names of `DTYPES`;
    ``None``: the parameters' own dtype)."""
    for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(f"{name} must be one of {sorted(DTYPES)} or None, got {value!r}")
    return MixedPrecisionPolicy(
        param_dtype=None if param_dtype is None else DTYPES[param_dtype],
        reduce_dtype=None if reduce_dtype is None else DTYPES[reduce_dtype],
    )


def shard_model(model: CPToyLM, mesh, *, mp_policy: MixedPrecisionPolicy | None = None,
                data_parallel: int = 1, reshard_after_forward: bool = True) -> CPToyLM:  # fmt: skip
    """``fully_shard`` every block, then the root, over ``mesh`` (a 1-D ``DeviceMesh``).

    ``data_parallel``: how many different rows the ranks of ``mesh`` process at once (the
    gradients are divided by it and summed over the context-parallel ranks of a row). Returns
    ``model`` (now an FSDP module: its parameters are sharded ``DTensor`` s).
    """
    if not isinstance(model, CPToyLM):
        raise TypeError(f"model must be a CPToyLM, got {type(model).__name__}")
    if not isinstance(data_parallel, int) or data_parallel < 1:
        raise ValueError(f"data_parallel must be a positive int, got {data_parallel!r}")
    options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    for block in model.blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(float(data_parallel))
            # SUM collectives with a separate division (none for data_parallel == 1): gloo has
            # no PREMUL_SUM, which a custom factor would otherwise ask for.
            module.set_force_sum_reduction_for_comms(True)
    return model


def save_checkpoint(path: str | Path, model, optimizer, *, step: int) -> None:
    """Write the sharded model and optimiser state and ``step`` to the DCP directory ``path``
    (a collective: every rank calls it)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "step": torch.tensor(int(step))}
    dcp.save(state, checkpoint_id=str(path))


def load_checkpoint(path: str | Path, model, optimizer) -> int:
    """Load a `save_checkpoint` directory into ``model`` and ``optimizer`` (sharded like them);
    returns the step. A collective."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"no distributed checkpoint at {path}")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])  # fmt: skip
    return int(state["step"])
