"""Where a full NSA call's time goes on a GPU: torch.profiler over a planned forward
(``torch.no_grad()``) and a forward+backward, the top kernels by device time, the host time, and
the device-busy fraction of the wall clock (host work and syncs show up as the gap); before the
profile, the unprofiled time per call with the plan reused and without a plan.

    python bench/profile_forward.py --T 65536 [--out DIR]

bf16, B=1, H=64, G=4, Dk=Dv=128, paper config; one warm-up call, then one profiled call each.
Prints a short table; with ``--out``, writes profile_<T>.txt. Never asserts on time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--out", default=None)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--reps", type=int, default=5, help="unprofiled calls timed per variant")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to profile")
        return 2
    import nsa_impl

    T, H, G, D, dt = args.T, 64, 4, 128, torch.bfloat16
    cfg = nsa_impl.NSAConfig()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, T, H, D, device="cuda", generator=gen).to(dt)
    k, v = (torch.randn(1, T, G, D, device="cuda", generator=gen).to(dt) for _ in range(2))
    gates = torch.rand(1, T, H, 3, device="cuda", generator=gen).to(dt)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, gates)]
    do = torch.randn_like(q)
    lines = [f"T={T} H={H} G={G} D={D} bf16, {torch.cuda.get_device_name()}"]

    for label, grad in (("forward (no_grad, plan reused)", False), ("forward+backward", True)):
        p = nsa_impl.plan(tuple(q.shape), cfg, kv_heads=G, device="cuda", dtype=dt, backward=grad)
        lines.append("route: " + " ".join(f"{b}={p.route[b].path}" for b in ("cmp", "sel", "win"))
                     + f" gate={p.route.gate}")

        def call():
            if grad:
                o = nsa_impl.nsa_attention(*leaves, cfg, plan=p, validate=False)
                torch.autograd.grad(o, leaves, do)
            else:
                with torch.no_grad():
                    nsa_impl.nsa_attention(q, k, v, gates, cfg, plan=p, validate=False)

        def no_plan():  # what a caller without a plan pays: the plan built inside
            if grad:
                o = nsa_impl.nsa_attention(*leaves, cfg, validate=False)
                torch.autograd.grad(o, leaves, do)
            else:
                with torch.no_grad():
                    nsa_impl.nsa_attention(q, k, v, gates, cfg, validate=False)

        for name, fn in (("plan reused", call), ("no plan", no_plan)):
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.reps):
                fn()
            torch.cuda.synchronize()
            lines.append(f"{label}, {name}: {(time.perf_counter() - t0) * 1e3 / args.reps:.2f} ms"
                         f" per call (mean of {args.reps}, unprofiled)")
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            t0 = time.perf_counter()
            call()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e3
        events = prof.key_averages()
        dev = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)
        busy = sum(e.self_device_time_total for e in events) / 1e3
        lines.append(f"\n## {label}: wall {wall:.2f} ms, device busy {busy:.2f} ms "
                     f"({100 * busy / wall:.0f}% of wall)")
        lines.append(f"{'kernel / op':70s} {'device ms':>10s} {'calls':>6s}")
        for e in dev[: args.top]:
            if e.self_device_time_total <= 0:
                break
            lines.append(f"{e.key[:70]:70s} {e.self_device_time_total / 1e3:10.3f} {e.count:6d}")
        host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        lines.append("host (self CPU ms): " + ", ".join(
            f"{e.key[:40]} {e.self_cpu_time_total / 1e3:.2f}" for e in host))
        syncs = [e for e in events if "synchronize" in e.key.lower() or "item" in e.key.lower()
                 or "_local_scalar_dense" in e.key]
        lines.append("syncs: " + (", ".join(f"{e.key} x{e.count}" for e in syncs) or "none seen"))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"profile_{T}.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
