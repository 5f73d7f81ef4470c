"""nsa_impl.numerics: the precision rule (the dtype attention is computed in)."""

from __future__ import annotations

import torch

from nsa_impl import branches
from nsa_impl.numerics import compute_dtype, product_dtype


def test_compute_and_product_dtypes():
    assert compute_dtype(torch.bfloat16) == torch.float32
    assert compute_dtype(torch.float16) == torch.float32
    assert compute_dtype(torch.float32) == torch.float64
    assert compute_dtype(torch.float64) == torch.float64
    assert product_dtype(torch.float32) == torch.float64
    assert product_dtype(torch.bfloat16) == torch.bfloat16


def test_low_precision_softmax_runs_in_float32():
    seen = []
    q = torch.randn(1, 9, 2, 4, dtype=torch.bfloat16)
    k = torch.randn(1, 9, 1, 4, dtype=torch.bfloat16)
    lo = torch.clamp(torch.arange(9) - 2, min=0)
    branches.chunk_forward(q, k, k, lo, torch.arange(1, 10), [(0, 9, 0, 9)], 0.5,
                           on_probs=lambda r0, r1, s0, p: seen.append(p.dtype))  # fmt: skip
    assert seen == [torch.float32]
