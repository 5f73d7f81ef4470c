"""nsa_impl: the Native Sparse Attention library (fast paths behind one dispatcher).

Computes exactly what `nsa_ref` computes (spec Part I), with autograd, variable-length batches
and a decode cache. Public entry points: `nsa_attention`, `NSAAttention`, `NSACache`,
`NSAConfig` (the same class as `nsa_ref.NSAConfig`), `plan` / `Plan` (the reusable route and
layouts of a shape), and `explain` (which path each branch takes, and why).

``nsa_impl.plan`` is the function; the module it lives in is reached with
``from nsa_impl.plan import ...`` (`Plan` is exported here too).
"""

from nsa_ref.config import NSAConfig

from . import dispatch, routing
from .api import nsa_attention
from .decode import NSACache
from .dispatch import explain
from .module import NSAAttention
from .plan import Plan, plan

__all__ = [
    "NSAAttention",
    "NSACache",
    "NSAConfig",
    "Plan",
    "dispatch",
    "explain",
    "nsa_attention",
    "plan",
    "routing",
]
