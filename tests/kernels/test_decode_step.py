"""The fused decode kernels (`nsa_impl.kernels.decode_step`) through `NSACache(path="triton")`.

CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors) on tiny
shapes against `nsa_ref` (`NSARefCache`, `nsa_attention`) and against the torch path of the same
cache: float32 within the fp32 class (1e-6), bfloat16 by the low-precision criterion of spec
I.10, selected blocks and read counters exactly. Workspaces are filled with NaN first, so a
value a kernel forgot to write cannot pass as a plausible one. GPU tests (marker ``gpu``) repeat
the checks at the paper's shapes, the 64k needle, graph replay and the zero-sync step; they skip
with a reason where no CUDA GPU is present.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: the decode kernels cannot run", allow_module_level=True)

import nsa_ref  # noqa: E402
from nsa_impl import NSACache, NSAConfig, nsa_attention  # noqa: E402
from nsa_impl.kernels import decode_step  # noqa: E402
from nsa_impl.tolerances import FP32_OUT_ATOL, lowp_bound  # noqa: E402
from nsa_ref import rules  # noqa: E402

from ..helpers import plan_of  # noqa: E402
from ..test_decode import (  # noqa: E402
    CONFIGS,
    check_needle,
    check_slot_reset,
    expected_reads,
    make_inputs,
    needle_context,
    row,
)

#: Unwritten K2 candidates start as block 0 with a ``+inf`` key packed (`_pack_key`): read by
#: mistake, it would be chosen first.
POISON_CAND = (0x7F800000 << 32) + 0x7FFFFFFF

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch, request):
    """CPU tests: CPU tensors go to the interpreter; one intra-op thread (tiny tensors). GPU
    tests keep the environment as it is."""
    if request.node.get_closest_marker("gpu") is not None:
        yield
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kernel_cache(cfg, *, splits=(1, 1, 1), **kwargs) -> NSACache:
    """A Triton-path cache whose workspaces start as NaN (see the module docstring)."""
    cache = NSACache(cfg, path="triton", splits=splits, **kwargs)
    allocate = cache._workspace

    def poisoned(rows):
        fresh = rows not in cache._workspaces
        ws = allocate(rows)
        if fresh:
            for t in (ws.logits, ws.pm, ws.pl, ws.pacc):
                t.fill_(float("nan"))
            ws.cand.fill_(POISON_CAND)
            ws.sel_idx.fill_(-7)
            ws.sel_cnt.fill_(-7)
        return ws

    cache._workspace = poisoned
    return cache


def reference_rows(cfg, q, k, v, gates, bkv=None):
    """``(truth, naive)``: nsa_ref on the inputs in float32 (the spec's reference for both
    float32 and low-precision paths) and nsa_ref in the inputs' own dtype."""
    up = {n: (kk.float(), vv.float()) for n, (kk, vv) in bkv.items()} if bkv else None
    truth = nsa_ref.nsa_attention(q.float(), k.float(), v.float(), gates.float(), cfg,
                                  branch_kv=up)
    return truth, nsa_ref.nsa_attention(q, k, v, gates, cfg, branch_kv=bkv).float()


def assert_rows_close(got, truth, naive, dtype, what=""):
    """fp32 class for float32, the low-precision criterion otherwise (spec I.10)."""
    err = (got.float() - truth).abs().max().item()
    if dtype == torch.float32:
        assert err <= FP32_OUT_ATOL, f"{what}: {err:.3g} > {FP32_OUT_ATOL}"
    else:
        bound = lowp_bound((naive - truth).abs().max().item())
        assert err <= bound, f"{what}: {err:.3g} > {bound:.3g}"
    return err


