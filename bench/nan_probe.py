"""Where does a NaN in one batch row reach the other? (NSA-NAN-ROWS, per forced path, on CUDA)

    python bench/nan_probe.py [--paths router,masked,packed,varlen,triton,cmp:flash/sel:masked]
                              [--dtypes bfloat16,float16]

The clause NSA-NAN-ROWS puts a NaN at token 21 of batch row 0 (B=2, T=48, G=2, h=2, the
conformance config CFG_B) and requires batch row 1 to be bit-identical to a clean run. For each
path, dtype and tensor (q, k, v) this runs that case with the branch outputs and the gradients
of each branch separately, and prints every field of batch row 1 that changed: how many
elements, the largest difference, whether NaN arrived. Never asserts (a diagnostic, run by hand
or by bench/gpu_session.sh); the clause itself is the test.
"""

from __future__ import annotations

import argparse
import sys

import torch

BRANCH_FIELDS = ("o_cmp", "o_sel", "o_win")


def _forced(path: str) -> dict[str, str]:
    """``router``, a path name, or per branch ``cmp:flash/sel:packed/win:masked``."""
    if ":" in path:
        return dict(part.split(":") for part in path.split("/"))
    if path == "router":
        return {}
    if path in ("packed", "varlen"):
        return {"sel": path}
    return {b: path for b in ("cmp", "sel", "win")}


def _run(path, dtype, which, dirty, head_dim, device):
    import nsa_impl
    from conformance.inputs import Case
    from conformance.tests.cases import CFG_B
    from nsa_impl import dispatch

    inp = Case(B=2, T=48, G=2, h=2, Dk=head_dim, Dv=head_dim, seed=90).make()
    x = {n: getattr(inp, n).to(dtype).to(device) for n in ("q", "k", "v", "gates")}
    if dirty:
        x[which][0, 21] = float("nan")
    for t in x.values():
        t.requires_grad_(True)
    with dispatch.force_path(**_forced(path)):
        p = nsa_impl.plan(x["q"].shape, CFG_B, kv_heads=2, device=device, dtype=dtype,
                          backward=True)  # fmt: skip
    o, aux = nsa_impl.nsa_attention(x["q"], x["k"], x["v"], x["gates"], CFG_B, plan=p,
                                    return_aux=True)  # fmt: skip
    parts = {"o": o, **{f: getattr(aux, f) for f in BRANCH_FIELDS}}
    out = {name: t.detach() for name, t in parts.items()}
    out["block_indices"] = aux.block_indices
    for name, t in parts.items():
        gs = torch.autograd.grad(t.float().sum(), [x["q"], x["k"], x["v"]], retain_graph=True,
                                 allow_unused=True)  # fmt: skip
        for leaf, g in zip("qkv", gs, strict=True):
            if g is not None:
                out[f"d{leaf}({name})"] = g
    return p.route.paths(), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default="router,masked,packed,varlen,triton")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run (triton: TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to probe")
        return 2
    for path in args.paths.split(","):
        head_dim = 16 if "triton" in path else 8  # the triton kernels need Dk >= 16
        for dname in args.dtypes.split(","):
            dtype = getattr(torch, dname)
            for which in "qkv":
                try:
                    route, clean = _run(path, dtype, which, False, head_dim, args.device)
                    _, dirty = _run(path, dtype, which, True, head_dim, args.device)
                except Exception as e:  # noqa: BLE001 - a diagnostic reports and goes on
                    print(f"{path} {dname} {which}: {type(e).__name__}: {e}"[:300])
                    continue
                changed = []
                for name, t in clean.items():
                    a, b = t[1].double(), dirty[name][1].double()
                    same = (a == b) | (a.isnan() & b.isnan())
                    if not bool(same.all()):
                        diff = (a - b).abs()[~same]
                        finite = diff[torch.isfinite(diff)]
                        worst = float(finite.max()) if finite.numel() else float("nan")
                        changed.append(f"{name}: {int((~same).sum())} el, max {worst:.3g}, "
                                       f"nan {bool(b.isnan().any())}")  # fmt: skip
                verdict = "row 1 intact" if not changed else "; ".join(changed)
                print(f"{path} {dname} {which} {route}: {verdict}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
