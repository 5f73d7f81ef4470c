"""Launch shapes of the Triton kernels and the per-GPU-class profiles that hold their defaults.

Every launcher in `nsa_impl.kernels.triton_attn`, `triton_topn` and `triton_gate` takes an
explicit tuning object (``tuning=``); when it is ``None`` the launcher asks `profile_for` the
device's profile. Benchmarks sweep launch shapes by passing objects built with
`dataclasses.replace`, never by editing module state.

A profile is one JSON file per GPU class in ``nsa_impl/kernels/profiles/`` (``sm90.json``:
Hopper, ``sm89.json``: Ada, ``sm80.json``: Ampere, ``cpu.json``: the Triton interpreter). It also
carries the router's thresholds and preferences (``routing``: whether the Triton selection path
is preferred and from which sequence length, the order of paths for the compressed and window
branches, whether the gate is fused) and says whether its numbers were ``measured`` or are
predictions. `nsa_impl.dispatch` reads the routing data when it builds a route, and
`nsa_impl.explain` names the profile it used.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

PROFILE_DIR = Path(__file__).with_name("profiles")
#: Capability (major, minor) -> profile name; other CUDA devices take the closest lower entry.
_CLASSES = (((9, 0), "sm90"), ((8, 9), "sm89"), ((8, 0), "sm80"))


def next_pow2(x: int) -> int:
    """The smallest power of two ``>= x`` (1 for ``x <= 1``)."""
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass(frozen=True)
class Launch:
    """One kernel's launch shape.

    Attributes:
        rows: query rows per program (forward, dQ, scores) or per step (dK/dV): positions times
            the group's heads padded to a power of two; rounded to whole positions.
        block_n: keys per step (forward, dQ) or keys per program (dK/dV).
        warps: ``num_warps``.
        stages: ``num_stages`` (software-pipelining depth).
        chunk: dK/dV only: query positions per work item (long key ranges are split into items
            whose partial sums a second kernel adds in a fixed order).
    """

    rows: int = 64
    block_n: int = 64
    warps: int = 4
    stages: int = 2
    chunk: int = 4096

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Launch.{f.name} must be a positive int, got {value!r}")
        for name in ("rows", "block_n", "warps"):
            if next_pow2(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"Launch.{name} must be a power of two, got {getattr(self, name)}")


@dataclass(frozen=True)
class AttnTuning:
    """Launch shapes of the row-range attention kernels (compressed branch or window).

    ``dq_atomic``: the dK/dV kernel also adds dQ with float32 atomics (5 matrix products for
    the backward instead of 7; dQ then varies run to run in its last bits, as FlashAttention-2's
    does). ``False`` (a separate dQ kernel) keeps every gradient bit-identical run to run.
    """

    fwd: Launch = Launch(rows=128, block_n=64, warps=8, stages=2)
    dq: Launch = Launch(rows=128, block_n=64, warps=8, stages=2)
    dkdv: Launch = Launch(rows=64, block_n=64, warps=8, stages=1, chunk=4096)
    dq_atomic: bool = False

    def as_list(self) -> list[int]:
        """The launch shapes as 16 ints (how the custom ops take them): fwd, dq, dkdv, atomic."""
        out = [getattr(lt, f.name) for lt in (self.fwd, self.dq, self.dkdv) for f in fields(lt)]
        return out + [int(self.dq_atomic)]

    @classmethod
    def from_list(cls, values: list[int]) -> AttnTuning:
        """Inverse of `as_list` (cached: every kernel call rebuilds its shape from the list its
        custom op takes, and validating three `Launch` objects costs ~9 µs)."""
        return _attn_tuning(cls, tuple(values))


@functools.lru_cache(maxsize=64)
def _attn_tuning(cls: type, values: tuple[int, ...]) -> AttnTuning:
    n = len(fields(Launch))
    launches = [Launch(*values[i * n : (i + 1) * n]) for i in range(3)]
    return cls(*launches, dq_atomic=bool(values[3 * n]))


@dataclass(frozen=True)
class TopNTuning:
    """Launch shape of the fused selection-score + top-n kernel.

    ``positions`` query positions share a program (all heads of the group: ``positions * h``
    rows); at least 16 (the Eq. 9 band is an MMA over positions). ``block_n`` compressed blocks
    per band.
    """

    positions: int = 16
    block_n: int = 64
    warps: int = 8
    stages: int = 1

    def __post_init__(self):
        for name in ("positions", "block_n", "warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or next_pow2(value) != value:
                raise ValueError(
                    f"TopNTuning.{name} must be a positive power of two, got {value!r}"
                )
        if self.positions < 16 or self.block_n < 16:
            raise ValueError(f"TopNTuning positions and block_n must be >= 16, got {self}")

    def as_list(self) -> list[int]:
        """The fields as ints (how the custom op takes them)."""
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True)
class TopNTile:
    """A `TopNTuning` resolved for one call (see `resolve_topn`).

    Attributes:
        P: positions per program; BN: compressed blocks per band; warps, stages: launch options.
        KC: ``0``: the query tile stays in registers for the whole program; ``> 0``: float64
            logits summed over ``KC``-column slices of ``q`` and the keys, reloaded per band.
    """

    P: int
    BN: int
    warps: int
    stages: int
    KC: int


#: float32 top-n (float64 logits): compressed blocks per band, warps, column slice of q / keys.
#: Chosen with ``bench/aot_compile.py`` for sm_90 (shared memory and spills at h=16, Dk=128/192).
TOPN_FP32 = dict(block_n=32, warps=16, kc=32)


def resolve_topn(tn: TopNTuning, ieee: bool, dk: int = 128) -> TopNTile:
    """Concrete tile of ``tn`` for head dim ``dk``. float32 inputs (``ieee``) form float64
    logits: a resident float64 query tile of ``positions * 16`` rows does not fit in shared
    memory (256 KB at Dk=128 against sm_90's 227 KB), so they take `TOPN_FP32`: at most 32
    blocks per band, at least 16 warps and 32-column slices (`nsa_impl.kernels._topn_kernels`).
    fp16/bf16 keep ``tn``, with at least 8 warps above 128 head dims (the resident ``[256, 256]``
    query tile spilled 568 bytes at 4 warps, none at 8: ``bench/aot_compile.py``, Dk=192)."""
    if not ieee:
        warps = tn.warps if next_pow2(dk) <= 128 else max(tn.warps, 8)
        return TopNTile(P=tn.positions, BN=tn.block_n, warps=warps, stages=tn.stages, KC=0)
    return TopNTile(P=tn.positions, BN=min(tn.block_n, TOPN_FP32["block_n"]),
                    warps=max(tn.warps, TOPN_FP32["warps"]), stages=tn.stages,
                    KC=TOPN_FP32["kc"])


@dataclass(frozen=True)
class GateTuning:
    """Launch shape of the fused gate combine: (token, head) rows per program, warps."""

    rows: int = 32
    warps: int = 4

    def as_list(self) -> list[int]:
        """The fields as ints (how the custom ops take them)."""
        return [self.rows, self.warps]


@dataclass(frozen=True)
class Profile:
    """Defaults of one GPU class (module docstring)."""

    name: str
    measured: bool
    note: str
    routing: Mapping[str, object] = field(default_factory=dict)
    cmp: AttnTuning = AttnTuning()
    win: AttnTuning = AttnTuning()
    topn: TopNTuning = TopNTuning()
    gate: GateTuning = GateTuning()

    def route(self, key: str, default):
        """A routing entry of this profile, ``default`` when it has none."""
        return self.routing.get(key, default)


def _attn(raw: Mapping) -> AttnTuning:
    launches = {k: Launch(**raw[k]) for k in ("fwd", "dq", "dkdv") if k in raw}
    return AttnTuning(**launches, dq_atomic=bool(raw.get("dq_atomic", False)))


@functools.cache
def load_profile(name: str) -> Profile:
    """The profile ``profiles/<name>.json`` (cached). ``ValueError`` for an unknown name."""
    path = PROFILE_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
        raise ValueError(f"unknown kernel profile {name!r}; known: {known}")
    raw = json.loads(path.read_text())
    return Profile(
        name=raw["name"],
        measured=bool(raw["measured"]),
        note=str(raw.get("note", "")),
        routing=dict(raw.get("routing", {})),
        cmp=_attn(raw.get("cmp", {})),
        win=_attn(raw.get("win", {})),
        topn=TopNTuning(**raw.get("topn", {})),
        gate=GateTuning(**raw.get("gate", {})),
    )


def profile_name(device) -> str:
    """Profile name for a ``torch.device`` (or its type string): ``cpu`` or the CUDA class."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    cap = torch.cuda.get_device_capability(dev)
    for floor, name in _CLASSES:
        if cap >= floor:
            return name
    return "sm80"  # below Ampere nothing runs; the kernels' supports() say so


_OVERRIDE: contextvars.ContextVar[Profile | None] = contextvars.ContextVar(
    "nsa_kernel_profile", default=None
)


@contextlib.contextmanager
def use_profile(profile: Profile) -> Iterator[Profile]:
    """Within the context, `profile_for` returns ``profile`` for every device.

    How a benchmark runs the whole library on launch shapes it just measured (an explicit
    object, scoped like `nsa_impl.dispatch.force_path`; no file or module state changes).
    """
    if not isinstance(profile, Profile):
        raise TypeError(f"profile must be a tuning.Profile, got {type(profile).__name__}")
    token = _OVERRIDE.set(profile)
    try:
        yield profile
    finally:
        _OVERRIDE.reset(token)


def profile_for(device) -> Profile:
    """The `Profile` of ``device`` (see `profile_name`), or the one `use_profile` set."""
    override = _OVERRIDE.get()
    return override if override is not None else load_profile(profile_name(device))


def profile_dict(profile: Profile) -> dict:
    """``profile`` as the JSON object of a profile file (the inverse of `load_profile`)."""
    from dataclasses import asdict

    return {
        "name": profile.name, "measured": profile.measured, "note": profile.note,
        "routing": dict(profile.routing),
        **{k: asdict(getattr(profile, k)) for k in ("cmp", "win", "topn", "gate")},
    }


@dataclass(frozen=True)
class Tile:
    """A `Launch` resolved for one call: positions per program/step, padded heads, rows, keys."""

    P: int
    HP: int
    BM: int
    BN: int
    warps: int
    stages: int
    chunk: int


#: Warps of the row-range dK/dV kernel when the padded head dims sum above 256 (Dk = 192 pads
#: to 256): measured at Dk/Dv = 192/128, T = 64k on an H200 (`bench/range_sweep.py`, session 5):
#: 8 -> 4 warps took the window dK/dV 29.0 -> 22.8 ms and the compressed one 96.5 -> 69.3 ms.
WIDE_DKDV_WARPS = 4


def resolve(launch: Launch, h: int, dk: int, dv: int, ieee: bool, dkdv: bool = False) -> Tile:
    """Concrete tile of ``launch`` for group size ``h`` and head dims (no device work).

    Rows become whole positions (``P = rows // HP``, at least one, so at least ``HP >= 16`` rows
    when ``h`` is large). float32 inputs (float64 operands) cap rows and keys at 32 so that the
    tiles fit in shared memory; head dims above 128 halve the key block (register pressure of
    the ``[rows, Dv]`` accumulator) and, for the dK/dV launch (``dkdv``), cap its warps at
    `WIDE_DKDV_WARPS`.
    """
    HP = next_pow2(h)
    rows, bn, warps = launch.rows, launch.block_n, launch.warps
    if ieee:
        rows, bn = min(rows, 32), min(bn, 32)
    if next_pow2(dk) + next_pow2(dv) > 256:
        bn = min(bn, 32)
        if dkdv:
            warps = min(warps, WIDE_DKDV_WARPS)
    P = max(1, rows // HP)
    BM = max(16, P * HP)
    P = BM // HP
    bn = max(16, bn)
    chunk = max(P, (launch.chunk // P) * P)  # items are whole steps
    return Tile(P=P, HP=HP, BM=BM, BN=bn, warps=warps, stages=launch.stages, chunk=chunk)
