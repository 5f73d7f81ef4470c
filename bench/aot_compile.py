"""Compile the Triton kernels for a GPU target without a GPU: registers, spills, shared memory.

``python bench/aot_compile.py [--arch 90] [--dtype bf16|fp16|fp32] [--dk 128 --dv 128]
[--shapes sweep|profile] [--decode] [--check] [--filter topn]`` builds each kernel of
`nsa_impl.kernels._range_kernels`, `_topn_kernels` and `_gate_kernels` in every launch shape
the GPU sweep tries (``--shapes sweep``, `bench.gpu_prefill.candidates`) or only in the shapes
the library launches (``--shapes profile``: the ``sm<arch>`` profile's defaults, resolved per
dtype as the launchers do), and with ``--decode`` the four decode kernels exactly as
`nsa_impl.kernels.decode_step.launches` gives them for the decode grid (B=1/8/32 at T=64k, B=16
at T=16k) with 132 SMs; for h=16, the paper config and head dims ``--dk``/``--dv``. It goes
through ``triton.compile`` (with the divisibility hints a real launch gets) and the ptxas that
ships with triton, and prints per build: MMA kind (wgmma / mma.sync, +cp.async when the loop is
software-pipelined), registers, spill bytes, stack, shared memory. A build that fails prints
the compiler's error: what would otherwise cost a GPU call. ``--check`` also fails a build whose
shared memory exceeds the arch's per-block limit (sm_90: 227 KB) or that spills more than
`HEAVY_SPILL` bytes. Nothing runs; timings need the GPU. (Local triton may differ from the GPU
machine's: 3.7 here, 3.6 there.)

Every launch of the library at the paper shapes, both dtypes and both head-dim pairs:

    for dt in bf16 fp32; do for dk in 128 192; do
      python bench/aot_compile.py --shapes profile --decode --check --dtype $dt --dk $dk --dv 128
    done; done
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["TRITON_INTERPRET"] = "0"

H_PER_G = 16
PAPER = dict(CL=32, CD=16, SELB=64, WIN=512, NTOP=16, INIT=1, LOCAL=2)
#: Shared memory per block (opt-in maximum) by compute capability, bytes.
SMEM_LIMIT = {90: 232448, 89: 101376, 86: 101376, 80: 166912}
#: Spill stores above this many bytes fail ``--check`` (the measured bf16 top-n default: 104).
HEAVY_SPILL = 256


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


def _ptxas_stats(ptx: str, arch: int) -> dict:
    """MMA kind, registers, spill bytes and stack from the ptxas that ships with triton (``-v``)."""
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
    num = (lambda m, i=1: int(m.group(i)) if m else -1)  # noqa: E731
    return dict(mma=mma, regs=num(regs), spill_st=num(spill), spill_ld=num(spill, 2),
                stack=num(stack))


def build(fn, constexprs, ptr, floats, arch: int, warps: int, stages: int, label: str,
          check: bool = False) -> bool:
    """Compile one launch and print its line; ``False`` if it failed (or, with ``check``, if
    its shared memory passes `SMEM_LIMIT` or it spills more than `HEAVY_SPILL` bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = _sig(fn, constexprs, ptr, floats)
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=_attrs(fn, sig))
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=warps, num_stages=stages))
    except Exception as exc:  # noqa: BLE001 - report every failing build
        print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:1500]}", flush=True)
        traceback.print_exc(limit=2)
        return False
    st = _ptxas_stats(k.asm["ptx"], arch)
    smem = k.metadata.shared
    bad = []
    if check and smem > SMEM_LIMIT.get(arch, SMEM_LIMIT[80]):
        bad.append(f"smem > {SMEM_LIMIT.get(arch, SMEM_LIMIT[80]) // 1024} KB")
    if check and st["spill_st"] > HEAVY_SPILL:
        bad.append(f"spills > {HEAVY_SPILL} B")
    print(f"{'OVER' if bad else 'OK  '} {label:56s} {st['mma']:8s} regs {st['regs']:>3} "
          f"spill st/ld {st['spill_st']}/{st['spill_ld']} stack {st['stack']} "
          f"smem {smem / 1024:6.1f} KB{'  <- ' + ', '.join(bad) if bad else ''}", flush=True)
    return not bad


