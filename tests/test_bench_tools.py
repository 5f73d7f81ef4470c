"""CPU checks of the benchmark tools that have a CPU mode (the GPU ones refuse without a GPU)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.triton
pytest.importorskip("triton", reason="triton is not installed")


def test_host_overhead_runs_with_stubbed_kernels_and_restores_them(capsys):
    """`bench/host_overhead.py`: a planned forward+backward with no kernel launched (so no
    interpreter time) is timed and its ops counted; the real kernel loaders come back."""
    from bench import host_overhead
    from nsa_impl.kernels import triton_attn, triton_gate, triton_sel, triton_topn

    mods = (triton_attn, triton_gate, triton_sel, triton_topn)
    before = [m._kernels for m in mods]
    assert host_overhead.main(["--backward", "--reps", "2", "--top", "3", "--ops"]) == 0
    out = capsys.readouterr().out
    assert "forward+backward, planned, kernels stubbed" in out and "torch ops dispatched" in out
    assert "sel_backward" in out  # the kernel ops are still dispatched, their launches stubbed
    assert [m._kernels for m in mods] == before


def test_decode_sweep_variants_apply_and_restore():
    """`bench/decode_sweep.py`: a variant sets the decode step's launch options and constants
    only inside `applied` (restored after an error too); bad variants are refused by name."""
    from bench import decode_sweep
    from nsa_impl.kernels import decode_step

    options, tile = dict(decode_step.LAUNCH_OPTIONS), decode_step.TILE
    variant = decode_sweep.check_variant({"options": {"cmp_win": [8, 3]}, "module": {"TILE": 128}})
    assert decode_sweep.describe(variant) == "cmp_win 8w/3s, TILE=128"
    with pytest.raises(RuntimeError, match="inside"), decode_sweep.applied(variant):
        assert decode_step.LAUNCH_OPTIONS["cmp_win"] == (8, 3) and decode_step.TILE == 128
        raise RuntimeError("inside")
    assert decode_step.LAUNCH_OPTIONS == options and decode_step.TILE == tile
    for bad, word in (({"warps": 4}, "unknown variant keys"), ({"options": {"k9": [4, 1]}}, "k9"),
                      ({"options": {"sel": [3, 1]}}, "power of two"),
                      ({"module": {"BLOCK": 2}}, "BLOCK"), ({"split_scale": [1, 0]}, "three")):
        with pytest.raises(ValueError, match=word):
            decode_sweep.check_variant(bad)
    for variant in decode_sweep.VARIANTS:  # the default sweep is well-formed
        decode_sweep.check_variant(variant)


def test_decode_sweep_scales_splits_to_powers_of_two():
    import torch

    from bench import decode_sweep
    from nsa_impl import NSAConfig
    from nsa_impl.kernels import decode_step

    cfg, cpu = NSAConfig(), torch.device("cpu")
    base = decode_step.default_splits(8, 4, cfg.num_cmp(65535), cfg.window, cfg.sel_top_n, cpu)
    half = decode_sweep.scaled_splits({"split_scale": [0.5, 1, 2]}, 8, 65536, cfg, 4, cpu)
    assert half == decode_step.Splits(max(1, base.cmp // 2), base.win, base.sel * 2)
    assert decode_sweep.scaled_splits({}, 8, 65536, cfg, 4, cpu) is None


def test_decode_sweep_records_each_launch_and_restores_the_kernels(monkeypatch):
    """`recorded_launches` sees the four launches of an interpreted decode step and puts the
    real kernels back."""
    import torch

    from bench import decode_sweep
    from nsa_impl import NSACache, NSAConfig
    from nsa_impl.kernels import decode_step

    module = decode_step._kernels(True)
    before = {attr: getattr(module, attr) for attr in decode_sweep.KERNELS.values()}
    cfg = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, window=4)
    cache = NSACache(cfg, path="triton", max_len=16)
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 9, 2, 16, generator=gen) for _ in range(2))
    cache.append(k, v)
    q, gates = torch.randn(1, 1, 4, 16, generator=gen), torch.rand(1, 1, 4, 3, generator=gen)
    # the sweep wraps the compiled module's kernels; here the interpreted one runs the step
    monkeypatch.setattr(decode_step, "_kernels", lambda interpret: module)
    with decode_sweep.recorded_launches({}) as launched:
        cache.step(q, k[:, :1], v[:, :1], gates)
    assert set(launched) == set(decode_sweep.KERNELS)
    assert {attr: getattr(module, attr) for attr in decode_sweep.KERNELS.values()} == before


def test_generate_bench_smoke_on_the_cpu(tmp_path):
    """`bench/generate_bench.py --smoke`: the eager NSA and dense variants of a tiny model
    generate at two contexts; every cell has a tokens/s or the noise note, and the table and
    CSV are written."""
    import csv

    from bench import generate_bench

    out = tmp_path / "gen"
    assert generate_bench.main(["--smoke", "--out", str(out)]) == 0
    with out.with_suffix(".csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["context"], r["variant"]) for r in rows} == {
        (c, v) for c in ("48", "96") for v in ("nsa-eager", "dense-eager")}
    for r in rows:
        assert (r["tokens_per_s"] and float(r["tokens_per_s"]) > 0) or r["error"].startswith(
            "noise"), r
    assert "| 48 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        generate_bench.main(["--smoke", "--variants", "nsa-graph", "--out", str(out)])


def test_generate_bench_static_dense_step_equals_sdpa():
    """The captured dense baseline's step (static buffer, length mask) computes what SDPA over
    exactly the cached keys does, so `dense-graph` times the same attention as `dense-eager`."""
    import torch

    from bench import generate_bench
    from nsa_impl import NSAConfig
    from nsa_impl.model import NSAToyLM

    torch.manual_seed(0)
    cfg = NSAConfig(**generate_bench.SMOKE_CONFIG)
    model = NSAToyLM(config=cfg, **generate_bench.SMOKE_MODEL).eval()
    blk = model.blocks[0].attn
    prompt = torch.randint(0, 64, (2, 20))

    def caches():
        return [generate_bench.DenseCache(2, blk.num_kv_heads, blk.head_dim, 30,
                                          model.head.weight) for _ in model.blocks]

    eager, static = caches(), caches()
    with torch.no_grad():
        a = generate_bench.dense_forward(model, prompt, eager, False)
        b = generate_bench.dense_forward(model, prompt, static, True)
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the prompt path is shared
        tok = a[:, -1:].argmax(-1)
        for _ in range(4):
            a = generate_bench.dense_forward(model, tok, eager, False)
            b = generate_bench.dense_forward(model, tok, static, True)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            tok = a[:, -1:].argmax(-1)
