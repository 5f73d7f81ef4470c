"""nsa_ref: the exact reference of Native Sparse Attention (spec Part I).

Readable, float64-capable, depends on torch only. It defines "correct" for this project.
"""

from . import rules
from .config import NSAConfig
from .decode import NSARefCache
from .reference import NSAAux, SequenceKV, gate, nsa_attention, nsa_row
from .validate import BRANCHES, Dims, check_cu_seqlens, check_inputs

__all__ = [
    "BRANCHES",
    "Dims",
    "NSAAux",
    "NSAConfig",
    "NSARefCache",
    "SequenceKV",
    "check_cu_seqlens",
    "check_inputs",
    "gate",
    "nsa_attention",
    "nsa_row",
    "rules",
]
