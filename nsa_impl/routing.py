"""Routing flags: the ``NSA_*`` environment variables of API.md, parsed once.

`Settings` is the frozen record of the flags, parsed **once** (on first use of `settings`);
`reload_settings` re-reads them (tests). Unknown ``NSA_*`` variables warn and name the known
ones; a malformed value raises ``ValueError`` naming the variable. The dispatcher
(`nsa_impl.dispatch`) reads them when it builds a plan's route; nothing reads the environment in
a hot path.

Flags (boolean values: 1/0, true/false, yes/no, on/off):

=========================  =======  ==========================================================
``NSA_FORCE_PARITY``       0        every branch runs on the "reference" path (`nsa_ref`)
``NSA_USE_CMP_MASK``       1        compressed branch may use "masked" (else: reference)
``NSA_USE_WIN_MASK``       1        window branch may use "masked" (else: flash or reference)
``NSA_USE_SEL_PACK``       1        selection may use "packed" (else: "masked")
``NSA_SEL_VARLEN_V2``      0        selection prefers "varlen" over "packed"
``NSA_SEL_VARLEN_MIN_L``   unset    int, passed to the varlen selection path as its threshold
``NSA_USE_TRITON_SEL``     1        selection may use "triton" on CUDA when available
``NSA_TRITON_SEL_FORCE``   0        selection uses "triton" whatever the device (CPU tensors
                                    need ``TRITON_INTERPRET=1``)
``NSA_USE_FA2``            1        FlashAttention-2 paths may be used when available
``NSA_USE_FA2_CMP``        =FA2     compressed branch may use "flash" (FA-2 + Triton scores)
``NSA_USE_FA2_WIN``        =FA2     window branch may use "flash"
``NSA_DEBUG_TIMING``       0        an active `nsa_impl.observe.Collector` times each branch
                                    (CUDA events on a GPU); not a routing choice
=========================  =======  ==========================================================

Beside the flags, the device profiles (`nsa_impl.kernels.tuning`, one JSON file per GPU class)
hold the router's data: whether the Triton selection path is preferred and from which sequence
length (``sel_triton``, ``sel_triton_min_len``), the order in which the compressed and window
branches try their paths (``cmp``, ``win``) and whether the gate is fused (``gate_triton``);
`nsa_impl.dispatch` reads them when it builds a route, and `nsa_impl.explain` names the profile.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")


def _parse_int(name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a non-negative integer") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r}: expected a non-negative integer")
    return value


#: Environment variable -> (Settings field, parser). Defaults live on `Settings`.
FLAGS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "NSA_FORCE_PARITY": ("force_parity", _parse_bool),
    "NSA_USE_WIN_MASK": ("use_win_mask", _parse_bool),
    "NSA_USE_CMP_MASK": ("use_cmp_mask", _parse_bool),
    "NSA_USE_SEL_PACK": ("use_sel_pack", _parse_bool),
    "NSA_SEL_VARLEN_V2": ("sel_varlen_v2", _parse_bool),
    "NSA_SEL_VARLEN_MIN_L": ("sel_varlen_min_len", _parse_int),
    "NSA_USE_TRITON_SEL": ("use_triton_sel", _parse_bool),
    "NSA_TRITON_SEL_FORCE": ("triton_sel_force", _parse_bool),
    "NSA_USE_FA2": ("use_fa2", _parse_bool),
    "NSA_USE_FA2_CMP": ("use_fa2_cmp", _parse_bool),
    "NSA_USE_FA2_WIN": ("use_fa2_win", _parse_bool),
    "NSA_DEBUG_TIMING": ("debug_timing", _parse_bool),
}

#: ``NSA_*`` variables of the project's tooling (nox, conformance, peers), not routing flags:
#: set in the same processes, never warned about.
TOOLING_VARIABLES = frozenset({
    "NSA_CONSTRAINTS", "NSA_TORCH_SPEC", "NSA_TRITON_SPEC", "NSA_GPU_MATRIX_PYTHON",
    "NSA_FLASH_NSA_PATH", "NSA_CONFORMANCE_DEVICE", "NSA_CONFORMANCE_EXAMPLES",
    "NSA_CONFORMANCE_IMPL", "NSA_CONFORMANCE_LANES",
})


@dataclass(frozen=True)
class Settings:
    """The routing flags (module docstring), read once from the environment.

    ``use_fa2_cmp`` / ``use_fa2_win`` are ``None`` when unset (they then follow ``use_fa2``).
    ``triton_interpret`` mirrors ``TRITON_INTERPRET`` (triton's own CPU interpreter switch).
    ``source`` keeps the raw ``NSA_*`` values that were set, for `explain`.
    """

    force_parity: bool = False
    use_win_mask: bool = True
    use_cmp_mask: bool = True
    use_sel_pack: bool = True
    sel_varlen_v2: bool = False
    sel_varlen_min_len: int | None = None
    use_triton_sel: bool = True
    triton_sel_force: bool = False
    use_fa2: bool = True
    use_fa2_cmp: bool | None = None
    use_fa2_win: bool | None = None
    debug_timing: bool = False
    triton_interpret: bool = False
    source: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def fa2_win(self) -> bool:
        """Whether the window branch may use FlashAttention-2."""
        return self.use_fa2 if self.use_fa2_win is None else self.use_fa2_win

    @property
    def fa2_cmp(self) -> bool:
        """Whether FlashAttention-2 was asked for the compressed branch."""
        return self.use_fa2 if self.use_fa2_cmp is None else self.use_fa2_cmp

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Parse ``environ``; warn about unknown ``NSA_*`` names."""
        unknown = sorted(n for n in environ if n.startswith("NSA_") and n not in FLAGS
                         and n not in TOOLING_VARIABLES)  # fmt: skip
        if unknown:
            warnings.warn(
                f"unknown NSA_* environment variable(s) {unknown} ignored; known flags: "
                f"{', '.join(FLAGS)}",
                RuntimeWarning,
                stacklevel=3,
            )
        values, source = {}, {}
        for name, (attr, parse) in FLAGS.items():
            if name in environ:
                values[attr] = parse(name, environ[name])
                source[name] = environ[name]
        interpret = environ.get("TRITON_INTERPRET", "0")
        values["triton_interpret"] = interpret.strip().lower() in _TRUE
        return cls(**values, source=source)


_SETTINGS: Settings | None = None


def settings() -> Settings:
    """The process-wide `Settings`, parsed from ``os.environ`` on first use."""
    global _SETTINGS
    if _SETTINGS is None:
        _SETTINGS = Settings.from_environ(os.environ)
    return _SETTINGS


def reload_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Re-read the flags (from ``environ``, default ``os.environ``).

    Plans built afterwards route by the new flags (availability probes are cached per
    `Settings` value by the dispatcher); plans built before keep their route.
    """
    global _SETTINGS
    _SETTINGS = Settings.from_environ(os.environ if environ is None else environ)
    return _SETTINGS
