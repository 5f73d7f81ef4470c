"""Mixed precision: the one rule by which NSA's entry points meet ``torch.autocast``.

Autocast casts per operator, which does not suit a computation whose paths are chosen by dtype
and whose custom autograd Functions, index copies and float64 logit tricks expect one dtype for
``q, k, v`` throughout. So the public entry points (`nsa_impl.nsa_attention`,
`nsa_impl.api.selection_attention`, `NSACache.step` / `NSACache.prefill`) follow the rule of
``torch.amp.custom_fwd(cast_inputs=...)``:

* when autocast is enabled for the device of the first tensor argument, every floating-point
  tensor argument that is not float64 (``q, k, v, gates`` and the pairs of ``branch_kv``) is
  cast to ``torch.get_autocast_dtype(device)``, and the body runs with autocast *disabled*;
  the router therefore sees (and routes) the autocast dtype, and the output is in that dtype;
* user callables that the body calls (``phi_k``/``phi_v``: a learnable `LearnablePhi` has
  float32 weights) run under the caller's autocast state again, through `user_fn`, and their
  result is cast to the autocast dtype;
* the casts are differentiable, so gradients reach float32 leaves in float32.

Every autograd Function's backward runs with autocast off as well (`autocast_off_backward`,
defined beside the custom-op helper in `nsa_impl.kernels.ops` so that the kernels can use it).

With autocast off the decorator costs one ``torch.is_autocast_enabled`` call. float64 inputs are
left alone, as autocast itself leaves them.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Callable

import torch

from .kernels.ops import autocast_enabled, autocast_off_backward

__all__ = ["autocast_dtype", "autocast_off_backward", "entry", "run_dtype", "user_fn"]

#: ``(device_type, dtype)`` of the caller's autocast while an entry point runs its body with
#: autocast disabled; ``None`` otherwise. Read by `user_fn`.
_CALLER: contextvars.ContextVar[tuple[str, torch.dtype] | None] = contextvars.ContextVar(
    "nsa_amp_caller", default=None
)


def _castable(x: object) -> bool:
    # The inputs autocast itself would cast: floating point, not float64.
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


def _cast(x: object, dtype: torch.dtype) -> object:
    """``x`` in ``dtype`` if castable; tensors inside dicts/tuples/lists are cast too."""
    if _castable(x):
        return x.to(dtype)
    if isinstance(x, dict):
        return {key: _cast(value, dtype) for key, value in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_cast(value, dtype) for value in x)
    return x


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in effect for ``x``'s device type, or ``None`` when autocast is off
    (or has no kernels for that device type, e.g. ``meta``)."""
    device_type = x.device.type
    if not autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def run_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an entry point computes in for inputs like ``x``: the autocast dtype when
    autocast is on for ``x``'s device and ``x`` would be cast (floating point, not float64),
    else ``x.dtype``. What a plan built outside the entry point must be built for
    (`nsa_impl.NSAAttention.plan_for`)."""
    dtype = autocast_dtype(x)
    return dtype if dtype is not None and _castable(x) else x.dtype


def entry(*tensor_args: str) -> Callable:
    """Decorate a public entry point with the module's autocast rule.

    ``tensor_args`` name the parameters to cast (tensors, or dicts/tuples of tensors such as
    ``branch_kv``); the device is taken from the first of them. Example::

        @amp.entry("q", "k", "v", "gates", "branch_kv")
        def nsa_attention(q, k, v, gates, cfg, *, branch_kv=None, ...): ...
    """
    if not tensor_args:
        raise ValueError("entry() needs the names of the tensor arguments to cast")

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        missing = [name for name in tensor_args if name not in signature.parameters]
        if missing:
            raise ValueError(f"{fn.__qualname__} has no parameter(s) {missing}")
        first = tensor_args[0]
        first_pos = list(signature.parameters).index(first)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            lead = args[first_pos] if len(args) > first_pos else kwargs.get(first)
            dtype = autocast_dtype(lead) if isinstance(lead, torch.Tensor) else None
            if dtype is None:  # autocast off (the common case): the body as written
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            for name in tensor_args:
                if name in bound.arguments:
                    bound.arguments[name] = _cast(bound.arguments[name], dtype)
            token = _CALLER.set((lead.device.type, dtype))
            try:
                with torch.autocast(lead.device.type, enabled=False):
                    return fn(*bound.args, **bound.kwargs)
            finally:
                _CALLER.reset(token)

        return wrapper

    return decorate


def user_fn(fn: Callable | None) -> Callable | None:
    """``fn`` as the caller would have run it: under the caller's autocast, result in its dtype.

    Inside an entry point's body (autocast disabled by `entry`), a user callable such as a
    learnable ``phi`` would otherwise see low-precision inputs against float32 weights. Outside
    an entry point, or for ``None``, returns ``fn`` unchanged.
    """
    if fn is None:  # before the ContextVar read, which torch.compile cannot trace
        return fn
    caller = _CALLER.get()
    if caller is None:
        return fn
    device_type, dtype = caller

    @functools.wraps(fn)
    def under_caller_autocast(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            out = fn(*args, **kwargs)
        return _cast(out, dtype)

    return under_caller_autocast