# ---------------------------------------------------------------------------------------------
# CPU, Triton interpreter
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg_name, dtype",
    [(name, torch.float32) for name in CONFIGS] + [("overlap", torch.bfloat16),
                                                     ("long-cmp", torch.bfloat16),
                                                     ("identity", torch.float16)],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_steps_match_reference_and_torch_path(cfg_name, dtype):
    """Token by token from position 0 (every emission step, the first blocks, Eq. 9's band
    and forced blocks): outputs match nsa_ref, selected blocks match the prefill's
    block_indices, read counters match spec I.9, the compressed cache matches the torch path."""
    cfg = CONFIGS[cfg_name]
    T = 14
    q, k, v, gates, _ = make_inputs(2, T, 1, 2, 6, 5, dtype, seed=31)
    truth, naive = reference_rows(cfg, q, k, v, gates)
    _, aux = nsa_attention(q.double(), k.double(), v.double(), gates.double(), cfg,
                           return_aux=True)
    kc, tc = kernel_cache(cfg), NSACache(cfg, path="torch")
    with torch.no_grad():
        for p in range(T):
            args = (row(q, p), row(k, p), row(v, p), row(gates, p))
            o = kc.step(*args)
            tc.step(*args)
            assert o.dtype == dtype and o.shape == (2, 1, 2, 5)
            assert_rows_close(o, row(truth, p), row(naive, p), dtype, f"p={p}")
            want = aux.block_indices[:, p]
            got = kc.selected_blocks
            assert torch.equal(got, want), (p, got.tolist(), want.tolist())
            assert kc.reads == expected_reads(cfg, aux.block_indices, p) == tc.reads
            assert kc.length == p + 1
    # K1's in-place emission against the torch path's pooling: one rounding apart at most.
    rtol = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(kc._cmp[0], tc._cmp[0], atol=0, rtol=rtol)


def test_extend_equals_steps_and_ragged_branch_kv():
    """Per-branch K/V, three sequences at ragged lengths (`append` with lengths), then a chunk
    of 4 through `extend` and 3 steps: every row matches the torch path on the same calls
    (fp32 class), and `extend` equals the same tokens stepped one by one."""
    cfg = CONFIGS["overlap"]
    lengths, C = [2, 9, 13], 4
    q, k, v, gates, bkv = make_inputs(3, 20, 1, 2, 4, 4, torch.float32, seed=41, branch_kv=True)
    b = torch.arange(3)

    def at(t, i):  # sequence s's token lengths[s] + i, as [B, 1, ...]
        return t[b, torch.tensor([n + i for n in lengths])][:, None]

    def chunk(t):  # tokens lengths[s] .. lengths[s] + C - 1 of every sequence, [B, C, ...]
        return torch.cat([at(t, i) for i in range(C)], 1)

    caches = {"kernel": kernel_cache(cfg), "torch": NSACache(cfg, path="torch"),
              "stepped": kernel_cache(cfg)}
    outs = {}
    with torch.no_grad():
        for name, cache in caches.items():
            cache.append(k, v, bkv, lengths=lengths)
            if name == "stepped":
                first = torch.cat([cache.step(at(q, i), at(k, i), at(v, i), at(gates, i),
                                              {n: (at(x, i), at(y, i)) for n, (x, y) in
                                               bkv.items()}) for i in range(C)], 1)
            else:
                first = cache.extend(chunk(q), chunk(k), chunk(v), chunk(gates),
                                     {n: (chunk(x), chunk(y)) for n, (x, y) in bkv.items()})
            rest = [cache.step(at(q, i), at(k, i), at(v, i), at(gates, i),
                               {n: (at(x, i), at(y, i)) for n, (x, y) in bkv.items()})
                    for i in range(C, C + 3)]
            outs[name] = torch.cat([first] + rest, 1)
            assert cache.lengths == [n + C + 3 for n in lengths]
    for name in ("kernel", "stepped"):
        torch.testing.assert_close(outs[name], outs["torch"], atol=FP32_OUT_ATOL, rtol=0,
                                   msg=name)
        assert caches[name].reads_per_sequence == caches["torch"].reads_per_sequence
        assert torch.equal(caches[name].selected_blocks, caches["torch"].selected_blocks)
    torch.testing.assert_close(outs["kernel"], outs["stepped"], atol=FP32_OUT_ATOL, rtol=0)


def test_splits_over_a_longer_context(monkeypatch):
    """16-block tiles, 4 compressed, 2 window and 2 selection splits over 300 cached tokens
    (so every split holds work and K4 merges several partials): the steps match the torch
    path, and the single-split kernels, within the fp32 class."""
    monkeypatch.setattr(decode_step, "TILE", 32)  # float32 tiles: 16 blocks / keys
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=8, sel_top_n=5, window=40)
    q, k, v, gates, _ = make_inputs(2, 303, 1, 2, 4, 4, torch.float32, seed=43)
    caches = [kernel_cache(cfg, splits=(4, 2, 2)), kernel_cache(cfg),
              NSACache(cfg, path="torch")]
    outs = []
    with torch.no_grad():
        for cache in caches:
            cache.append(k[:, :300], v[:, :300])
            outs.append(torch.cat([cache.step(row(q, p), row(k, p), row(v, p), row(gates, p))
                                   for p in range(300, 303)], 1))
    for o in outs[:2]:
        torch.testing.assert_close(o, outs[2], atol=FP32_OUT_ATOL, rtol=0)
    # p = 302: 150 compressed blocks; 4 full blocks + keys 296..302 of the current one; 40 keys.
    assert caches[0].reads == caches[2].reads == {"cmp": 150, "sel": 4 * 8 + 7, "win": 40}
    assert torch.equal(caches[0].selected_blocks, caches[2].selected_blocks)


