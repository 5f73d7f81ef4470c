"""Fused NSA decode on Triton (spec I.3-I.9): four launches for any number of query rows.

``decode_rows(...)`` computes the NSA output of ``R`` *rows*, each a query of sequence
``seq[r]`` at position ``pos[r]`` over that sequence's caches: one decode step of a (ragged)
batch is ``R = B`` rows at ``pos = lengths``; a chunk of ``C`` new tokens is ``R = B*C`` rows at
``lengths[b] + c`` after their K/V were appended. Everything is a tensor on the device or an
int, the grids depend only on sizes fixed when the workspace is built, and nothing is read back
to the host: a step is CUDA-graph capturable.

Design (why it looks like this)
-------------------------------
*Four launches.* K1 attends to the visible compressed blocks (split over ``NC`` programs) and to
the window (split over ``NW``) and stores the compressed logits; K2 turns the logits into the
group's block scores (Eqs. 9-10) chunk by chunk of ``CH`` selection blocks, each program keeping
its chunk's top-n (Eq. 11's order); K3 merges those lists into the exact top-n and attends to
the chosen blocks (split over ``NS``); K4 merges the splits, rounds each branch, gates (Eq. 5)
and, in a step, advances the lengths. A step cannot be fewer launches without a grid-wide
barrier: the scores need every compressed split's log-sum-exp, top-n needs every chunk, and
the gate needs every selection split.

*Append and emission inside K1.* In a step (``new`` given) K1's split 0 writes the new token's
raw K/V at row ``p`` of each branch buffer, and the split that holds compressed block
``i = num_cmp(p) - 1`` pools it (mean, the default phi) from the raw keys ``p+1-l .. p-1`` plus
the new token when it completes at this step (``i*d + l == p + 1``), writes it to the compressed
cache and uses it; the window splits take row ``p`` from the input. So no program reads what
another program of the same launch writes, and the append costs no launch.

*Flash-decoding splits.* At small batch a (row, group) pair has 4k compressed blocks and 1.5k
raw keys to read, too much for one SM; the splits spread them (K1 and K3 at about 4 programs
per SM each, a window split as long as a compressed one: `default_splits`).
A split's range is computed in the kernel from ``p``: splits past a row's visible range store an
empty partial at once, so a ragged batch costs what each row reads. Partials are float32
``(m, l, acc)`` in the workspace; K4 merges them in a fixed order (deterministic).

*Scores from logits, not from a second pass.* K1 stores ``s = scale * q.k_cmp`` (float32,
``R*H*num_cmp`` values: 1 MB per sequence at 64k, a quarter of a re-read of the compressed
keys); K2 forms ``exp(s - lse)`` with the log-sum-exp merged from K1's partials, sums the
group's heads (Eq. 10 before Eq. 9, like `nsa_impl.scoring`) and applies the band weights.

*Split top-n.* One program per (row, group) scoring all ``T/l'`` blocks and taking ``n`` argmax
rounds over them was 36-41 µs at every batch on an H200 (4 programs at B=1, each walking 16
heads x 4k logits). K2 is ``(R, G, NQ)`` programs of ``CH`` blocks each (the chunk's logits
gathered `score_heads` heads at a time: all at once where programs are few and latency rules,
one where they are many and registers rule), each storing its chunk's top-``min(n, CH)`` in
rank order; the global top-n is inside the union of those lists (a block of the global top-n
has fewer than ``n`` blocks of its chunk above it). K3's programs each merge the ``NQ * min(n, CH)``
candidates; program 0 of K3 stores the blocks and their key count. Candidates are one int64
each, the key's float32 bits (mapped to an order-preserving int) above the complemented block
index, so the int order is the spec's (forced, then higher score, then lower index), as
`nsa_impl.scoring.top_n`, and a top-n is ``n`` rounds of one plain max: an argmax with its
index and a second reduction to fetch the block were twice the cross-warp reductions per round.
Counting ranks (all pairs compared at once) was measured slower on an H200 (B=8, T=64k: K2
15.3 -> 18.3 µs, K3 13.1 -> 19.4 µs; K3's 256 candidates make 65k comparisons per program).

*Numerics.* fp16/bf16: MMAs in the input dtype with float32 accumulation and softmax (the
probabilities are rounded to the input dtype for ``p @ v``, as in FlashAttention). float32 (the
parity path): float64 logits, IEEE float32 ``p @ v``, libdevice ``exp``/``log`` on CUDA. Each
branch output is rounded to the input dtype and the gate rounds as `nsa_ref.reference.gate`
does: per operation for float32, once (float32 arithmetic) for fp16/bf16.

*Custom op.* The four launches are registered as one custom op, ``nsa::decode_rows``
(``torch.library.custom_op`` with the caches, the workspace, ``out`` and ``lengths`` declared as
mutated, and a fake), which `decode_rows` calls while ``torch.compile`` traces, so a compiled
model sees the step as one opaque node. Eagerly (and while a CUDA graph is captured) it calls
the launches directly: the Python custom-op dispatch costs about as much as the whole step (tens
of microseconds per call against a 35 us goal), and a replayed graph contains only the kernels
either way.

Interpreter: like the other kernel files, `_decode_kernels` is executed once per mode (CUDA
tensors: compiled; CPU tensors under ``TRITON_INTERPRET=1``: interpreted).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ._loader import load_kernel_module
from .ops import kernel_op

#: Launches per decode step (K1 cmp+window, K2 scores+top-n, K3 selection, K4 combine).
KERNELS_PER_STEP = 4

#: Head dims the kernels accept (tl.dot needs >= 16 after padding; 256 keeps a tile in registers).
MAX_HEAD_DIM = 256

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Compressed blocks / window keys per K1 tile, selection keys per K3 tile (bf16/fp16; float32
#: uses half: its float64 logit operands need twice the registers).
TILE = 64

#: Target programs per SM of the splits (K1, K3): 2, measured on an H200 (bench/decode_sweep.py,
#: 2026-12-03): half of 4's compressed splits cost 8 % less at B=32, T=64k and half the selection
#: splits 5 % less at B=8 (fewer partials to merge), never more elsewhere.
PROGRAMS_PER_SM = 2

#: Target programs per SM of K4 (heads per program).
COMBINE_PROGRAMS_PER_SM = 4

#: Most selection blocks one K2 program scores, and most elements of its logit gather.
SCORE_CHUNK = 64
SCORE_ELEMS = 8192

#: Heads per pass of K2's logit gather (a power of two), ``None``: by K2 programs per SM
#: (`score_heads`). An int forces it (sweeps, tests).
SCORE_HEADS: int | None = None

#: ``(num_warps, num_stages)`` of each launch on CUDA (bench/decode_sweep.py measures others;
#: K4 with 2 warps: 11.1 -> 6.2 µs at B=16, T=16k and 14.1 -> 7.4 at B=32, T=64k on an H200).
LAUNCH_OPTIONS = {"cmp_win": (4, 2), "score": (4, 1), "sel": (4, 2), "combine": (2, 1)}


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _cap_cmp(cap: int, l: int, d: int) -> int:
    """Compressed blocks a cache of ``cap`` tokens holds: ``max(1, num_cmp(cap - 1))``."""
    return max(1, (cap - l) // d + 1) if cap >= l else 1


def interpret_mode() -> bool:
    """``TRITON_INTERPRET=1``: CPU tensors may run the kernels in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def supports(dtype: torch.dtype, device: torch.device, Dk: int, Dv: int) -> tuple[bool, str]:
    """Can the decode kernels run for these inputs? ``(False, reason)`` instead of raising.

    Needs triton, fp16/bf16/fp32, head dims up to 256 and a CUDA device of compute capability
    >= 8.0 (or CPU tensors under ``TRITON_INTERPRET=1``).
    """
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    if dtype not in _DTYPES:
        return False, f"dtype {dtype} not supported (fp16, bf16, fp32)"
    for name, d in (("Dk", Dk), ("Dv", Dv)):
        if not 1 <= d <= MAX_HEAD_DIM:
            return False, f"{name}={d} outside 1..{MAX_HEAD_DIM}"
    device = torch.device(device)
    if device.type == "cpu":
        if not interpret_mode():
            return False, "CPU tensors run only in Triton's interpreter (set TRITON_INTERPRET=1)"
        return True, "CPU tensors, Triton interpreter"
    if device.type != "cuda":
        return False, f"device {device.type} not supported"
    if getattr(torch.version, "hip", None):
        return False, "ROCm is not tested for these kernels"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0 (bf16 tensor cores needed)"
    return True, f"CUDA sm_{major}{minor}"


