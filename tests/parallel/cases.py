"""Problems for the context-parallel tests: one drawn `Case` is computed three ways.

* `reference`: the single-process `nsa_impl.nsa_attention` on the whole, unpadded row;
* `rows_on_one_process`: every rank's rows through `nsa_impl.parallel.attend_rows` in this
  process, against the whole row's keys (the row-subset plans without collectives);
* `on_rank`: a rank's share in a gloo process group through `cp_nsa_attention` (local inputs,
  all-gathered keys, reduce-scattered key gradients).

`compare` sums the ranks' gradients of shared tensors (``k``/``v`` come back per rank for its own
rows, the phi parameters as each rank's share) and measures them against the reference with the
tolerance classes of `nsa_impl.tolerances`. The loss weights are zero on pad rows, so the real
rows' gradients must equal those of the unpadded problem and the pad rows' must be zero.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

import nsa_impl
from nsa_impl.dispatch import force_path
from nsa_impl.parallel import CPLayout, attend_rows, context_parallel, cp_nsa_attention
from nsa_impl.tolerances import fp_class_atol
from nsa_ref import NSAConfig
from nsa_ref.reference import branch_pairs

BRANCHES = ("cmp", "sel", "win")


@dataclass(frozen=True)
class Case:
    """One problem: sizes, config, packing, options and the ranks it is sharded over."""

    name: str
    world: int
    cfg: NSAConfig
    T: int
    G: int = 1
    h: int = 2
    Dk: int = 4
    Dv: int = 4
    B: int = 1
    cu: tuple[int, ...] | None = None
    separate: bool = False  # branch_kv: each branch its own k, v
    phi: bool = False  # a learnable compression (parameters with gradients)
    sel_path: str | None = None  # force the selection path (None: the router's)
    seed: int = 0

    @property
    def H(self) -> int:
        return self.G * self.h

    def layout(self) -> CPLayout:
        cu = None if self.cu is None else torch.tensor(self.cu, dtype=torch.int32)
        return CPLayout.build(self.T, self.world, cu_seqlens=cu)

    def cu_seqlens(self):
        return None if self.cu is None else torch.tensor(self.cu, dtype=torch.int32)

    def data(self, dtype: torch.dtype) -> dict:
        """Whole padded row: ``q, k, v, gates, w`` (loss weights, 0 on pad rows), ``kv``
        (branch -> (k, v) names), ``phi`` parameters; drawn in float64 from ``seed``."""
        lay = self.layout()
        gen = torch.Generator().manual_seed(self.seed)
        B, T, H, G = self.B, lay.T_pad, self.H, self.G

        def draw(*shape, uniform=False):
            x = (torch.rand if uniform else torch.randn)(*shape, generator=gen,
                                                         dtype=torch.float64)  # fmt: skip
            return x.to(dtype)

        out = {"q": draw(B, T, H, self.Dk), "gates": draw(B, T, H, 3, uniform=True)}
        for b in BRANCHES if self.separate else ("",):
            out[f"k{b}"], out[f"v{b}"] = draw(B, T, G, self.Dk), draw(B, T, G, self.Dv)
        w = draw(B, T, H, self.Dv)
        w[:, self.T :] = 0  # pad rows do not enter the loss
        out["w"] = w
        l = self.cfg.cmp_block
        out["phi_k"], out["phi_v"] = draw(l, self.Dk), draw(l, self.Dv)
        return out


#: Tensors whose gradients are compared (rows: sharded like q; keys: every rank's own rows).
ROW_TENSORS = ("q", "gates")


def _phi(weight):
    """A learnable compression: ``sum_l weight[l] * x[..., l, :]`` (gradient to ``weight``)."""
    return lambda x: (x * weight).sum(-2)


def _call(fn, t: dict, case: Case, **kw):
    """``fn(q, k, v, gates, cfg, ...)`` with the case's branch_kv and phi from tensors ``t``."""
    branch_kv = None
    if case.separate:
        branch_kv = {b: (t[f"k{b}"], t[f"v{b}"]) for b in BRANCHES}
        k, v = t["kcmp"], t["vcmp"]  # ignored: every branch has its own
    else:
        k, v = t["k"], t["v"]
    phi_k = _phi(t["phi_k"]) if case.phi else None
    phi_v = _phi(t["phi_v"]) if case.phi else None
    return fn(t["q"], k, v, t["gates"], case.cfg, phi_k=phi_k, phi_v=phi_v, branch_kv=branch_kv,
              **kw)  # fmt: skip


