"""Unit tests of the exact reference `nsa_ref`: the spec's worked vectors (Part II §9, §5.3),
configuration and input validation (spec I.2, I.11), gradients, and the decode cache (spec I.9).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from nsa_impl.tolerances import EXACT_ATOL
from nsa_ref import NSAConfig, NSARefCache, nsa_attention, rules

PAPER = NSAConfig()
F64 = torch.float64


# --- Worked vectors (spec Part II §9) ----------------------------------------------------------

#: Eq. 9 overlap weights of the paper config, rows j = 0..3, columns i = 0..10 (spec §9).
W_T200 = [
    [2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 1, 2, 2, 2, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2],
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
]
P_CMP_T200 = [Fraction(i, 66) for i in range(1, 12)]
P_SLC_T200 = [Fraction(8, 33), Fraction(8, 11), Fraction(34, 33), Fraction(0)]
#: The v1 "+m+n" reading of Eq. 9 gives this instead (spec §9): it must not come out.
P_SLC_V1 = [Fraction(4, 11), Fraction(28, 33), Fraction(17, 22), Fraction(0)]


def test_eq9_worked_vector_exact():
    """t = 200 (p = 199), paper config: 11 visible blocks, the W rows of §9, and
    ``p_slc = (8/33, 8/11, 34/33, 0)`` from ``p_cmp = (1..11)/66`` in exact rationals."""
    p = 199
    assert PAPER.num_cmp(p) == 11 and p // PAPER.sel_block == 3
    W = rules.overlap_weights(4, 11, PAPER)
    assert W.tolist() == W_T200
    p_slc = [
        sum(Fraction(w) * c for w, c in zip(row, P_CMP_T200, strict=True)) for row in W.tolist()
    ]
    assert p_slc == P_SLC_T200
    assert sum(p_slc) == Fraction(PAPER.cmp_block, PAPER.cmp_stride)  # P9: mass l/d = 2
    assert p_slc != P_SLC_V1


def _as_tensor(fractions: list[Fraction]) -> torch.Tensor:
    return torch.tensor([float(x) for x in fractions], dtype=F64)


def _ramp_keys(blocks: torch.Tensor) -> torch.Tensor:
    """A ``phi_k`` that turns compressed block ``i`` into the key ``(log(i+1), 0)``.

    Raw keys carry their position in channel 0, so the first key of block ``i`` is ``i*d``; with
    ``q = (1, 0)`` and scale 1 the compressed logits are ``log(i+1)`` and
    ``p_cmp = (i+1) / sum``: at p = 199 that is exactly ``(1..11)/66``.
    """
    index = blocks[..., 0, 0] / PAPER.cmp_stride
    return torch.stack([torch.log(index + 1), torch.zeros_like(index)], dim=-1)


def test_eq9_worked_vector_through_nsa_attention():
    """The §9 vector end to end: ``nsa_attention`` on the paper config at T = 200 reports
    ``p_cmp = (1..11)/66``, ``p_slc = (8/33, 8/11, 34/33, 0)`` and selects blocks 0..3."""
    T = 200
    q = torch.zeros(1, T, 1, 2, dtype=F64)
    q[..., 0] = 1.0
    k = torch.zeros(1, T, 1, 2, dtype=F64)
    k[0, :, 0, 0] = torch.arange(T, dtype=F64)
    v = torch.randn(1, T, 1, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    gates = torch.full((1, T, 1, 3), 0.5, dtype=F64)
    _, aux = nsa_attention(q, k, v, gates, PAPER, scale=1.0, phi_k=_ramp_keys, return_aux=True)
    p = T - 1
    p_cmp = aux.p_cmp[0, p, 0]
    assert p_cmp.shape == (11,)
    assert (p_cmp - _as_tensor(P_CMP_T200)).abs().max() <= EXACT_ATOL
    p_slc = aux.p_slc[0, p, 0]
    assert p_slc.shape == (4,)
    assert (p_slc - _as_tensor(P_SLC_T200)).abs().max() <= EXACT_ATOL
    assert aux.block_indices[0, p, 0].tolist() == [0, 1, 2, 3] + [-1] * 12


@pytest.mark.parametrize(
    ("S", "bound"), [(8192, 2047), (16384, 2559), (32768, 3583), (65536, 5631)]
)
def test_decode_read_bound_table4(S, bound):
    """Spec I.9 / §5.3: ``num_cmp(S-1) + n*l' + min(w, S)``; 5631 at S = 65536. Table 4's
    rounded ``S/16 + 1536`` is this bound plus one."""
    assert PAPER.decode_read_bound(S) == bound
    assert S // 16 + 1536 == bound + 1


def test_paper_thresholds():
    """§9 thresholds of the paper config (t = p + 1): selection is full attention for t <= 1024,
    the window (w keys) for t <= 512, compression is empty for t <= 31, the first scored block
    appears at t = 193, and top-n first excludes a block at t = 1025."""
    cfg = PAPER

    def candidates(p):
        return p // cfg.sel_block + 1

    assert candidates(1023) <= cfg.sel_top_n < candidates(1024)
    assert len(rules.window_keys(511, cfg)) == 512 and len(rules.window_keys(512, cfg)) == 512
    assert rules.window_keys(511, cfg) == list(range(512))
    assert rules.window_keys(512, cfg)[0] == 1
    assert cfg.num_cmp(30) == 0 and cfg.num_cmp(31) == 1
    assert rules.forced_blocks(2, cfg) == [0, 1, 2]  # t = 129..192: everything is forced
    assert rules.forced_blocks(3, cfg) == [0, 2, 3]  # t >= 193: block 1 goes to scoring
    scores = [0.0] * 17
    assert rules.top_n_blocks(scores[:16], 15, cfg) == list(range(16))
    assert len(rules.top_n_blocks(scores, 16, cfg)) == 16  # b = 16 (t = 1025): one block out


# --- NSAConfig validation (spec I.2) -----------------------------------------------------------

POSITIVE_FIELDS = ("cmp_block", "cmp_stride", "sel_block", "sel_top_n", "window")
COUNT_FIELDS = ("sel_init_blocks", "sel_local_blocks")


@pytest.mark.parametrize("field", POSITIVE_FIELDS)
@pytest.mark.parametrize("value", [0, -1, -16])
def test_config_rejects_non_positive(field, value):
    """Spec I.2: a non-positive size is a ``ValueError`` naming the field, never clamped."""
    with pytest.raises(ValueError, match=rf"NSAConfig\.{field}\b"):
        NSAConfig(**{field: value})


@pytest.mark.parametrize("field", COUNT_FIELDS)
def test_config_rejects_negative_counts(field):
    """The forced-block counts may be 0 but not negative."""
    with pytest.raises(ValueError, match=rf"NSAConfig\.{field}\b"):
        NSAConfig(**{field: -1})


@pytest.mark.parametrize("field", POSITIVE_FIELDS + COUNT_FIELDS)
@pytest.mark.parametrize("value", [2.0, True, "4", None])
def test_config_rejects_non_integers(field, value):
    """A float, bool, string or ``None`` size is a ``TypeError`` naming the field."""
    with pytest.raises(TypeError, match=rf"NSAConfig\.{field}\b"):
        NSAConfig(**{field: value})


@pytest.mark.parametrize(
    ("kwargs", "fields"),
    [
        (dict(cmp_block=24, cmp_stride=16), ("cmp_stride", "cmp_block")),  # d does not divide l
        (dict(cmp_block=32, cmp_stride=16, sel_block=40), ("cmp_stride", "sel_block")),  # nor l'
        (dict(sel_top_n=2), ("sel_top_n",)),  # fewer than the 3 forced blocks
        (dict(sel_top_n=4, sel_init_blocks=3, sel_local_blocks=2), ("sel_top_n",)),
    ],
)
def test_config_rejects_inconsistent_sizes(kwargs, fields):
    """``d`` must divide ``l`` and ``l'``; ``n`` must cover the forced blocks (spec I.2)."""
    with pytest.raises(ValueError) as info:
        NSAConfig(**kwargs)
    for field in fields:
        assert field in str(info.value)


