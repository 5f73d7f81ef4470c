"""`NSAConfig`: the one definition of NSA's hyper-parameters (spec I.2).

`nsa_impl.NSAConfig` is this same class, re-exported.
"""

from __future__ import annotations

from dataclasses import dataclass

from .scalars import as_int


@dataclass(frozen=True)
class NSAConfig:
    """NSA hyper-parameters, paper defaults (spec I.2, paper §4.1).

    Attributes:
        cmp_block: ``l``, compression block length in tokens.
        cmp_stride: ``d``, stride between compression blocks; must divide ``cmp_block`` and
            ``sel_block``.
        sel_block: ``l'``, selection block length in tokens.
        sel_top_n: ``n``, blocks selected per (query, KV group), forced blocks included.
        sel_init_blocks: leading blocks ``0 .. sel_init_blocks-1`` that are always selected.
        sel_local_blocks: the current block and the ``sel_local_blocks-1`` blocks before it,
            always selected.
        window: ``w``, sliding-window length: a query at ``p`` sees keys ``p-w < s <= p``.

    Invalid values raise ``ValueError`` (``TypeError`` for a non-integer) naming the field;
    nothing is clamped. numpy integers are accepted and stored as ``int``.
    """

    cmp_block: int = 32
    cmp_stride: int = 16
    sel_block: int = 64
    sel_top_n: int = 16
    sel_init_blocks: int = 1
    sel_local_blocks: int = 2
    window: int = 512

    def __post_init__(self) -> None:
        minimum = dict.fromkeys(("sel_init_blocks", "sel_local_blocks"), 0)
        for name in self.__dataclass_fields__:
            value = as_int(f"NSAConfig.{name}", getattr(self, name), minimum=minimum.get(name, 1))
            object.__setattr__(self, name, value)  # frozen: store the plain int
        if self.cmp_block % self.cmp_stride:
            raise ValueError(
                f"NSAConfig.cmp_stride (d={self.cmp_stride}) must divide "
                f"cmp_block (l={self.cmp_block})"
            )
        if self.sel_block % self.cmp_stride:
            raise ValueError(
                f"NSAConfig.cmp_stride (d={self.cmp_stride}) must divide "
                f"sel_block (l'={self.sel_block})"
            )
        if self.sel_top_n < self.forced_blocks:
            raise ValueError(
                f"NSAConfig.sel_top_n (n={self.sel_top_n}) must be >= the forced blocks "
                f"sel_init_blocks + sel_local_blocks = {self.forced_blocks}"
            )

    @property
    def forced_blocks(self) -> int:
        """Upper bound on the number of forced blocks per query (init + local)."""
        return self.sel_init_blocks + self.sel_local_blocks

    def num_cmp(self, p: int) -> int:
        """Compressed blocks visible to query position ``p`` (0-based), spec I.3 / Eq. 7."""
        l, d = self.cmp_block, self.cmp_stride
        return 0 if p + 1 < l else (p + 1 - l) // d + 1

    def num_sel_blocks(self, T: int) -> int:
        """Selection blocks covering ``T`` tokens: ``ceil(T / l')``."""
        return -(-T // self.sel_block)

    def decode_read_bound(self, S: int) -> int:
        """Upper bound of keys read at a decode step with ``S`` cached tokens (spec I.9)."""
        return self.num_cmp(S - 1) + self.sel_top_n * self.sel_block + min(self.window, S)
