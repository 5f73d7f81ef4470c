"""`nsa_impl.NSACache`: token-by-token decoding against prefill and the reference cache (spec I.9).

Every decode test checks, at every step: the output row against the prefill row
(`nsa_impl.nsa_attention`) and against `nsa_ref.NSARefCache`, and ``cache.reads`` against the
spec I.9 values computed from the config and the prefill's selected blocks.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import nsa_impl.decode as decode_mod
import nsa_ref
from nsa_impl import NSACache, NSAConfig, nsa_attention
from nsa_impl.tolerances import EXACT_ATOL, FP32_OUT_ATOL, lowp_bound
from nsa_ref import rules
from properties.strategies import weighted_pool

ATOL = {torch.float64: EXACT_ATOL, torch.float32: FP32_OUT_ATOL}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny per-step tensors: intra-op threads only add overhead (and stall badly when the two
    CPU cores are shared with other pytest workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_inputs(B, T, G, h, Dk, Dv, dtype, seed, branch_kv=False):
    """Random ``q, k, v, gates`` (and per-branch K/V) from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    H = G * h
    q, k, v = randn(B, T, H, Dk), randn(B, T, G, Dk), randn(B, T, G, Dv)
    gates = torch.rand(B, T, H, 3, generator=gen, dtype=torch.float64).to(dtype)
    bkv = None
    if branch_kv:
        bkv = {name: (randn(B, T, G, Dk), randn(B, T, G, Dv)) for name in ("cmp", "sel", "win")}
    return q, k, v, gates, bkv


def row(t: torch.Tensor | None, p: int):
    """Position ``p`` of a ``[B, T, ...]`` tensor, kept as ``[B, 1, ...]``."""
    return None if t is None else t[:, p : p + 1]


def row_kv(bkv, p):
    """Position ``p`` of every branch's (k, v)."""
    return None if bkv is None else {n: (row(k, p), row(v, p)) for n, (k, v) in bkv.items()}


def expected_reads(cfg: NSAConfig, block_indices: torch.Tensor, p: int) -> dict[str, int]:
    """Spec I.9 at ``p`` from the config and the prefill's ``block_indices [B, T, G, n]``."""
    sel = max(
        len(rules.selected_keys(blocks, p, cfg))
        for per_seq in block_indices[:, p].tolist()
        for blocks in per_seq
    )
    return {"cmp": cfg.num_cmp(p), "sel": sel, "win": min(cfg.window, p + 1)}


def decode_all(cache, q, k, v, gates, bkv, start=0):
    """Step through positions ``start..T-1``; return outputs ``[B, T-start, H, Dv]`` and reads."""
    outs, reads = [], []
    for p in range(start, q.shape[1]):
        outs.append(cache.step(row(q, p), row(k, p), row(v, p), row(gates, p), row_kv(bkv, p)))
        reads.append(cache.reads)
    return torch.cat(outs, dim=1), reads