def test_config_keeps_valid_values():
    """Nothing is clamped: valid edge values come back unchanged."""
    cfg = NSAConfig(
        cmp_block=1,
        cmp_stride=1,
        sel_block=1,
        sel_top_n=1,
        sel_init_blocks=0,
        sel_local_blocks=0,
        window=1,
    )
    assert (cfg.cmp_block, cfg.sel_top_n, cfg.sel_init_blocks, cfg.window) == (1, 1, 0, 1)
    assert cfg.forced_blocks == 0
    assert NSAConfig(sel_top_n=3).sel_top_n == 3  # exactly the forced count is allowed


# --- Bad input to nsa_attention (spec I.11) ----------------------------------------------------

SMALL = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=3)
B, T, H, G, DK, DV = 2, 8, 4, 2, 4, 3


def _inputs(batch=B):
    gen = torch.Generator().manual_seed(7)
    return dict(
        q=torch.randn(batch, T, H, DK, generator=gen, dtype=F64),
        k=torch.randn(batch, T, G, DK, generator=gen, dtype=F64),
        v=torch.randn(batch, T, G, DV, generator=gen, dtype=F64),
        gates=torch.rand(batch, T, H, 3, generator=gen, dtype=F64),
        cfg=SMALL,
    )


def _pair(g=G, dk=DK, dv=DV, dtype=F64, t=T):
    return torch.zeros(B, t, g, dk, dtype=dtype), torch.zeros(B, t, g, dv, dtype=dtype)


