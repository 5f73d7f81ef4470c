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
group's block scores (Eqs. 9-10) and takes top-n (Eq. 11); K3 attends to the chosen blocks
(split over ``NS``); K4 merges the splits, rounds each branch, gates (Eq. 5) and, in a step,
advances the lengths. A step cannot be fewer launches without a grid-wide barrier: top-n needs
every compressed probability of the group, and the selection needs top-n.

*Append and emission inside K1.* In a step (``new`` given) K1's split 0 writes the new token's
raw K/V at row ``p`` of each branch buffer, and the split that holds compressed block
``i = num_cmp(p) - 1`` pools it (mean, the default phi) from the raw keys ``p+1-l .. p-1`` plus
the new token when it completes at this step (``i*d + l == p + 1``), writes it to the compressed
cache and uses it; the window splits take row ``p`` from the input. So no program reads what
another program of the same launch writes, and the append costs no launch.

*Flash-decoding splits.* At small batch a (row, group) pair has 4k compressed blocks and 1.5k
raw keys to read, too much for one SM; the splits spread them (K1 at about 4 programs per SM).
A split's range is computed in the kernel from ``p``: splits past a row's visible range store an
empty partial at once, so a ragged batch costs what each row reads. Partials are float32
``(m, l, acc)`` in the workspace; K4 merges them in a fixed order (deterministic).

*Scores from logits, not from a second pass.* K1 stores ``s = scale * q.k_cmp`` (float32,
``R*H*num_cmp`` values: 1 MB per sequence at 64k, a quarter of a re-read of the compressed
keys); K2 forms ``exp(s - lse)`` with the log-sum-exp merged from K1's partials, sums the
group's heads (Eq. 10 before Eq. 9, like `nsa_impl.scoring`) and applies the band weights.
Top-n is ``n`` rounds of a tie-break-left argmax over ``[S]`` with forced blocks at ``+inf``:
the spec's order (forced, then higher score, then lower index), as `nsa_impl.scoring.top_n`.

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

#: Target K1 programs per SM when choosing the splits.
PROGRAMS_PER_SM = 4


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


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


