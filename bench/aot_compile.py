"""Compile the v4 Triton kernels for a GPU target without a GPU: registers, spills, shared memory.

``python bench/aot_compile.py [--arch 90] [--filter topn]`` builds each kernel of
`nsa_impl.kernels._range_kernels`, `_topn_kernels` and `_gate_kernels` in every launch shape
the GPU sweep tries (`bench.gpu_prefill.candidates`) for the benchmark's shape (bf16, h=16,
D=128, paper config), through ``triton.compile`` (with the divisibility hints a real launch
gets) and the ptxas that ships with triton, and prints per build: MMA kind (wgmma / mma.sync,
+cp.async when the loop is software-pipelined), registers, spill bytes, stack, shared memory.
A build that fails prints the compiler's error: what would otherwise cost a GPU call. Nothing
runs; timings need the GPU. (Local triton may differ from the GPU machine's: 3.7 here, 3.6
there.)
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["TRITON_INTERPRET"] = "0"

H_PER_G, D = 16, 128
PAPER = dict(CL=32, CD=16, SELB=64, WIN=512, NTOP=16, INIT=1, LOCAL=2)


def _sig(fn, constexprs: dict, ptr: dict, floats=(), i64=()):
    """Triton signature: pointers by ``ptr`` (name -> dtype), floats, ints (i32 unless ``i64``)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr:
            sig[name] = "*" + ptr[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name in i64 else "i32"
    return sig


def _attrs(fn, sig: dict) -> dict:
    """The divisibility hints the runtime JIT would add: 16-byte aligned pointers and strides.

    Without them vector widths collapse to one element and nothing is software-pipelined
    (no cp.async), so register and shared-memory numbers would not be those of a real launch.
    Strides are the integer arguments whose names start with ``s`` (all multiples of 16 for the
    benchmark's shapes: H*D, G*D, D, 3 is not used as a stride hint).
    """
    out = {}
    for i, name in enumerate(fn.arg_names):
        kind = sig[name]
        if kind.startswith("*") or (kind == "i32" and name.startswith("s") and name != "sgi"):
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def _ptxas_report(ptx: str, arch: int) -> str:
    """Registers and spill bytes from the ptxas that ships with triton (``-v``)."""
    import re
    import subprocess
    import tempfile

    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", str(src), "-o",
                              str(Path(tmp) / "k.o")], capture_output=True, text=True)
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "no-mma")
    mma += "+cp.async" if "cp.async" in ptx else ""
    return (f"{mma:8s} regs {regs.group(1) if regs else '?':>3} "
            f"spill st/ld {spill.group(1) if spill else '?'}/{spill.group(2) if spill else '?'} "
            f"stack {stack.group(1) if stack else '?'}")


