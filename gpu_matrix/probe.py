"""`python -m gpu_matrix probe`: what this machine offers NSA, and whether its pair is supported.

It prints torch, triton, CUDA, the GPUs and their compute capability, the attention backends
that actually run here (SDPA flash / efficient / cuDNN / math, torch's varlen FlashAttention-2
op, the ``flash_attn`` package, triton), the availability of each ``nsa_impl`` path and the
router's decision on a small tensor (CUDA when a GPU exists, else CPU), then a verdict on the
installed torch/triton pair against ``matrix.toml``.

Exit status: `EXIT_SUPPORTED` (0) for a supported pair, `EXIT_UNSUPPORTED` (1) for a pair the
matrix does not list, `EXIT_MISSING` (3) when torch or triton is missing or cannot be imported,
so there is no pair to judge (2 stays argparse's usage error).

Every fact is gathered at call time and each one is guarded: a missing or broken package becomes a
printed reason, never a traceback. Nothing is imported from torch, triton or ``nsa_impl`` at
module level, so importing this module touches no GPU.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

from . import check_pair, pair_for_torch

EXIT_SUPPORTED = 0
EXIT_UNSUPPORTED = 1
EXIT_MISSING = 3

#: Distributions that may provide each module (nightlies ship triton as ``pytorch-triton``).
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "triton": ("triton", "pytorch-triton", "pytorch-triton-rocm"),
    "flash_attn": ("flash-attn", "flash_attn"),
}


@dataclass(frozen=True)
class PackageState:
    """An optional package as found here.

    Attributes:
        name: the module name (``"torch"``, ``"triton"``).
        version: the imported module's ``__version__``, else the installed distribution's version
            (read from metadata, so it is known even when the import fails), else ``None``.
        error: ``None`` when the module imported; otherwise why not (``"not installed"`` or the
            exception).
    """

    name: str
    version: str | None
    error: str | None

    @property
    def ok(self) -> bool:
        """Installed and importable."""
        return self.error is None and self.version is not None


def distribution_version(module: str) -> str | None:
    """Version of the distribution providing ``module`` from its metadata, without importing it."""
    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _describe(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception: one table cell, not a traceback."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line.split('. ')[0][:300]}"


def import_state(module: str) -> tuple[PackageState, ModuleType | None]:
    """Try to import ``module``; return its `PackageState` and the module (``None`` on failure)."""
    meta_version = distribution_version(module)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module and meta_version is None:
            return PackageState(module, None, "not installed"), None
        return PackageState(module, meta_version, f"cannot be imported ({_describe(exc)})"), None
    except Exception as exc:  # a broken install raises anything (OSError for a missing .so, ...)
        return PackageState(module, meta_version, f"cannot be imported ({_describe(exc)})"), None
    return PackageState(module, str(getattr(mod, "__version__", meta_version)), None), mod


def judge(torch_state: PackageState, triton_state: PackageState) -> tuple[int, str]:
    """Exit status and one-line reason for the installed pair (see the module docstring)."""
    if not torch_state.ok:
        return EXIT_MISSING, f"torch {torch_state.error}: no pair to judge"
    if not triton_state.ok:
        try:
            pair = pair_for_torch(torch_state.version)
        except ValueError:
            pair = None
        hint = f" (pip install '{pair.requirements()[1]}')" if pair is not None else ""
        return EXIT_MISSING, f"triton {triton_state.error}{hint}: no pair to judge"
    try:
        verdict = check_pair(torch_state.version, triton_state.version)
    except ValueError as exc:  # e.g. a source build reporting "unknown" as its version
        return EXIT_UNSUPPORTED, f"cannot judge the pair: {exc}"
    return (EXIT_SUPPORTED if verdict.supported else EXIT_UNSUPPORTED), verdict.reason


def nvidia_smi() -> dict[str, Any]:
    """GPUs as ``nvidia-smi`` sees them (no torch needed): ``{"gpus": [...], "error": str|None}``.

    Each GPU is ``{"name", "driver", "compute_cap"}`` (fields ``None`` where the driver is too old
    to report them). The noxfile uses this to tell a GPU machine from a CPU one.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"gpus": [], "error": "nvidia-smi not found"}
    query = [exe, "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:  # drivers before 510 cannot report compute_cap: list names only
            out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"gpus": [], "error": f"nvidia-smi failed ({_describe(exc)})"}
    if out.returncode != 0:
        return {"gpus": [], "error": f"nvidia-smi exited {out.returncode}: {out.stderr.strip()}"}
    gpus = []
    for line in out.stdout.splitlines():
        if not line.strip():
            continue
        if line.startswith("GPU "):  # "-L": "GPU 0: NVIDIA H100 80GB HBM3 (UUID: ...)"
            name = line.split(":", 1)[1].split("(UUID")[0].strip()
            gpus.append({"name": name, "driver": None, "compute_cap": None})
        else:
            name, driver, cap = ([f.strip() for f in line.split(",")] + [None, None])[:3]
            gpus.append({"name": name, "driver": driver, "compute_cap": cap})
    return {"gpus": gpus, "error": None if gpus else "nvidia-smi lists no GPU"}


