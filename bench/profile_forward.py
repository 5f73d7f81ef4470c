"""Where a full NSA call's time goes on a GPU: torch.profiler over a planned forward
(``torch.no_grad()``) and a forward+backward, the top kernels by device time, the host time, and
the device-busy fraction of the wall clock (host work and syncs show up as the gap); before the
profile, the unprofiled time per call with the plan reused and without a plan.

    python bench/profile_forward.py --T 65536 [--out DIR] [--who flash_nsa] [--dims 192/128]
        [--heads 16/4]

bf16, B=1, H=64, G=4, Dk=Dv=128 (``--heads H/G``, ``--dims Dk/Dv`` change them), paper
config; one warm-up call, then one profiled call each.
Prints a short table; with ``--out``, writes profile_<T>.txt (profile_flash_nsa_<T>.txt).
``--who flash_nsa`` profiles that peer's ``HFNSACore`` on the same inputs and configuration
instead (measuring only: it must be importable, with a ``flash_attn`` on the path, e.g. the
peers' stand-in; see ``bench/gpu_session.sh``). Never asserts on time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--out", default=None)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--reps", type=int, default=5, help="unprofiled calls timed per variant")
    ap.add_argument("--who", choices=("nsa_impl", "flash_nsa"), default="nsa_impl")
    ap.add_argument("--dims", default="128/128", help="Dk/Dv")
    ap.add_argument("--heads", default="64/4", help="query heads / KV groups")
    args = ap.parse_args(argv)
    from bench.workloads import parse_pair

    (DK, DV), (H, G) = parse_pair(args.dims, "--dims"), parse_pair(args.heads, "--heads")
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to profile")
        return 2
    import nsa_impl

    T, dt = args.T, torch.bfloat16
    cfg = nsa_impl.NSAConfig()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, T, H, DK, device="cuda", generator=gen).to(dt)
    k = torch.randn(1, T, G, DK, device="cuda", generator=gen).to(dt)
    v = torch.randn(1, T, G, DV, device="cuda", generator=gen).to(dt)
    gates = torch.rand(1, T, H, 3, device="cuda", generator=gen).to(dt)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, gates)]
    do = torch.randn(1, T, H, DV, device="cuda", generator=gen).to(dt)
    lines = [f"T={T} H={H} G={G} Dk/Dv={DK}/{DV} bf16, {torch.cuda.get_device_name()}, "
             f"{args.who}"]
    if args.who == "flash_nsa" and DK != DV:
        ap.error("--who flash_nsa profiles Dk = Dv only")
    peer = _flash_nsa(cfg, H, G, DK, dt) if args.who == "flash_nsa" else None

    for label, grad in (("forward (no_grad, plan reused)", False), ("forward+backward", True)):
        if peer is not None:
            label = label.replace(" (no_grad, plan reused)", " (no_grad)")
            call = _peer_call(peer, leaves if grad else (q, k, v, gates), do, grad)
            variants = (("flash_nsa", call),)
        else:
            call, no_plan = _our_calls(nsa_impl, cfg, q, k, v, gates, leaves, do, grad, lines)
            variants = (("plan reused", call), ("no plan", no_plan))
        for name, fn in variants:
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
        shape = "" if (DK, DV, H, G) == (128, 128, 64, 4) else f"_{DK}x{DV}_h{H // G}"
        who = "" if peer is None else "flash_nsa_"
        name = f"profile_{who}{T}{shape}.txt"
        Path(args.out, name).write_text(text + "\n")
    return 0


def _our_calls(nsa_impl, cfg, q, k, v, gates, leaves, do, grad, lines):
    """``(planned call, plan-free call)`` of `nsa_impl.nsa_attention`; notes the route."""
    p = nsa_impl.plan(tuple(q.shape), cfg, kv_heads=k.shape[2], v_head_dim=v.shape[-1],
                      device="cuda", dtype=q.dtype, backward=grad)
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

    return call, no_plan


def _flash_nsa(cfg, H, G, D, dt):
    """The peer's module with our configuration (mdy666's flash_nsa, for measuring only)."""
    from flash_nsa import HFNSACore, NSAConfig

    peer_cfg = NSAConfig(
        head_dim=D, num_heads=H, num_kv_heads=G, kernel_size=cfg.cmp_block,
        stride=cfg.cmp_stride, block_size=cfg.sel_block, top_n=cfg.sel_top_n,
        num_init_blocks=cfg.sel_init_blocks, num_local_blocks=cfg.sel_local_blocks,
        window_size=cfg.window,
    )
    return HFNSACore(peer_cfg).to(device="cuda", dtype=dt)


def _peer_call(peer, tensors, do, grad):
    """One flash_nsa call on our ``[1, T, ...]`` tensors (it takes ``[T, ...]`` + cu_seqlens)."""
    flat = [t.squeeze(0) for t in tensors]
    cu = torch.tensor([0, flat[0].shape[0]], device="cuda", dtype=torch.int32)

    def call():
        if grad:
            torch.autograd.grad(peer(*flat, cu), tensors, do.squeeze(0))
        else:
            with torch.no_grad():
                peer(*flat, cu)

    return call


if __name__ == "__main__":
    sys.exit(main())