def _grads(loss, leaves) -> list:
    """Gradients, zeros for unused leaves (no compressed block yet: phi is never called; the
    selection of a row without keys reads none)."""
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]


def _leaves(data: dict, names) -> dict:
    return {n: data[n].detach().clone().requires_grad_() for n in names}


def _grad_names(case: Case) -> list[str]:
    keys = [f"{x}{b}" for b in (BRANCHES if case.separate else ("",)) for x in "kv"]
    return [*ROW_TENSORS, *keys, *(["phi_k", "phi_v"] if case.phi else [])]


def reference(case: Case, dtype: torch.dtype) -> dict:
    """Single-process output and gradients of the unpadded problem (pad rows: zeros)."""
    data = case.data(dtype)
    T, names = case.T, _grad_names(case)
    real = {n: (data[n][:, :T] if n not in ("phi_k", "phi_v") else data[n]) for n in names}
    t = _leaves(real, names)
    o = _call(nsa_impl.nsa_attention, t, case, cu_seqlens=case.cu_seqlens())
    grads = _grads((o * data["w"][:, :T]).sum(), [t[n] for n in names])
    pad = case.layout().T_pad - T

    def padded(x, n):
        return x if n in ("phi_k", "phi_v") else torch.cat([x, x.new_zeros(x.shape[0], pad,
                                                                           *x.shape[2:])], 1)

    return {"o": padded(o.detach(), "o"), **{n: padded(g, n) for n, g in zip(names, grads,
                                                                             strict=True)}}


def _local_run(case: Case, dtype, t: dict, w, run) -> dict:
    names = _grad_names(case)
    o = run(t)
    grads = _grads((o * w).sum(), [t[n] for n in names])
    return {"o": o.detach(), **dict(zip(names, grads, strict=True))}


def on_rank(case: Case, dtype: torch.dtype, rank: int) -> dict:
    """This rank's output and gradients through `cp_nsa_attention` (in a gloo process group)."""
    lay = case.layout()
    data = case.data(dtype)
    names = _grad_names(case)
    local = {n: (data[n] if n in ("phi_k", "phi_v") else lay.shard(data[n], rank)) for n in names}
    with force_path(**({"sel": case.sel_path} if case.sel_path else {})):
        cp = context_parallel(None, case.T, case.cfg, heads=case.H, kv_heads=case.G,
                              head_dim=case.Dk, v_head_dim=case.Dv, batch=case.B,
                              cu_seqlens=case.cu_seqlens(), dtype=dtype)  # fmt: skip
    assert cp.plan.route["sel"].path == (case.sel_path or cp.plan.route["sel"].path)
    t = _leaves(local, names)
    out = _local_run(case, dtype, t, lay.shard(data["w"], rank),
                     lambda t: _call(cp_nsa_attention, t, case, cp=cp))  # fmt: skip
    out["paths"] = cp.plan.route.paths()
    return out


def rows_on_one_process(case: Case, dtype: torch.dtype) -> list[dict]:
    """Every rank's share computed here: `attend_rows` with each rank's row-subset plan against
    the whole row's keys (``k``/``v`` gradients then cover every key: summed like the ranks')."""
    lay = case.layout()
    data = case.data(dtype)
    names = _grad_names(case)
    results = []
    for rank in range(case.world):
        rows = lay.rows(rank)
        with force_path(**({"sel": case.sel_path} if case.sel_path else {})):
            plan = nsa_impl.plan((case.B, lay.T_pad, case.H, case.Dk), case.cfg, kv_heads=case.G,
                                 v_head_dim=case.Dv, dtype=dtype, rows=rows,
                                 _bounds=list(lay.bounds))  # fmt: skip
        t = _leaves({n: data[n][:, rows] if n in ROW_TENSORS else data[n] for n in names}, names)

        def run(t, plan=plan):
            def fn(q, k, v, gates, cfg, *, phi_k, phi_v, branch_kv):
                kv = branch_pairs(k, v, branch_kv)
                return attend_rows(q, kv, gates, cfg, plan, phi_k=phi_k, phi_v=phi_v)

            return _call(fn, t, case)

        results.append(_local_run(case, dtype, t, data["w"][:, rows], run))
    for n in names:  # keys: the sum over ranks, each rank's rows of it (a reduce-scatter)
        if n not in ROW_TENSORS and n not in ("phi_k", "phi_v"):
            total = sum(out[n] for out in results)
            for rank, out in enumerate(results):
                out[n] = total[:, lay.rows(rank)]
    return results


