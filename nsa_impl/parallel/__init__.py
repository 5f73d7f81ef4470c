"""Beyond one device: context-parallel NSA attention and FSDP2 training on torch.distributed.

* `CPLayout` (`layout`): the load-balanced sharding of a (packed) row over ``R`` ranks (chunks
  ``r`` and ``2R-1-r``), its padding, and ``shard``/``unshard`` of whole-row tensors.
* `all_gather`, `gather_rows` (`collectives`): the differentiable K/V all-gather (backward: the
  reduce-scatter of ``dK``/``dV``).
* `context_parallel`, `ContextParallel`, `cp_nsa_attention`, `attend_rows` (`attention`): a
  rank's share of the problem (its row-subset `nsa_impl.Plan`) and NSA attention of its rows
  against the gathered keys, on the torch paths.
* `model`, `fsdp`, `train`: the decoder model with context-parallel attention, FSDP2
  ``fully_shard`` per block with a mixed-precision policy, distributed checkpoints, and the
  ``torchrun`` entry ``python -m nsa_impl.parallel.train``.

docs/parallel.md has the design (bytes and latency of the all-gather against a ring), the test
commands and the GPU commands.
"""

from .attention import ContextParallel, attend_rows, context_parallel, cp_nsa_attention
from .collectives import all_gather, gather_rows
from .layout import CPLayout

__all__ = [
    "CPLayout",
    "ContextParallel",
    "all_gather",
    "attend_rows",
    "context_parallel",
    "cp_nsa_attention",
    "gather_rows",
]
