"""Two tiny Triton kernels for the GPU lane: does this torch/triton pair compile and run on this
GPU? Imported only inside GPU tests, after ``pytest.importorskip("triton")``."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """``out = x + y`` over ``n`` elements (masked tail)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + y, mask=mask)


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    """``c = a @ b`` for one ``N x N`` tile: half-precision inputs, fp32 accumulation (tl.dot,
    the tensor-core path the selection kernels use)."""
    rows = tl.arange(0, N)[:, None] * N
    cols = tl.arange(0, N)[None, :]
    a = tl.load(a_ptr + rows + cols)
    b = tl.load(b_ptr + rows + cols)
    tl.store(c_ptr + rows + cols, tl.dot(a, b))
