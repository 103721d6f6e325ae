"""Builds and loads the CPU kernels' C library (``csrc/*.c``: paged decode and prefill attention, the cache write, fused
layer ops, linears); see "CPU C kernels" in docs/architecture.md.

Built on first use with ``$CC`` (else ``gcc``, ``cc``) into ``$HF_PAGED_CACHE`` (default ``~/.cache/hf_paged``), named
by the tier and a hash of the sources, flags (:func:`compiler_flags`), compiler version and the CPU's model and
features, so a library is never loaded for another CPU or tier; written under a temporary name and renamed, so racing
processes at worst build it twice. ctypes, not a torch extension: no torch headers, so it builds with any C compiler,
the same for every torch. Every exported function and struct is declared once, in ``csrc/hf_paged_kernels.h``, which
:func:`parse_header` reads, so a wrong argument type raises ``ctypes.ArgumentError``. Without a compiler or on a failed
build :func:`available` is False (:func:`failure` says why) and callers keep PyTorch; nothing raises at import.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ... import envs
from . import cpu_isa

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "paged_decode_attention.c", CSRC / "paged_prefill_attention.c", CSRC / "fused_layer_ops.c",
           CSRC / "amx_linear.c", CSRC / "llama_decode_layer.c", CSRC / "small_linear.c"]
HEADER = CSRC / "hf_paged_kernels.h"  # every exported function and argument struct (see parse_header)
HEADERS = [HEADER, CSRC / "cpu_vec.h"]
# No -ffast-math: reductions are vectorized by `omp simd reduction` and exp is a polynomial in the source. Missing
# prototypes are errors: an exported function not in the header would have no ctypes declaration.
CFLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-fno-strict-aliasing", "-std=gnu11", "-Werror=missing-prototypes"]


def compiler_flags() -> list[str]:
    """The flags the library is built with (read when it is built): ``HF_PAGED_CFLAGS``, else the CPU tier's."""
    target = envs.cflags()
    return CFLAGS + (target.split() if target is not None else cpu_isa.target_flags())


_SCALARS = {"int": ctypes.c_int, "long": ctypes.c_long, "float": ctypes.c_float, "void": None}


def _declaration(text: str, structs: dict) -> tuple[str, type | None]:
    """``const T *name`` (or ``T name``) -> (name, its ctypes type): a struct pointer as a pointer to that struct
    (ctypes then refuses another struct), any other pointer as ``c_void_p`` (an address, e.g. a ``data_ptr()``)."""
    base, stars, name = re.fullmatch(r"\s*(?:const\s+)?(\w+)\s*(\**)\s*(\w*)\s*", text).groups()
    if stars:
        return name, ctypes.POINTER(structs[base]) if base in structs else ctypes.c_void_p
    return name, structs[base] if base in structs else _SCALARS[base]


