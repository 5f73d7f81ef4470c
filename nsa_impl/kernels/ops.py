"""What every kernel shares: the problem description, the custom-op helper, NaN containment
helpers and the explicit tuning object.

* `Inputs`: what a kernel's ``supports(inputs)`` looks at (device, dtype, sizes, gradient need,
  varlen, the longest sequence, the configuration), built by the dispatcher from shapes only, so
  asking costs no tensor work and no device sync.
* `kernel_op`: registers a function as ``torch.library.custom_op("nsa::<name>", mutates_args=())``
  with its ``register_fake`` (the flash-attn pattern): ``torch.compile`` traces the call as one
  opaque node with known output shapes, also for dynamic shapes; plain eager calls skip the
  custom-op dispatch (`KernelOp`). Differentiable kernels pair a
  forward op with a backward op inside a ``torch.autograd.Function`` that has ``setup_context``
  and saves only tensors (so ``torch.func.grad`` works); the backward op is called under
  `no_grad` because it has no derivative of its own (no double backward), and with autocast
  off (`autocast_off_backward`), as the forward ran.
* `finite_rows`, `nan_to_zero`, `poison`: NaN containment for kernels that cannot select masked
  keys themselves (FlashAttention): run the kernel on inputs whose non-finite values are zeroed
  and mark the rows that read one as NaN (see `nsa_impl.kernels.flash`).
* `TUNING`: launch-shape overrides, NaN-poisoned output buffers and launch records for benchmarks
  and tests, in one explicit object (`tuning` sets fields for the length of a ``with`` block).
  Nothing in the library writes to it.

Imports nothing from ``nsa_impl`` (the bottom layer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Inputs:
    """A problem as the dispatcher and the kernels' ``supports`` see it (no tensors).

    Attributes:
        device: the device the tensors live on (``torch.device``; its index is used to ask CUDA
            for the compute capability).
        dtype: the input dtype.
        B, T, H, G: batch, (packed) length, query heads, KV groups.
        Dk, Dv: key and value head dims.
        max_seqlen: the longest sequence (``T`` without ``cu_seqlens``).
        varlen: ``cu_seqlens`` packs several sequences into ``B = 1``.
        backward: gradients will be asked for.
        cfg: the `nsa_ref.NSAConfig`.
        row_subset: ``q`` holds only some of the ``T`` query rows (a context-parallel shard,
            `nsa_impl.parallel`) while ``k``/``v`` hold all ``T`` keys.
    """

    device: torch.device
    dtype: torch.dtype
    B: int
    T: int
    H: int
    G: int
    Dk: int
    Dv: int
    max_seqlen: int
    varlen: bool
    backward: bool
    cfg: Any
    row_subset: bool = False

    @property
    def device_type(self) -> str:
        """``"cpu"``, ``"cuda"``, ..."""
        return self.device.type


def kernel_op(name: str, fake: Callable, *, mutates: tuple[str, ...] = ()) -> Callable:
    """Decorator: ``fn`` becomes the custom op ``nsa::<name>`` with ``fake`` as its fake impl,
    wrapped in a `KernelOp`.

    ``fn`` must be fully annotated (the schema is inferred) and functional (fresh outputs,
    never views of its inputs), except for the arguments named in ``mutates``, which it writes
    in place (the decode step's caches and workspace). ``fake`` receives the same arguments as
    fake tensors and returns empty tensors of the output shapes (``None`` for no output).
    """

    def register(fn: Callable) -> KernelOp:
        op = torch.library.custom_op(f"nsa::{name}", mutates_args=tuple(mutates))(fn)
        op.register_fake(fake)
        return KernelOp(op, fn)

    return register


class KernelOp:
    """A kernel's custom op and the Python function behind it.

    A call goes through the custom op (``op``) whenever something may need to see it as one
    node: ``torch.compile`` tracing, a torch dispatch mode (fake tensors, op counters), a
    ``torch.func`` transform, the profiler, grad mode on, or a tensor subclass argument. Other
    calls (eager, inside an autograd Function or under ``no_grad``, on plain tensors) run the
    function itself: the Python custom-op dispatch costs ~50 µs a call on a 2-core CPU (the
    function's own glue for a small launch ~6), ten calls per forward+backward of a host-bound
    short sequence. The results are the same function's. Other attributes (``_opoverload``,
    ``_init_fn``, ``register_*``) are the custom op's.
    """

    def __init__(self, op: Any, fn: Callable):
        self.op, self.fn = op, fn
        functools.update_wrapper(self, fn)  # name, docstring and signature of the function

    def __call__(self, *args, **kwargs):
        if _direct_call_ok(args, kwargs):
            return self.fn(*args, **kwargs)
        return self.op(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.op, name)


def _direct_call_ok(args: tuple, kwargs: dict) -> bool:
    """Whether a kernel op may skip the custom-op dispatch (see `KernelOp`)."""
    if (torch.compiler.is_compiling() or torch.is_grad_enabled()
            or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch.autograd.profiler._is_profiler_enabled):  # fmt: skip
        return False
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            if type(value) is not torch.Tensor:
                return False
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            # a schema list is homogeneous: only Tensor[] lists need a look (int[] launch
            # shapes, the most common lists here, are skipped whole)
            if any(type(t) is not torch.Tensor for t in value):
                return False
    return True


#: Device types with autocast kernels in every torch build.
_ALWAYS_AUTOCAST = frozenset({"cpu", "cuda"})


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``False`` where it has no kernels, e.g.
    ``meta``). cpu/cuda always have autocast, and asking would stop torch.compile on torch 2.11,
    whose dynamo cannot trace ``torch._C._is_autocast_available`` (measured on the H200)."""
    if device_type not in _ALWAYS_AUTOCAST and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def autocast_off_backward(backward: Callable) -> Callable:
    """Decorate an autograd Function's ``backward`` to run with autocast disabled.

    The engine runs a custom ``backward`` under the autocast state of the ``.backward()`` call,
    and the Python implementation of a custom op sees it too; a Function whose forward ran
    inside an entry point (autocast off, one dtype: `nsa_impl.amp`) must see the same in its
    backward, also when the caller (against PyTorch's advice) calls ``.backward()`` inside an
    autocast region. The device is that of the first tensor gradient. Lives here, at the bottom,
    so that the kernels' Functions can use it; `nsa_impl.amp` re-exports it.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        lead = next((g for g in grads if isinstance(g, torch.Tensor)), None)
        kind = None if lead is None else lead.device.type
        if kind is None or not autocast_enabled(kind):
            return backward(ctx, *grads)
        with torch.autocast(kind, enabled=False):
            return backward(ctx, *grads)

    return wrapper


# ---------------------------------------------------------------------------------------------
# NaN containment helpers: for opaque kernels, and for the Triton kernels' operands, cleaned
# once per call before the launches (the torch paths and the kernels also select).


def nan_to_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every NaN/Inf replaced by 0 (one pass; finite values are bit-identical)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Bool ``x.shape[:-1]``: whether every element of the last axis is finite."""
    return torch.isfinite(x).all(dim=-1)


def poison(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``x`` with the rows where ``bad`` (``x.shape[:-1]``, broadcastable) is true set to NaN."""
    return x.masked_fill(bad.unsqueeze(-1), float("nan"))  # one read of x, one write


# ---------------------------------------------------------------------------------------------
# Explicit tuning object (benchmarks and tests only).


@dataclass
class Tuning:
    """Knobs the benchmarks and tests turn; the library only reads them.

    Attributes:
        sel: overrides of the Triton selection launch shape (fields of
            `nsa_impl.kernels.triton_sel.LaunchShape`, e.g. ``{"warps_fwd": 2}``).
        score: the scoring kernel's launch shape (``block_m``, ``block_n``, ``warps``,
            ``stages``); the default is the fastest shape timed at T=65536, H=64 on an H200.
        poison_outputs: fill every kernel-written buffer with NaN first, so an element a kernel
            forgets to write cannot pass as a plausible value (the FLA conftest habit).
        launches: when a dict, each Triton launch stores its compiled kernel handle there by
            name (register/spill reports in `bench/gpu_bench.py`).
    """

    sel: dict = field(default_factory=dict)
    score: dict = field(
        default_factory=lambda: {"block_m": 64, "block_n": 64, "warps": 4, "stages": None}
    )
    poison_outputs: bool = False
    launches: dict | None = None


#: The process-wide tuning object (see `Tuning`); change it with `tuning`.
TUNING = Tuning()


@contextlib.contextmanager
def tuning(**changes: Any) -> Iterator[Tuning]:
    """Set `TUNING` fields for the duration of the block (``score`` merges into the current one).

    Example: ``with tuning(sel={"warps_fwd": 2}, launches={}) as t: ...; t.launches``.
    """
    known = {f.name for f in dataclasses.fields(Tuning)}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown tuning fields {sorted(unknown)}; known: {sorted(known)}")
    if "score" in changes:
        changes["score"] = {**TUNING.score, **changes["score"]}
    saved = {name: getattr(TUNING, name) for name in changes}
    for name, value in changes.items():
        setattr(TUNING, name, value)
    try:
        yield TUNING
    finally:
        for name, value in saved.items():
            setattr(TUNING, name, value)


def new_output(*shape: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A buffer every element of which a kernel overwrites (NaN-filled under ``poison_outputs``)."""
    dtype = like.dtype if dtype is None else dtype
    if TUNING.poison_outputs:
        return torch.full(shape, float("nan"), device=like.device, dtype=dtype)
    return torch.empty(shape, device=like.device, dtype=dtype)


def record_launch(name: str, handle: Any) -> None:
    """Keep a Triton launch's compiled handle when `TUNING.launches` is a dict."""
    if TUNING.launches is not None:
        TUNING.launches[name] = handle