def profile_shapes(arch: int) -> dict:
    """The launch shapes the library uses on ``sm<arch>``: its profile's defaults, in the
    layout of `bench.gpu_prefill.candidates`."""
    from nsa_impl.kernels import tuning

    prof = tuning.load_profile(f"sm{arch}")
    out = {f"{name}_{k}": [getattr(getattr(prof, name), k)] for name in ("cmp", "win")
           for k in ("fwd", "dq", "dkdv")}
    out["atomic"] = {name: getattr(prof, name).dq_atomic for name in ("cmp", "win")}
    return dict(out, topn=[prof.topn], gate=[prof.gate])


#: The decode grid (bench/decode_bench.py): (B, T).
DECODE_CASES = ((1, 65536), (8, 65536), (32, 65536), (16, 16384))


def decode_builds(dt: str, dk: int, dv: int, arch_sms: int = 132):
    """``(kernel, constexprs, pointer dtypes, warps, stages, label)`` of every distinct decode
    launch of `nsa_impl.kernels.decode_step.launches` over `DECODE_CASES` (a step, shared and
    per-branch K/V, and rows over cached K/V as in ``extend``)."""
    import torch

    from nsa_impl.kernels import decode_step

    dk_ = decode_step._kernels(False)
    tdt = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[dt]
    cfg = (PAPER["CL"], PAPER["CD"], PAPER["SELB"], PAPER["NTOP"], PAPER["INIT"],
           PAPER["LOCAL"], PAPER["WIN"])
    ptrs = {
        "cmp_win": (dk_._cmp_win_kernel, dict(
            **dict.fromkeys(("Q", "KN_C", "VN_C", "KN_S", "VN_S", "KN_W", "VN_W", "KR_C",
                             "VR_C", "KR_S", "VR_S", "KR_W", "VR_W", "KC", "VC"), dt),
            SEQ="i32", POS="i32", LOGITS="fp32", PM="fp32", PL="fp32", PACC="fp32")),
        "score": (dk_._score_kernel, dict(POS="i32", LOGITS="fp32", PM="fp32", PL="fp32",
                                          CAND="i64")),
        "sel": (dk_._sel_kernel, dict(Q=dt, KR_S=dt, VR_S=dt, SEQ="i32", POS="i32",
                                      CAND="i64", SELIDX="i32", SELCNT="i32",
                                      PM="fp32", PL="fp32", PACC="fp32")),
        "combine": (dk_._combine_kernel, dict(OUT=dt, GATES=dt, PM="fp32", PL="fp32",
                                              PACC="fp32", SEQ="i32", POS="i32", LEN="i32")),
    }
    seen = set()
    for B, T in DECODE_CASES:
        geo = decode_step.geometry(B, 4, H_PER_G, T, cfg, "cuda", sms=arch_sms)
        for append, shared in ((True, True), (True, False), (False, True)):
            plan = decode_step.launches(B, 4, H_PER_G, dk, dv, cfg, geo, tdt, False,
                                        append=append, shared=shared)
            for name, launch in plan.items():
                key = (name, tuple(sorted(launch.constexprs.items())),
                       tuple(sorted(launch.options.items())))
                if key in seen:
                    continue
                seen.add(key)
                fn, ptr = ptrs[name]
                sp = geo.splits
                label = (f"decode {name} B={B} T={T // 1024}k splits {sp.cmp}/{sp.win}/{sp.sel}"
                         f"{'' if append else ' rows'}{'' if shared else ' branch-kv'}")
                yield (fn, launch.constexprs, ptr, launch.options["num_warps"],
                       launch.options["num_stages"], label)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--filter", default="")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--shapes", default="sweep", choices=["sweep", "profile", "none"],
                    help="prefill launch shapes: the sweep's, the profile's defaults, or none")
    ap.add_argument("--decode", action="store_true", help="also the decode kernels")
    ap.add_argument("--no-backward", action="store_true",
                    help="prefill: forward launches only (no dQ, dK/dV, reduce, gate backward)")
    ap.add_argument("--check", action="store_true",
                    help="fail on shared memory over the arch's limit or heavy spills")
    args = ap.parse_args(argv)
    from nsa_impl.kernels import _loader, triton_topn, tuning

    rk = _loader.load_kernel_module("_range_kernels.py", False)
    tk = _loader.load_kernel_module("_topn_kernels.py", False)
    gk = _loader.load_kernel_module("_gate_kernels.py", False)
    dt = args.dtype
    ieee = dt == "fp32"
    DK, DV = args.dk, args.dv
    BDK, BDV = tuning.next_pow2(max(16, DK)), tuning.next_pow2(max(16, DV))
    common = dict(H_PER_G=H_PER_G, DK=DK, DV=DV, BDK=BDK, BDV=BDV, IEEE=ieee, PRECISE=ieee)
    floats = ("qk_scale", "LN_DOM", "DOM", "scale")
    ok = True
    print(f"# sm_{args.arch}, {dt}, h={H_PER_G}, Dk={DK}, Dv={DV}, shapes: {args.shapes}"
          f"{', decode' if args.decode else ''}", flush=True)

    backward = ("dq", "dkdv", "reduce", "bwd")

    def run(fn, c, ptr, warps, stages, label):
        nonlocal ok
        if args.no_backward and any(f" {w}" in label for w in backward):
            return
        if args.filter in label:
            ok &= build(fn, c, ptr, floats, args.arch, warps, stages, label, args.check)

    if args.shapes == "sweep":
        from bench.gpu_prefill import candidates

        cands = candidates()
        atomic_ok = {"cmp": True, "win": True}
    elif args.shapes == "profile":
        cands = profile_shapes(args.arch)
        atomic_ok = cands["atomic"]
    else:
        cands = {k: [] for k in ("cmp_fwd", "cmp_dq", "cmp_dkdv", "win_fwd", "win_dq",
                                 "win_dkdv", "topn", "gate")}
        atomic_ok = {}
    for mode, name in ((0, "cmp"), (1, "win")):
        geo = dict(MODE=mode, CL=PAPER["CL"] if mode == 0 else 1,
                   CD=PAPER["CD"] if mode == 0 else 1, WIN=1 if mode == 0 else PAPER["WIN"])
        for launch in cands[f"{name}_fwd"]:
            t = tuning.resolve(launch, H_PER_G, DK, DV, ieee)
            label = f"{name} fwd {launch.rows}x{launch.block_n} w{launch.warps} s{launch.stages}"
            c = dict(**geo, **common, HP=t.HP, P=t.P, A=0, BM=t.BM, BN=t.BN)
            ptr = dict(Q=dt, K=dt, V=dt, O=dt, LSE="fp32", QSTART="i64", KSTART="i64")
            run(rk._range_fwd_kernel, c, ptr, t.warps, t.stages, label)
        for launch in cands[f"{name}_dq"]:
            for delta_only in (False, True):
                t = tuning.resolve(launch, H_PER_G, DK, DV, ieee)
                label = (f"{name} dq {launch.rows}x{launch.block_n} w{launch.warps} "
                         f"s{launch.stages}{' delta-only' if delta_only else ''}")
                c = dict(**geo, **common, HP=t.HP, P=t.P, A=0, BM=t.BM, BN=t.BN,
                         DELTA_ONLY=delta_only)
                ptr = dict(Q=dt, K=dt, V=dt, O=dt, DO=dt, DQ=dt, LSE="fp32", DELTA="fp32",
                           QSTART="i64", KSTART="i64")
                run(rk._range_dq_kernel, c, ptr, t.warps, t.stages, label)
        for launch in cands[f"{name}_dkdv"]:
            for nit, atomic in ((1, False), (32, False), (32, True)):
                if atomic and not atomic_ok.get(name, True):
                    continue
                t = tuning.resolve(launch, H_PER_G, DK, DV, ieee)
                label = (f"{name} dkdv {launch.rows}x{launch.block_n} w{launch.warps} "
                         f"s{launch.stages} c{launch.chunk} NIT={nit}"
                         f"{' atomic-dq' if atomic else ''}")
                c = dict(**geo, **common, HP=t.HP, BKN=t.BN, QP=t.P, BR=t.BM, QCH=t.chunk,
                         NIT=nit, ATOMIC_DQ=atomic)
                part = "fp64" if ieee else "fp32"
                ptr = dict(Q=dt, K=dt, V=dt, DO=dt, LSE="fp32", DELTA="fp32", DK_OUT=dt,
                           DV_OUT=dt, PART_K=part, PART_V=part, DQ_ACC="fp32",
                           QSTART="i64", KSTART="i64")
                run(rk._range_dkdv_kernel, c, ptr, t.warps, t.stages, label)
        if cands[f"{name}_dkdv"]:
            part = "fp64" if ieee else "fp32"
            c = dict(BKN=64, NIT=32, DK=DK, DV=DV, BDK=BDK, BDV=BDV, IEEE=ieee)
            ptr = dict(PART_K=part, PART_V=part, DK_OUT=dt, DV_OUT=dt, KSTART="i64")
            run(rk._range_reduce_kernel, c, ptr, 4, 1, f"{name} reduce")
    for tn in cands["topn"]:
        t = tuning.resolve_topn(tn, ieee, DK)  # what select_blocks launches
        label = f"topn {tn.positions}x{tn.block_n} w{tn.warps} s{tn.stages}"
        if (t.BN, t.warps, t.KC) != (tn.block_n, tn.warps, 0):
            label += f" (resolved: {t.P}x{t.BN} w{t.warps} KC={t.KC})"
        bn, bs, bsp = triton_topn.band(32, 16, 64, t.BN, 16)
        for write in (False, True):
            c = dict(CL=32, CD=16, SELB=64, R=4, M=2, NTOP=16, INIT=1, LOCAL=2,
                     H_PER_G=H_PER_G, HP=16, P=t.P, BM=t.P * 16, BN=bn,
                     BS=bs, BSP=bsp, LOG_BSP=bsp.bit_length() - 1, DK=DK, BDK=BDK, KC=t.KC,
                     IEEE=ieee, PRECISE=ieee,
                     WRITE_SCORES=write)
            ptr = dict(Q=dt, K=dt, LSE="fp32", IDX="i64", SC="fp32", QSTART="i64",
                       KSTART="i64")
            run(tk._select_kernel, c, ptr, t.warps, t.stages, label + (" +scores" if write else ""))
    for g in cands["gate"]:
        label = f"gate {g.rows} w{g.warps}"
        c = dict(D=DV, BD=BDV, BR=g.rows)
        ptr = dict(C=dt, S=dt, W=dt, GATES=dt, O=dt)
        run(gk._gate_fwd_kernel, c, ptr, g.warps, 2, label + " fwd")
        ptr = dict(DO=dt, C=dt, S=dt, W=dt, GATES=dt, DC=dt, DS=dt, DW=dt, DG=dt)
        run(gk._gate_bwd_kernel, c, ptr, g.warps, 2, label + " bwd")
    if args.decode:
        for fn, c, ptr, warps, stages, label in decode_builds(dt, DK, DV):
            run(fn, c, ptr, warps, stages, label)
    print("all builds OK" if ok else "SOME BUILDS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