def compare(case: Case, dtype: torch.dtype, parts: list[dict]) -> dict:
    """``name -> (max error, tolerance)`` of the ranks' results (`on_rank` or
    `rows_on_one_process`: row tensors and key gradients per rank, phi gradients as shares)
    against `reference`."""
    lay = case.layout()
    ref = reference(case, dtype)
    errors = {}
    for name in ["o", *_grad_names(case)]:
        if name in ("phi_k", "phi_v"):  # each rank's share of the parameter gradient
            got = sum(p[name] for p in parts)
        else:
            got = lay.unshard([p[name] for p in parts], keep_padding=True)
        kind = "out" if name == "o" else "grad"
        want = ref[name]
        if name == "o":  # a pad row's output is meaningless (its gradients must still be 0)
            got, want = got[:, : case.T], want[:, : case.T]
        err = float((got.double() - want.double()).abs().max())
        errors[name] = (err, fp_class_atol(str(dtype).removeprefix("torch."), kind))
    return errors


def draw_cases(world: int, count: int, seed: int) -> list[Case]:
    """``count`` random cases for ``world`` ranks: configs, lengths (often shorter than a shard
    or cutting a block), packings, GQA, ``Dk != Dv``, separate branch K/V, learnable phi and the
    three torch selection paths."""
    rnd = random.Random(seed)
    cases = []
    for i in range(count):
        d = rnd.choice([1, 2, 4])
        l = d * rnd.choice([1, 2])
        ls = l * rnd.choice([1, 2])
        init, local = rnd.choice([0, 1]), rnd.choice([1, 2])
        cfg = NSAConfig(cmp_block=l, cmp_stride=d, sel_block=ls, sel_top_n=init + local +
                        rnd.choice([0, 1]), sel_init_blocks=init, sel_local_blocks=local,
                        window=rnd.choice([1, 3, 8]))  # fmt: skip
        T = rnd.choice([rnd.randint(1, 2 * world), rnd.randint(2 * world, 48)])
        B, cu = 1, None
        if T > 2 and rnd.random() < 0.5:
            cuts = sorted(rnd.sample(range(1, T), rnd.randint(1, min(3, T - 1))))
            cu = (0, *cuts, T)
        elif rnd.random() < 0.3:
            B = 2
        cases.append(Case(
            f"w{world}-random{i}", world, cfg, T, G=rnd.choice([1, 2]), h=rnd.choice([1, 2]),
            Dk=rnd.choice([3, 4]), Dv=rnd.choice([2, 4, 5]), B=B, cu=cu,
            separate=rnd.random() < 0.25, phi=rnd.random() < 0.3,
            sel_path=rnd.choice([None, "masked", "packed", "varlen"]), seed=seed * 1000 + i,
        ))  # fmt: skip
    return cases


#: A configuration with blocks that chunk boundaries cut (C = 3, 5, 7 ... against l' = 4).
EDGE_CFG = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, sel_top_n=3, sel_init_blocks=1,
                     sel_local_blocks=1, window=5)  # fmt: skip


def edge_cases(world: int) -> list[Case]:
    """The named cases of the issue: a row shorter than one shard (ranks with only padding),
    chunks of 3 and 5 tokens that cut selection and compressed blocks (separate branch K/V,
    GQA with h = 1, ``Dk != Dv``), documents crossing rank boundaries, B = 2 with padding and a
    learnable phi."""
    R = world
    return [
        Case(f"w{R}-shorter-than-a-shard", R, EDGE_CFG, T=1, G=1, h=2, Dk=4, Dv=3),
        Case(f"w{R}-chunks-cut-blocks", R, EDGE_CFG, T=2 * R * 3 - 1, G=2, h=1, Dk=3, Dv=5,
             separate=True, seed=1),  # fmt: skip
        Case(f"w{R}-documents-cross-ranks", R, EDGE_CFG, T=2 * R * 5, G=2, h=2, Dk=4, Dv=2,
             cu=(0, 3, 17, 2 * R * 5), seed=2),  # fmt: skip
        Case(f"w{R}-batch2-padding", R, EDGE_CFG, T=2 * R * 4 - 3, B=2, G=1, h=2, Dk=4, Dv=4,
             phi=True, seed=3),  # fmt: skip
    ]


@dataclass
class Summary:
    """Worst error per tensor over a set of cases, and the failures."""

    worst: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def add(self, case: Case, dtype, errors: dict) -> None:
        for name, (err, tol) in errors.items():
            key = (str(dtype), name)
            self.worst[key] = max(self.worst.get(key, 0.0), err)
            if not err <= tol:
                self.failures.append(f"{case.name} {dtype} {name}: {err:.3g} > {tol:g} ({case})")
