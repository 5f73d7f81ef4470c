"""Host time of one planned NSA call, without a GPU: the Triton launches stubbed out.

    python bench/host_overhead.py [--backward] [--reps 200] [--top 25] [--ops]

At short lengths a GPU call is host-bound (8k on an H200: 4.9 ms eager, 3.2 ms replayed from a
CUDA graph; docs/gpu_notes.md). This measures the host side on the CPU: the triton route's
planned call (`nsa_impl.nsa_attention` with a prebuilt plan, ``validate=False``) on tiny CPU
tensors, with every Triton kernel replaced by a launcher that does nothing (the outputs keep
whatever the glue allocated; the top-n's block indices are zeroed), so what is timed is
Python, torch dispatch and the glue's torch ops on tiny tensors. A CUDA run adds a kernel
launch (~3-6 µs) per torch op and per Triton launch on top. The ops outside the kernel ops
are counted with a dispatch mode (``--ops``: by op and issuing function). Prints the time per
call, the op count and the Python functions of ``nsa_impl`` with the most self time
(``cProfile``).
Numbers are a proxy for the host share of a GPU call, never a measurement of it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


class _NoLaunch:
    """``kernel[grid](*args, **kw)`` that launches nothing; the top-n kernel's block indices
    (its 4th argument) are zeroed instead, so the backward reads valid ones (one op more)."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.name == "_select_kernel":
                args[3].zero_()

        return launch


class _StubKernels:
    """A kernel module whose every kernel is a `_NoLaunch`."""

    def __getattr__(self, name):
        return _NoLaunch(name)


@contextlib.contextmanager
def stubbed_kernels():
    """Every Triton kernel module of `nsa_impl.kernels` replaced by `_StubKernels`."""
    from nsa_impl.kernels import triton_attn, triton_gate, triton_sel, triton_topn

    mods = (triton_attn, triton_gate, triton_sel, triton_topn)
    saved = [m._kernels for m in mods]
    for m in mods:
        m._kernels = lambda interpret: _StubKernels()
    try:
        yield
    finally:
        for m, kernels in zip(mods, saved, strict=True):
            m._kernels = kernels


class _CountOps(TorchDispatchMode):
    """Counts dispatched ops, by op and by the innermost `nsa_impl` function that issued it."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.by_site: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        frame = sys._getframe(1)
        while frame is not None and "nsa_impl" not in frame.f_code.co_filename:
            frame = frame.f_back
        site = ("?" if frame is None else
                f"{frame.f_code.co_filename.split('nsa_impl/')[-1]}:{frame.f_code.co_name}")
        self.by_site[(site, str(func.overloadpacket.__name__))] += 1
        return func(*args, **(kwargs or {}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backward", action="store_true", help="forward+backward (default: forward)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--ops", action="store_true", help="also list the ops by issuing function")
    args = ap.parse_args(argv)
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors take the triton route
    import nsa_impl
    from nsa_impl import dispatch

    cfg = nsa_impl.NSAConfig(cmp_block=16, cmp_stride=8, sel_block=16, sel_top_n=4, window=32)
    T, H, G, D = 128, 32, 2, 16  # h = 16 heads per group, as in the benchmarks (P = 1)
    gen = torch.Generator().manual_seed(0)
    # float32: on the CPU half precision computes in float32 (casts a CUDA call does not have)
    q = torch.randn(1, T, H, D, generator=gen)
    k, v = (torch.randn(1, T, G, D, generator=gen) for _ in range(2))
    gates = torch.rand(1, T, H, 3, generator=gen)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, gates)]
    do = torch.randn_like(q)
    with dispatch.force_path(cmp="triton", sel="triton", win="triton"):
        p = nsa_impl.plan(tuple(q.shape), cfg, kv_heads=G, device="cpu", dtype=q.dtype,
                          backward=args.backward)  # fmt: skip

    def call():
        if args.backward:
            o = nsa_impl.nsa_attention(*leaves, cfg, plan=p, validate=False)
            torch.autograd.grad(o, leaves, do)
        else:
            with torch.no_grad():
                nsa_impl.nsa_attention(q, k, v, gates, cfg, plan=p, validate=False)

    with stubbed_kernels():
        for _ in range(5):
            call()
        t0 = time.perf_counter()
        for _ in range(args.reps):
            call()
        per_call = (time.perf_counter() - t0) / args.reps * 1e3
        with _CountOps() as ops:
            call()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.reps):
            call()
        prof.disable()
    label = "forward+backward" if args.backward else "forward"
    print(f"{label}, planned, kernels stubbed: {per_call:.3f} ms per call on this CPU, "
          f"{ops.count} torch ops dispatched")
    if args.ops:
        print(f"{'issuing function':58s} {'op':24s} {'count':>5s}")
        for (site, op), n in sorted(ops.by_site.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"{site:58s} {op:24s} {n:5d}")
    stats = pstats.Stats(prof).stats
    rows = [(fn.split("nsa_impl/")[-1], line, name, tt / args.reps * 1e3, ct / args.reps * 1e3,
             nc / args.reps)
            for (fn, line, name), (_, nc, tt, ct, _) in stats.items() if "nsa_impl" in fn]
    total = sum(r[3] for r in rows)
    print(f"Python self time in nsa_impl: {total:.3f} ms per call (under cProfile)")
    print(f"{'function':58s} {'self ms':>8s} {'cum ms':>8s} {'calls':>6s}")
    for f, line, name, tt, ct, nc in sorted(rows, key=lambda r: -r[3])[: args.top]:
        print(f"{f + ':' + str(line) + ' ' + name:58s} {tt:8.4f} {ct:8.4f} {nc:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
