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

    def new_caches(self, batch_size: int, *, max_len: int | None = None,
                   **options) -> list[NSACache]:
        """One empty decode cache per block (``max_len`` and ``options`` go to `NSACache`)."""
        return [block.new_cache(batch_size, max_len=max_len, **options) for block in self.blocks]

    def forward(self, tokens: torch.Tensor, *, cu_seqlens=None, caches=None) -> torch.Tensor:
        """``tokens [B, T]`` (int64) -> logits ``[B, T, vocab]``.

        ``caches`` (from `new_caches`): the first call prefills them, later calls decode
        ``tokens [B, 1]`` (or a chunk ``[B, C]``) at each sequence's next position, as in
        `NSAAttention`. Without caches one `nsa_impl.Plan` is built per forward and shared by
        every block.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError("tokens must be a [B, T] tensor of token ids")
        if caches is not None and len(caches) != len(self.blocks):
            raise ValueError(f"caches must hold {len(self.blocks)} caches, got {len(caches)}")
        x = self.embed(tokens)
        plan = None if caches is not None else self.blocks[0].plan_for(x, cu_seqlens)
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x = block(x, cu_seqlens=cu_seqlens, cache=cache, plan=plan)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, cuda_graph: bool = False,
                 **cache_options) -> torch.Tensor:
        """Greedy decoding: ``prompt [B, T0]`` -> ``[B, T0 + max_new_tokens]`` token ids.

        The prompt is prefilled in one call (`NSACache.prefill`), then one token per step
        through caches with ``max_len = T0 + max_new_tokens``. ``cuda_graph=True`` (CUDA only,
        the Triton decode path) captures one whole model step (embedding, every layer, the head
        and the argmax) in a CUDA graph after a first eager step and replays it for the rest,
        telling each cache (`NSACache.note_replay`); the tokens are those of the eager loop.
        ``cache_options`` go to `NSACache` (e.g. ``path``, ``splits``).
        """
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype != torch.long:
            raise ValueError("prompt must be an int64 [B, T0] tensor of token ids")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if cuda_graph and not prompt.is_cuda:
            raise ValueError("cuda_graph=True needs a CUDA model and prompt")
        B, T0 = prompt.shape
        caches = self.new_caches(B, max_len=T0 + max_new_tokens, **cache_options)
        out = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=prompt.device)
        out[:, :T0] = prompt
        token = self(prompt, caches=caches)[:, -1:].argmax(-1)
        out[:, T0 : T0 + 1] = token
        if not cuda_graph:
            for t in range(T0 + 1, T0 + max_new_tokens):
                token = self(token, caches=caches)[:, -1:].argmax(-1)
                out[:, t : t + 1] = token
            return out
        if any(c.path != "triton" for c in caches):
            raise ValueError("cuda_graph=True needs the Triton decode path in every layer")
        steps = max_new_tokens - 1
        if steps == 0:
            return out
        # One eager step compiles every kernel; the captured step then reads and writes the
        # static token buffer and writes its token at a device-side column index.
        token = self(token, caches=caches)[:, -1:].argmax(-1)
        out[:, T0 + 1 : T0 + 2] = token
        static = token.clone()
        column = torch.full((1,), T0 + 2, dtype=torch.long, device=prompt.device)
        for cache in caches:
            cache.reserve(steps - 1)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static.copy_(self(static, caches=caches)[:, -1:].argmax(-1))
            out.index_copy_(1, column, static)
            column.add_(1)
        for _ in range(steps - 1):
            graph.replay()
            for cache in caches:
                cache.note_replay(1)
        return out


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
