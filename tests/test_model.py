"""`nsa_impl.model`: the decoder block and the toy LM (one plan per forward for all layers,
decode equals prefill, greedy generation, training lowers the loss)."""

from __future__ import annotations

import pytest
import torch

import nsa_impl.module as module_mod
from nsa_impl.model import NSADecoderBlock, NSAToyLM, train_toy
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
