"""`nsa_impl.NSACache`: token-by-token decoding against prefill and the reference cache (spec I.9).

Every decode test checks, at every step: the output row against the prefill row
(`nsa_impl.nsa_attention`) and against `nsa_ref.NSARefCache`, and ``cache.reads`` against the
spec I.9 values computed from the config and the prefill's selected blocks.
"""

from __future__ import annotations

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