def cuda_facts(torch: ModuleType) -> dict[str, Any]:
    """CUDA/HIP build versions, cuDNN, and each visible device's name and compute capability."""
    facts: dict[str, Any] = {
        "cuda": getattr(torch.version, "cuda", None),
        "hip": getattr(torch.version, "hip", None),
        "available": False,
        "devices": [],
        "cudnn": None,
    }
    try:
        facts["available"] = bool(torch.cuda.is_available())
        if facts["available"]:
            facts["cudnn"] = torch.backends.cudnn.version()
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                facts["devices"].append(
                    {
                        "index": i,
                        "name": props.name,
                        "capability": "{}.{}".format(*torch.cuda.get_device_capability(i)),
                        "memory_gib": round(props.total_memory / 2**30, 1),
                    }
                )
    except Exception as exc:  # a driver/runtime mismatch shows up here, not at import
        facts["error"] = _describe(exc)
    return facts


def _row(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "detail": detail}


def _sdpa_rows(torch: ModuleType, device: str) -> list[dict[str, Any]]:
    """Run one tiny causal SDPA call per backend, forced with ``sdpa_kernel``."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except Exception as exc:
        return [_row("sdpa", False, f"torch.nn.attention.sdpa_kernel missing ({_describe(exc)})")]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # flash needs half precision
    rows = []
    for label, member in (
        ("flash", "FLASH_ATTENTION"),
        ("efficient", "EFFICIENT_ATTENTION"),
        ("cudnn", "CUDNN_ATTENTION"),
        ("math", "MATH"),
    ):
        backend = getattr(SDPBackend, member, None)
        if backend is None:
            rows.append(_row(f"sdpa:{label}", False, f"SDPBackend.{member} not in this torch"))
            continue
        q = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([backend]):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
                rows.append(_row(f"sdpa:{label}", True, f"ran a causal {dtype} call on {device}"))
            except Exception as exc:
                # torch explains a refused backend in warnings; the first one says why
                why = str(caught[0].message).splitlines()[0] if caught else _describe(exc)
                rows.append(_row(f"sdpa:{label}", False, f"on {device}: {why[:200]}"))
    return rows


def _varlen_rows(torch: ModuleType, device: str) -> list[dict[str, Any]]:
    """torch's own varlen FlashAttention-2 (what the ``flash`` path's window branch uses)."""
    rows = []
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    if op is None:
        rows.append(_row("aten._flash_attention_forward", False, "op not registered"))
    elif "window_size_left" not in str(op.default._schema):
        rows.append(_row("aten._flash_attention_forward", False, "no window_size_left argument"))
    elif device != "cuda":
        rows.append(_row("aten._flash_attention_forward", False, "registered; runs on CUDA only"))
    else:
        try:
            q = torch.randn(16, 2, 64, device="cuda", dtype=torch.bfloat16)
            cu = torch.tensor([0, 16], device="cuda", dtype=torch.int32)
            op(q, q, q, cu, cu, 16, 16, 0.0, True, False, window_size_left=7, window_size_right=0)
            rows.append(_row("aten._flash_attention_forward", True, "ran varlen, left window 7"))
        except Exception as exc:
            rows.append(_row("aten._flash_attention_forward", False, _describe(exc)))
    try:
        importlib.import_module("torch.nn.attention.varlen")
        rows.append(_row("torch.nn.attention.varlen", True, "varlen_attn present"))
    except Exception as exc:
        rows.append(_row("torch.nn.attention.varlen", False, _describe(exc)))
    return rows


def attention_backends(torch: ModuleType, device: str) -> list[dict[str, Any]]:
    """One row per attention backend: name, whether it runs on ``device``, and why."""
    rows = _sdpa_rows(torch, device) + _varlen_rows(torch, device)
    flash_attn, _ = import_state("flash_attn")
    rows.append(_row("flash_attn", flash_attn.ok, flash_attn.version or flash_attn.error))
    triton, _ = import_state("triton")
    if not triton.ok:
        rows.append(_row("triton", False, triton.error))
    elif device == "cuda":
        rows.append(_row("triton", True, f"{triton.version}: compiled kernels on cuda"))
    else:
        rows.append(_row("triton", True, f"{triton.version}: CPU interpreter (TRITON_INTERPRET=1)"))
    return rows


def nsa_impl_facts(torch: ModuleType, device: str) -> dict[str, Any]:
    """Each ``nsa_impl`` path's availability, and ``nsa_impl.explain`` on a small tensor."""
    try:
        from nsa_impl import NSAConfig, dispatch
    except Exception as exc:  # the probe must still report the machine when nsa_impl is broken
        return {"error": f"nsa_impl cannot be imported ({_describe(exc)})"}
    facts: dict[str, Any] = {"device": device, "paths": {}}
    try:
        for name, decl in dispatch.PATHS.items():
            ok, why = decl.available()
            facts["paths"][name] = {"ok": bool(ok), "detail": str(why)}
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        # 4096 tokens: past the kernels' minimum-length guards, still only 2-4 MB
        shape = (1, 4096, 4, 64)
        q = torch.randn(*shape, device=device, dtype=dtype)
        facts["query"] = f"q {list(shape)} {dtype} on {device}, NSAConfig() defaults"
        facts["routing"] = str(dispatch.explain(q, NSAConfig()))
    except Exception as exc:
        facts["error"] = f"routing failed ({_describe(exc)})"
    return facts