CONFIGS = {
    # l < l', overlapping compression blocks, window shorter than T.
    "overlap": NSAConfig(cmp_block=4, cmp_stride=2, sel_block=8, sel_top_n=3, window=5),
    # l = l' = d (FLA's scheme): Eq. 9 is the identity.
    "identity": NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=3, window=7),
    # l > l', no forced blocks except the current one, window wider than T.
    "long-cmp": NSAConfig(
        cmp_block=8,
        cmp_stride=2,
        sel_block=4,
        sel_top_n=2,
        sel_init_blocks=0,
        sel_local_blocks=1,
        window=64,
    ),
    # No forced blocks at all: the current block competes on score.
    "no-forced": NSAConfig(
        cmp_block=4,
        cmp_stride=2,
        sel_block=4,
        sel_top_n=2,
        sel_init_blocks=0,
        sel_local_blocks=0,
        window=1,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("variant", ["shared", "branch_kv", "phi"])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_decode_matches_prefill_and_reference(cfg_name, variant, dtype, monkeypatch):
    """Decode row p == prefill row p == NSARefCache row p; reads follow spec I.9 every step.

    A 4-token initial capacity makes the raw and compressed buffers double several times.
    """
    monkeypatch.setattr(decode_mod, "INITIAL_CAPACITY", 4)
    cfg = CONFIGS[cfg_name]
    T = 29
    bkv_on = variant == "branch_kv"
    q, k, v, gates, bkv = make_inputs(2, T, 2, 2, 6, 5, dtype, seed=7, branch_kv=bkv_on)
    phi = weighted_pool if variant == "phi" else None
    kwargs = dict(phi_k=phi, phi_v=phi)
    prefill, aux = nsa_attention(q, k, v, gates, cfg, branch_kv=bkv, return_aux=True, **kwargs)
    ref_cache = nsa_ref.NSARefCache(cfg, **kwargs)
    cache = NSACache(cfg, **kwargs)
    atol = ATOL[dtype]
    with torch.no_grad():
        for p in range(T):
            args = (row(q, p), row(k, p), row(v, p), row(gates, p))
            o = cache.step(*args, branch_kv=row_kv(bkv, p))
            o_ref = ref_cache.step(*args, branch_kv=row_kv(bkv, p))
            assert o.shape == o_ref.shape and o.dtype == dtype
            torch.testing.assert_close(o, row(prefill, p), atol=atol, rtol=0, msg=f"prefill p={p}")
            torch.testing.assert_close(o, o_ref, atol=atol, rtol=0, msg=f"NSARefCache p={p}")
            assert cache.reads == expected_reads(cfg, aux.block_indices, p) == ref_cache.reads
            assert sum(cache.reads.values()) <= cfg.decode_read_bound(p + 1)
            assert cache.length == p + 1


def test_decode_2048_paper_config():
    """Paper config, 2048 tokens, float32: every row matches prefill (fp32 class), reads follow
    spec I.9 at every step and stay within the bound; buffers grow 256 -> 2048 on the way."""
    cfg = NSAConfig()
    T = 2048
    q, k, v, gates, _ = make_inputs(1, T, 2, 2, 16, 16, torch.float32, seed=2048)
    started = time.perf_counter()
    prefill, aux = nsa_attention(q, k, v, gates, cfg, return_aux=True)
    cache = NSACache(cfg)
    with torch.no_grad():
        out, reads = decode_all(cache, q, k, v, gates, None)
    elapsed = time.perf_counter() - started
    err = (out - prefill).abs().max().item()
    assert err <= FP32_OUT_ATOL, err
    for p, got in enumerate(reads):
        assert got == expected_reads(cfg, aux.block_indices, p), p
        assert sum(got.values()) <= cfg.decode_read_bound(p + 1)
    # Last step: 127 compressed blocks, 15 full blocks + the current one, the full window.
    assert reads[-1] == {"cmp": 127, "sel": 15 * 64 + 64, "win": 512}
    print(f"2048-token decode + prefill: {elapsed:.2f} s, max |decode - prefill| = {err:.2e}")


def test_prefill_then_decode_matches_full_prefill():
    """`NSACache.prefill` of a prompt, then steps, reproduces the prefill of the whole sequence."""
    cfg = CONFIGS["overlap"]
    q, k, v, gates, bkv = make_inputs(2, 23, 2, 2, 4, 4, torch.float64, seed=3, branch_kv=True)
    full, aux = nsa_attention(q, k, v, gates, cfg, branch_kv=bkv, return_aux=True)
    cut = 11
    cache = NSACache(cfg)
    with torch.no_grad():
        head = cache.prefill(
            q[:, :cut],
            k[:, :cut],
            v[:, :cut],
            gates[:, :cut],
            {n: (kk[:, :cut], vv[:, :cut]) for n, (kk, vv) in bkv.items()},
        )
        assert cache.length == cut
        assert cache.reads == expected_reads(cfg, aux.block_indices, cut - 1)
        tail, reads = decode_all(cache, q, k, v, gates, bkv, start=cut)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, atol=EXACT_ATOL, rtol=0)
    assert reads == [expected_reads(cfg, aux.block_indices, p) for p in range(cut, 23)]


def test_branch_kv_may_start_later():
    """Shared K/V for the first steps, then per-branch K/V: the cache splits its buffers and
    keeps matching the reference cache fed the same calls."""
    cfg = CONFIGS["overlap"]
    q, k, v, gates, bkv = make_inputs(1, 14, 1, 2, 4, 4, torch.float64, seed=5, branch_kv=True)
    cache, ref_cache = NSACache(cfg), nsa_ref.NSARefCache(cfg)
    with torch.no_grad():
        for p in range(14):
            extra = row_kv(bkv, p) if p >= 6 else None
            args = (row(q, p), row(k, p), row(v, p), row(gates, p))
            o = cache.step(*args, branch_kv=extra)
            o_ref = ref_cache.step(*args, branch_kv=extra)
            torch.testing.assert_close(o, o_ref, atol=EXACT_ATOL, rtol=0)