def test_launch_geometry_on_an_h200_at_the_paper_shapes(monkeypatch):
    """The measured launch policy (132 SMs, 16 heads per group, 64k): splits at 2 programs per
    SM, K2 gathering 16 / 4 / 1 heads per pass at B = 1 / 8 / 32 (`score_heads`), and
    `SCORE_HEADS` forcing its value."""
    cfg = tuple(int(x) for x in (32, 16, 64, 16, 1, 2, 512))
    cuda = torch.device("cuda")  # only the policy: nothing is allocated or launched
    geos = {B: decode_step.geometry(B, 4, 16, 65536, cfg, cuda, sms=132) for B in (1, 8, 32)}
    assert {B: g.score_heads for B, g in geos.items()} == {1: 16, 8: 4, 32: 1}
    assert {B: (g.splits.cmp, g.splits.sel) for B, g in geos.items()} == {
        1: (64, 16), 8: (8, 8), 32: (2, 2)}
    monkeypatch.setattr(decode_step, "SCORE_HEADS", 2)
    assert decode_step.geometry(32, 4, 16, 65536, cfg, cuda, sms=132).score_heads == 2


def test_reset_of_one_sequence_refills_its_slot_on_the_kernel_path():
    """`reset([b])` through the interpreted kernels (float32): the device lengths follow, the
    slot's new sequence and the others decode as their own prefills."""
    check_slot_reset(kernel_cache(CONFIGS["overlap"]), torch.float32, FP32_OUT_ATOL)


def test_needle_64k_kernel_path():
    """The 64k needle through the interpreted kernels (small heads, float32): K1 appends the last
    token and emits block 4094 in place, K2 ranks the needle's block into the top 16, K3
    returns each group's value to its heads, and the read counters say 4095 + 1024 + 512 = 5631
    (2 groups of 2 heads: the same group-to-head mapping as the paper-shape GPU test)."""
    cfg = NSAConfig()
    q_last, k, v, _ = needle_context(65536, 2, 2, 16, torch.float32)
    cache = NSACache(cfg, max_len=65536, path="triton")
    out, expected = check_needle(cache, q_last, k, v, cfg, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


# The split top-n (K2 chunk lists, K3 merge) against `nsa_impl.scoring.top_n` on crafted ties.

TIE_CONFIGS = {  # R = l'/d, MM = l/d: halo 1, none, 3 (wider than R)
    "overlap": NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=5, window=8),
    "identity": NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=4,
                          sel_init_blocks=2, sel_local_blocks=1, window=8),
    "long-cmp": NSAConfig(cmp_block=8, cmp_stride=2, sel_block=4, sel_top_n=3,
                          sel_init_blocks=0, sel_local_blocks=1, window=8),
}


