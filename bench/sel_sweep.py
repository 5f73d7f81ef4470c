"""Launch shapes of the Triton selection kernels on one GPU: forward and backward, timed alone.

    python bench/sel_sweep.py --T 65536,8192 --out DIR [--budget-s 240] [--coherent] [--only-new]
        [--variants '[{}, {"tma": 0}]'] [--heads 16/4] [--dims 192/128]

bf16, B=1, H=64 query heads in G=4 KV groups (h=16; ``--heads H/G`` changes them), Dk=Dv=128,
the paper's l'=64 and n=16
with random paper-shaped selections (`bench.workloads.random_block_indices`: forced blocks
plus random ones per position, the worst case for sharing; ``--coherent``: one draw per query
block). Each variant overrides fields of `nsa_impl.kernels.triton_sel.LaunchShape` through
`nsa_impl.kernels.ops.tuning` and is timed by ``triton.testing.do_bench`` (median, L2 flushed
between runs): the forward (``sel_forward``) and the backward (inverse index, dQ, dK/dV, the
reduction). A variant that fails to compile or run is reported and skipped. Prints a table
sorted by forward+backward per T and writes sel_sweep.csv under ``--out``. Never asserts on
time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.workloads import parse_pair  # noqa: E402

H, G, D, SEL, TOP_N = 64, 4, 128, 64, 16

#: The variants, each a dict of `LaunchShape` overrides ({} is the library's default shape).
VARIANTS: list[dict] = [
    {},
    {"BN": 32}, {"warps_fwd": 2}, {"warps_fwd": 8}, {"stages_fwd": 1}, {"stages_fwd": 3},
    {"BN": 32, "stages_fwd": 3}, {"BN": 32, "warps_fwd": 2},
    {"stages_dq": 1}, {"stages_dq": 3},
    {"BKEY": 32}, {"QB": 2}, {"QB": 8}, {"warps_bwd": 8}, {"stages_kv": 2},
    {"QB": 8, "warps_bwd": 8}, {"BKEY": 32, "warps_bwd": 8}, {"CH": 256}, {"CH": 4096},
    {"P": 2}, {"P": 4},
    # fewer warps per program, more programs per SM (a 16-row tile needs one warp's MMA)
    {"warps_fwd": 1}, {"warps_fwd": 1, "stages_fwd": 3}, {"warps_fwd": 1, "stages_fwd": 4},
    {"warps_fwd": 2, "stages_fwd": 3}, {"warps_fwd": 1, "BN": 32},
    {"warps_dq": 2}, {"warps_dq": 2, "stages_dq": 3}, {"warps_dq": 1},
    {"warps_dq": 1, "stages_dq": 3},
    {"warps_bwd": 2}, {"warps_bwd": 2, "stages_kv": 2}, {"QB": 2, "warps_bwd": 2},
    {"warps_fwd": 1, "warps_dq": 2, "stages_dq": 3},
]
#: ``--only-new``: the variants after this index (and the default) only.
FIRST_NEW = 21


def time_variant(override: dict, q, k, v, idx, do, rep_ms: float) -> tuple[float, float]:
    """``(forward ms, backward ms)`` of the selection kernels under ``override``."""
    import triton.testing

    from nsa_impl.kernels import ops, triton_sel

    scale = 1.0 / math.sqrt(q.shape[-1])
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with ops.tuning(sel=override):
        def fwd():
            with torch.no_grad():
                triton_sel.selection_attention(q, k, v, idx, SEL, scale)

        o = triton_sel.selection_attention(*leaves, idx, SEL, scale)

        def bwd():
            torch.autograd.grad(o, leaves, do, retain_graph=True)

        fwd(), bwd()
        torch.cuda.synchronize()
        t_fwd = triton.testing.do_bench(fwd, warmup=10, rep=rep_ms, return_mode="median")
        t_bwd = triton.testing.do_bench(bwd, warmup=5, rep=rep_ms, return_mode="median")
    return float(t_fwd), float(t_bwd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="65536,8192")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--coherent", action="store_true")
    ap.add_argument("--only-new", action="store_true",
                    help="the default and the variants from FIRST_NEW on")
    ap.add_argument("--variants", default=None,
                    help='a JSON list of overrides instead, e.g. \'[{}, {"tma": 0}]\'')
    ap.add_argument("--heads", default=f"{H}/{G}", help="query heads / KV groups")
    ap.add_argument("--dims", default=f"{D}/{D}", help="Dk/Dv")
    args = ap.parse_args(argv)
    heads, groups = parse_pair(args.heads, "--heads")
    dk, dv = parse_pair(args.dims, "--dims")
    if heads % groups:
        ap.error(f"--heads: H must be a positive multiple of G, got {args.heads!r}")
    variants = [{}, *VARIANTS[FIRST_NEW:]] if args.only_new else VARIANTS
    if args.variants:
        variants = json.loads(args.variants)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to sweep")
        return 2
    from bench.workloads import random_block_indices, write_rows_csv

    deadline = time.monotonic() + args.budget_s
    lengths = [int(t) for t in args.T.split(",")]
    rows = []
    for T in lengths:
        gen = torch.Generator(device="cuda").manual_seed(T)
        q = torch.randn(1, T, heads, dk, device="cuda", generator=gen).to(torch.bfloat16)
        k = torch.randn(1, T, groups, dk, device="cuda", generator=gen).to(torch.bfloat16)
        v = torch.randn(1, T, groups, dv, device="cuda", generator=gen).to(torch.bfloat16)
        do = torch.randn(1, T, heads, dv, device="cuda", generator=gen).to(torch.bfloat16)
        idx = random_block_indices(1, T, groups, TOP_N, SEL, generator=gen, device="cuda",
                                   coherent=args.coherent)
        print(f"T={T} H={heads} G={groups} Dk/Dv={dk}/{dv} "
              f"({'coherent' if args.coherent else 'random'} selections), "
              f"{torch.cuda.get_device_name()}", flush=True)
        for override in variants:
            if time.monotonic() > deadline:
                print(f"  {override}: skipped (budget spent)", flush=True)
                continue
            try:
                f, b = time_variant(override, q, k, v, idx, do, args.rep_ms)
            except Exception as exc:  # noqa: BLE001 - a failing shape is reported, not fatal
                print(f"  {override}: ERROR {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            rows.append(dict(T=T, variant=str(override or "default"), fwd_ms=f, bwd_ms=b,
                             total_ms=f + b))
            print(f"  {str(override or 'default'):40s} fwd {f:8.3f}  bwd {b:8.3f}  "
                  f"sum {f + b:8.3f} ms", flush=True)
            torch.cuda.empty_cache()
        mine = sorted((r for r in rows if r["T"] == T), key=lambda r: r["total_ms"])
        for key in ("fwd_ms", "bwd_ms", "total_ms"):
            best = min(mine, key=lambda r: r[key], default=None)
            if best is not None:
                print(f"  best {key[:-3]} at T={T}: {best['variant']} {best[key]:.3f} ms",
                      flush=True)
        del q, k, v, do, idx
        torch.cuda.empty_cache()
    if args.out and rows:
        write_rows_csv(args.out, "sel_sweep.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