def default_splits(rows: int, G: int, max_cmp: int, window: int, n_top: int,
                   device: torch.device) -> Splits:
    """Splits for ``rows * G`` (row, group) pairs: about `PROGRAMS_PER_SM` compressed programs
    per SM (a power of two, at most 64 and never more than the tiles at full length), the
    window with 1/8 and the selection with 1/4 as many (their bytes at 64k, relative to the
    compressed branch's)."""
    device = torch.device(device)
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 4)
    per_pair = max(1, PROGRAMS_PER_SM * sms // max(1, rows * G))
    cmp = 1 << (per_pair.bit_length() - 1)  # the power of two at or below
    cmp = max(1, min(cmp, 64, _next_pow2(_cdiv(max(1, max_cmp), TILE))))
    win = max(1, min(cmp // 8, _cdiv(window, TILE)))
    sel = max(1, min(cmp // 4, n_top))
    return Splits(cmp, win, sel)


@dataclass
class Workspace:
    """Scratch of `decode_rows` for ``rows`` rows: every buffer is overwritten by each call.

    Attributes:
        logits: ``[rows, H, max(1, cap_cmp)]`` float32 compressed logits (K1 -> K2).
        pm, pl: ``[rows, G, splits.total, BH]`` float32 partial max / sum.
        pacc: ``[rows, G, splits.total, BH, BDV]`` float32 partial outputs.
        sel_idx: ``[rows, G, NP]`` int32 chosen blocks in selection order, ``-1`` padded.
        sel_cnt: ``[rows, G]`` int32 selected keys ``<= p`` (spec I.9 ``sel``).
        splits: the `Splits` the grids use.
    """

    logits: torch.Tensor
    pm: torch.Tensor
    pl: torch.Tensor
    pacc: torch.Tensor
    sel_idx: torch.Tensor
    sel_cnt: torch.Tensor
    splits: Splits
    sel_slots: int  # NP = next_pow2(n)

    @classmethod
    def allocate(cls, rows: int, G: int, h: int, Dv: int, cap_cmp: int, n_top: int,
                 splits: Splits, device) -> Workspace:
        """Buffers for ``rows`` rows of ``G`` groups of ``h`` heads and ``cap_cmp`` compressed
        blocks."""
        BH, BDV, NP = max(16, _next_pow2(h)), max(16, _next_pow2(Dv)), _next_pow2(n_top)
        f32 = dict(device=device, dtype=torch.float32)
        S = splits.total
        return cls(
            logits=torch.empty(rows, G * h, max(1, cap_cmp), **f32),
            pm=torch.empty(rows, G, S, BH, **f32),
            pl=torch.empty(rows, G, S, BH, **f32),
            pacc=torch.empty(rows, G, S, BH, BDV, **f32),
            sel_idx=torch.full((rows, G, NP), -1, device=device, dtype=torch.int32),
            sel_cnt=torch.zeros(rows, G, device=device, dtype=torch.int32),
            splits=splits,
            sel_slots=NP,
        )

    @property
    def rows(self) -> int:
        return self.pm.shape[0]

    def buffers(self) -> list[torch.Tensor]:
        """The six buffers, in field order (how the custom op takes them)."""
        return [self.logits, self.pm, self.pl, self.pacc, self.sel_idx, self.sel_cnt]

    def sizes(self) -> list[int]:
        """``[splits.cmp, splits.win, splits.sel, sel_slots]`` (how the custom op takes them)."""
        return [self.splits.cmp, self.splits.win, self.splits.sel, self.sel_slots]

    @classmethod
    def of(cls, buffers: list[torch.Tensor], sizes: list[int]) -> Workspace:
        """Inverse of `buffers` / `sizes`."""
        return cls(*buffers, splits=Splits(*sizes[:3]), sel_slots=sizes[3])


def _kernels(interpret: bool):
    """`_decode_kernels` executed in the given mode (cached; see `_loader`)."""
    return load_kernel_module("_decode_kernels.py", interpret)


def _options(interpret: bool, warps: int, stages: int = 1) -> dict:
    return {} if interpret else dict(num_warps=warps, num_stages=stages)


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
        ws: a `Workspace` of at least ``R`` rows.
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
    if ws.rows < R:
        raise ValueError(f"workspace holds {ws.rows} rows, {R} requested")
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
    l, d, ls, n_top, init, local, w = cfg
    R, H, Dk = q.shape
    B, G, cap, _ = raw[0].shape
    Dv = raw[1].shape[-1]
    h = H // G
    interpret = q.device.type == "cpu"
    kern = _kernels(interpret)
    ieee = q.dtype == torch.float32
    precise = ieee and not interpret
    BH, BDK, BDV = max(16, _next_pow2(h)), max(16, _next_pow2(Dk)), max(16, _next_pow2(Dv))
    tile = TILE // 2 if ieee else TILE
    sp = ws.splits
    S = sp.total
    shared = _same(raw[0], raw[2], raw[4]) and _same(raw[1], raw[3], raw[5])
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
    n_sel = _cdiv(cap, ls)
    kern._cmp_win_kernel[(R, G, sp.cmp + sp.win)](
        q, *kn, *raw, k_cmp, v_cmp, seq, pos, logits, ws.pm, ws.pl, ws.pacc,
        q.stride(0), q.stride(1), *kn_strides,
        kr.stride(0), kr.stride(1), vr.stride(0), vr.stride(1),
        kc.stride(0), kc.stride(1), v_cmp.stride(0), v_cmp.stride(1),
        logits.stride(0), logits.stride(1),
        float(scale), G, sp.cmp, sp.win, S, cap,
        HPG=h, BH=BH, DK=Dk, DV=Dv, BDK=BDK, BDV=BDV, L=l, D=d, BL=_next_pow2(l), W=w,
        BN=tile, APPEND=new is not None, SHARED=shared, IEEE=ieee, PRECISE=precise,
        **_options(interpret, 4, 2),
    )
    kern._score_topn_kernel[(R, G)](
        pos, logits, ws.pm, ws.pl, ws.sel_idx, ws.sel_cnt,
        logits.stride(0), logits.stride(1), G, sp.cmp, S, cap,
        HPG=h, BH=BH, NCP=_next_pow2(sp.cmp), L=l, D=d, LS=ls, R=ls // d, MM=l // d,
        RP=_next_pow2(ls // d), MP=_next_pow2(max(1, l // d - 1)), SP=_next_pow2(n_sel),
        N_TOP=n_top, NP=ws.sel_slots, INIT=init, LOCAL=local, PRECISE=precise,
        **_options(interpret, 8),
    )
    ks, vs = raw[2], raw[3]
    kern._sel_kernel[(R, G, sp.sel)](
        q, ks, vs, seq, pos, ws.sel_idx, ws.pm, ws.pl, ws.pacc,
        q.stride(0), q.stride(1), ks.stride(0), ks.stride(1), vs.stride(0), vs.stride(1),
        float(scale), G, S, sp.cmp + sp.win, sp.sel, cap,
        HPG=h, BH=BH, DK=Dk, DV=Dv, BDK=BDK, BDV=BDV, LS=ls,
        BN=max(16, min(tile, _next_pow2(ls))), N_TOP=n_top, NP=ws.sel_slots, IEEE=ieee,
        PRECISE=precise, **_options(interpret, 4, 2),
    )
    hb = h if interpret else 1  # the interpreter pays per program, a GPU wants parallelism
    kern._combine_kernel[(R, G, _cdiv(h, hb))](
        out, gates, ws.pm, ws.pl, ws.pacc, seq, pos, pos if lengths is None else lengths,
        out.stride(0), out.stride(1), gates.stride(0), gates.stride(1), gates.stride(2),
        G, S, sp.cmp, sp.win, sp.sel,
        HPG=h, BH=BH, HB=hb, HBP=_next_pow2(hb), DV=Dv, BDV=BDV,
        NSP=_next_pow2(max(sp.cmp, sp.win, sp.sel)), INC=lengths is not None, PRECISE=precise,
        HALF=out.dtype in (torch.float16, torch.bfloat16), **_options(interpret, 4),
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
