"""Host time of one planned NSA call on a CUDA GPU, measured where it runs.

    python bench/host_gpu.py [--T 8192,16384] [--backward] [--top 20] [--out DIR]

A call timed the way users time it (events around the call, then a sync) costs the host's time
to issue every launch plus the work the GPU still has when the host is done; when the host is
slower than the kernels, the GPU waits between launches. For each T (bf16, B=1, H=64, G=4,
Dk=Dv=128, paper config, the library's route) this prints:

* ``eager``: the event-timed call (median), as `bench/gpu_bench.py` and the peers' tool time it;
* ``graph``: the same planned call replayed from a CUDA graph (kernels only, no host);
* ``host``: the host's time to issue one call while the GPU is still busy with a long sleep
  queued before it (nothing waits on the GPU, so this is Python, dispatch and launch cost);
* the `nsa_impl` functions with the most host time per call (``cProfile`` over issued calls,
  self and cumulative), and the count of torch ops and Triton launches per call.

Prints lines ``ROW {json}`` and a table; ``--out`` writes host_gpu.txt. Never asserts on time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.utils._python_dispatch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.gpu_bench import timeit  # noqa: E402
from bench.profile_forward import _our_calls  # noqa: E402 - the same planned call it profiles

H, G, D = 64, 4, 128


def _graph_ms(fn, reps: int) -> float:
    """Median replay time of ``fn`` captured in a CUDA graph (warm-up on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timeit(graph.replay, reps=reps, max_ms=float("inf"))


def _busy_gpu(ms: float) -> None:
    """Queue about ``ms`` of sleep on the current stream (the GPU stays busy meanwhile)."""
    torch.cuda._sleep(int(ms * 1.98e6))  # cycles at the H200's ~1.98 GHz boost clock


def _host_ms(fn, reps: int) -> list[float]:
    """Host time per call of ``fn`` issued behind a sleeping GPU (one sample per call)."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        _busy_gpu(40.0)
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return out


class _Counts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts torch ops dispatched (the kernel ops included, each once)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _launch_count(fn) -> int:
    """CUDA kernels one call launches (torch.profiler's device events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    return sum(e.count for e in prof.key_averages()
               if getattr(e, "device_type", None) == cuda and e.self_device_time_total > 0)


def _profile_rows(fn, reps: int, top: int) -> list[str]:
    """The `nsa_impl` functions with the most host time per issued call (cProfile)."""
    prof = cProfile.Profile()
    for _ in range(reps):
        torch.cuda.synchronize()
        _busy_gpu(40.0)
        prof.enable()
        fn()
        prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    rows = []
    for (path, line, name), (_, ncalls, self_s, cum_s, _) in stats.items():
        if "nsa_impl" in path or "triton" in path:
            short = path.split("site-packages/")[-1].split("nsa_impl/")[-1]
            rows.append((self_s / reps * 1e3, cum_s / reps * 1e3, ncalls / reps,
                         f"{short}:{line} {name}"))
    total_self = sum(r[0] for r in rows if "triton/" not in r[3])
    out = [f"  Python self time in nsa_impl: {total_self:.3f} ms per call (under cProfile); "
           f"top by self time:",
           f"  {'function':64s} {'self ms':>8s} {'cum ms':>8s} {'calls':>6s}"]
    for s, c, n, name in sorted(rows, reverse=True)[:top]:
        out.append(f"  {name[:64]:64s} {s:8.3f} {c:8.3f} {n:6.0f}")
    return out


def _planned_call(nsa_impl, cfg, T: int, grad: bool):
    """A planned `nsa_attention` call on fresh paper-shaped inputs (with its backward)."""
    gen = torch.Generator(device="cuda").manual_seed(T)
    q = torch.randn(1, T, H, D, device="cuda", generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(1, T, G, D, device="cuda", generator=gen).to(torch.bfloat16)
            for _ in range(2))
    gates = torch.rand(1, T, H, 3, device="cuda", generator=gen).to(torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, gates)]
    do = torch.randn_like(q)
    call, _ = _our_calls(nsa_impl, cfg, q, k, v, gates, leaves, do, grad, [])
    return call


def _measure(nsa_impl, cfg, T: int, grad: bool, args) -> list[str]:
    """One ``ROW`` (printed) and the report lines of one (T, pass)."""
    call = _planned_call(nsa_impl, cfg, T, grad)
    label = "fwd+bwd" if grad else "fwd"
    eager = timeit(call, reps=args.reps, max_ms=float("inf"))
    try:
        graph = _graph_ms(call, args.reps)
    except Exception as exc:  # noqa: BLE001 - reported; the other numbers still count
        print(f"T={T} {label}: graph capture failed: {type(exc).__name__}: {exc}"[:300])
        graph = float("nan")
    host = _host_ms(call, args.reps)
    with _Counts() as counts:
        call()
    launches = _launch_count(call)
    row = dict(T=T, pass_=label, eager_ms=eager, graph_ms=graph,
               host_ms=statistics.median(host), host_min_ms=min(host),
               torch_ops=counts.n, cuda_launches=launches)
    print("ROW " + json.dumps(row), flush=True)
    lines = [f"T={T} {label}: eager {eager:.2f} ms, graph {graph:.2f} ms, host "
             f"{row['host_ms']:.2f} ms (min {row['host_min_ms']:.2f}), "
             f"{counts.n} torch ops, {launches} CUDA launches"]
    return lines + _profile_rows(call, max(5, args.reps // 2), args.top)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="8192,16384")
    ap.add_argument("--backward", action="store_true", help="forward+backward (default: both)")
    ap.add_argument("--forward", action="store_true", help="forward only")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure (bench/host_overhead.py measures the host on a CPU)")
        return 2
    import nsa_impl

    modes = [False, True]
    if args.backward != args.forward:
        modes = [args.backward]
    cfg = nsa_impl.NSAConfig()
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}"]
    for T in (int(t) for t in args.T.split(",")):
        for grad in modes:
            lines += _measure(nsa_impl, cfg, T, grad, args)
            torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "host_gpu.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
