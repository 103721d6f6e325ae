"""The C kernels fail loudly: every ctypes declaration matches its C prototype, a wrongly typed argument raises
instead of reaching C, the library's cache key holds the CPU's full feature set and the flags (which can be
overridden), and a kernel build that fails makes the suite fail under ``CI=true`` instead of skipping."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_paged.execution.kernels import cpu_isa, cpu_library

_C_TYPES = {"long": ctypes.c_long, "int64_t": ctypes.c_long, "int": ctypes.c_int, "float": ctypes.c_float,
            "void": None}


def _prototypes() -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, parameter declarations) of every function declared or defined in csrc/."""
    found: dict[str, tuple[str, list[str]]] = {}
    pattern = re.compile(r"^(int|void|long)\s+(\w+)\s*\(([^)]*)\)\s*[{;]", re.M)
    for path in cpu_library.SOURCES:
        text = path.read_text()
        macro = re.search(r"#define ARGS((?:[^\n]*\\\n)*[^\n]*)", text)  # a parameter list shared by several
        if macro:
            text = text.replace("(ARGS)", "(" + macro.group(1).replace("\\\n", " ") + ")")
        for ret, name, params in pattern.findall(text):
            params = [p.strip() for p in params.replace("\n", " ").split(",") if p.strip()]
            if all("*" in p or p.replace("const", "").split()[0] in _C_TYPES for p in params):  # not a macro
                found.setdefault(name, (ret, params))
    return found


def _ctype_of(param: str):
    if "*" in param:
        return ctypes.c_void_p
    words = param.replace("const", "").split()
    return _C_TYPES[words[0]]


@pytest.mark.parametrize("name", sorted(cpu_library.SIGNATURES))
def test_ctypes_signatures_match_the_c_prototypes(name):
    protos = _prototypes()
    assert name in protos, f"{name} has no C prototype in csrc/"
    ret, params = protos[name]
    restype, argtypes = cpu_library.SIGNATURES[name]
    if params == ["void"]:
        params = []
    assert [_ctype_of(p) for p in params] == argtypes, name
    assert _C_TYPES[ret] is restype or (ret == "long" and restype is ctypes.c_long), name


def test_a_wrongly_typed_argument_raises(cpu_kernels):
    import torch

    lib = cpu_kernels.load()
    x = torch.zeros(4)
    with pytest.raises(ctypes.ArgumentError):  # a tensor where its data_ptr() belongs
        lib.hf_rms_norm(x, 4, x.data_ptr(), x.data_ptr(), 4, 1, 4, 1e-6, 0)
    with pytest.raises(ctypes.ArgumentError):  # a float where an integer belongs
        lib.hf_rms_norm(x.data_ptr(), 4.0, x.data_ptr(), x.data_ptr(), 4, 1, 4, 1e-6, 0)
    with pytest.raises(TypeError):
        lib.hf_silu_mul(x.data_ptr(), 1, x.data_ptr(), 1, 1, 1)  # too few arguments


def test_cache_key_holds_cpu_features_and_flags(monkeypatch):
    cpu = cpu_library._cpu_id()
    if Path("/proc/cpuinfo").exists():
        text = Path("/proc/cpuinfo").read_text()
        feature_line = next((ln.strip() for ln in text.splitlines() if ln.startswith(("flags", "Features"))), None)
        assert feature_line is None or feature_line in cpu
    monkeypatch.delenv("HF_PAGED_CFLAGS", raising=False)
    assert cpu_library.compiler_flags()[-len(cpu_isa.target_flags()):] == cpu_isa.target_flags()  # the tier's
    monkeypatch.setenv("HF_PAGED_CFLAGS", "-march=x86-64-v2 -mtune=generic")
    flags = cpu_library.compiler_flags()
    assert "-march=native" not in flags and flags[-2:] == ["-march=x86-64-v2", "-mtune=generic"]


def _pytest_child(env: dict, tmp_path) -> subprocess.CompletedProcess:
    test = Path(__file__).parent / "test_cpu_kernel.py"
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "HF_PAGED_CFLAGS", "HF_PAGED_CACHE")}
    return subprocess.run([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", str(test), "-k",
                           "c_cache_write_equals_torch_write"],
                          env={**base, "HF_PAGED_CACHE": str(tmp_path), **env}, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parent.parent)


def test_a_broken_kernel_build_fails_the_suite_in_ci(tmp_path):
    broken = {"HF_PAGED_CFLAGS": "-fthis-flag-does-not-exist"}
    in_ci = _pytest_child({**broken, "CI": "true"}, tmp_path)
    assert in_ci.returncode != 0, in_ci.stdout
    assert "could not be built" in in_ci.stdout
    elsewhere = _pytest_child(broken, tmp_path)
    assert elsewhere.returncode == 0 and "SKIPPED" in elsewhere.stdout, elsewhere.stdout
    assert "could not be built" in elsewhere.stdout


@pytest.mark.skipif(shutil.which("clang") is None, reason="clang is not installed (apt-get install clang libomp-dev)")
def test_clang_builds_the_kernels_and_they_agree(tmp_path):
    """The library builds with clang too (no GCC-only builtins) and its decode attention matches the oracle."""
    code = """
        import torch
        from hf_paged.execution.kernels import cpu_isa, cpu_library, cpu_decode_attention as k
        from hf_paged.execution.kernels.paged_attention import paged_attention_naive
        assert cpu_library.load() is not None, cpu_library.failure()
        g = torch.Generator().manual_seed(0)
        kc, vc = torch.randn(8, 16, 2, 64, generator=g), torch.randn(8, 16, 2, 64, generator=g)
        q = torch.randn(2, 4, 64, generator=g)
        tables, lens = torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([40, 17], dtype=torch.int32)
        out = k.decode_attention_cpu(q, kc, vc, tables, lens, 0.125)
        ref = paged_attention_naive(q, kc, vc, tables, [40, 17], [0, 1, 2], 0.125)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
        print("OK", cpu_library.library_path().name)
    """
    import textwrap

    env = {**os.environ, "CC": "clang", "HF_PAGED_CACHE": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
