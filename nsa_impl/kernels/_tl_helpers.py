"""``triton.jit`` helpers shared by the kernel files (`_range_kernels`, `_topn_kernels`,
`_gate_kernels`).

Loaded through `nsa_impl.kernels._loader.load_kernel_module` in the mode of the kernel file that
asks for it (``executing_mode()``), so compiled kernels call compiled helpers and interpreted
kernels interpreted ones.

Two arithmetic regimes, picked by the constexpr ``IEEE``:

* fp16/bf16 inputs (``IEEE=False``): tensor-core dots with float32 accumulation; the softmax runs
  in the base-2 domain (logits pre-multiplied by ``log2(e)``, ``exp2``/``log2``: one MUFU op).
* float32 inputs (``IEEE=True``, the parity dtype, spec I.10 fp32 class): logits formed in
  float64, natural ``exp``/``log`` (libdevice's when ``PRECISE``, i.e. compiled; the
  interpreter's numpy functions are already exact), IEEE float32 dots elsewhere and float64
  long-running gradient sums. A float32 ``q.k`` over 128 dims alone rounds logits by ~1e-6,
  which is the whole fp32 budget (docs/gpu_notes.md, "fp32 class").

NaN containment (the rule of `nsa_impl.kernels.triton_sel`): masked keys contribute exactly
nothing. Scores and probabilities are selected with ``tl.where`` (never multiplied by a zero
probability); the operands a ``tl.dot`` contracts over masked entries arrive cleaned by the
launchers (`nsa_impl.kernels.ops.nan_to_zero`), so no kernel loop cleans a tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # the backend-neutral shim (triton >= 3.1)
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

from ._loader import executing_mode

#: Whether this copy runs in Triton's interpreter. Its ``tl.dot`` of two bfloat16 tiles returns
#: garbage (triton 3.7.1: numpy multiplies the raw bit patterns), so interpreted half-precision
#: dots go through float32, which is also what the tensor cores accumulate in.
INTERPRETED = tl.constexpr(executing_mode())


@triton.jit
def mma(a, b):
    """``a @ b`` of fp16/bf16 tiles, float32 accumulation (see `INTERPRETED`)."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def round_to(x, dt: tl.constexpr):
    """``x.to(dt)`` rounding to nearest even. The interpreter truncates float32 -> bfloat16, so
    it rounds here by hand (add half an ulp and the tie bit, keep the top 16 bits); compiled
    code converts with round-to-nearest-even itself."""
    if INTERPRETED and dt == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dt)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` accumulated in float32 (IEEE float32 products when ``IEEE``)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return mma(a, b)


@triton.jit
def logits(a, b, qk_scale, IEEE: tl.constexpr):
    """``qk_scale * a @ b`` as float32; products and sums in float64 when ``IEEE``."""
    if IEEE:
        return (tl.dot(a.to(tl.float64), b.to(tl.float64)) * qk_scale).to(tl.float32)
    else:
        return mma(a, b) * qk_scale


@triton.jit
def exp_d(x, IEEE: tl.constexpr, PRECISE: tl.constexpr):
    """The softmax's exponential in its domain: ``exp2`` (half precision) or ``exp`` (float32)."""
    if IEEE:
        if PRECISE:
            return libdevice.exp(x)
        else:
            return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def log_d(x, IEEE: tl.constexpr, PRECISE: tl.constexpr):
    """The inverse of `exp_d`: ``log2`` (half precision) or ``log`` (float32)."""
    if IEEE:
        if PRECISE:
            return libdevice.log(x)
        else:
            return tl.log(x)
    else:
        return tl.log2(x)


@triton.jit
def acc_zeros(M: tl.constexpr, N: tl.constexpr, IEEE: tl.constexpr):
    """A long-running gradient accumulator: float64 for float32 inputs, else float32.

    dK of a selected block sums over every (position, head) that selected it (block 0: all of
    them); a float32 running sum of ~25k terms drifts by ~1e-4 at T=1536, h=16, beyond the fp32
    class's 1e-5 on gradients. The fp32 path is for parity, so it pays for float64.
    """
    if IEEE:
        return tl.zeros([M, N], tl.float64)
    else:
        return tl.zeros([M, N], tl.float32)


@triton.jit
def acc_dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` for `acc_zeros` accumulators (float64 products when ``IEEE``)."""
    if IEEE:
        return tl.dot(a.to(tl.float64), b.to(tl.float64))
    else:
        return mma(a, b)


@triton.jit
def load_tile(PTR, row_off, row_ok, D: tl.constexpr, BD: tl.constexpr, MASKED: tl.constexpr):
    """``[len(row_off), BD]`` tile at ``PTR + row_off[:, None] + d``; zero padding.

    ``row_off`` are int64 element offsets of the rows. ``MASKED=False`` promises every row is in
    bounds (only padded columns ``d >= D`` are masked, none when ``BD == D``): full key chunks.
    """
    d = tl.arange(0, BD)
    ptr = PTR + row_off[:, None] + d[None, :]
    if MASKED:
        return tl.load(ptr, mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    else:
        if BD == D:
            return tl.load(ptr)
        else:
            return tl.load(ptr, mask=d[None, :] < D, other=0.0)


@triton.jit
def sort_rows(x, N: tl.constexpr, LOG_N: tl.constexpr, DESCENDING: tl.constexpr,
              BITONIC: tl.constexpr):
    """``x [P, N]`` sorted along its last axis (``N = 2**LOG_N``); ``BITONIC``: each row is
    already bitonic (rises then falls, or the reverse), so only the network's last stage runs.

    Compiled: ``tl.sort``. Interpreted: a bitonic network written with reshapes and element-wise
    min/max, because the interpreter runs ``tl.sort``'s combine-function reductions element by
    element in Python (the fused top-n took 6x longer on the CPU).
    """
    if INTERPRETED:
        P: tl.constexpr = x.shape[0]
        first: tl.constexpr = LOG_N if BITONIC else 1
        for s in tl.static_range(first, LOG_N + 1):  # sorted runs of 2**s
            for t in tl.static_range(0, s):  # compare-exchange at distance d = 2**(s-1-t)
                d: tl.constexpr = 1 << (s - 1 - t)
                A: tl.constexpr = N // (2 * d)
                lo, hi = tl.split(tl.permute(tl.reshape(x, [P, A, 2, d]), [0, 1, 3, 2]))
                # run a = i // (2d) holds bit s of i as its bit t: it sets the run's direction
                up = (((tl.arange(0, A) >> t) & 1) == 0) != DESCENDING
                up = up[None, :, None]
                small, big = tl.minimum(lo, hi), tl.maximum(lo, hi)
                pair = tl.join(tl.where(up, small, big), tl.where(up, big, small))
                x = tl.reshape(tl.permute(pair, [0, 1, 3, 2]), [P, N])
        return x
    else:
        return tl.sort(x, 1, descending=DESCENDING)