def test_no_recompression_of_history():
    """Each step pools at most one new block of l keys (never the history): phi sees one block."""
    cfg = CONFIGS["overlap"]
    seen = []

    def spy(blocks):
        seen.append(tuple(blocks.shape))
        return blocks.mean(dim=-2)

    q, k, v, gates, _ = make_inputs(2, 40, 2, 2, 4, 4, torch.float64, seed=1)
    cache = NSACache(cfg, phi_k=spy, phi_v=spy)
    with torch.no_grad():
        decode_all(cache, q, k, v, gates, None)
    emitted = cfg.num_cmp(39)
    assert len(seen) == 2 * emitted  # keys and values, once per emitted block
    assert set(seen) == {(2, 2, 1, cfg.cmp_block, 4)}


def test_low_precision_decode():
    """bf16 decode vs the float32 reference on the same rounded inputs (spec I.10 low-precision)."""
    cfg = CONFIGS["overlap"]
    q, k, v, gates, _ = make_inputs(1, 20, 2, 2, 8, 8, torch.bfloat16, seed=11)
    ref = nsa_ref.nsa_attention(*(t.float() for t in (q, k, v, gates)), cfg)
    naive = nsa_ref.nsa_attention(q, k, v, gates, cfg).float()  # the reference run in bf16
    with torch.no_grad():
        out, _ = decode_all(NSACache(cfg), q, k, v, gates, None)
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max().item()
    assert err <= lowp_bound((naive - ref).abs().max().item()), err


def test_max_len_is_static_and_enforced():
    """``max_len`` preallocates once; the step past it raises ValueError naming max_len."""
    cfg = CONFIGS["overlap"]
    q, k, v, gates, _ = make_inputs(1, 6, 1, 1, 4, 4, torch.float64, seed=0)
    cache = NSACache(cfg, max_len=5)
    with torch.no_grad():
        decode_all(cache, q[:, :5], k[:, :5], v[:, :5], gates[:, :5], None)
        with pytest.raises(ValueError, match="max_len"):
            cache.step(row(q, 5), row(k, 5), row(v, 5), row(gates, 5))


def test_reset_forgets_tokens():
    """After `reset` the cache decodes a new batch from position 0."""
    cfg = CONFIGS["identity"]
    q, k, v, gates, _ = make_inputs(1, 9, 1, 2, 4, 4, torch.float64, seed=4)
    cache = NSACache(cfg)
    with torch.no_grad():
        first, _ = decode_all(cache, q, k, v, gates, None)
        cache.reset()
        assert cache.length == 0 and cache.reads == {"cmp": 0, "sel": 0, "win": 0}
        again, _ = decode_all(cache, q, k, v, gates, None)
    assert torch.equal(first, again)


def _step_args(B=1, G=1, h=2, Dk=4, Dv=4, dtype=torch.float64):
    q, k, v, gates, _ = make_inputs(B, 1, G, h, Dk, Dv, dtype, seed=0)
    return q, k, v, gates


@pytest.mark.parametrize(
    "make_call, error, match",
    [
        (
            lambda c, q, k, v, g: c.step(*(t.repeat(1, 2, 1, 1) for t in (q, k, v, g))),
            ValueError,
            "exactly one position",
        ),
        (lambda c, q, k, v, g: c.step(q[0], k, v, g), ValueError, "q must have rank 4"),
        (lambda c, q, k, v, g: c.step(q, k.float(), v, g), TypeError, "k dtype"),
        (
            lambda c, q, k, v, g: c.step(
                q[:, :, :1], k.repeat(1, 1, 2, 1), v.repeat(1, 1, 2, 1), g[:, :, :1]
            ),
            ValueError,
            "multiple of the KV groups",
        ),
        (lambda c, q, k, v, g: c.step(q, k, v, g * 3), ValueError, "gates must be finite"),
        (lambda c, q, k, v, g: c.step(q, k, v, g, {"bad": (k, v)}), ValueError, "branch_kv keys"),
    ],
    ids=["T=2", "rank", "dtype", "H%G", "gates", "branch_kv"],
)
def test_bad_step_input(make_call, error, match):
    """Bad inputs raise ValueError/TypeError naming the argument (spec I.11)."""
    cache = NSACache(CONFIGS["overlap"])
    with torch.no_grad(), pytest.raises(error, match=match):
        make_call(cache, *_step_args())