def tie_levels(pattern: str, n: int, R: int, gen) -> torch.Tensor:
    """Levels (logit steps of 1) of ``n`` compressed keys whose Eq. 9 scores tie exactly: the
    level of compressed block ``i`` depends only on its selection-block class ``(i // R) % k``
    and offset ``i % R``, so blocks of one class see the same band values in the same order
    (bitwise-equal scores in float32 and float64). Classes must differ clearly: equal exact
    scores from different arrangements (say, an even/odd pattern under a symmetric band) round
    differently and are near-ties that no float32 kernel orders like float64 (the test checks
    the gaps)."""
    i = torch.arange(n)
    if pattern == "flat":  # every block ties (identity band: score = p_cmp)
        return torch.zeros(n, dtype=torch.float64)
    if pattern == "periodic":  # every third selection block high
        return 2.0 * ((i // R) % 3 == 0).double()
    table = torch.randint(0, 3, (3, R), generator=gen).double()  # three random classes
    return table[(i // R) % 3, i % R]


def reference_selection(cfg, q_row, kc, p, h, scale):
    """float64 Eqs. 7, 9-11 for one row: ``[G, n]`` blocks ascending, ``-1`` padded, and the
    group scores (to check that distinct scores are well apart)."""
    from nsa_impl import scoring

    G = kc.shape[0]
    M = cfg.num_cmp(p)
    S = -(-kc.shape[1] * cfg.cmp_stride // cfg.sel_block) + 1  # covers every compressed block
    logits = torch.einsum("ghd,gnd->ghn", q_row.double().reshape(G, h, -1),
                          kc[:, :M].double()) * scale
    p_cmp = torch.softmax(logits, -1) if M > 0 else logits.new_zeros(G, h, 0)
    scores = scoring.overlap_scores(p_cmp.sum(1), S, cfg)  # [G, S]
    b = torch.tensor([p // cfg.sel_block])
    return scoring.top_n(scores[:, None], b, cfg)[:, 0], scores[:, : p // cfg.sel_block + 1]


@pytest.mark.parametrize(("cfg_name", "chunk", "heads"), [
    ("overlap", 1, 16), ("overlap", 4, 16), ("identity", 2, 16), ("long-cmp", 2, 16),
    ("overlap", 4, 4), ("long-cmp", 2, 1)])
def test_split_top_n_equals_the_scoring_rule_on_ties(monkeypatch, cfg_name, chunk, heads):
    """K2 scores chunks of ``chunk`` selection blocks and keeps a top-n per chunk, K3 merges the
    lists: over crafted compressed keys (flat, periodic and few-level logits, so scores tie
    exactly across chunk boundaries), rows at ragged positions (fewer candidates than n early
    on, forced blocks in different chunks) the selection equals `nsa_impl.scoring.top_n` on the
    float64 scores, and the counts equal spec I.9, with K2 gathering ``heads`` heads per pass.
    Unwritten workspace entries are NaN/-7 (the packed candidates: a valid-looking block that
    must never be read)."""
    monkeypatch.setattr(decode_step, "SCORE_CHUNK", chunk)
    monkeypatch.setattr(decode_step, "SCORE_HEADS", heads)
    cfg = TIE_CONFIGS[cfg_name]
    G, h, D, cap = 2, 3, 16, 72
    gen = torch.Generator().manual_seed(7)
    ncmp = cfg.num_cmp(cap - 1)
    # "flat" ties blocks at the ends of the band (partly visible) with interior ones by equal
    # exact sums in different orders (near-ties): only where Eq. 9 is one term per block.
    banded = cfg.sel_block != cfg.cmp_stride or cfg.cmp_block != cfg.cmp_stride
    patterns = ("classes", "periodic", "classes") if banded else ("flat", "periodic", "classes")
    e0 = torch.zeros(D, dtype=torch.float64)
    e0[0] = 1.0
    R_ = cfg.sel_block // cfg.cmp_stride
    kc = torch.stack([torch.stack([tie_levels(pt, ncmp, R_, gen)[:, None] * e0 for pt in (a, b)])
                      for a, b in zip(patterns, patterns[1:] + patterns[:1], strict=True)])
    B = kc.shape[0]  # sequence b: group 0 pattern b, group 1 the next one
    raw = torch.randn(B, G, cap, D, generator=gen, dtype=torch.float64)
    positions = [0, 3, 4, 7, 8, 15, 16, 33, 47, 64, 71]
    seqs = [i % B for i in range(len(positions))]
    R = len(positions)
    scale = 1.0 / math.sqrt(D)
    q = (math.sqrt(D) * e0).expand(R, G * h, D)  # logit = level: steps of exp(1)
    f32 = torch.float32
    ws = decode_step.Workspace.allocate(R, G, h, D, cap, cfg_ints(cfg), None, "cpu")
    assert ws.geo.chunk == min(chunk, decode_step._next_pow2(-(-cap // cfg.sel_block)))
    for t in (ws.logits, ws.pm, ws.pl, ws.pacc):
        t.fill_(float("nan"))
    ws.cand.fill_(POISON_CAND)
    out = torch.empty(R, G * h, D, dtype=f32)
    gates = torch.full((R, G * h, 3), 1.0 / 3, dtype=f32)
    decode_step.decode_rows(
        q.to(f32).contiguous(), gates, out, torch.tensor(seqs, dtype=torch.int32),
        torch.tensor(positions, dtype=torch.int32), (raw.to(f32),) * 6,
        kc.to(f32).contiguous(), raw[:, :, :ncmp].to(f32).contiguous(), ws, cfg_ints(cfg),
        scale)
    assert torch.isfinite(out).all()
    got = ws.sel_idx[:, :, : cfg.sel_top_n].long()
    got = torch.where(got < 0, 1 << 20, got).sort(-1).values
    got = torch.where(got == 1 << 20, -1, got)
    ties = 0
    for r, (b, p) in enumerate(zip(seqs, positions, strict=True)):
        want, scores = reference_selection(cfg, q[r], kc[b], p, h, scale)
        for g in range(G):  # the data is fit for the test: distinct scores are far apart
            u = scores[g].unique()
            ties += scores[g].numel() - u.numel()
            if u.numel() > 1:
                assert ((u[1:] - u[:-1]) / u[1:].abs()).min() > 1e-4, (r, g, u.tolist())
        assert torch.equal(got[r], want), (r, p, got[r].tolist(), want.tolist())
        for g in range(G):
            assert ws.sel_cnt[r, g].item() == len(rules.selected_keys(want[g].tolist(), p, cfg))
    assert ties > 20  # the crafted keys do tie


def cfg_ints(cfg):
    """The 7 ints `decode_step.decode_rows` takes."""
    return (cfg.cmp_block, cfg.cmp_stride, cfg.sel_block, cfg.sel_top_n, cfg.sel_init_blocks,
            cfg.sel_local_blocks, cfg.window)


def test_float32_prefill_top_n_over_column_slices():
    """`NSACache.prefill`'s fused top-n on the Triton path (`triton_topn.select_blocks`) forms
    float32 inputs' float64 logits over 32-column slices of q and the keys (a resident float64
    query tile does not fit sm_90's shared memory): at Dk = 80 (slices at 0, 32 and a partly
    masked one at 64) it selects exactly the blocks nsa_ref selects."""
    from nsa_impl import scoring
    from nsa_impl.kernels import triton_attn, triton_topn, tuning

    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_top_n=4, sel_local_blocks=1,
                    window=8)  # two of the four blocks chosen by score
    tn = tuning.TopNTuning(positions=16, block_n=16)
    assert tuning.resolve_topn(tn, True, 80).KC == 32  # three slices
    B, T, G, h, D = 1, 160, 2, 2, 80
    q, k, v, gates, _ = make_inputs(B, T, G, h, D, D, torch.float32, seed=80)
    p = plan_of(q, k, v, cfg)
    kc = scoring.compress(k, cfg, p.cmp)
    qs, ks = p.cmp_triton.qstart, p.cmp_triton.kstart
    q3, k3 = q.reshape(B * T, G * h, D), kc.reshape(-1, G, D)
    small = tuning.AttnTuning(fwd=tuning.Launch(rows=16, block_n=16))
    _, lse = triton_attn.cmp_attention(q3, k3, k3, qs, ks, T, cfg.cmp_block, cfg.cmp_stride,
                                       tuning=small)
    idx, _ = triton_topn.select_blocks(
        q3, k3, lse, qs, ks, T, cmp_block=cfg.cmp_block, cmp_stride=cfg.cmp_stride,
        sel_block=cfg.sel_block, top_n=cfg.sel_top_n, init_blocks=cfg.sel_init_blocks,
        local_blocks=cfg.sel_local_blocks, tuning=tn)
    _, ref = nsa_ref.nsa_attention(q.double(), k.double(), v.double(), gates.double(), cfg,
                                   return_aux=True)
    assert torch.equal(idx.reshape(B, T, G, -1), ref.block_indices)


def test_replay_bookkeeping_and_supports():
    """`note_replay` advances the host lengths and refuses to pass max_len; `capture` on CPU
    tensors is a clear error (no silent fallback); `supports` says why the kernels cannot run."""
    cfg = CONFIGS["overlap"]
    q, k, v, gates, _ = make_inputs(1, 4, 1, 2, 4, 4, torch.float32, seed=0)
    cache = kernel_cache(cfg, max_len=6)
    with torch.no_grad():
        cache.step(row(q, 0), row(k, 0), row(v, 0), row(gates, 0))
    cache.note_replay(4)  # as if a captured step had run four more times on the device
    assert cache.lengths == [5] and cache.reads_per_sequence[0]["win"] == 5
    with pytest.raises(ValueError, match="max_len=6 exceeded"):
        cache.note_replay(2)
    with torch.no_grad(), pytest.raises(ValueError, match="capture needs the Triton decode path "
                                                          "on CUDA"):
        kernel_cache(cfg, max_len=6).capture(row(q, 0), row(k, 0), row(v, 0), row(gates, 0))
    ok, why = decode_step.supports(torch.float64, torch.device("cpu"), 8, 8)
    assert not ok and "float64" in why
    ok, why = decode_step.supports(torch.float32, torch.device("cpu"), 8, 512)
    assert not ok and "Dv=512" in why
    with pytest.raises(ValueError, match="cannot run here"):
        NSACache(cfg, path="triton").step(*(t.double() for t in (row(q, 0), row(k, 0),
                                                                 row(v, 0), row(gates, 0))))


def test_auto_path_keeps_the_interpreter_for_tests():
    """``path="auto"`` never runs the interpreter (tests ask for it); CPU caches use torch."""
    q, k, v, gates, _ = make_inputs(1, 1, 1, 2, 4, 4, torch.float32, seed=0)
    cache = NSACache(CONFIGS["overlap"])
    with torch.no_grad():
        cache.step(q, k, v, gates)
    assert cache.path == "torch"


# ---------------------------------------------------------------------------------------------
# CUDA (marker gpu): the paper's shapes, graphs, no host sync, the 64k needle
# ---------------------------------------------------------------------------------------------

PAPER = NSAConfig()


def gpu(test):
    """Marker ``gpu`` plus a skip with its reason where no CUDA GPU is present."""
    test = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test)
    return pytest.mark.gpu(test)


def cuda_inputs(B, T, G, h, D, dtype, seed):
    """Seeded ``q, k, v, gates`` on the GPU (drawn in float32, then cast)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    gates = torch.rand(B, T, G * h, 3, generator=gen, device="cuda").to(dtype)
    return randn(B, T, G * h, D), randn(B, T, G, D), randn(B, T, G, D), gates


def reference_decode_rows(cfg, q, k, v, gates, rows, dtype):
    """nsa_ref's own prefill rows (`nsa_ref.reference.nsa_row` + `gate`) for ``rows`` =
    ``[(b, p), ...]``, computed in ``dtype`` (float32: computed in float64, the truth; bf16:
    the naive low-precision twin). Returns ``[len(rows), H, Dv]``."""
    from nsa_ref import rules
    from nsa_ref.reference import SequenceKV, gate, nsa_row

    h = q.shape[2] // k.shape[2]
    scale = 1.0 / q.shape[-1] ** 0.5
    out, seqs = [], {}
    for b, p in rows:
        if b not in seqs:
            seq = SequenceKV(cfg, h)
            kb, vb = k[b].to(dtype), v[b].to(dtype)
            seq.set_raw(dict.fromkeys(("cmp", "sel", "win"), (kb, vb)))
            seq.compress_all()
            W = rules.overlap_weights(cfg.num_sel_blocks(kb.shape[0]), seq.cmp_k.shape[0], cfg)
            seqs[b] = (seq, W.to(q.device))
        seq, W = seqs[b]
        r = nsa_row(p, q[b, p].to(dtype), seq, scale, W)
        out.append(gate(r.o_cmp, r.o_sel, r.o_win, gates[b, p].to(dtype)))
    return torch.stack(out).float()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_decode_rows_equal_prefill_rows(dtype):
    """Paper shapes (64 heads, 4 groups, D=128, paper config), 1088-token prompt then 12 steps
    (top-n chooses among 18 blocks, the window is full): every decoded row equals nsa_ref's
    prefill row: fp32 class in float32 (NSA-P5), the low-precision criterion in bf16."""
    B, T0, steps = 2, 1088, 12
    q, k, v, gates = cuda_inputs(B, T0 + steps, 4, 16, 128, dtype, seed=11)
    cache = NSACache(PAPER, max_len=T0 + steps)
    with torch.no_grad():
        cache.prefill(q[:, :T0], k[:, :T0], v[:, :T0], gates[:, :T0], validate=False)
        assert cache.path == "triton"
        out = torch.cat([cache.step(row(q, p), row(k, p), row(v, p), row(gates, p),
                                    validate=False) for p in range(T0, T0 + steps)], 1)
    rows = [(b, p) for b in range(B) for p in range(T0, T0 + steps)]
    got = out.reshape(B * steps, 64, 128).float()
    truth = reference_decode_rows(PAPER, q, k, v, gates, rows, torch.float32)
    naive = reference_decode_rows(PAPER, q, k, v, gates, rows, dtype)
    err = assert_rows_close(got, truth, naive, dtype, "decode vs nsa_ref rows")
    print(f"{dtype}: max |decode - ref| = {err:.3g}")


@gpu
def test_gpu_ragged_extend_and_graph_replay():
    """bf16, paper shapes, four sequences at 17 / 70 / 1500 / 5000 tokens: a 5-token `extend`,
    then 6 steps eagerly and the same through ``cuda_graph=True``: graph and eager outputs
    and counters are identical, and equal nsa_ref's rows (low-precision criterion)."""
    lengths, C, steps = [17, 70, 1500, 5000], 5, 6
    B, Tmax = 4, 5000 + C + steps
    q, k, v, gates = cuda_inputs(B, Tmax, 4, 16, 128, torch.bfloat16, seed=12)
    b_idx = torch.arange(B, device="cuda")

    def at(t, i):
        return t[b_idx, torch.tensor([n + i for n in lengths], device="cuda")][:, None]

    outs, caches = {}, {}
    for name, graph in (("eager", False), ("graph", True)):
        cache = NSACache(PAPER, max_len=Tmax, cuda_graph=graph)
        with torch.no_grad():
            cache.append(k, v, lengths=lengths)
            rows = [cache.extend(*(torch.cat([at(t, i) for i in range(C)], 1)
                                   for t in (q, k, v, gates)), validate=False)]
            for i in range(C, C + steps):  # a graph step returns its static buffer: clone
                rows.append(cache.step(at(q, i), at(k, i), at(v, i), at(gates, i),
                                       validate=False).clone())
            outs[name] = torch.cat(rows, 1)
        caches[name] = cache
    assert torch.equal(outs["eager"], outs["graph"])
    assert caches["eager"].reads_per_sequence == caches["graph"].reads_per_sequence
    assert caches["eager"].lengths == caches["graph"].lengths == [n + C + steps for n in lengths]
    ref_rows = [(b, n + i) for b, n in enumerate(lengths) for i in range(C + steps)]
    truth = reference_decode_rows(PAPER, q, k, v, gates, ref_rows, torch.float32)
    naive = reference_decode_rows(PAPER, q, k, v, gates, ref_rows, torch.bfloat16)
    got = outs["eager"].reshape(B * (C + steps), 64, 128).float()
    assert_rows_close(got, truth, naive, torch.bfloat16, "ragged decode vs nsa_ref rows")


@gpu
def test_gpu_graph_replay_after_a_slot_reset():
    """bf16, paper shapes: a captured step keeps replaying across `reset([1])` (the graph reads
    the device lengths): slot 1 restarts at position 0 with sequence 2's tokens while slot 0
    goes on, eager and graph outputs are identical, and match nsa_ref's rows."""
    q, k, v, gates = cuda_inputs(3, 400, 4, 16, 128, torch.bfloat16, seed=14)

    def at(t, seqs, pos):
        return t[torch.tensor(seqs, device="cuda"), torch.tensor(pos, device="cuda")][:, None]

    outs = {}
    for name, graph in (("eager", False), ("graph", True)):
        cache = NSACache(PAPER, max_len=400, cuda_graph=graph)
        rows = []
        with torch.no_grad():
            cache.append(k[:2, :300], v[:2, :300])
            for i in range(3):
                p = [300 + i, 300 + i]
                rows.append(cache.step(at(q, [0, 1], p), at(k, [0, 1], p), at(v, [0, 1], p),
                                       at(gates, [0, 1], p), validate=False).clone())
            cache.reset([1])
            for i in range(4):
                p, seqs = [303 + i, i], [0, 2]
                rows.append(cache.step(at(q, seqs, p), at(k, seqs, p), at(v, seqs, p),
                                       at(gates, seqs, p), validate=False).clone())
        assert cache.lengths == [307, 4]
        outs[name] = torch.cat(rows, 1)
    assert torch.equal(outs["eager"], outs["graph"])
    ref_rows = [(0, 300 + i) for i in range(7)]
    got0 = outs["eager"][0].float()
    truth = reference_decode_rows(PAPER, q, k, v, gates, ref_rows, torch.float32)
    naive = reference_decode_rows(PAPER, q, k, v, gates, ref_rows, torch.bfloat16)
    assert_rows_close(got0, truth, naive, torch.bfloat16, "slot 0 across the reset")
    ref_rows = [(2, i) for i in range(4)]
    got1 = outs["eager"][1, 3:].float()
    truth = reference_decode_rows(PAPER, q, k, v, gates, ref_rows, torch.float32)
    naive = reference_decode_rows(PAPER, q, k, v, gates, ref_rows, torch.bfloat16)
    assert_rows_close(got1, truth, naive, torch.bfloat16, "slot 1 after the reset")


@gpu
def test_gpu_step_performs_no_host_sync():
    """A Triton decode step (validate=False) never synchronises with the host."""
    q, k, v, gates = cuda_inputs(2, 300, 4, 16, 128, torch.bfloat16, seed=13)
    cache = NSACache(PAPER, max_len=300)
    with torch.no_grad():
        cache.append(k[:, :290], v[:, :290])
        cache.step(row(q, 290), row(k, 290), row(v, 290), row(gates, 290), validate=False)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for p in range(291, 295):
                cache.step(row(q, p), row(k, p), row(v, p), row(gates, p), validate=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert cache.lengths == [295, 295]


@gpu
def test_gpu_needle_64k_paper_shapes():
    """The 64k needle at the paper's shapes (64 heads, 4 groups, D=128, bf16) on the Triton path:
    the needle's block is selected in every group, the output (gates 0/1/0) is its value, and
    the last step reads 4095 + 1024 + 512 = 5631 tokens."""
    q_last, k, v, _ = needle_context(65536, 4, 16, 128, torch.bfloat16, device="cuda")
    cache = NSACache(PAPER, max_len=65536)
    out, expected = check_needle(cache, q_last, k, v, PAPER, 16)
    assert cache.path == "triton"
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=0)


@gpu
def test_gpu_generate_with_cuda_graph_equals_eager():
    """`NSAToyLM.generate(cuda_graph=True)` (one whole model step captured and replayed) yields
    the same greedy tokens as the eager loop on the same Triton decode path."""
    from nsa_impl.model import NSAToyLM

    torch.manual_seed(0)
    model = NSAToyLM(97, 64, 4, 2, 16, num_layers=2, rope=True).cuda()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.normal_(0, 0.5)
    prompt = torch.randint(0, 97, (2, 40), device="cuda")
    eager = model.generate(prompt, 30)
    graphed = model.generate(prompt, 30, cuda_graph=True)
    assert torch.equal(eager, graphed)


def test_the_step_is_a_custom_op_with_declared_mutations(monkeypatch):
    """``nsa::decode_rows`` (what torch.compile traces) computes what the direct launches do,
    writing the same caches, workspace, output and lengths; opcheck's schema and fake tests
    pass for a step with the new token (every mutation declared)."""
    cfg = CONFIGS["overlap"]
    q, k, v, gates, _ = make_inputs(2, 9, 1, 2, 6, 5, torch.float32, seed=5)
    calls = []
    real = decode_step._launch
    monkeypatch.setattr(decode_step, "_launch", lambda *a: calls.append(a) or real(*a))
    eager, via_op = kernel_cache(cfg), kernel_cache(cfg)
    with torch.no_grad():
        for p in range(8):
            args = (row(q, p), row(k, p), row(v, p), row(gates, p))
            eager.step(*args)
            via_op.step(*args)
        n = len(calls)
        o_eager = eager.step(row(q, 8), row(k, 8), row(v, 8), row(gates, 8))
        # the same step through the registered op, on the other cache's own buffers
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        o_op = via_op.step(row(q, 8), row(k, 8), row(v, 8), row(gates, 8))
        monkeypatch.undo()
    assert len(calls) == n + 2  # both steps launched (the second inside the op)
    assert torch.equal(o_op, o_eager)
    assert via_op.lengths == eager.lengths
    q_, g_, out, seq, pos, raw, kc, vc, ws, sizes, scale, new, lengths = calls[-1]
    args = (q_, g_, out.clone(), seq, pos.clone(), [t.clone() for t in raw], kc.clone(),
            vc.clone(), [t.clone() for t in ws.buffers()], ws.sizes(), list(sizes), scale,
            list(new), lengths.clone())  # fmt: skip
    torch.library.opcheck(decode_step.decode_rows_op._opoverload, args,
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