def collect() -> dict[str, Any]:
    """Gather the whole probe as a JSON-serialisable dict (``verdict`` holds the exit status)."""
    torch_state, torch_mod = import_state("torch")
    triton_state, _ = import_state("triton")
    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": asdict(torch_state),
        "triton": asdict(triton_state),
        "nvidia_smi": nvidia_smi(),
    }
    if torch_mod is not None:
        report["cuda"] = cuda_facts(torch_mod)
        device = "cuda" if report["cuda"]["available"] else "cpu"
        report["backends"] = attention_backends(torch_mod, device)
        report["nsa_impl"] = nsa_impl_facts(torch_mod, device)
    code, reason = judge(torch_state, triton_state)
    report["verdict"] = {"exit_code": code, "supported": code == EXIT_SUPPORTED, "reason": reason}
    return report


def _package_line(state: dict[str, Any]) -> str:
    if state["error"] is None:
        return state["version"]
    return f"{state['version'] or '-'}  ({state['error']})"


def render(report: dict[str, Any]) -> str:
    """The human-readable probe (what ``python -m gpu_matrix probe`` prints)."""
    out = [
        "gpu_matrix probe",
        f"  python   {report['python']}  ({report['platform']})",
        f"  torch    {_package_line(report['torch'])}",
        f"  triton   {_package_line(report['triton'])}",
    ]
    smi = report["nvidia_smi"]
    for gpu in smi["gpus"]:
        out.append(
            f"  driver   {gpu['name']}: driver {gpu['driver'] or '?'}, "
            f"compute capability {gpu['compute_cap'] or '?'} (nvidia-smi)"
        )
    if smi["error"]:
        out.append(f"  driver   no GPU seen by nvidia-smi: {smi['error']}")
    cuda = report.get("cuda")
    if cuda is None:
        out.append("  CUDA     unknown: torch is not importable")
    else:
        build = f"CUDA {cuda['cuda']}" if cuda["cuda"] else "no CUDA in this torch build"
        if cuda["hip"]:
            build += f", HIP {cuda['hip']}"
        cudnn = f", cuDNN {cuda['cudnn']}" if cuda["cudnn"] else ""
        out.append(f"  CUDA     {build}{cudnn}; torch.cuda.is_available() = {cuda['available']}")
        for dev in cuda["devices"]:
            out.append(
                f"  GPU      cuda:{dev['index']} {dev['name']}, compute capability "
                f"{dev['capability']}, {dev['memory_gib']} GiB"
            )
        if not cuda["devices"]:
            out.append("  GPU      none visible to torch")
        if cuda.get("error"):
            out.append(f"  CUDA     error: {cuda['error']}")
    if "backends" in report:
        out.append("attention backends")
        for row in report["backends"]:
            out.append(f"  [{'yes' if row['ok'] else 'no '}] {row['name']:<30} {row['detail']}")
    impl = report.get("nsa_impl")
    if impl is not None:
        if impl.get("paths"):
            out.append("nsa_impl paths")
            for name, row in impl["paths"].items():
                out.append(f"  [{'yes' if row['ok'] else 'no '}] {name:<10} {row['detail']}")
        if impl.get("routing"):
            out.append(f"routing decision ({impl['query']})")
            out.extend("  " + line for line in impl["routing"].splitlines())
        if impl.get("error"):
            out.append(f"nsa_impl: {impl['error']}")
    verdict = report["verdict"]
    word = {EXIT_SUPPORTED: "SUPPORTED", EXIT_UNSUPPORTED: "UNSUPPORTED"}.get(
        verdict["exit_code"], "INCOMPLETE"
    )
    out.append(f"pair     {word}: {verdict['reason']} (exit {verdict['exit_code']})")
    return "\n".join(out) + "\n"


def main(as_json: bool = False) -> int:
    """Print the probe (text, or JSON with ``as_json``) and return its exit status."""
    report = collect()
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if as_json else render(report))
    return report["verdict"]["exit_code"]