def test_step_must_match_the_first_step():
    """Batch size, head sizes and dtype are fixed by the first step (and ``batch_size``)."""
    cfg = CONFIGS["overlap"]
    with torch.no_grad():
        cache = NSACache(cfg)
        cache.step(*_step_args())
        with pytest.raises(ValueError, match="do not match the cache"):
            cache.step(*_step_args(B=2))
        with pytest.raises(ValueError, match="do not match the cache"):
            cache.step(*_step_args(Dv=3))
        with pytest.raises(TypeError, match="dtype"):
            cache.step(*_step_args(dtype=torch.float32))
        with pytest.raises(ValueError, match="batch_size=3"):
            NSACache(cfg, batch_size=3).step(*_step_args(B=2))


def test_prefill_needs_an_empty_cache():
    """`prefill` only starts a cache; later tokens go through `step`."""
    cache = NSACache(CONFIGS["overlap"])
    with torch.no_grad():
        cache.prefill(*_step_args())
        with pytest.raises(ValueError, match="empty cache"):
            cache.prefill(*_step_args())


def test_step_refuses_autograd():
    """Decoding is inference only: inputs that require grad raise instead of silently detaching."""
    q, k, v, gates = _step_args()
    with pytest.raises(ValueError, match="q_t requires grad"):
        NSACache(CONFIGS["overlap"]).step(q.requires_grad_(), k, v, gates)


