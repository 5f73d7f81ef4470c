"""`nsa_impl.model.dense.DenseAttention`: the dense baseline never crosses a document.

In float64, against a written-out masked softmax (block-diagonal causal mask), and packed
sequences against the same sequences run one by one.
"""

from __future__ import annotations

import math

import pytest
import torch

from nsa_impl.model import NSADecoderBlock, NSAToyLM
from nsa_impl.model.dense import DenseAttention
from nsa_impl.module import apply_rope, rope_cos_sin, sequence_positions
from nsa_impl.tolerances import EXACT_ATOL

CU = torch.tensor([0, 7, 20, 33], dtype=torch.int32)


def module(rope=True, G=2) -> DenseAttention:
    torch.manual_seed(0)
    return DenseAttention(24, 4, G, 6, rope=rope).double()


def explicit(m: DenseAttention, x: torch.Tensor, cu: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with a block-diagonal causal mask, written out."""
    B, T, _ = x.shape
    H, G, D = m.num_heads, m.num_kv_heads, m.head_dim
    q = m.q_proj(x).view(B, T, H, D)
    k = m.k_proj(x).view(B, T, G, D)
    v = m.v_proj(x).view(B, T, G, D)
    if m.rope:
        cos, sin = rope_cos_sin(sequence_positions(T, cu, x.device), D, m.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    seq = torch.zeros(T, dtype=torch.long) if cu is None else torch.bucketize(
        torch.arange(T), cu[1:].long(), right=True
    )  # fmt: skip
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & (seq[:, None] == seq[None, :])
    out = torch.empty(B, T, H, D, dtype=x.dtype)
    for h in range(H):
        g = h // (H // G)
        logits = q[:, :, h] @ k[:, :, g].transpose(-1, -2) / math.sqrt(D)
        p = logits.masked_fill(~allowed, -math.inf).softmax(-1)
        out[:, :, h] = p @ v[:, :, g]
    return m.o_proj(out.reshape(B, T, H * D))


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_matches_the_block_diagonal_causal_formula(rope, G):
    m = module(rope, G)
    x = torch.randn(1, 33, 24, dtype=torch.float64)
    for cu in (None, CU):
        got, want = m(x, cu_seqlens=cu), explicit(m, x, cu)
        assert (got - want).abs().max() <= EXACT_ATOL


def test_packed_equals_each_sequence_alone():
    m = module()
    x = torch.randn(1, 33, 24, dtype=torch.float64)
    packed = m(x, cu_seqlens=CU)
    bounds = CU.tolist()
    for s, e in zip(bounds, bounds[1:], strict=False):
        alone = m(x[:, s:e])
        assert (packed[:, s:e] - alone).abs().max() <= EXACT_ATOL


def test_a_change_in_one_document_stays_there():
    m = module()
    x = torch.randn(1, 33, 24, dtype=torch.float64)
    y = x.clone()
    y[0, 12] += 1.0  # inside the second document [7, 20)
    a, b = m(x, cu_seqlens=CU), m(y, cu_seqlens=CU)
    changed = (a - b).abs().amax(dim=(0, 2)) > 0
    assert changed[12:20].all() and not changed[:12].any() and not changed[20:].any()


def test_block_and_lm_take_the_dense_option():
    block = NSADecoderBlock(24, 4, 2, 6, attention="dense", rope=True)
    assert isinstance(block.attn, DenseAttention)
    lm = NSAToyLM(256, 24, 4, 2, 6, num_layers=2, attention="dense")
    tokens = torch.randint(0, 256, (1, 33))
    logits = lm(tokens, cu_seqlens=CU)
    logits.sum().backward()
    assert logits.shape == (1, 33, 256)
    assert all(p.grad is not None for p in lm.parameters())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="attention must be one of"):
        NSADecoderBlock(24, 4, 2, 6, attention="flash")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        DenseAttention(24, 4, 3, 6)
    with pytest.raises(TypeError, match="has no decode cache"):
        module()(torch.randn(1, 3, 24, dtype=torch.float64), cache=object())
    with pytest.raises(ValueError, match="cu_seqlens must end at the packed length"):
        module()(torch.randn(1, 30, 24, dtype=torch.float64), cu_seqlens=CU)
    with pytest.raises(TypeError, match="unexpected keyword"):
        NSADecoderBlock(24, 4, 2, 6, attention="dense", phi="mlp")  # an NSA-only option
