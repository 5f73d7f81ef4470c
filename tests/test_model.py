"""`nsa_impl.model`: the decoder block and the toy LM (one plan per forward for all layers,
decode equals prefill, greedy generation, training lowers the loss), and the dense baseline
`nsa_impl.model.dense.DenseAttention` (never crosses a document: in float64 against a written-out
block-diagonal causal softmax, and packed sequences against the same sequences run one by one).
"""

from __future__ import annotations

import math

import pytest
import torch

import nsa_impl.module as module_mod
from nsa_impl.model import NSADecoderBlock, NSAToyLM, train_toy
from nsa_impl.model.dense import DenseAttention
from nsa_impl.module import apply_rope, rope_cos_sin, sequence_positions
from nsa_impl.tolerances import EXACT_ATOL
from nsa_ref import NSAConfig

CFG = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=5)
HIDDEN = 12


def randn(*shape, dtype=torch.float64, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_one_plan_per_forward_serves_every_layer(monkeypatch):
    model = NSAToyLM(17, HIDDEN, 4, 2, 4, CFG, num_layers=3, rope=True).double()
    tokens = torch.randint(0, 17, (1, 12), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    built = []
    real = module_mod.make_plan
    monkeypatch.setattr(module_mod, "make_plan", lambda *a, **k: built.append(1) or real(*a, **k))
    out = model(tokens, cu_seqlens=cu)
    assert built == [1] and out.shape == (1, 12, 17)


def test_decoder_block_and_model_decode_equal_prefill():
    """The decoder block keeps shapes; the toy model decodes (per-block caches) what it prefills."""
    torch.manual_seed(0)
    block = NSADecoderBlock(HIDDEN, 4, 2, 4, CFG, rope=True).double()
    x = randn(2, 9, HIDDEN)
    assert block(x).shape == x.shape
    model = NSAToyLM(17, HIDDEN, 4, 2, 4, CFG, num_layers=2, phi="mlp").double()
    tokens = torch.randint(0, 17, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        caches = model.new_caches(2)
        steps = [model(tokens[:, p : p + 1], caches=caches) for p in range(12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=EXACT_ATOL, rtol=0)


def test_toy_training_loss_decreases():
    """A few Adam steps on a fixed batch of random tokens lower the loss steadily, with every
    option of the layer switched on."""
    losses = train_toy(steps=6, phi="mlp", rope=True, separate_branch_kv=True, gate_hidden=16)
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses
    assert losses[-1] < 0.8 * losses[0], losses


def test_generate_is_greedy_decoding_of_the_full_forward():
    """`NSAToyLM.generate` (prefill, then one cached step per token) picks, at every step, the
    argmax of the full forward over the sequence so far; bad arguments are named."""
    torch.manual_seed(0)
    model = NSAToyLM(23, HIDDEN, 4, 2, 4, CFG, num_layers=2, rope=True).double()
    prompt = torch.randint(0, 23, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(prompt, 9)
        assert out.shape == (2, 14) and torch.equal(out[:, :5], prompt)
        for t in range(5, 14):
            assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1)), t
    with pytest.raises(ValueError, match="int64"):
        model.generate(prompt.float(), 2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        model.generate(prompt, 0)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA"):
        model.generate(prompt, 2, cuda_graph=True)


def test_dense_blocks_take_no_plan():
    """A toy LM of dense blocks builds no plan (dense attention has none) and a dense block
    refuses one; the NSA block builds the plan its attention would."""
    model = NSAToyLM(17, HIDDEN, 4, 2, 4, CFG, num_layers=2, attention="dense").double()
    tokens = torch.randint(0, 17, (1, 12), generator=torch.Generator().manual_seed(0))
    assert model(tokens).shape == (1, 12, 17)
    x = randn(1, 12, HIDDEN)
    assert model.blocks[0].plan_for(x) is None
    nsa = NSADecoderBlock(HIDDEN, 4, 2, 4, CFG).double()
    plan = nsa.plan_for(x)
    with pytest.raises(ValueError, match="dense"):
        model.blocks[0](x, plan=plan)
    torch.testing.assert_close(nsa(x, plan=plan), nsa(x), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------
# DenseAttention (nsa_impl/model/dense.py)

CU = torch.tensor([0, 7, 20, 33], dtype=torch.int32)


def dense_module(rope=True, G=2) -> DenseAttention:
    torch.manual_seed(0)
    return DenseAttention(24, 4, G, 6, rope=rope).double()


def dense_explicit(m: DenseAttention, x: torch.Tensor, cu: torch.Tensor | None) -> torch.Tensor:
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
def test_dense_matches_the_block_diagonal_causal_formula(rope, G):
    m = dense_module(rope, G)
    x = torch.randn(1, 33, 24, dtype=torch.float64)
    for cu in (None, CU):
        got, want = m(x, cu_seqlens=cu), dense_explicit(m, x, cu)
        assert (got - want).abs().max() <= EXACT_ATOL


def test_dense_packed_equals_each_sequence_alone():
    m = dense_module()
    x = torch.randn(1, 33, 24, dtype=torch.float64)
    packed = m(x, cu_seqlens=CU)
    bounds = CU.tolist()
    for s, e in zip(bounds, bounds[1:], strict=False):
        alone = m(x[:, s:e])
        assert (packed[:, s:e] - alone).abs().max() <= EXACT_ATOL


def test_dense_a_change_in_one_document_stays_there():
    m = dense_module()
    x = torch.randn(1, 33, 24, dtype=torch.float64)
    y = x.clone()
    y[0, 12] += 1.0  # inside the second document [7, 20)
    a, b = m(x, cu_seqlens=CU), m(y, cu_seqlens=CU)
    changed = (a - b).abs().amax(dim=(0, 2)) > 0
    assert changed[12:20].all() and not changed[:12].any() and not changed[20:].any()


def test_dense_block_and_lm_take_the_dense_option():
    block = NSADecoderBlock(24, 4, 2, 6, attention="dense", rope=True)
    assert isinstance(block.attn, DenseAttention)
    lm = NSAToyLM(256, 24, 4, 2, 6, num_layers=2, attention="dense")
    tokens = torch.randint(0, 256, (1, 33))
    logits = lm(tokens, cu_seqlens=CU)
    logits.sum().backward()
    assert logits.shape == (1, 33, 256)
    assert all(p.grad is not None for p in lm.parameters())


def test_dense_bad_arguments_are_named():
    with pytest.raises(ValueError, match="attention must be one of"):
        NSADecoderBlock(24, 4, 2, 6, attention="flash")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        DenseAttention(24, 4, 3, 6)
    with pytest.raises(TypeError, match="has no decode cache"):
        dense_module()(torch.randn(1, 3, 24, dtype=torch.float64), cache=object())
    with pytest.raises(ValueError, match="cu_seqlens must end at the packed length"):
        dense_module()(torch.randn(1, 30, 24, dtype=torch.float64), cu_seqlens=CU)
    with pytest.raises(TypeError, match="unexpected keyword"):
        NSADecoderBlock(24, 4, 2, 6, attention="dense", phi="mlp")  # an NSA-only option
