"""Input checks shared by `nsa_ref` and `nsa_impl` (spec I.1, I.11).

Every error says what was expected and what was given, and names the argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import NSAConfig
from .scalars import as_positive_float

BRANCHES = ("cmp", "sel", "win")


@dataclass(frozen=True)
class Dims:
    """Sizes read off validated inputs: ``q [B, T, H, Dk]``, ``v [B, T, G, Dv]``, ``H = G * h``."""

    B: int
    T: int
    H: int
    G: int
    h: int
    Dk: int
    Dv: int


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, t: object, rank: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {_shape(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_kv(name: str, k: object, v: object, q: torch.Tensor) -> tuple[int, int]:
    """Check one (k, v) pair against ``q``; return ``(G, Dv)``.

    ``name`` prefixes the argument names in messages (``""`` for the shared ``k``, ``v``).
    """
    k_name, v_name = (f"{name} k", f"{name} v") if name else ("k", "v")
    k = _check_tensor(k_name, k, 4)
    v = _check_tensor(v_name, v, 4)
    B, T, H, Dk = q.shape
    if k.shape[:2] != (B, T) or k.shape[3] != Dk:
        raise ValueError(f"{k_name} must have shape [B={B}, T={T}, G, Dk={Dk}], got {_shape(k)}")
    G = k.shape[2]
    if v.shape[:3] != (B, T, G):
        raise ValueError(f"{v_name} must have shape [B={B}, T={T}, G={G}, Dv], got {_shape(v)}")
    for label, t in ((k_name, k), (v_name, v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{label} dtype {t.dtype} does not match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{label} device {t.device} does not match q device {q.device}")
    if G == 0 or H % G:
        raise ValueError(f"q heads H={H} must be a multiple of the KV groups G={G} ({k_name})")
    return G, v.shape[3]


def check_cu_seqlens(
    cu_seqlens: object, B: int = 1, T: int | None = None, device: torch.device | None = None
) -> list[int]:
    """Check ``cu_seqlens`` (int32 ``[N+1]``, ``0 = c_0 < ... < c_N = T``, ``B == 1``).

    ``T=None`` skips the comparison with a packed length (helpers that build layouts from it).
    Returns the boundaries as a Python list (read once, outside any hot loop).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with N+1 >= 2 entries, got shape {_shape(cu_seqlens)}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if B != 1:
        raise ValueError(f"cu_seqlens requires packed inputs with B == 1, got B={B}")
    bounds = [int(c) for c in cu_seqlens.tolist()]
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if T is not None and bounds[-1] != T:
        raise ValueError(f"cu_seqlens must end at the packed length T={T}, got {bounds[-1]}")
    if any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {bounds}")
    return bounds


def check_inputs(
    q: object,
    k: object,
    v: object,
    gates: object,
    cfg: object,
    *,
    scale: float | None = None,
    branch_kv: dict | None = None,
    cu_seqlens: torch.Tensor | None = None,
    phi_k=None,
    phi_v=None,
    validate_gates: bool = True,
) -> tuple[Dims, list[int] | None]:
    """Validate the arguments of ``nsa_attention`` (spec I.11); return dims and seq bounds."""
    if not isinstance(cfg, NSAConfig):
        raise TypeError(f"cfg must be an NSAConfig, got {type(cfg).__name__}")
    q = _check_tensor("q", q, 4)
    B, T, H, Dk = q.shape
    if T == 0 or B == 0 or H == 0 or Dk == 0:
        raise ValueError(f"q must have non-empty B, T, H, Dk, got shape {_shape(q)}")
    G, Dv = check_kv("", k, v, q) if branch_kv is None or len(branch_kv) < 3 else (None, None)
    if branch_kv is not None:
        if not isinstance(branch_kv, dict):
            raise TypeError(f"branch_kv must be a dict, got {type(branch_kv).__name__}")
        unknown = set(branch_kv) - set(BRANCHES)
        if unknown:
            raise ValueError(f"branch_kv keys must be among {BRANCHES}, got {sorted(unknown)}")
        for name, pair in branch_kv.items():
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise TypeError(f"branch_kv[{name!r}] must be a (k, v) pair")
            Gb, Dvb = check_kv(f"branch_kv[{name!r}]", pair[0], pair[1], q)
            if G is None:
                G, Dv = Gb, Dvb
            elif (Gb, Dvb) != (G, Dv):
                raise ValueError(
                    f"branch_kv[{name!r}] has G={Gb}, Dv={Dvb}; expected G={G}, Dv={Dv} "
                    "like the other branches"
                )
    gates = _check_tensor("gates", gates, 4)
    if gates.shape != (B, T, H, 3):
        raise ValueError(f"gates must have shape [B={B}, T={T}, H={H}, 3], got {_shape(gates)}")
    if gates.device != q.device:
        raise ValueError(f"gates device {gates.device} does not match q device {q.device}")
    if gates.dtype != q.dtype:
        raise TypeError(f"gates dtype {gates.dtype} does not match q dtype {q.dtype}")
    if validate_gates:
        g = gates.detach()
        if not bool(torch.isfinite(g).all()) or bool((g < 0).any()) or bool((g > 1).any()):
            raise ValueError("gates must be finite and in [0, 1] (pass validate=False to skip)")
    if scale is not None:
        as_positive_float("scale", scale)
    for name, phi in (("phi_k", phi_k), ("phi_v", phi_v)):
        check_phi(name, phi)
    bounds = None
    if cu_seqlens is not None:
        bounds = check_cu_seqlens(cu_seqlens, B, T, q.device)
    return Dims(B=B, T=T, H=H, G=G, h=H // G, Dk=Dk, Dv=Dv), bounds


def check_phi(name: str, phi: object) -> None:
    """``phi_k`` / ``phi_v`` must be ``None`` (mean pooling) or callable."""
    if phi is not None and not callable(phi):
        raise TypeError(f"{name} must be callable or None, got {type(phi).__name__}")


def check_phi_output(name: str, out: object, blocks: torch.Tensor) -> torch.Tensor:
    """What ``phi(blocks)`` returned, checked: ``blocks [..., l, D]`` must map to a tensor
    ``[..., D]`` of the blocks' dtype and device (spec I.3). Never broadcast, never cast."""
    expected = (*blocks.shape[:-2], blocks.shape[-1])
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"{name} must return a torch.Tensor of shape {list(expected)}, "
            f"got {type(out).__name__}"
        )
    if tuple(out.shape) != expected:
        raise ValueError(
            f"{name} must map blocks {list(blocks.shape)} ([..., l, D]) to {list(expected)} "
            f"([..., D]), got {list(out.shape)}"
        )
    if out.dtype != blocks.dtype:
        raise TypeError(f"{name} returned dtype {out.dtype}, expected the blocks' {blocks.dtype}")
    if out.device != blocks.device:
        raise ValueError(f"{name} returned device {out.device}, expected {blocks.device}")
    return out
