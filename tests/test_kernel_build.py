"""The C kernels fail loudly: their one header (``csrc/hf_paged_kernels.h``) is the single declaration of every
exported function and argument struct (every source includes it and declares nothing of its own; the library exports
exactly its prototypes; the ctypes structs cpu_library reads from it have the compiler's layouts), a wrongly typed
argument raises instead of reaching C, the library's cache key holds the CPU's full feature set and the flags (which
can be overridden), and a kernel build that fails makes the suite fail under ``CI=true`` instead of skipping."""

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

HARNESS = cpu_library.CSRC / "tests" / "test_kernels.c"


def test_every_source_includes_the_header_and_declares_nothing_else():
    """No source re-declares a prototype (they all come from the header), and the build refuses an exported function
    the header does not declare."""
    assert "-Werror=missing-prototypes" in cpu_library.CFLAGS
    prototype = re.compile(r"^(?:extern\s+)?(?:const\s+)?\w+[\s*]+\w+\s*\([^)]*\)\s*;", re.M)
    for path in [*cpu_library.SOURCES, HARNESS]:
        text = path.read_text()
        assert re.search(r'#include "(\.\./)?hf_paged_kernels\.h"', text), path.name
        assert not prototype.findall(text), f"{path.name} declares {prototype.findall(text)}"


def test_the_header_parse_misses_nothing():
    """Every prototype and struct field of the header is in SIGNATURES / STRUCTS (found here by a looser scan), with
    the types spelled out for one function of each kind."""
    text = re.sub(r"/\*.*?\*/", "", cpu_library.HEADER.read_text(), flags=re.S)
    assert set(re.findall(r"^\w[\w\s*]*?\b(\w+)\s*\(", text, re.M)) == set(cpu_library.SIGNATURES)
    for body, name in re.findall(r"typedef struct\s*\{(.*?)\}\s*(\w+)", text, re.S):
        names = re.findall(r"(\w+)\s*[,;]", body)
        assert [f[0] for f in cpu_library.STRUCTS[name]._fields_] == names, name
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    assert cpu_library.SIGNATURES["hf_rms_norm"] == (None, [p, i64, p, p, i64, i64, i32, f32, i32])
    layer, step = (ctypes.POINTER(cpu_library.STRUCTS[n]) for n in ("hf_llama_layer_t", "hf_decode_step_t"))
    assert cpu_library.SIGNATURES["hf_llama_decode_layer"] == (ctypes.c_int, [layer, step, p, p])
    assert cpu_library.SIGNATURES["hf_llama_decode_layer_workspace"] == (ctypes.c_long, [layer, i64])


def test_the_library_exports_exactly_the_header(cpu_kernels):
    """Both ways: every prototype of the header is bound (``load`` binds them all) and every function the built
    library exports is in the header."""
    if shutil.which("nm") is None:
        pytest.skip("no nm (binutils)")
    out = subprocess.run(["nm", "-D", "--defined-only", str(cpu_library.library_path())], capture_output=True,
                         text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split()[1:2] == ["T"]}
    assert {n for n in exported if not n.startswith("_")} == set(cpu_library.SIGNATURES)


def test_struct_layouts_match_the_compiler(cpu_kernels, tmp_path):
    """Each ctypes struct has the size and field offsets the C compiler gives the header's struct, with the
    library's own flags."""
    lines = ['#include <stddef.h>', '#include <stdio.h>', f'#include "{cpu_library.HEADER}"', "int main(void) {"]
    for name, struct in cpu_library.STRUCTS.items():
        lines.append(f'    printf("{name} %zu\\n", sizeof({name}));')
        lines += [f'    printf("{name}.{f} %zu\\n", offsetof({name}, {f}));' for f, _ in struct._fields_]
    (tmp_path / "layouts.c").write_text("\n".join(lines + ["    return 0;", "}"]) + "\n")
    flags = [f for f in cpu_library.compiler_flags() if f not in ("-shared", "-fPIC")]
    subprocess.run([cpu_library._compiler(), *flags, str(tmp_path / "layouts.c"), "-o", str(tmp_path / "layouts")],
                   check=True, capture_output=True)
    c_side = dict(line.split() for line in subprocess.run([str(tmp_path / "layouts")], capture_output=True,
                                                          text=True, check=True).stdout.splitlines())
    py_side = {}
    for name, struct in cpu_library.STRUCTS.items():
        py_side[name] = str(ctypes.sizeof(struct))
        py_side.update({f"{name}.{f}": str(getattr(struct, f).offset) for f, _ in struct._fields_})
    assert py_side == c_side


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
    with pytest.raises(ctypes.ArgumentError):  # another struct where a layer's belongs
        lib.hf_llama_decode_layer_workspace(cpu_kernels.STRUCTS["hf_seqs_t"](), 1)


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
        import sys; sys.path.insert(0, TESTS_DIR)
        from attention_oracle import paged_attention_naive
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
    code = textwrap.dedent(code).replace("TESTS_DIR", repr(os.path.dirname(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
