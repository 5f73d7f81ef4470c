"""Full NSA with its host work removed: a planned call replayed from a CUDA graph, beside the
same planned call run eagerly and dense attention, in one process.

    python bench/graphed_bench.py [--T 8192,16384,32768,65536] > rows.jsonl

bf16, B=1, H=64 query heads in G=4 KV groups, Dk=Dv=128, the paper configuration (the setting
of ``.peers/peer_bench.py``, whose ``ROW`` line format this prints, so that
`bench/side_by_side.py` merges the rows). A planned `nsa_impl.nsa_attention` call performs no
host sync and keeps every shape static, so it can be captured: the forward with
``torch.cuda.graph`` under ``no_grad``, the forward+backward with
``torch.cuda.make_graphed_callables`` (one graph each way, replayed by autograd). Rows:
``dense-flash``/``dense-cudnn`` (SDPA, causal, GQA), ``nsa_impl (planned)`` (eager with a
prebuilt plan) and ``nsa_impl (CUDA graph)``. The difference of the last two is the host time
per call (Python, dispatch, launches) that a training or serving loop with static shapes can
remove. Medians of CUDA-event times; never asserts on time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.gpu_bench import timeit  # noqa: E402

H, G, D = 64, 4, 128
DT = torch.bfloat16


def emit(**row) -> None:
    print("ROW " + json.dumps(row), flush=True)


def inputs(T: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, T, H, D, device="cuda", generator=gen).to(DT)
    k, v = (torch.randn(1, T, G, D, device="cuda", generator=gen).to(DT) for _ in range(2))
    gates = torch.rand(1, T, H, 3, device="cuda", generator=gen).to(DT)
    return q, k, v, gates


def dense_rows(T: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, _ = inputs(T)
    leaves = [x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
    do = torch.randn(1, H, T, D, device="cuda", dtype=DT)
    for name, backend in (("dense-flash", SDPBackend.FLASH_ATTENTION),
                          ("dense-cudnn", SDPBackend.CUDNN_ATTENTION)):  # fmt: skip
        try:
            with sdpa_kernel([backend]):
                def fwd():
                    return F.scaled_dot_product_attention(*leaves, is_causal=True,
                                                          enable_gqa=True)

                with torch.no_grad():
                    tf = timeit(fwd)
                tb = timeit(lambda: torch.autograd.grad(fwd(), leaves, do))
            emit(who=name, T=T, fwd_ms=tf, fwdbwd_ms=tb)
        except Exception as exc:  # noqa: BLE001 - a missing backend is reported, not fatal
            print(f"{name} T={T} failed: {exc!r}"[:300], flush=True)


def nsa_rows(T: int) -> None:
    import nsa_impl

    cfg = nsa_impl.NSAConfig()
    q, k, v, gates = inputs(T)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, gates)]
    do = torch.randn_like(q)
    p_fwd = nsa_impl.plan(tuple(q.shape), cfg, kv_heads=G, device="cuda", dtype=DT,
                          backward=False)  # fmt: skip
    p_bwd = nsa_impl.plan(tuple(q.shape), cfg, kv_heads=G, device="cuda", dtype=DT,
                          backward=True)  # fmt: skip

    def call(plan, *xs):
        return nsa_impl.nsa_attention(*xs, cfg, plan=plan, validate=False)

    # eager, planned
    with torch.no_grad():
        tf = timeit(lambda: call(p_fwd, q, k, v, gates))
    tb = timeit(lambda: torch.autograd.grad(call(p_bwd, *leaves), leaves, do))
    emit(who="nsa_impl (planned)", T=T, fwd_ms=tf, fwdbwd_ms=tb)

    # forward: one graph, captured after a warm-up on a side stream (compiles the kernels)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            call(p_fwd, q, k, v, gates)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = call(p_fwd, q, k, v, gates)
    with torch.no_grad():
        eager = call(p_fwd, q, k, v, gates)
    graph.replay()
    if not torch.equal(out, eager):
        print(f"T={T}: graph replay differs from eager (max {(out - eager).abs().max():.3g})")
    tf_g = timeit(graph.replay)
    del graph, out

    # forward+backward: make_graphed_callables captures both directions
    fn = torch.cuda.make_graphed_callables(lambda *xs: call(p_bwd, *xs), tuple(leaves))
    tb_g = timeit(lambda: torch.autograd.grad(fn(*leaves), leaves, do))
    emit(who="nsa_impl (CUDA graph)", T=T, fwd_ms=tf_g, fwdbwd_ms=tb_g)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="8192,16384,32768,65536")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 2
    for T in (int(t) for t in args.T.split(",")):
        dense_rows(T)
        try:
            nsa_rows(T)
        except Exception as exc:  # noqa: BLE001 - a failed capture is reported, not fatal
            print(f"nsa_impl T={T} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
