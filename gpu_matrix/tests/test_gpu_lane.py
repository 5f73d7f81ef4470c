"""The GPU lane of ``nox -s gpu_matrix``: does the installed torch/triton pair work on this GPU?

Every test is marked ``gpu`` and takes the ``cuda_device`` fixture, which skips with the reason
when no CUDA device is present. Nothing at module level imports torch or triton.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.gpu

#: Packages whose modules must all import without initialising CUDA.
_PACKAGES = ("gpu_matrix", "nsa_ref", "nsa_impl")
#: Optional dependencies a module may lack on a given machine (its import then fails, by design).
_OPTIONAL = ("triton", "flash_attn")


def test_probe_reports_this_gpu_and_a_supported_pair(cuda_device, run_python):
    import torch

    result = run_python("-m", "gpu_matrix", "probe", "--json", timeout=300)
    report = json.loads(result.stdout)
    assert result.returncode == 0, report["verdict"]["reason"]
    cuda = report["cuda"]
    assert cuda["available"] and cuda["cuda"] == torch.version.cuda
    assert len(cuda["devices"]) == torch.cuda.device_count()
    first = cuda["devices"][0]
    assert first["name"] == torch.cuda.get_device_name(0)
    assert first["capability"] == "{}.{}".format(*torch.cuda.get_device_capability(0))
    backends = {row["name"]: row for row in report["backends"]}
    assert backends["sdpa:math"]["ok"], backends["sdpa:math"]
    assert backends["triton"]["ok"] and "cuda" in backends["triton"]["detail"]
    assert "error" not in report["nsa_impl"], report["nsa_impl"]["error"]


def test_nothing_touches_cuda_at_import(cuda_device, run_python):
    code = f"""
import importlib, pkgutil, sys
import torch
skipped = []
for package in {_PACKAGES!r}:
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        if ".tests" in info.name:
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if exc.name not in {_OPTIONAL!r}:
                raise
            skipped.append(info.name)
print("initialized", torch.cuda.is_initialized(), "skipped", skipped)
"""
    result = run_python("-c", code, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("initialized False"), result.stdout


def test_triton_compiles_and_runs_on_this_gpu(cuda_device):
    import torch

    triton = pytest.importorskip("triton", reason="triton is not installed")
    from nsa_impl.tolerances import lowp_bound

    from ._triton_kernels import add_kernel, dot_kernel

    gen = torch.Generator(device="cpu").manual_seed(0)
    n = 1000  # not a multiple of the block: the masked tail is exercised
    x, y = (torch.randn(n, generator=gen).to(cuda_device) for _ in range(2))
    out = torch.full_like(x, float("nan"))  # an element the kernel forgets stays NaN
    add_kernel[(triton.cdiv(n, 256),)](x, y, out, n, BLOCK=256)
    torch.testing.assert_close(out, x + y, rtol=0, atol=0)

    N = 32
    a, b = (torch.randn(N, N, generator=gen).to(cuda_device, torch.float16) for _ in range(2))
    c = torch.full((N, N), float("nan"), device=cuda_device)
    dot_kernel[(1,)](a, b, c, N=N)
    exact = a.double() @ b.double()
    naive_err = ((a @ b).double() - exact).abs().max().item()  # torch in the same dtype
    err = (c.double() - exact).abs().max().item()
    assert err <= lowp_bound(naive_err), f"tl.dot error {err:.3g} vs fp16 matmul {naive_err:.3g}"


def test_fused_sdpa_backends_agree_with_float64(cuda_device):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nsa_impl.tolerances import lowp_bound

    gen = torch.Generator(device="cpu").manual_seed(1)
    # odd length and a head dim the kernels pad: the cases that break first
    q, k, v = (torch.randn(1, 2, 59, 64, generator=gen) for _ in range(3))
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), is_causal=True
    )
    low = [t.to(cuda_device, torch.bfloat16) for t in (q, k, v)]

    def run(backend):
        with sdpa_kernel([backend]):
            out = torch.nn.functional.scaled_dot_product_attention(*low, is_causal=True)
        return (out.double().cpu() - exact).abs().max().item()

    bound = lowp_bound(run(SDPBackend.MATH))
    ran = []
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        try:
            err = run(backend) if backend is not None else None
        except RuntimeError:  # not built in, or not for this GPU: the probe reports which
            continue
        if err is not None:
            assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"
            ran.append(name)
    if torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(
        cuda_device
    ) >= (8, 0):
        # nsa_impl's flash path needs torch's FlashAttention on Ampere and newer
        assert "FLASH_ATTENTION" in ran, f"flash attention did not run; ran: {ran}"


def test_routing_on_cuda_uses_cuda_paths(cuda_device):
    import torch

    from nsa_impl import NSAConfig, dispatch

    q = torch.randn(1, 256, 4, 64, device=cuda_device, dtype=torch.bfloat16)
    route = dispatch.explain(q, NSAConfig())
    assert set(route) == {"cmp", "sel", "win"}
    for branch, decision in route.items():
        assert decision.error is None, f"{branch}: {decision.error}"
        assert "cuda" in dispatch.PATHS[decision.path].devices, (branch, decision)
    ok, why = dispatch.PATHS["triton"].available()
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    assert ok, f"triton is installed but the triton path is unavailable on this GPU: {why}"