@dataclass(frozen=True)
class Splits:
    """Programs per (row, group) for each branch: compressed, window, selection."""

    cmp: int
    win: int
    sel: int

    def __post_init__(self) -> None:
        for name in ("cmp", "win", "sel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Splits.{name} must be a positive int, got {value!r}")

    @property
    def total(self) -> int:
        return self.cmp + self.win + self.sel


def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; 4 for the interpreter (its splits only need to be several)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


def default_splits(rows: int, G: int, max_cmp: int, window: int, n_top: int,
                   device: torch.device, *, sms: int | None = None,
                   programs_per_sm: int | None = None) -> Splits:
    """Splits for ``rows * G`` (row, group) pairs on a device with ``sms`` SMs (default: the
    device's), aiming at ``programs_per_sm`` (default `PROGRAMS_PER_SM`) programs per SM.

    * compressed: about ``programs_per_sm`` programs per SM (a power of two, at most 64 and
      never more than the tiles at full length);
    * window: as many programs as give each about the keys of one compressed split (the
      longest program sets K1's time: at ``T = 16k`` one window program per pair read 4x what
      a compressed split did);
    * selection: its own launch (K3), so again about ``programs_per_sm`` programs per SM, at
      most one per selected block (one program per pair at ``B = 32`` was a single CTA per SM
      streaming 512 KB: 33 µs for a 17 µs floor).
    """
    sms = _sm_count(device) if sms is None else int(sms)
    pps = PROGRAMS_PER_SM if programs_per_sm is None else int(programs_per_sm)
    per_pair = max(1, pps * sms // max(1, rows * G))
    cmp = max(1, min(_pow2_floor(per_pair), 64, _next_pow2(_cdiv(max(1, max_cmp), TILE))))
    per_cmp = _cdiv(_cdiv(max(1, max_cmp), cmp), TILE) * TILE  # blocks of one split (tiles)
    win = max(1, min(_cdiv(window, per_cmp), _cdiv(window, TILE)))
    sel = max(1, min(_pow2_floor(per_pair), n_top))
    return Splits(cmp, win, sel)


@dataclass(frozen=True)
class Geometry:
    """Static launch geometry of a `Workspace` (everything a grid or a buffer size depends on).

    Attributes:
        splits: programs per (row, group) of each branch (K1, K3).
        chunk: selection blocks per K2 program (``CH``, a power of two).
        chunks: K2 programs per (row, group) (``NQ = cdiv(ceil(cap / l'), CH)``).
        local_top: entries of a chunk's list (``NL = min(n, CH)``).
        sel_slots: ``NP = next_pow2(n)``.
        combine_heads: heads per K4 program.
        score_heads: heads per pass of K2's logit gather (``HC``).
    """

    splits: Splits
    chunk: int
    chunks: int
    local_top: int
    sel_slots: int
    combine_heads: int
    score_heads: int


def score_chunk(h: int, cfg: tuple[int, ...], sel_blocks: int) -> int:
    """``CH``: selection blocks per K2 program: at most `SCORE_CHUNK`, and few enough that the
    chunk's logit gather ``[BH, CH, next_pow2(l'/d) + next_pow2(l/d - 1)]`` stays within
    `SCORE_ELEMS` elements (four warps' registers)."""
    l, d, ls = (int(x) for x in cfg[:3])
    BH = max(16, _next_pow2(h))
    per_block = _next_pow2(ls // d) + _next_pow2(max(1, l // d - 1))
    fit = _pow2_floor(max(1, SCORE_ELEMS // (BH * per_block)))
    return max(1, min(SCORE_CHUNK, fit, _next_pow2(max(1, sel_blocks))))


def score_heads(programs: int, sms: int, h: int) -> int:
    """``HC``, K2's heads per gather pass, for ``programs`` K2 programs on ``sms`` SMs: all (padded)
    heads below one program per SM, where latency rules (every load in flight at once); 4 below
    8 per SM; 1 above, where registers rule (more programs resident). Measured on an H200
    (`bench/decode_sweep.py`, 2026-12-03): B=1 64k (0.5 per SM) 16 heads 6.9 µs, 4 heads 7.6;
    B=8 64k (3.9) 4 heads 11.0 µs against 15.6 for 16; B=32 64k (15.5) 1 head 28.9 µs against
    36.7 for 4 and 48.8 for 16. `SCORE_HEADS` overrides."""
    BH = max(16, _next_pow2(h))
    if SCORE_HEADS is not None:
        return max(1, min(BH, int(SCORE_HEADS)))
    per_sm = programs / max(1, sms)
    return BH if per_sm < 1 else min(BH, 4) if per_sm < 8 else 1


def geometry(rows: int, G: int, h: int, cap: int, cfg: tuple[int, ...], device,
             splits: Splits | None = None, *, sms: int | None = None) -> Geometry:
    """The `Geometry` of ``rows`` rows over caches of ``cap`` tokens (``cfg``: the 7 ints of
    `decode_rows`); ``splits`` default to `default_splits`."""
    l, d, ls, n_top, _, _, w = (int(x) for x in cfg)
    device = torch.device(device)
    sms = _sm_count(device) if sms is None else int(sms)
    cap_cmp = _cap_cmp(cap, l, d)
    if splits is None:
        splits = default_splits(rows, G, cap_cmp, w, n_top, device, sms=sms)
    sel_blocks = _cdiv(cap, ls)
    ch = score_chunk(h, cfg, sel_blocks)
    chunks = _cdiv(sel_blocks, ch)
    if device.type == "cpu":  # the interpreter pays per program and per pass: all heads in one
        hb = _next_pow2(h)
        hc = score_heads(0, sms, h) if SCORE_HEADS is not None else max(16, _next_pow2(h))
    else:  # about COMBINE_PROGRAMS_PER_SM programs per SM
        hb = min(_next_pow2(h), _next_pow2(_cdiv(rows * G * h, COMBINE_PROGRAMS_PER_SM * sms)))
        hc = score_heads(rows * G * chunks, sms, h)
    return Geometry(splits=splits, chunk=ch, chunks=chunks, local_top=min(n_top, ch),
                    sel_slots=_next_pow2(n_top), combine_heads=hb, score_heads=hc)


@dataclass
class Workspace:
    """Scratch of `decode_rows` for ``rows`` rows: every buffer is overwritten by each call.

    Attributes:
        logits: ``[rows, H, max(1, cap_cmp)]`` float32 compressed logits (K1 -> K2).
        pm, pl: ``[rows, G, splits.total, BH]`` float32 partial max / sum.
        pacc: ``[rows, G, splits.total, BH, BDV]`` float32 partial outputs.
        cand: ``[rows, G, chunks, NLP]`` int64: each K2 chunk's top-n in rank order, each entry
            the Eq. 11 key and its block packed into one int (``_pack_key``; K2 -> K3).
        sel_idx: ``[rows, G, NP]`` int32 chosen blocks in selection order, ``-1`` padded.
        sel_cnt: ``[rows, G]`` int32 selected keys ``<= p`` (spec I.9 ``sel``).
        geo: the `Geometry` the grids use.
    """

    logits: torch.Tensor
    pm: torch.Tensor
    pl: torch.Tensor
    pacc: torch.Tensor
    cand: torch.Tensor
    sel_idx: torch.Tensor
    sel_cnt: torch.Tensor
    geo: Geometry

    @classmethod
    def allocate(cls, rows: int, G: int, h: int, Dv: int, cap: int, cfg: tuple[int, ...],
                 splits: Splits | None, device) -> Workspace:
        """Buffers for ``rows`` rows of ``G`` groups of ``h`` heads over caches of ``cap``
        tokens (``cfg``: the 7 ints of `decode_rows`; ``splits=None``: `default_splits`)."""
        geo = geometry(rows, G, h, cap, cfg, device, splits)
        cap_cmp = _cap_cmp(cap, int(cfg[0]), int(cfg[1]))
        BH, BDV = max(16, _next_pow2(h)), max(16, _next_pow2(Dv))
        f32 = dict(device=device, dtype=torch.float32)
        S = geo.splits.total
        NLP = _next_pow2(geo.local_top)
        return cls(
            logits=torch.empty(rows, G * h, cap_cmp, **f32),
            pm=torch.empty(rows, G, S, BH, **f32),
            pl=torch.empty(rows, G, S, BH, **f32),
            pacc=torch.empty(rows, G, S, BH, BDV, **f32),
            cand=torch.empty(rows, G, geo.chunks, NLP, device=device, dtype=torch.int64),
            sel_idx=torch.full((rows, G, geo.sel_slots), -1, device=device, dtype=torch.int32),
            sel_cnt=torch.zeros(rows, G, device=device, dtype=torch.int32),
            geo=geo,
        )

    @property
    def rows(self) -> int:
        return self.pm.shape[0]

    @property
    def splits(self) -> Splits:
        return self.geo.splits

    def buffers(self) -> list[torch.Tensor]:
        """The seven buffers, in field order (how the custom op takes them)."""
        return [self.logits, self.pm, self.pl, self.pacc, self.cand, self.sel_idx, self.sel_cnt]

    def sizes(self) -> list[int]:
        """The `Geometry` as ints (how the custom op takes it): ``[splits.cmp, splits.win,
        splits.sel, chunk, chunks, local_top, sel_slots, combine_heads, score_heads]``."""
        g = self.geo
        return [*dataclasses.astuple(g.splits), g.chunk, g.chunks, g.local_top, g.sel_slots,
                g.combine_heads, g.score_heads]  # fmt: skip

    @classmethod
    def of(cls, buffers: list[torch.Tensor], sizes: list[int]) -> Workspace:
        """Inverse of `buffers` / `sizes`."""
        geo = Geometry(Splits(*sizes[:3]), *sizes[3:])
        return cls(*buffers, geo=geo)


def _kernels(interpret: bool):
    """`_decode_kernels` executed in the given mode (cached; see `_loader`)."""
    return load_kernel_module("_decode_kernels.py", interpret)


@dataclass(frozen=True)
class Launch:
    """One kernel launch of a step: grid, constexpr arguments, compile options."""

    grid: tuple[int, int, int]
    constexprs: dict
    options: dict


def launches(R: int, G: int, h: int, Dk: int, Dv: int, cfg: tuple[int, ...], geo: Geometry,
             dtype: torch.dtype, interpret: bool, *, append: bool,
             shared: bool) -> dict[str, Launch]:
    """The four launches of `decode_rows` for ``R`` rows (by kernel name, in launch order).

    The one place the constexprs and options are derived: `decode_rows` launches these and
    ``bench/aot_compile.py --decode`` builds exactly these for sm_90 without a GPU.
    """
    l, d, ls, n_top, init, local, w = (int(x) for x in cfg)
    ieee = dtype == torch.float32
    precise = ieee and not interpret
    BH, BDK, BDV = max(16, _next_pow2(h)), max(16, _next_pow2(Dk)), max(16, _next_pow2(Dv))
    tile = TILE // 2 if ieee else TILE
    sp = geo.splits
    NLP = _next_pow2(geo.local_top)
    hb = geo.combine_heads

    def opts(name: str) -> dict:
        warps, stages = LAUNCH_OPTIONS[name]
        return {} if interpret else dict(num_warps=warps, num_stages=stages)

    return {
        "cmp_win": Launch((R, G, sp.cmp + sp.win), dict(
            HPG=h, BH=BH, DK=Dk, DV=Dv, BDK=BDK, BDV=BDV, L=l, D=d, BL=_next_pow2(l), W=w,
            BN=tile, APPEND=append, SHARED=shared, IEEE=ieee, PRECISE=precise), opts("cmp_win")),
        "score": Launch((R, G, geo.chunks), dict(
            HPG=h, BH=BH, NCP=_next_pow2(sp.cmp), L=l, D=d, LS=ls, R=ls // d, MM=l // d,
            RP=_next_pow2(ls // d), MP=_next_pow2(max(1, l // d - 1)), CH=geo.chunk,
            NL=geo.local_top, NLP=NLP, INIT=init, LOCAL=local, HC=geo.score_heads,
            PRECISE=precise), opts("score")),
        "sel": Launch((R, G, sp.sel), dict(
            HPG=h, BH=BH, DK=Dk, DV=Dv, BDK=BDK, BDV=BDV, LS=ls,
            BN=max(16, min(tile, _next_pow2(ls))), CH=geo.chunk, NQP=_next_pow2(geo.chunks),
            NLP=NLP, N_TOP=n_top, NP=geo.sel_slots, IEEE=ieee, PRECISE=precise), opts("sel")),
        "combine": Launch((R, G, _cdiv(h, hb)), dict(
            HPG=h, BH=BH, HB=hb, HBP=_next_pow2(hb), DV=Dv, BDV=BDV, NCP=_next_pow2(sp.cmp),
            NWP=_next_pow2(sp.win), NSP=_next_pow2(sp.sel), INC=append, PRECISE=precise,
            HALF=dtype in (torch.float16, torch.bfloat16)), opts("combine")),
    }


def decode_rows(
    q: torch.Tensor,
    gates: torch.Tensor,
    out: torch.Tensor,
    seq: torch.Tensor,
    pos: torch.Tensor,
    raw: tuple[torch.Tensor, ...],
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    ws: Workspace,
    cfg: tuple[int, int, int, int, int, int, int],
    scale: float,
    *,
    new: tuple[torch.Tensor, ...] | None = None,
    lengths: torch.Tensor | None = None,
) -> None:
    """NSA output of ``R`` rows into ``out [R, H, Dv]`` (four launches, no host sync).

    Args:
        q: ``[R, H, Dk]`` queries (last dim contiguous); ``gates``: ``[R, H, 3]``.
        out: ``[R, H, Dv]`` output in the input dtype (written, last dim contiguous).
        seq, pos: int32 ``[R]``: the row's sequence and position ``p``.
        raw: ``(k_cmp_raw, v_cmp_raw, k_sel, v_sel, k_win, v_win)`` caches ``[B, G, cap, D]``
            (contiguous; the same tensors three times when the branches share K/V).
        k_cmp, v_cmp: compressed caches ``[B, G, cap_cmp, D]`` (contiguous).
        ws: a `Workspace` of at least ``R`` rows, allocated for these caches' ``cap``.
        cfg: ``(l, d, l', n, init_blocks, local_blocks, w)`` of the `NSAConfig`.
        scale: softmax scale.
        new: a decode step: the new token's ``(k, v)`` per branch as six ``[R, G, D]`` tensors
            (row ``r`` = sequence ``r``); K1 writes them at row ``pos[r]`` and emits the block
            that completes. ``None``: the rows' K/V (and compressed blocks) are already cached.
        lengths: with ``new``: the int32 ``[B]`` lengths tensor, advanced by one per row (``pos``
            must be that same tensor). ``None`` leaves every length alone.
    """
    l, d, ls, n_top, init, local, w = (int(x) for x in cfg)
    R = q.shape[0]
    cap = raw[0].shape[2]
    if ws.rows < R:
        raise ValueError(f"workspace holds {ws.rows} rows, {R} requested")
    if ws.geo.chunks * ws.geo.chunk < _cdiv(cap, ls) or ws.logits.shape[-1] < k_cmp.shape[2]:
        raise ValueError(f"workspace was allocated for a smaller cache than cap={cap}")
    if (new is None) != (lengths is None):
        raise ValueError("new and lengths go together (a decode step) or are both None")
    sizes = [l, d, ls, n_top, init, local, w]
    if torch.compiler.is_compiling():  # one opaque node for torch.compile (module docstring)
        decode_rows_op(q, gates, out, seq, pos, list(raw), k_cmp, v_cmp, ws.buffers(),
                       ws.sizes(), sizes, float(scale), [] if new is None else list(new),
                       lengths)  # fmt: skip
        return
    _launch(q, gates, out, seq, pos, raw, k_cmp, v_cmp, ws, sizes, scale, new, lengths)


def _launch(q, gates, out, seq, pos, raw, k_cmp, v_cmp, ws: Workspace, cfg, scale, new, lengths):
    """The four launches of `decode_rows` (arguments checked there)."""
    R, H, Dk = q.shape
    B, G, cap, _ = raw[0].shape
    Dv = raw[1].shape[-1]
    h = H // G
    interpret = q.device.type == "cpu"
    kern = _kernels(interpret)
    geo, sp = ws.geo, ws.geo.splits
    S = sp.total
    shared = _same(raw[0], raw[2], raw[4]) and _same(raw[1], raw[3], raw[5])
    plan = launches(R, G, h, Dk, Dv, cfg, geo, q.dtype, interpret, append=new is not None,
                    shared=shared)
    kn = new if new is not None else (raw[0],) * 6  # unused pointers when not appending
    if new is not None:
        knew, vnew = new[0], new[1]
        if any(t.stride() != knew.stride() for t in new[0::2]) or any(
            t.stride() != vnew.stride() for t in new[1::2]
        ):
            kn = tuple(t.contiguous() for t in new)
            knew, vnew = kn[0], kn[1]
        kn_strides = (knew.stride(0), knew.stride(1), vnew.stride(0), vnew.stride(1))
    else:
        kn_strides = (0, 0, 0, 0)
    kr, vr, kc = raw[0], raw[1], k_cmp
    logits = ws.logits
    k1, k2, k3, k4 = (plan[name] for name in ("cmp_win", "score", "sel", "combine"))
    kern._cmp_win_kernel[k1.grid](
        q, *kn, *raw, k_cmp, v_cmp, seq, pos, logits, ws.pm, ws.pl, ws.pacc,
        q.stride(0), q.stride(1), *kn_strides,
        kr.stride(0), kr.stride(1), vr.stride(0), vr.stride(1),
        kc.stride(0), kc.stride(1), v_cmp.stride(0), v_cmp.stride(1),
        logits.stride(0), logits.stride(1),
        float(scale), G, sp.cmp, sp.win, S, cap, **k1.constexprs, **k1.options,
    )
    kern._score_kernel[k2.grid](
        pos, logits, ws.pm, ws.pl, ws.cand,
        logits.stride(0), logits.stride(1), G, sp.cmp, S, geo.chunks, cap,
        **k2.constexprs, **k2.options,
    )
    ks, vs = raw[2], raw[3]
    kern._sel_kernel[k3.grid](
        q, ks, vs, seq, pos, ws.cand, ws.sel_idx, ws.sel_cnt,
        ws.pm, ws.pl, ws.pacc,
        q.stride(0), q.stride(1), ks.stride(0), ks.stride(1), vs.stride(0), vs.stride(1),
        float(scale), G, S, sp.cmp + sp.win, sp.sel, geo.chunks, cap,
        **k3.constexprs, **k3.options,
    )
    kern._combine_kernel[k4.grid](
        out, gates, ws.pm, ws.pl, ws.pacc, seq, pos, pos if lengths is None else lengths,
        out.stride(0), out.stride(1), gates.stride(0), gates.stride(1), gates.stride(2),
        G, S, sp.cmp, sp.win, sp.sel, **k4.constexprs, **k4.options,
    )


def _same(*ts: torch.Tensor) -> bool:
    """The tensors are one buffer (the branches share their K/V cache)."""
    return all(t.data_ptr() == ts[0].data_ptr() and t.stride() == ts[0].stride() for t in ts)


def _decode_rows_fake(q, gates, out, seq, pos, raw, k_cmp, v_cmp, workspace, ws_sizes, cfg,
                      scale, new, lengths):  # fmt: skip
    return None


@kernel_op("decode_rows", _decode_rows_fake,
           mutates=("out", "raw", "k_cmp", "v_cmp", "workspace", "lengths"))  # fmt: skip
def decode_rows_op(
    q: torch.Tensor,
    gates: torch.Tensor,
    out: torch.Tensor,
    seq: torch.Tensor,
    pos: torch.Tensor,
    raw: list[torch.Tensor],
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    workspace: list[torch.Tensor],
    ws_sizes: list[int],
    cfg: list[int],
    scale: float,
    new: list[torch.Tensor],
    lengths: torch.Tensor | None,
) -> None:
    """`decode_rows` as a custom op (what ``torch.compile`` traces); writes its mutated
    arguments in place: ``out``, the workspace, and in a step the caches and ``lengths``.
    ``new`` is empty when the rows are already cached (no optional tensor lists in a schema)."""
    _launch(q, gates, out, seq, pos, tuple(raw), k_cmp, v_cmp,
            Workspace.of(workspace, ws_sizes), cfg, scale, tuple(new) or None, lengths)  # fmt: skip
