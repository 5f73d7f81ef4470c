"""The probe on the CPU: its verdicts and exit codes (versions monkeypatched), its survival when
torch is missing or broken, ``nvidia-smi`` parsing, and an end-to-end run on this machine."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap

import pytest

from gpu_matrix import check_pair, probe
from gpu_matrix.probe import (
    EXIT_MISSING,
    EXIT_SUPPORTED,
    EXIT_UNSUPPORTED,
    PackageState,
    judge,
    nvidia_smi,
)

OK_TORCH = PackageState("torch", "2.13.0+cpu", None)
OK_TRITON = PackageState("triton", "3.7.1", None)


def _fake_packages(monkeypatch, **states: PackageState) -> None:
    """Make the probe see ``states`` (module -> state) and no importable module at all."""
    monkeypatch.setattr(probe, "import_state", lambda name: (states[name], None))
    monkeypatch.setattr(probe, "nvidia_smi", lambda: {"gpus": [], "error": "faked"})


@pytest.mark.parametrize(
    ("torch", "triton", "code", "words"),
    [
        (OK_TORCH, OK_TRITON, EXIT_SUPPORTED, ["supported pair"]),
        (OK_TORCH, PackageState("triton", "3.9.0", None), EXIT_UNSUPPORTED, ["triton==3.7.*"]),
        (PackageState("torch", "2.3.1", None), OK_TRITON, EXIT_UNSUPPORTED, ["not in the matrix"]),
        (PackageState("torch", "unknown", None), OK_TRITON, EXIT_UNSUPPORTED, ["cannot judge"]),
        (PackageState("torch", None, "not installed"), OK_TRITON, EXIT_MISSING, ["torch not inst"]),
        (OK_TORCH, PackageState("triton", None, "not installed"), EXIT_MISSING, ["triton==3.7.*"]),
        (
            PackageState("torch", "2.13.0", "cannot be imported (OSError: libcudart.so.12)"),
            OK_TRITON,
            EXIT_MISSING,
            ["cannot be imported", "libcudart"],
        ),
    ],
)
def test_judge(torch, triton, code, words):
    got, reason = judge(torch, triton)
    assert got == code, reason
    for word in words:
        assert word in reason


@pytest.mark.parametrize(
    ("triton_version", "code", "word"),
    [("3.7.0", EXIT_SUPPORTED, "SUPPORTED"), ("3.9.0", EXIT_UNSUPPORTED, "UNSUPPORTED")],
)
def test_main_exit_code_follows_the_installed_pair(monkeypatch, capsys, triton_version, code, word):
    _fake_packages(monkeypatch, torch=OK_TORCH, triton=PackageState("triton", triton_version, None))
    assert probe.main() == code
    out = capsys.readouterr().out
    assert f"pair     {word}:" in out and f"(exit {code})" in out
    assert "torch    2.13.0+cpu" in out and f"triton   {triton_version}" in out


def test_main_without_torch_or_triton_is_clear(monkeypatch, capsys):
    _fake_packages(
        monkeypatch,
        torch=PackageState("torch", None, "not installed"),
        triton=PackageState("triton", None, "not installed"),
    )
    assert probe.main() == EXIT_MISSING
    out = capsys.readouterr().out
    assert "torch    -  (not installed)" in out
    assert "triton   -  (not installed)" in out
    assert "CUDA     unknown: torch is not importable" in out
    assert "INCOMPLETE: torch not installed: no pair to judge (exit 3)" in out


def test_main_json(monkeypatch, capsys):
    _fake_packages(monkeypatch, torch=OK_TORCH, triton=PackageState("triton", "3.9.0", None))
    assert probe.main(as_json=True) == EXIT_UNSUPPORTED
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == {
        "exit_code": EXIT_UNSUPPORTED,
        "supported": False,
        "reason": check_pair("2.13.0+cpu", "3.9.0").reason,
    }
    assert report["torch"] == {"name": "torch", "version": "2.13.0+cpu", "error": None}


def test_import_state_of_a_missing_module():
    state, mod = probe.import_state("gpu_matrix_no_such_module")
    assert mod is None and state == PackageState("gpu_matrix_no_such_module", None, "not installed")


def test_importing_gpu_matrix_imports_neither_torch_nor_triton(run_python):
    code = (
        "import sys, gpu_matrix, gpu_matrix.probe, gpu_matrix.__main__; "
        "print(sorted(m for m in ('torch', 'triton', 'nsa_impl') if m in sys.modules))"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_probe_survives_a_broken_torch(tmp_path, run_python):
    # a torch package that raises on import, ahead of any real one on sys.path
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "raise OSError('libtorch_cuda.so: cannot open shared object file')\n"
    )
    result = run_python("-m", "gpu_matrix", "probe", extra_path=(str(tmp_path),))
    assert result.returncode == EXIT_MISSING, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot be imported (OSError: libtorch_cuda.so" in result.stdout
    assert "CUDA     unknown: torch is not importable" in result.stdout
    assert "(exit 3)" in result.stdout


def _fake_nvidia_smi(tmp_path, monkeypatch, script: str) -> None:
    exe = tmp_path / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + textwrap.dedent(script))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.mark.skipif(sys.platform == "win32", reason="the fake nvidia-smi is a shell script")
def test_nvidia_smi_query(tmp_path, monkeypatch):
    _fake_nvidia_smi(
        tmp_path,
        monkeypatch,
        """\
        echo "NVIDIA H100 80GB HBM3, 570.86.15, 9.0"
        echo "NVIDIA A100-SXM4-40GB, 570.86.15, 8.0"
        """,
    )
    assert nvidia_smi() == {
        "gpus": [
            {"name": "NVIDIA H100 80GB HBM3", "driver": "570.86.15", "compute_cap": "9.0"},
            {"name": "NVIDIA A100-SXM4-40GB", "driver": "570.86.15", "compute_cap": "8.0"},
        ],
        "error": None,
    }


@pytest.mark.skipif(sys.platform == "win32", reason="the fake nvidia-smi is a shell script")
def test_nvidia_smi_old_driver_falls_back_to_listing(tmp_path, monkeypatch):
    _fake_nvidia_smi(
        tmp_path,
        monkeypatch,
        """\
        if [ "$1" = "-L" ]; then echo "GPU 0: Tesla V100-SXM2-16GB (UUID: GPU-1234)"; exit 0; fi
        echo "Field compute_cap is not a valid field to query." >&2; exit 2
        """,
    )
    result = nvidia_smi()
    assert result["gpus"] == [{"name": "Tesla V100-SXM2-16GB", "driver": None, "compute_cap": None}]


@pytest.mark.skipif(sys.platform == "win32", reason="the fake nvidia-smi is a shell script")
def test_nvidia_smi_failure_is_a_reason(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, 'echo "NVIDIA-SMI has failed" >&2; exit 9\n')
    result = nvidia_smi()
    assert result["gpus"] == [] and "exited 9" in result["error"]


def test_nvidia_smi_absent(monkeypatch):
    monkeypatch.setattr(probe.shutil, "which", lambda name: None)
    assert nvidia_smi() == {"gpus": [], "error": "nvidia-smi not found"}


def test_probe_end_to_end_on_this_machine(run_python):
    """The real probe, in a fresh process: its facts agree with torch and its verdict with the
    matrix (whatever pair this machine has)."""
    torch = pytest.importorskip("torch")
    result = run_python("-m", "gpu_matrix", "probe", "--json")
    report = json.loads(result.stdout)
    assert report["torch"] == {"name": "torch", "version": torch.__version__, "error": None}
    expected_code, expected_reason = judge(
        PackageState(**report["torch"]), PackageState(**report["triton"])
    )
    assert result.returncode == expected_code == report["verdict"]["exit_code"]
    assert report["verdict"]["reason"] == expected_reason
    assert report["cuda"]["available"] == torch.cuda.is_available()
    backends = {row["name"]: row for row in report["backends"]}
    assert backends["sdpa:math"]["ok"], backends["sdpa:math"]
    assert {"sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "flash_attn", "triton"} <= set(backends)
    assert "aten._flash_attention_forward" in backends
    impl = report["nsa_impl"]
    assert "error" not in impl, impl["error"]
    assert impl["paths"]["reference"]["ok"]
    for branch in ("cmp", "sel", "win"):
        assert branch in impl["routing"]