def _cu(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


# (id, changes to the valid arguments, batch size, exception, regex the message must match)
BAD_INPUTS = [
    ("q-rank", dict(q=torch.zeros(B, T, H, dtype=F64)), B, ValueError, r"\bq\b.*rank 4"),
    ("k-rank", dict(k=torch.zeros(B, T, G, DK, 1, dtype=F64)), B, ValueError, r"\bk\b.*rank 4"),
    ("v-rank", dict(v=torch.zeros(B, T, G, dtype=F64)), B, ValueError, r"\bv\b.*rank 4"),
    ("gates-rank", dict(gates=torch.zeros(B, T, H, dtype=F64)), B, ValueError, r"gates"),
    ("q-not-tensor", dict(q=[[0.0]]), B, TypeError, r"\bq\b"),
    ("q-int", dict(q=torch.zeros(B, T, H, DK, dtype=torch.int64)), B, TypeError, r"\bq\b"),
    ("q-empty", dict(q=torch.zeros(B, 0, H, DK, dtype=F64)), B, ValueError, r"\bq\b"),
    (
        "H-not-multiple-of-G",
        dict(k=torch.zeros(B, T, 3, DK, dtype=F64), v=torch.zeros(B, T, 3, DV, dtype=F64)),
        B,
        ValueError,
        r"H=4.*G=3",
    ),
    ("k-length", dict(k=torch.zeros(B, T - 1, G, DK, dtype=F64)), B, ValueError, r"\bk\b.*shape"),
    ("k-head-dim", dict(k=torch.zeros(B, T, G, DK + 1, dtype=F64)), B, ValueError, r"\bk\b"),
    ("v-groups", dict(v=torch.zeros(B, T, G + 1, DV, dtype=F64)), B, ValueError, r"\bv\b.*shape"),
    ("k-dtype", dict(k=torch.zeros(B, T, G, DK)), B, TypeError, r"\bk dtype"),
    ("v-dtype", dict(v=torch.zeros(B, T, G, DV)), B, TypeError, r"\bv dtype"),
    ("gates-dtype", dict(gates=torch.full((B, T, H, 3), 0.5)), B, TypeError, r"gates dtype"),
    (
        "k-device",
        dict(k=torch.zeros(B, T, G, DK, dtype=F64, device="meta")),
        B,
        ValueError,
        r"\bk device",
    ),
    (
        "gates-device",
        dict(gates=torch.zeros(B, T, H, 3, dtype=F64, device="meta")),
        B,
        ValueError,
        r"gates device",
    ),
    ("gates-shape", dict(gates=torch.zeros(B, T, H, 2, dtype=F64)), B, ValueError, r"gates.*shape"),
    (
        "gates-above-1",
        dict(gates=torch.full((B, T, H, 3), 1.5, dtype=F64)),
        B,
        ValueError,
        r"gates",
    ),
    (
        "gates-below-0",
        dict(gates=torch.full((B, T, H, 3), -1e-9, dtype=F64)),
        B,
        ValueError,
        r"gates",
    ),
    (
        "gates-nan",
        dict(gates=torch.full((B, T, H, 3), float("nan"), dtype=F64)),
        B,
        ValueError,
        r"gates",
    ),
    ("cfg-type", dict(cfg={"cmp_block": 4}), B, TypeError, r"\bcfg\b"),
    ("scale-zero", dict(scale=0.0), B, ValueError, r"\bscale\b"),
    ("scale-negative", dict(scale=-1.0), B, ValueError, r"\bscale\b"),
    ("scale-inf", dict(scale=math.inf), B, ValueError, r"\bscale\b"),
    ("scale-nan", dict(scale=math.nan), B, ValueError, r"\bscale\b"),
    ("scale-str", dict(scale="0.5"), B, TypeError, r"\bscale\b"),
    ("scale-bool", dict(scale=True), B, TypeError, r"\bscale\b"),
    ("scale-tensor", dict(scale=torch.tensor(0.5)), B, TypeError, r"\bscale\b"),
    ("cu-batch", dict(cu_seqlens=_cu([0, 4, 8])), B, ValueError, r"cu_seqlens.*B == 1"),
    ("cu-start", dict(cu_seqlens=_cu([1, 4, 8])), 1, ValueError, r"cu_seqlens.*start at 0"),
    ("cu-end", dict(cu_seqlens=_cu([0, 4, 7])), 1, ValueError, r"cu_seqlens.*end"),
    ("cu-past-end", dict(cu_seqlens=_cu([0, 4, 9])), 1, ValueError, r"cu_seqlens.*end"),
    (
        "cu-not-monotonic",
        dict(cu_seqlens=_cu([0, 5, 3, 8])),
        1,
        ValueError,
        r"cu_seqlens.*increasing",
    ),
    ("cu-repeated", dict(cu_seqlens=_cu([0, 4, 4, 8])), 1, ValueError, r"cu_seqlens.*increasing"),
    (
        "cu-float",
        dict(cu_seqlens=torch.tensor([0.0, 4.0, 8.0])),
        1,
        TypeError,
        r"cu_seqlens.*int32",
    ),
    ("cu-2d", dict(cu_seqlens=_cu([[0, 8]])), 1, ValueError, r"cu_seqlens.*1-D"),
    ("cu-single", dict(cu_seqlens=_cu([0])), 1, ValueError, r"cu_seqlens"),
    ("cu-list", dict(cu_seqlens=[0, 4, 8]), 1, TypeError, r"cu_seqlens"),
    ("branch-kv-type", dict(branch_kv=[("sel", _pair())]), B, TypeError, r"branch_kv"),
    ("branch-kv-key", dict(branch_kv={"full": _pair()}), B, ValueError, r"branch_kv.*full"),
    ("branch-kv-pair", dict(branch_kv={"sel": _pair()[:1]}), B, TypeError, r"branch_kv\['sel'\]"),
    (
        "branch-kv-shape",
        dict(branch_kv={"sel": _pair(t=T - 1)}),
        B,
        ValueError,
        r"branch_kv\['sel'\] k",
    ),
    ("branch-kv-groups", dict(branch_kv={"win": _pair(g=1)}), B, ValueError, r"branch_kv\['win'\]"),
    (
        "branch-kv-dv",
        dict(branch_kv={"cmp": _pair(dv=DV + 1)}),
        B,
        ValueError,
        r"branch_kv\['cmp'\]",
    ),
    (
        "branch-kv-dtype",
        dict(branch_kv={"win": _pair(dtype=torch.float32)}),
        B,
        TypeError,
        r"branch_kv\['win'\] k dtype",
    ),
]


@pytest.mark.parametrize(
    ("changes", "batch", "error", "pattern"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_is_rejected_naming_the_argument(changes, batch, error, pattern):
    """Spec I.11: a ``ValueError``/``TypeError`` whose message names the offending argument."""
    args = {**_inputs(batch), **changes}
    q, k, v, gates, cfg = (args.pop(n) for n in ("q", "k", "v", "gates", "cfg"))
    with pytest.raises(error, match=pattern):
        nsa_attention(q, k, v, gates, cfg, **args)


def test_validate_false_skips_only_the_gate_range():
    """``validate=False`` accepts gates outside [0, 1] (and still combines them linearly)."""
    args = _inputs()
    gates = args["gates"] * 3 - 1
    o, aux = nsa_attention(
        args["q"], args["k"], args["v"], gates, SMALL, validate=False, return_aux=True
    )
    want = gates[..., 0:1] * aux.o_cmp + gates[..., 1:2] * aux.o_sel + gates[..., 2:3] * aux.o_win
    assert (o - want).abs().max() <= EXACT_ATOL
    with pytest.raises(ValueError, match=r"\bq\b"):
        nsa_attention(args["q"][0], args["k"], args["v"], gates, SMALL, validate=False)


def test_complete_branch_kv_needs_no_shared_kv():
    """With all three branches in ``branch_kv`` the shared ``k, v`` are not read."""
    args = _inputs()
    pairs = {n: (args["k"], args["v"]) for n in ("cmp", "sel", "win")}
    want = nsa_attention(args["q"], args["k"], args["v"], args["gates"], SMALL)
    got = nsa_attention(args["q"], None, None, args["gates"], SMALL, branch_kv=pairs)
    assert torch.equal(got, want)


# --- Gradients ---------------------------------------------------------------------------------

GRAD_CFG = NSAConfig(
    cmp_block=2,
    cmp_stride=1,
    sel_block=2,
    sel_top_n=2,
    sel_init_blocks=1,
    sel_local_blocks=1,
    window=3,
)


@pytest.mark.parametrize("variant", ["plain", "packed", "branch_kv"])
def test_gradcheck_float64(variant):
    """``nsa_ref`` is the gradient oracle: its autograd agrees with finite differences (float64,
    a tiny shape where top-n really drops blocks; gates kept inside (0, 1) for the check)."""
    gen = torch.Generator().manual_seed(3)
    Tg, Hg, Gg = 7, 2, 1
    shapes = [(1, Tg, Hg, 3), (1, Tg, Gg, 3), (1, Tg, Gg, 2)]
    q, k, v = (torch.randn(*s, generator=gen, dtype=F64, requires_grad=True) for s in shapes)
    gates = (0.1 + 0.8 * torch.rand(1, Tg, Hg, 3, generator=gen, dtype=F64)).requires_grad_()
    tensors = [q, k, v, gates]
    kwargs = {}
    if variant == "packed":
        kwargs["cu_seqlens"] = _cu([0, 3, Tg])
    if variant == "branch_kv":
        extra = [torch.randn(*s, generator=gen, dtype=F64, requires_grad=True) for s in shapes[1:]]
        tensors += extra

    def f(q, k, v, gates, *extra):
        if extra:
            kwargs["branch_kv"] = {"sel": (extra[0], extra[1])}
        return nsa_attention(q, k, v, gates, GRAD_CFG, **kwargs)

    # The last rows have more candidate blocks than n: top-n really drops blocks here.
    assert (Tg - 1) // GRAD_CFG.sel_block + 1 > GRAD_CFG.sel_top_n
    assert torch.autograd.gradcheck(f, tuple(tensors), eps=1e-6, atol=1e-8, rtol=1e-6)


# --- Decode cache (spec I.9) -------------------------------------------------------------------

DECODE_CFG = NSAConfig(
    cmp_block=4,
    cmp_stride=2,
    sel_block=4,
    sel_top_n=3,
    sel_init_blocks=1,
    sel_local_blocks=2,
    window=3,
)


def _decode_inputs(Td=16, batch=1, groups=1, heads=1, gate=(1.0, 0.0, 0.0)):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(batch, Td, heads, 4, generator=gen, dtype=F64)
    k = torch.randn(batch, Td, groups, 4, generator=gen, dtype=F64)
    v = torch.randn(batch, Td, groups, 2, generator=gen, dtype=F64)
    gates = torch.tensor(gate, dtype=F64).expand(batch, Td, heads, 3)
    return q, k, v, gates


def test_decode_emits_compressed_block_when_its_last_key_arrives():
    """Block ``i`` joins the compressed cache at the step with ``i*d + l == p + 1``: with only
    the ``cmp`` gate open, step ``p`` returns attention over the means of exactly those blocks."""
    q, k, v, gates = _decode_inputs()
    cfg = DECODE_CFG
    cache = NSARefCache(cfg)
    emitted = []
    for p in range(q.shape[1]):
        o = cache.step(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], gates[:, p : p + 1])
        emitted.append(cache.reads["cmp"])
        blocks = [i for i in range(p + 1) if i * cfg.cmp_stride + cfg.cmp_block == p + 1]
        assert len(blocks) == (emitted[-1] - (emitted[-2] if p else 0))
        starts = range(0, p + 2 - cfg.cmp_block, cfg.cmp_stride)
        if not starts:
            assert torch.all(o == 0)
            continue
        kc = torch.stack([k[0, s : s + cfg.cmp_block, 0].mean(0) for s in starts])
        vc = torch.stack([v[0, s : s + cfg.cmp_block, 0].mean(0) for s in starts])
        probs = torch.softmax(kc @ q[0, p, 0] / 2.0, dim=0)  # scale 1/sqrt(Dk = 4)
        assert (o[0, 0, 0] - probs @ vc).abs().max() <= EXACT_ATOL
    # Emission at p + 1 = 4, 6, 8, ... (l = 4, d = 2).
    assert emitted == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7]


def test_decode_read_counters():
    """Per-step reads: ``cmp = num_cmp(p)``, ``win = min(w, p+1)``, ``sel`` = selected keys
    ``<= p`` (block 1 drops out once ``b(p) = 3`` with n = 3 forced blocks)."""
    q, k, v, gates = _decode_inputs(batch=2, groups=2, heads=4, gate=(0.2, 0.3, 0.5))
    cache = NSARefCache(DECODE_CFG)
    assert cache.length == 0 and cache.reads == {"cmp": 0, "sel": 0, "win": 0}
    reads = []
    for p in range(q.shape[1]):
        cache.step(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], gates[:, p : p + 1])
        reads.append(dict(cache.reads))
    assert cache.length == q.shape[1]
    assert [r["cmp"] for r in reads] == [DECODE_CFG.num_cmp(p) for p in range(16)]
    assert [r["win"] for r in reads] == [1, 2] + [3] * 14
    assert [r["sel"] for r in reads] == list(range(1, 13)) + [9, 10, 11, 12]
    assert all(sum(r.values()) <= DECODE_CFG.decode_read_bound(p + 1) for p, r in enumerate(reads))