def build(fn, constexprs, ptr, floats, arch: int, warps: int, stages: int, label: str):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = _sig(fn, constexprs, ptr, floats)
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=_attrs(fn, sig))
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=warps, num_stages=stages))
        md = k.metadata
        print(f"OK   {label:48s} {_ptxas_report(k.asm['ptx'], arch)} "
              f"smem {md.shared / 1024:6.1f} KB", flush=True)
        return True
    except Exception as exc:  # noqa: BLE001 - report every failing build
        print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:1500]}", flush=True)
        traceback.print_exc(limit=2)
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--filter", default="")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = ap.parse_args(argv)
    from nsa_impl.kernels import _loader, triton_topn, tuning

    rk = _loader.load_kernel_module("_range_kernels.py", False)
    tk = _loader.load_kernel_module("_topn_kernels.py", False)
    gk = _loader.load_kernel_module("_gate_kernels.py", False)
    dt = args.dtype
    ieee = dt == "fp32"
    common = dict(H_PER_G=H_PER_G, DK=D, DV=D, BDK=D, BDV=D, IEEE=ieee, PRECISE=ieee)
    floats = ("qk_scale", "LN_DOM", "DOM", "scale")
    ok = True
    from bench.gpu_prefill import candidates

    cands = candidates()
    for mode, name in ((0, "cmp"), (1, "win")):
        geo = dict(MODE=mode, CL=PAPER["CL"] if mode == 0 else 1,
                   CD=PAPER["CD"] if mode == 0 else 1, WIN=1 if mode == 0 else PAPER["WIN"])
        for launch in cands[f"{name}_fwd"]:
            t = tuning.resolve(launch, H_PER_G, D, D, ieee)
            label = f"{name} fwd {launch.rows}x{launch.block_n} w{launch.warps} s{launch.stages}"
            if args.filter in label:
                c = dict(**geo, **common, HP=t.HP, P=t.P, A=0, BM=t.BM, BN=t.BN)
                ptr = dict(Q=dt, K=dt, V=dt, O=dt, LSE="fp32", QSTART="i64", KSTART="i64")
                ok &= build(rk._range_fwd_kernel, c, ptr, floats, args.arch, t.warps, t.stages,
                            label)
        for launch in cands[f"{name}_dq"]:
            for delta_only in (False, True):
                t = tuning.resolve(launch, H_PER_G, D, D, ieee)
                label = (f"{name} dq {launch.rows}x{launch.block_n} w{launch.warps} "
                         f"s{launch.stages}{' delta-only' if delta_only else ''}")
                if args.filter in label:
                    c = dict(**geo, **common, HP=t.HP, P=t.P, A=0, BM=t.BM, BN=t.BN,
                             DELTA_ONLY=delta_only)
                    ptr = dict(Q=dt, K=dt, V=dt, O=dt, DO=dt, DQ=dt, LSE="fp32", DELTA="fp32",
                               QSTART="i64", KSTART="i64")
                    ok &= build(rk._range_dq_kernel, c, ptr, floats, args.arch, t.warps,
                                t.stages, label)
        for launch in cands[f"{name}_dkdv"]:
            for nit, atomic in ((1, False), (32, False), (32, True)):
                t = tuning.resolve(launch, H_PER_G, D, D, ieee)
                label = (f"{name} dkdv {launch.rows}x{launch.block_n} w{launch.warps} "
                         f"s{launch.stages} c{launch.chunk} NIT={nit}"
                         f"{' atomic-dq' if atomic else ''}")
                if args.filter in label:
                    c = dict(**geo, **common, HP=t.HP, BKN=t.BN, QP=t.P, BR=t.BM, QCH=t.chunk,
                             NIT=nit, ATOMIC_DQ=atomic)
                    part = "fp64" if ieee else "fp32"
                    ptr = dict(Q=dt, K=dt, V=dt, DO=dt, LSE="fp32", DELTA="fp32", DK_OUT=dt,
                               DV_OUT=dt, PART_K=part, PART_V=part, DQ_ACC="fp32",
                               QSTART="i64", KSTART="i64")
                    ok &= build(rk._range_dkdv_kernel, c, ptr, floats, args.arch, t.warps,
                                t.stages, label)
        label = f"{name} reduce"
        if args.filter in label:
            part = "fp64" if ieee else "fp32"
            c = dict(BKN=64, NIT=32, DK=D, DV=D, BDK=D, BDV=D, IEEE=ieee)
            ptr = dict(PART_K=part, PART_V=part, DK_OUT=dt, DV_OUT=dt, KSTART="i64")
            ok &= build(rk._range_reduce_kernel, c, ptr, floats, args.arch, 4, 1, label)
    for tn in cands["topn"]:
        label = f"topn {tn.positions}x{tn.block_n} w{tn.warps} s{tn.stages}"
        if args.filter in label:
            bn, bs, bsp = triton_topn.band(32, 16, 64, tn.block_n)
            for write in (False, True):
                c = dict(CL=32, CD=16, SELB=64, R=4, M=2, NTOP=16, NP=16, INIT=1, LOCAL=2,
                         H_PER_G=H_PER_G, HP=16, P=tn.positions, BM=tn.positions * 16, BN=bn,
                         BS=bs, BSP=bsp, DK=D, BDK=D, IEEE=ieee, PRECISE=ieee,
                         WRITE_SCORES=write)
                ptr = dict(Q=dt, K=dt, LSE="fp32", IDX="i64", SC="fp32", QSTART="i64",
                           KSTART="i64")
                ok &= build(tk._select_kernel, c, ptr, floats, args.arch, tn.warps, tn.stages,
                            label + (" +scores" if write else ""))
    for g in cands["gate"]:
        label = f"gate {g.rows} w{g.warps}"
        if args.filter in label:
            c = dict(D=D, BD=D, BR=g.rows)
            ptr = dict(C=dt, S=dt, W=dt, GATES=dt, O=dt)
            ok &= build(gk._gate_fwd_kernel, c, ptr, floats, args.arch, g.warps, 2, label + " fwd")
            ptr = dict(DO=dt, C=dt, S=dt, W=dt, GATES=dt, DC=dt, DS=dt, DW=dt, DG=dt)
            ok &= build(gk._gate_bwd_kernel, c, ptr, floats, args.arch, g.warps, 2, label + " bwd")
    print("all builds OK" if ok else "SOME BUILDS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