def parse_header(text: str) -> tuple[dict, dict, dict]:
    """(structs as ``ctypes.Structure`` classes, prototypes as name -> (restype, argtypes), enum constants) of
    ``hf_paged_kernels.h``, the one place they are declared (a subset of C: see the header's opening comment)."""
    text = re.sub(r"/\*.*?\*/|^[ \t]*#[^\n]*", "", text, flags=re.S | re.M)
    structs: dict[str, type] = {}
    for body, name in re.findall(r"typedef struct\s*\{(.*?)\}\s*(\w+)\s*;", text, re.S):
        fields = []
        for decl in filter(str.strip, body.split(";")):
            first, *more = decl.split(",")
            base = re.match(r"\s*((?:const\s+)?\w+)", first).group(1)
            fields += [_declaration(f if i == 0 else f"{base} {f}", structs) for i, f in enumerate([first, *more])]
        structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
    functions = {}
    for ret, name, params in re.findall(r"^(int|long|void)\s+(\w+)\s*\(([^)]*)\)\s*;", text, re.M):
        args = [] if params.strip() == "void" else [_declaration(p, structs)[1] for p in params.split(",")]
        functions[name] = (_SCALARS[ret], args)
    enums = {k: int(v) for body in re.findall(r"enum\s*\{(.*?)\}", text, re.S)
             for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", body)}
    return structs, functions, enums


STRUCTS, SIGNATURES, CONSTANTS = parse_header(HEADER.read_text())

_profiler_enabled = torch._C._autograd._profiler_enabled
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_state: str | None = None  # None: not tried yet; "ok"; "failed"
_build_seconds: float | None = None  # how long the compile took in this process (None: loaded from the cache)
_path: Path | None = None
_failure: str | None = None  # why the library could not be built or loaded


def enabled() -> bool:
    """``HF_PAGED_CPU_KERNEL`` does not turn the kernels off (read on every call)."""
    return envs.cpu_kernel()


def _compiler() -> str | None:
    for name in (envs.c_compiler(), "gcc", "cc"):
        if name and shutil.which(name):
            return name
    return None


_CPU_ID_FIELDS = ("model name", "flags", "vendor_id", "cpu family", "model\t",  # x86-64
                  "Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part")  # AArch64


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and its full feature set (each distinct line once)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = sorted({ln.strip() for ln in f.read().splitlines() if ln.startswith(_CPU_ID_FIELDS)})
        return "\n".join(lines) or platform.processor() or platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def _run(command: list[str]) -> None:
    res = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")


def _compile_and_link(cc: str, flags: list[str], objects: Path, out: str) -> None:
    """Each source compiled on its own, as many at once as there are cores, then linked into ``out``."""
    compile_flags = [f for f in flags if f != "-shared"]
    commands = [[cc, *compile_flags, "-c", str(src), "-o", str(objects / f"{src.stem}.o")] for src in SOURCES]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_run, commands))
    _run([cc, *flags, *(str(objects / f"{src.stem}.o") for src in SOURCES), "-o", out, "-lm"])


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = [p.read_bytes() for p in SOURCES + HEADERS]
    flags = compiler_flags()
    key = hashlib.sha256(b"\0".join([*parts, " ".join(flags).encode(), version.encode(),
                                     _cpu_id().encode(), platform.machine().encode()])).hexdigest()[:16]
    folder = envs.cache_dir()
    path = folder / f"hf_paged_cpu_{cpu_isa.library_label()}_{key}.so"
    if path.exists():
        return path
    global _build_seconds
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=folder) as objects:
            _compile_and_link(cc, flags, Path(objects), tmp)
        _build_seconds = time.perf_counter() - t0
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)  # atomic: a racing process sees either no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built %s in %.2f s", path, _build_seconds)
    return path


def load() -> ctypes.CDLL | None:
    """The loaded library (built on the first call), or None where it cannot be built or loaded."""
    global _lib, _state, _path
    if _state is not None:
        return _lib
    with _lock:
        if _state is not None:
            return _lib
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found ($CC, gcc, cc)")
            _path = _build(cc)
            lib = ctypes.CDLL(str(_path))
            for name, (restype, argtypes) in SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
            _lib = lib
            _state = "ok"
        except Exception as exc:  # no compiler, a failed build, an unloadable library: keep PyTorch
            global _failure
            _failure = str(exc)
            logger.warning("the C CPU kernels are not usable (%s); the CPU path stays on PyTorch", exc)
            _lib = None
            _state = "failed"
    return _lib


def available() -> bool:
    """Whether the kernels can run here and are not switched off by ``HF_PAGED_CPU_KERNEL=0`` (builds the library on
    the first call). An engine asks once, for its plan; its hot path then uses :func:`loaded`."""
    return enabled() and load() is not None


def loaded() -> bool:
    """Whether the library is built and loaded (no environment lookup: for hot paths an engine's plan chose)."""
    return _lib is not None or load() is not None


def failure() -> str | None:
    """Why the library could not be built or loaded (None if it was, or was not tried yet)."""
    return _failure


def library_path() -> Path | None:
    """The loaded library's path (None until loaded)."""
    return _path


def build_seconds() -> float | None:
    """The compile time of the library in this process, or None if it came from the cache (or not yet)."""
    return _build_seconds


def call_profiled(label: str, fn, args: tuple) -> int:
    """``fn(*args)``; under torch.profiler inside a ``record_function(label)`` row of its own (a foreign call is
    invisible to the profiler otherwise)."""
    if _profiler_enabled():
        with torch.profiler.record_function(label):
            return fn(*args)
    return fn(*args)