def test_decode_rejects_bad_steps():
    """The cache validates like ``nsa_attention``: one position per step, a fixed batch size."""
    q, k, v, gates = _decode_inputs(Td=2, batch=2)
    with pytest.raises(TypeError, match=r"\bcfg\b"):
        NSARefCache({"cmp_block": 4})
    cache = NSARefCache(DECODE_CFG)
    with pytest.raises(ValueError, match=r"T=1"):
        cache.step(q, k, v, gates)
    cache.step(q[:, :1], k[:, :1], v[:, :1], gates[:, :1])
    with pytest.raises(ValueError, match=r"\bB=1\b.*\bB=2\b"):
        cache.step(q[:1, 1:], k[:1, 1:], v[:1, 1:], gates[:1, 1:])
    with pytest.raises(ValueError, match=r"gates"):
        cache.step(q[:, 1:], k[:, 1:], v[:, 1:], gates[:, 1:] + 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decode_equals_prefill_bit_for_bit(dtype):
    """`nsa_ref.NSARefCache` in float16/bfloat16 reproduces the prefill rows exactly: its
    compressed blocks pool float32 copies and stay float32, as the prefill's do (a bf16-rounded
    compressed key once moved the scores enough to flip a selection: NSA-P5 failed by 0.36)."""
    g = torch.Generator().manual_seed(0)
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=3, window=8)
    B, T, G, h, D = 2, 70, 2, 2, 16
    q = torch.randn(B, T, G * h, D, generator=g).to(dtype)
    k, v = (torch.randn(B, T, G, D, generator=g).to(dtype) for _ in range(2))
    gates = torch.rand(B, T, G * h, 3, generator=g).to(dtype)
    prefill = nsa_attention(q, k, v, gates, cfg)
    cache = NSARefCache(cfg)
    rows = [cache.step(q[:, p : p + 1], k[:, p : p + 1], v[:, p : p + 1], gates[:, p : p + 1])
            for p in range(T)]  # fmt: skip
    assert torch.equal(torch.cat(rows, dim=1), prefill)
