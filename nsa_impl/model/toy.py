"""A toy NSA language model and a few-step training loop on random tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nsa_ref.config import NSAConfig

from ..decode import NSACache
from .block import NSADecoderBlock

#: A configuration small enough that a 64-token toy sequence exercises every branch: compressed
#: blocks from token 8, more selection blocks than ``sel_top_n`` after 32 tokens, a window of 16.
TOY_CONFIG = NSAConfig(
    cmp_block=8,
    cmp_stride=4,
    sel_block=8,
    sel_top_n=4,
    sel_init_blocks=1,
    sel_local_blocks=2,
    window=16,
)


class NSAToyLM(nn.Module):
    """Embedding, ``num_layers`` `NSADecoderBlock` s, RMSNorm and a linear head.

    Args:
        vocab_size: number of token ids.
        hidden_size, num_heads, num_kv_heads, head_dim, config: per block (see `NSAAttention`).
        num_layers: decoder blocks.
        **block_options: further keyword options of `NSADecoderBlock`.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        config: NSAConfig = TOY_CONFIG,
        *,
        num_layers: int = 1,
        **block_options,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.blocks = nn.ModuleList(
            NSADecoderBlock(hidden_size, num_heads, num_kv_heads, head_dim, config, **block_options)
            for _ in range(num_layers)
        )
        self.norm = nn.RMSNorm(hidden_size)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False)

    def new_caches(self, batch_size: int) -> list[NSACache]:
        """One empty decode cache per block."""
        return [block.new_cache(batch_size) for block in self.blocks]

    def forward(self, tokens: torch.Tensor, *, cu_seqlens=None, caches=None) -> torch.Tensor:
        """``tokens [B, T]`` (int64) -> logits ``[B, T, vocab]``.

        ``caches`` (from `new_caches`) decodes one position per call, as in `NSAAttention`.
        Without caches one `nsa_impl.Plan` is built per forward and shared by every block.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError("tokens must be a [B, T] tensor of token ids")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold {len(self.blocks)} caches, got {len(caches)}")
        x = self.embed(tokens)
        plan = None if caches is not None else self.blocks[0].attn.plan_for(x, cu_seqlens)
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x = block(x, cu_seqlens=cu_seqlens, cache=cache, plan=plan)
        return self.head(self.norm(x))


def train_toy(
    *,
    steps: int = 8,
    batch_size: int = 2,
    seq_len: int = 64,
    vocab_size: int = 32,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    num_layers: int = 1,
    config: NSAConfig = TOY_CONFIG,
    lr: float = 1e-2,
    seed: int = 0,
    **block_options,
) -> list[float]:
    """Train `NSAToyLM` for ``steps`` Adam steps on one fixed batch of random tokens.

    Next-token cross-entropy on a batch the model can memorise, so the loss should fall. Returns
    the loss of every step (before its update). Deterministic for a given ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the model's init must not disturb the caller's RNG
        torch.manual_seed(seed)
        model = NSAToyLM(
            vocab_size,
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            config,
            num_layers=num_layers,
            **block_options,
        )
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses
