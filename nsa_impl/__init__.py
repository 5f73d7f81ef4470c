"""nsa_impl: the Native Sparse Attention library (fast paths behind one router).

Computes exactly what `nsa_ref` computes (spec Part I), with autograd, variable-length batches
and a decode cache. Public entry points: `nsa_attention`, `NSAAttention`, `NSACache`, `NSAConfig`
(the same class as `nsa_ref.NSAConfig`), and `routing.explain`.
"""

from nsa_ref.config import NSAConfig

from . import routing
from .api import nsa_attention
from .decode import NSACache
from .module import NSAAttention

__all__ = ["NSAAttention", "NSACache", "NSAConfig", "nsa_attention", "routing"]