def test_bad_phi_output():
    """A phi that does not return ``[..., D]`` is reported by name."""
    cfg = NSAConfig(cmp_block=1, cmp_stride=1, sel_block=1, sel_top_n=3, window=2)
    cache = NSACache(cfg, phi_k=lambda x: x)  # keeps the block axis
    with torch.no_grad(), pytest.raises(ValueError, match="phi_k"):
        cache.step(*_step_args())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(cfg="paper"), TypeError, "cfg must be an NSAConfig"),
        (dict(scale=0.0), ValueError, "scale"),
        (dict(scale="1"), TypeError, "scale"),
        (dict(phi_k=3), TypeError, "phi_k"),
        (dict(max_len=0), ValueError, "max_len"),
        (dict(batch_size=1.5), TypeError, "batch_size"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    """Constructor arguments are checked up front."""
    cfg = kwargs.pop("cfg", CONFIGS["overlap"])
    with pytest.raises(error, match=match):
        NSACache(cfg, **kwargs)


# ---------------------------------------------------------------------------------------------
# Ragged batches, chunked prefill, append-only prefill (both paths share this bookkeeping; the
# Triton path runs the same checks in tests/test_decode_step.py)
# ---------------------------------------------------------------------------------------------


def per_sequence_prefill(cfg, q, k, v, gates, lengths, bkv=None, **kwargs):
    """Each sequence's own prefill over its first ``lengths[b]`` tokens: a list of outputs."""
    outs = []
    for b, n in enumerate(lengths):
        extra = None if bkv is None else {m: (kk[b : b + 1, :n], vv[b : b + 1, :n])
                                          for m, (kk, vv) in bkv.items()}
        outs.append(nsa_attention(q[b : b + 1, :n], k[b : b + 1, :n], v[b : b + 1, :n],
                                  gates[b : b + 1, :n], cfg, branch_kv=extra, **kwargs))
    return outs


def spec_reads(cfg: NSAConfig, blocks: list[int], p: int) -> dict[str, int]:
    """Spec I.9 counters of one (row, group) from its selected blocks."""
    return {"cmp": cfg.num_cmp(p), "sel": len(rules.selected_keys(blocks, p, cfg)),
            "win": min(cfg.window, p + 1)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_ragged_batch_decodes_each_sequence_at_its_own_length(dtype):
    """Three sequences loaded to 3, 12 and 17 tokens (ragged `append`), then 9 steps: every
    sequence's rows equal its own prefill; per-sequence reads follow spec I.9."""
    cfg = CONFIGS["overlap"]
    lengths, steps, T = [3, 12, 17], 9, 26
    q, k, v, gates, bkv = make_inputs(3, T, 2, 2, 5, 4, dtype, seed=21, branch_kv=True)
    full = per_sequence_prefill(cfg, q, k, v, gates, [n + steps for n in lengths], bkv)
    cache = NSACache(cfg)
    with torch.no_grad():
        cache.append(k, v, {n: (kk, vv) for n, (kk, vv) in bkv.items()}, lengths=lengths)
        assert cache.lengths == lengths and cache.reads == {"cmp": 0, "sel": 0, "win": 0}
        for i in range(steps):
            rows = torch.tensor([n + i for n in lengths])

            def at(t, rows=rows):
                return t[torch.arange(3), rows][:, None]

            o = cache.step(at(q), at(k), at(v), at(gates),
                           {n: (at(kk), at(vv)) for n, (kk, vv) in bkv.items()})
            for s in range(3):
                p = lengths[s] + i
                torch.testing.assert_close(o[s : s + 1], full[s][:, p : p + 1],
                                           atol=ATOL[dtype], rtol=0, msg=f"seq {s} p={p}")
                got = cache.reads_per_sequence[s]
                want = [spec_reads(cfg, blk, p) for blk in cache.selected_blocks[s].tolist()]
                assert got == {key: max(w[key] for w in want) for key in got}
    assert cache.lengths == [n + steps for n in lengths] and cache.length == 26


def check_slot_reset(cache: NSACache, dtype, atol: float) -> None:
    """Continuous batching on ``cache``: slots 0-2 hold sequences 0-2 (ragged `append`, 4
    steps); slot 1's request ends (`reset([1])`) and sequence 3 takes the slot (6 tokens by
    `append`, then 5 steps with the others); then slot 2 starts its sequence over by steps
    alone. Every row equals its own sequence's prefill; a reset slot's counters read 0 and its
    selection is empty until it computes a row."""
    cfg = CONFIGS["overlap"]
    q, k, v, gates, _ = make_inputs(4, 20, 2, 2, 5, 4, dtype, seed=33)
    full = per_sequence_prefill(cfg, q, k, v, gates, [20] * 4)
    seq_of = [0, 1, 2]  # the sequence each slot holds
    start = [7, 12, 5]  # tokens already in each slot

    def steps(n: int) -> None:
        for i in range(n):
            pos = [s + i for s in start]

            def at(t, pos=pos):
                return torch.stack([t[seq_of[b], pos[b]] for b in range(3)])[:, None]

            o = cache.step(at(q), at(k), at(v), at(gates))
            for b in range(3):
                torch.testing.assert_close(o[b], full[seq_of[b]][0, pos[b]][None], atol=atol,
                                           rtol=0, msg=f"slot {b} seq {seq_of[b]} p={pos[b]}")
        start[:] = [s + n for s in start]

    with torch.no_grad():
        cache.append(k[:3], v[:3], lengths=list(start))
        steps(4)
        cache.reset([1])
        assert cache.lengths == [11, 0, 9]
        assert cache.reads_per_sequence[1] == {"cmp": 0, "sel": 0, "win": 0}
        assert cache.reads_per_sequence[0]["cmp"] == cfg.num_cmp(10)
        assert bool((cache.selected_blocks[1] == -1).all())
        seq_of[1], start[1] = 3, 6
        k_new, v_new = torch.zeros_like(k[:3, :6]), torch.zeros_like(v[:3, :6])
        k_new[1], v_new[1] = k[3, :6], v[3, :6]
        cache.append(k_new, v_new, lengths=[0, 6, 0])
        assert cache.lengths == [11, 6, 9]
        steps(5)
        assert cache.lengths == [16, 11, 14]
        cache.reset([2])  # slot 2 starts over by steps alone (no append in between)
        seq_of[2], start[2] = 2, 0
        steps(3)
    assert cache.lengths == [19, 14, 3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_reset_of_one_sequence_refills_its_slot(dtype):
    check_slot_reset(NSACache(CONFIGS["overlap"]), dtype, ATOL[dtype])


def test_reset_of_sequences_rejects_bad_indices():
    cache = NSACache(CONFIGS["overlap"])
    with pytest.raises(ValueError, match="holds a batch"):
        cache.reset([0])
    _, k, v, _, _ = make_inputs(2, 3, 1, 2, 4, 4, torch.float64, seed=1)
    cache.append(k, v)
    for bad, error, match in (([2], ValueError, "0..1"), ([0, 0], ValueError, "distinct"),
                              ((True,), TypeError, "list of ints"), (1, TypeError, "list")):
        with pytest.raises(error, match=match):
            cache.reset(bad)
    cache.reset([])  # nothing to empty
    assert cache.lengths == [3, 3]


@pytest.mark.parametrize("variant", ["shared", "branch_kv", "phi"])
def test_extend_equals_steps(variant):
    """A chunk through `extend` gives the same rows, reads, selections and cache as C steps
    (float64: exact class), after a prompt and across emission and block boundaries."""
    cfg = CONFIGS["long-cmp"]
    q, k, v, gates, bkv = make_inputs(2, 23, 2, 2, 6, 5, torch.float64, seed=8,
                                      branch_kv=variant == "branch_kv")
    phi = weighted_pool if variant == "phi" else None
    a, b = NSACache(cfg, phi_k=phi, phi_v=phi), NSACache(cfg, phi_k=phi, phi_v=phi)
    with torch.no_grad():
        for cache in (a, b):
            cache.prefill(q[:, :5], k[:, :5], v[:, :5], gates[:, :5],
                          None if bkv is None else {n: (x[:, :5], y[:, :5]) for n, (x, y) in
                                                    bkv.items()})
        stepped, _ = decode_all(a, q[:, :14], k[:, :14], v[:, :14], gates[:, :14],
                                None if bkv is None else {n: (x[:, :14], y[:, :14]) for n, (x, y)
                                                          in bkv.items()}, start=5)
        chunk = b.extend(q[:, 5:14], k[:, 5:14], v[:, 5:14], gates[:, 5:14],
                         None if bkv is None else {n: (x[:, 5:14], y[:, 5:14]) for n, (x, y)
                                                   in bkv.items()})
        assert a.reads == b.reads and torch.equal(a.selected_blocks, b.selected_blocks)
        torch.testing.assert_close(chunk, stepped, atol=EXACT_ATOL, rtol=0)
        for x, y in zip(a._cmp, b._cmp, strict=True):
            torch.testing.assert_close(x, y, atol=EXACT_ATOL, rtol=0)
        # and both continue identically
        tail_a = a.step(row(q, 14), row(k, 14), row(v, 14), row(gates, 14), row_kv(bkv, 14))
        tail_b = b.step(row(q, 14), row(k, 14), row(v, 14), row(gates, 14), row_kv(bkv, 14))
    torch.testing.assert_close(tail_a, tail_b, atol=EXACT_ATOL, rtol=0)


def test_append_then_step_equals_prefill_then_step():
    """`append` (K/V only) leaves the cache exactly as `prefill` does: the next steps agree."""
    cfg = CONFIGS["overlap"]
    q, k, v, gates, _ = make_inputs(2, 19, 1, 2, 4, 4, torch.float64, seed=13)
    a, b = NSACache(cfg), NSACache(cfg)
    with torch.no_grad():
        a.prefill(q[:, :15], k[:, :15], v[:, :15], gates[:, :15])
        b.append(k[:, :15], v[:, :15])
        assert a.lengths == b.lengths == [15, 15]
        out_a, reads_a = decode_all(a, q, k, v, gates, None, start=15)
        out_b, reads_b = decode_all(b, q, k, v, gates, None, start=15)
    assert torch.equal(out_a, out_b) and reads_a == reads_b


def test_ragged_prefill_equals_per_sequence_prefill():
    """`prefill(lengths=...)` packs padded prompts into one varlen call: each sequence's rows
    equal its own prefill, padding rows are zero, and decoding continues per sequence."""
    cfg = CONFIGS["identity"]
    lengths = [6, 13]
    q, k, v, gates, _ = make_inputs(2, 15, 2, 2, 4, 3, torch.float64, seed=17)
    full = per_sequence_prefill(cfg, q, k, v, gates, [n + 2 for n in lengths])
    cache = NSACache(cfg)
    with torch.no_grad():
        o = cache.prefill(q[:, :13], k[:, :13], v[:, :13], gates[:, :13], lengths=lengths)
        for s, n in enumerate(lengths):
            torch.testing.assert_close(o[s, :n], full[s][0, :n], atol=EXACT_ATOL, rtol=0)
            assert torch.equal(o[s, n:], torch.zeros_like(o[s, n:]))
        assert cache.reads_per_sequence[0]["cmp"] == cfg.num_cmp(5)
        for i in range(2):
            rows, b = torch.tensor([n + i for n in lengths]), torch.arange(2)
            step = cache.step(*(t[b, rows][:, None] for t in (q, k, v, gates)))
            for s, n in enumerate(lengths):
                torch.testing.assert_close(step[s, 0], full[s][0, n + i], atol=EXACT_ATOL, rtol=0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda c, k, v: c.append(k, v, lengths=[1, 2, 3]), ValueError, "B=2 counts"),
        (lambda c, k, v: c.append(k, v, lengths=[0, 5]), ValueError, r"in 0\.\.4"),
        (lambda c, k, v: c.append(k, v, lengths=[1.0, 2]), TypeError, "lengths"),
        (lambda c, k, v: c.append(k[0], v), ValueError, r"\[B, C, G, D\]"),
        (lambda c, k, v: c.append(k, v[:, :3]), ValueError, "shapes"),
        (lambda c, k, v: c.append(k, v.float()), TypeError, "dtype"),
        (lambda c, k, v: c.append(k, v, {"x": (k, v)}), ValueError, "branch_kv keys"),
    ],
    ids=["lengths-B", "lengths-range", "lengths-type", "rank", "shape", "dtype", "branch"],
)
def test_bad_append_input(call, error, match):
    """`append` checks its K/V and lengths up front and names what is wrong (spec I.11)."""
    _, k, v, _, _ = make_inputs(2, 4, 1, 1, 4, 4, torch.float64, seed=0)
    with torch.no_grad(), pytest.raises(error, match=match):
        call(NSACache(CONFIGS["overlap"]), k, v)


def test_cache_api_errors():
    """Capacity, capture and path errors are clear ValueErrors/TypeErrors."""
    cfg = CONFIGS["overlap"]
    with pytest.raises(ValueError, match="path must be one of"):
        NSACache(cfg, path="cuda")
    with pytest.raises(ValueError, match="cuda_graph=True needs max_len"):
        NSACache(cfg, cuda_graph=True)
    with pytest.raises(ValueError, match="custom phi"):
        NSACache(cfg, path="triton", phi_k=weighted_pool)
    with pytest.raises(TypeError, match="splits"):
        NSACache(cfg, splits=4)
    q, k, v, gates, _ = make_inputs(1, 6, 1, 1, 4, 4, torch.float64, seed=0)
    cache = NSACache(cfg, max_len=6)
    with torch.no_grad():
        cache.append(k[:, :4], v[:, :4])
        cache.reserve(2)
        with pytest.raises(ValueError, match="max_len=6"):
            cache.reserve(3)
        with pytest.raises(ValueError, match="max_len=6"):
            cache.extend(q[:, :3], k[:, :3], v[:, :3], gates[:, :3])
        with pytest.raises(ValueError, match="captured Triton step"):
            cache.note_replay(1)  # the torch path has nothing to replay
        with pytest.raises(ValueError, match="empty cache"):
            cache.prefill(q, k, v, gates)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of cuda_graph")
def test_cuda_graph_on_cpu_is_a_clear_error():
    """``cuda_graph=True`` with CPU tensors raises at the first call instead of falling back."""
    q, k, v, gates, _ = make_inputs(1, 1, 1, 1, 4, 4, torch.float32, seed=0)
    cache = NSACache(CONFIGS["overlap"], max_len=8, cuda_graph=True)
    with torch.no_grad(), pytest.raises(ValueError, match="cuda_graph=True needs CUDA"):
        cache.step(q, k, v, gates)


# ---------------------------------------------------------------------------------------------
# The 64k needle (issue 11, the M6 long-context smoke) and the read counters of a long decode
# ---------------------------------------------------------------------------------------------

#: Needle position: inside selection block 200 (of 1024), far outside the window.
NEEDLE_POS = 64 * 200 + 20


def needle_context(T, G, h, D, dtype, device="cpu", seed=64):
    """A ``T``-token context with one planted key/value and the last query aimed at it.

    Keys and values are standard normal noise except position `NEEDLE_POS`, whose key is
    ``30*sqrt(D)`` along a unit direction ``u`` (so its logit is 120 against noise ~1) and whose
    value is a ``+-3`` pattern distinct per group (runs of ``g+1`` equal signs), so a head that
    got another group's value fails. The last query is ``4*u`` for every head. Returns
    ``(q_last [1,1,H,D], k [1,T,G,D], v [1,T,G,D], u)``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.randn(D, generator=gen, dtype=torch.float64)
    u /= u.norm()
    k = torch.randn(1, T, G, D, generator=gen, dtype=torch.float64)
    v = torch.randn(1, T, G, D, generator=gen, dtype=torch.float64)
    k[0, NEEDLE_POS] = 30 * math.sqrt(D) * u
    runs = torch.arange(D)[None, :] // torch.arange(1, G + 1)[:, None]  # [G, D]
    v[0, NEEDLE_POS] = 3.0 * torch.where(runs % 2 == 0, 1.0, -1.0)
    q = (4 * u).expand(1, 1, G * h, D)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v)) + (u,)


def needle_block_scores(q_last, k, cfg, h):
    """Eqs. 7, 9, 10 for the last row, straight from the definitions (float64, no nsa_impl):
    group scores ``[G, num_sel]`` from the mean-pooled keys."""
    T = k.shape[1]
    l, d, ls = cfg.cmp_block, cfg.cmp_stride, cfg.sel_block
    N = cfg.num_cmp(T - 1)
    kc = k[0].double().unfold(0, l, d)[:N].mean(-1)  # [N, G, D]
    qh = q_last[0, 0].double().reshape(-1, h, k.shape[-1])  # [G, h, D]
    p_cmp = torch.softmax(torch.einsum("ghd,ngd->ghn", qh, kc) / math.sqrt(k.shape[-1]), -1)
    i = torch.arange(N, device=k.device)[None, :]
    j = torch.arange(cfg.num_sel_blocks(T), device=k.device)[:, None]
    overlap = (torch.minimum(i * d + l, (j + 1) * ls) - torch.maximum(i * d, j * ls)).clamp(min=0)
    return torch.einsum("ghn,sn->gs", p_cmp, overlap.double() / d)


def check_needle(cache, q_last, k, v, cfg, h):
    """Load 65535 tokens with `append`, decode the last position with gates (0, 1, 0) (the
    output is the selection branch) and check the needle end to end."""
    T = k.shape[1]
    G = k.shape[2]
    gates = torch.tensor([0.0, 1.0, 0.0], dtype=q_last.dtype, device=q_last.device)
    gates = gates.expand(1, 1, G * h, 3)
    with torch.no_grad():
        cache.append(k[:, : T - 1], v[:, : T - 1])
        out = cache.step(q_last, k[:, T - 1 :], v[:, T - 1 :], gates)
    target = NEEDLE_POS // cfg.sel_block
    scores = needle_block_scores(q_last, k, cfg, h)
    b = (T - 1) // cfg.sel_block
    free = scores.clone()
    free[:, [0, b - 1, b]] = -1.0  # the forced blocks (init 1, local 2)
    assert free.argmax(-1).tolist() == [target] * G  # Eqs. 9/10 rank the needle's block first
    assert all(target in blocks for blocks in cache.selected_blocks[0].tolist())
    # The selection returns the needle's value; head g*h + i belongs to group g.
    expected = v[0, NEEDLE_POS].to(out.dtype).repeat_interleave(h, dim=0)  # [G*h, D]
    reads = cache.reads
    assert reads == {"cmp": 4095, "sel": 1024, "win": 512} and sum(reads.values()) == 5631
    assert sum(reads.values()) == cfg.decode_read_bound(T)
    return out[0, 0], expected


def test_needle_64k_torch_path():
    """64k context on the CPU, small heads (2 groups of 2 heads, D=16), float32: Eq. 9/10 scores
    put the needle's block first in every group, every head's selection branch returns its
    group's needle value and the last step reads num_cmp + n*l' + w = 4095 + 1024 + 512 = 5631
    tokens (spec I.9)."""
    cfg = NSAConfig()
    q_last, k, v, _ = needle_context(65536, 2, 2, 16, torch.float32)
    out, expected = check_needle(NSACache(cfg, max_len=65536, path="torch"), q_last, k, v, cfg, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_read_counters_over_a_long_decode():
    """300 steps from position 1748 (paper config, small heads): every step's counters equal
    spec I.9 computed from the step's own selection; cmp and win never decrease, sel never
    exceeds n*l', the sum stays within the bound, and the window saturates at w."""
    cfg = NSAConfig()
    start, steps = 1748, 300  # the last step, p = 2047, ends a selection block
    q, k, v, gates, _ = make_inputs(1, start + steps, 1, 2, 8, 8, torch.float32, seed=5)
    cache = NSACache(cfg, max_len=start + steps)
    previous = {"cmp": -1, "sel": 0, "win": -1}
    with torch.no_grad():
        cache.append(k[:, :start], v[:, :start])
        for p in range(start, start + steps):
            cache.step(row(q, p), row(k, p), row(v, p), row(gates, p), validate=False)
            got = cache.reads
            blocks = cache.selected_blocks[0, 0].tolist()
            assert got == spec_reads(cfg, blocks, p), p
            assert got["cmp"] >= previous["cmp"] and got["win"] >= previous["win"], p
            assert got["sel"] <= cfg.sel_top_n * cfg.sel_block
            assert sum(got.values()) <= cfg.decode_read_bound(p + 1)
            previous = got
    assert previous == {"cmp": cfg.num_cmp(start + steps - 1), "sel": 1024, "win": 512}
