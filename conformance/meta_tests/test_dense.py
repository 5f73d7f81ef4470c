"""The dense oracle's own helpers, on the spec's worked vectors (NSA-SPEC Part II §9), and its
independence from `nsa_ref`."""

from __future__ import annotations

import ast
import inspect
from fractions import Fraction

import torch

from conformance import dense, mutants
from nsa_ref import NSAConfig, nsa_attention

PAPER = NSAConfig()


def test_num_cmp_worked_values():
    # t = 200 (p = 199): floor(168/16) + 1 = 11 blocks; nothing before p + 1 = l.
    assert dense.num_cmp(199, PAPER) == 11
    assert dense.num_cmp(30, PAPER) == 0 and dense.num_cmp(31, PAPER) == 1
    assert dense.num_cmp(46, PAPER) == 1 and dense.num_cmp(47, PAPER) == 2


def test_num_cmp_matches_the_visibility_rule_for_many_configs():
    for l, d in [(1, 1), (4, 2), (8, 4), (12, 4), (32, 16)]:
        cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=d * 4, sel_top_n=4, window=8)
        for p in range(120):
            assert dense.num_cmp(p, cfg) == sum(1 for i in range(200) if i * d + l <= p + 1), (
                l,
                d,
                p,
            )


def test_overlap_matrix_worked_example():
    """Spec §9: W rows for j = 0..3 over compressed blocks 0..10 (l=32, d=16, l'=64)."""
    W = dense.overlap_matrix(4, 11, PAPER, exact=True)
    assert [[int(x) for x in row] for row in W] == [
        [2, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 2, 2, 2, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    # Weights 1,2,2,2,1 on blocks 4j-1 .. 4j+3 for an interior block.
    assert dense.overlap_matrix(3, 12, PAPER)[1, 3:8].tolist() == [1, 2, 2, 2, 1]


def test_eq9_worked_vector_at_t200():
    """p_cmp = (1..11)/66 gives p_slc = (8/33, 8/11, 34/33, 0), mass 2 = l/d (P9)."""
    W = dense.overlap_matrix(4, 11, PAPER, exact=True)
    p_cmp = [Fraction(i, 66) for i in range(1, 12)]
    p_slc = [sum(w * p for w, p in zip(row, p_cmp, strict=False)) for row in W]
    assert p_slc == [Fraction(8, 33), Fraction(8, 11), Fraction(34, 33), 0]
    assert sum(p_slc) == 2


def test_the_v1_reading_mutant_gives_the_spec_vector():
    """The +m+n mutant reproduces the spec's v1 vector (4/11, 28/33, 17/22, 0), mass < 2."""
    W = mutants._eq9_plus(None)(4, 11, PAPER, dtype=torch.float64)
    p_cmp = torch.arange(1, 12, dtype=torch.float64) / 66
    got = (W @ p_cmp).tolist()
    want = [4 / 11, 28 / 33, 17 / 22, 0.0]
    assert max(abs(a - b) for a, b in zip(got, want, strict=False)) < 1e-15
    assert abs(sum(got) - 2) > 0.01


def test_read_bound_worked_values():
    assert dense.read_bound(65536, PAPER) == 5631
    # Table 4 lists s/16 + 1536; the exact bound is one below it.
    assert [dense.read_bound(s, PAPER) for s in (8192, 16384, 32768, 65536)] == [
        2047,
        2559,
        3583,
        5631,
    ]


def test_masked_softmax_empty_rows_are_zero_without_nan():
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [False] * 5, [True, False, False, False, True]])
    probs = dense.masked_softmax(logits, mask)
    assert probs[1].abs().max() == 0
    assert torch.allclose(probs.sum(-1), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    assert probs[2, 1:4].abs().max() == 0  # exact exclusion
    (g,) = torch.autograd.grad((probs * torch.randn(3, 5, dtype=torch.float64)).sum(), [logits])
    assert torch.isfinite(g).all() and g[1].abs().max() == 0


def test_dense_agrees_with_the_reference_exactly():
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=3, window=10)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 45, 4, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 45, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 45, 2, 6, generator=gen, dtype=torch.float64)
    g = torch.rand(1, 45, 4, 3, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, 9, 30, 45], dtype=torch.int32)
    o, aux = nsa_attention(q, k, v, g, cfg, cu_seqlens=cu, return_aux=True)
    d = dense.nsa_dense(q, k, v, g, cfg, cu_seqlens=cu)
    assert torch.equal(aux.block_indices, d.block_indices)
    for name in ("o_cmp", "o_sel", "o_win", "p_cmp", "p_slc"):
        assert (getattr(aux, name) - getattr(d, name)).abs().max() <= 1e-12, name
    assert (o - d.o).abs().max() <= 1e-12


def test_dense_positions_subset_equals_full_rows():
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_top_n=3, window=10)
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 40, 2, 8, generator=gen), torch.randn(2, 40, 1, 8, generator=gen)
    v, g = torch.randn(2, 40, 1, 4, generator=gen), torch.rand(2, 40, 2, 3, generator=gen)
    full = dense.nsa_dense(q, k, v, g, cfg)
    rows = torch.tensor([0, 7, 31, 39])
    part = dense.nsa_dense(q, k, v, g, cfg, positions=rows)
    assert torch.allclose(part.o, full.o[:, rows], atol=1e-6)
    assert torch.equal(part.block_indices, full.block_indices[:, rows])


def test_given_block_indices_ignore_duplicates_and_padding():
    cfg = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_top_n=3, window=4)
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 16, 1, 4, generator=gen), torch.randn(1, 16, 1, 4, generator=gen)
    v, g = torch.randn(1, 16, 1, 4, generator=gen), torch.rand(1, 16, 1, 3, generator=gen)
    plain = torch.tensor([0, 1, -1]).expand(1, 16, 1, 3)
    noisy = torch.tensor([1, 0, 1, -1, 0]).expand(1, 16, 1, 5)
    a = dense.nsa_dense(q, k, v, g, cfg, block_indices=plain)
    b = dense.nsa_dense(q, k, v, g, cfg, block_indices=noisy)
    assert torch.equal(a.o_sel, b.o_sel)


def test_dense_shares_no_code_with_the_reference():
    """Only `nsa_ref.config.NSAConfig` is imported, and no NSAConfig helper method is called."""
    source = inspect.getsource(dense)
    tree = ast.parse(source)
    imported = [
        (n.module, [a.name for a in n.names])
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("nsa_ref")
    ]
    assert imported == [("nsa_ref.config", ["NSAConfig"])]
    assert not any(
        isinstance(n, ast.Import) and any(a.name.startswith("nsa_ref") for a in n.names)
        for n in ast.walk(tree)
    )
    for helper in ("num_cmp(", "num_sel_blocks(", "decode_read_bound(", "forced_blocks"):
        assert f"cfg.{helper}" not in source, helper
