"""CPU instruction-set tiers: which one the C kernels are built for and the plan is capped at, and what this CPU and
torch can run (each fast path probed once per process, never assumed); see "CPU tiers" in docs/architecture.md.

x86-64 tiers, lowest first: ``generic``, ``avx2`` (x86-64-v3), ``avx512`` (x86-64-v4), ``avx512_bf16``, ``amx`` (their
compiler flags: :data:`TARGET_FLAGS`). ``HF_PAGED_CPU_ISA`` (read once) is ``native`` (``-march=native``, the plan free
to use what this CPU has) or a tier, lowered to the CPU's own where it is above it; ``HF_PAGED_CFLAGS`` still replaces
the flags; other architectures have one tier, ``native``. The variable cannot reach torch's own kernels, MKL or oneDNN,
which pick their instructions at first use: :func:`emulation_env` gives a new process the variables that cap them too.
"""

from __future__ import annotations

import functools
import getpass
import logging
import platform
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ... import envs

logger = logging.getLogger(__name__)

TIERS = ("generic", "avx2", "avx512", "avx512_bf16", "amx")
_FEATURES = {  # /proc/cpuinfo flags each tier adds to the one before
    "avx2": ("avx2", "fma", "f16c", "bmi1", "bmi2"),
    "avx512": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
    "avx512_bf16": ("avx512_bf16", "avx512_vnni"),
    "amx": ("amx_tile", "amx_bf16"),
}
_V4_BF16 = ["-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni"]
TARGET_FLAGS = {
    "generic": ["-march=x86-64-v2"],
    "avx2": ["-march=x86-64-v3"],
    "avx512": ["-march=x86-64-v4"],
    "avx512_bf16": _V4_BF16,
    "amx": _V4_BF16 + ["-mamx-tile", "-mamx-bf16", "-mamx-int8"],
}
_EMULATION = {  # ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA
    "generic": ("default", "SSE4_2", "SSE41"),
    "avx2": ("avx2", "AVX2", "AVX2"),
    "avx512": ("avx512", "AVX512", "AVX512_CORE"),
    "avx512_bf16": ("avx512", "AVX512", "AVX512_CORE_BF16"),
    "amx": ("avx512", "AVX512", "AVX512_CORE_AMX"),
}


def x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86-64 ``flags``, AArch64 ``Features``), empty where /proc/cpuinfo is not there."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=None)
def detected() -> str:
    """The highest tier this CPU has (``native`` off x86-64)."""
    if not x86():
        return "native"
    flags, tier = cpu_flags(), "generic"
    for name in TIERS[1:]:
        if not all(f in flags for f in _FEATURES[name]):
            break
        tier = name
    return tier


@functools.lru_cache(maxsize=None)
def requested() -> str:
    """``HF_PAGED_CPU_ISA`` as read the first time it is asked (``native`` when unset or not understood)."""
    value = envs.cpu_isa()
    if value != "native" and value not in TIERS:
        logger.warning("HF_PAGED_CPU_ISA=%s is not one of native, %s; using native", value, ", ".join(TIERS))
        return "native"
    if value != "native" and not x86():
        logger.warning("HF_PAGED_CPU_ISA=%s names an x86-64 tier; this is %s, using native", value,
                       platform.machine())
        return "native"
    return value


@functools.lru_cache(maxsize=None)
def tier() -> str:
    """The tier the kernels are built for and the plan is capped at: the requested one, lowered to what the CPU has."""
    want = requested()
    if want == "native":
        return detected()
    have = detected()
    if TIERS.index(want) > TIERS.index(have):
        logger.warning("HF_PAGED_CPU_ISA=%s: this CPU's highest tier is %s; using %s", want, have, have)
        return have
    return want


def forced() -> bool:
    """Whether ``HF_PAGED_CPU_ISA`` chose a tier (rather than ``native``)."""
    return requested() != "native"


def allows(name: str) -> bool:
    """Whether code of x86-64 tier ``name`` may run: this CPU has it and the requested tier is not below it."""
    current = tier()
    return current in TIERS and TIERS.index(current) >= TIERS.index(name)


def target_flags() -> list[str]:
    """The C library's target flags for the tier (``-march=native`` unless a tier was requested)."""
    return ["-march=native"] if not forced() else list(TARGET_FLAGS[tier()])


def library_label() -> str:
    """The tier part of the C library's file name (``native``, ``avx2``, ...; ``cflags`` for ``HF_PAGED_CFLAGS``)."""
    if envs.cflags() is not None:
        return "cflags"
    return tier() if forced() else "native"


def emulation_env(name: str) -> dict[str, str]:
    """Environment variables that make a new process behave like a CPU of tier ``name``, for hf_paged
    (``HF_PAGED_CPU_ISA``) and torch's own code (dispatch, MKL, oneDNN); torch reads them when it first runs."""
    if name not in TIERS:
        raise ValueError(f"{name}: not one of {', '.join(TIERS)}")
    aten, mkl, onednn = _EMULATION[name]
    # Inductor's own cache does not key its graphs by ATEN_CPU_CAPABILITY: a graph generated for AVX-512 vectors,
    # loaded and compiled for AVX2, reads past its vectors. A folder per tier keeps them apart.
    inductor = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}_{name}"
    return {"HF_PAGED_CPU_ISA": name, "ATEN_CPU_CAPABILITY": aten, "MKL_ENABLE_INSTRUCTIONS": mkl,
            "ONEDNN_MAX_CPU_ISA": onednn, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}


@functools.lru_cache(maxsize=None)
def _onednn_probe(dtype: torch.dtype) -> bool:
    """A real pack and product of a tiny ``dtype`` weight through the ops the packed linears use."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode():
            w = torch.linspace(-1, 1, 16 * 32).reshape(16, 32).to(dtype)
            x = torch.linspace(1, -1, 3 * 32).reshape(3, 32).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            ref = F.linear(x.float(), w.float())
        return out.shape == ref.shape and bool(torch.allclose(out.float(), ref, rtol=0.02, atol=0.05))
    except Exception as exc:  # RuntimeError where this CPU / oneDNN cannot: the path is just not chosen
        logger.info("oneDNN cannot pack %s weights here: %s", dtype, str(exc).splitlines()[0] if str(exc) else exc)
        return False


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether the plan may use oneDNN's packed weights for ``dtype``: the probe passed, and for bf16 the tier is
    at least ``avx512`` unless the CPU is this one's own (an AVX2 CPU with AVX-NE-CONVERT packs bf16 too)."""
    if dtype not in (torch.float32, torch.bfloat16) or not _onednn_probe(dtype):
        return False
    return dtype != torch.bfloat16 or not x86() or not forced() or allows("avx512")


@functools.lru_cache(maxsize=None)
def torch_capability() -> str:
    """torch's own kernel dispatch level (``AVX512``, ``AVX2``, ``DEFAULT``, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:
        return "unknown"


@functools.lru_cache(maxsize=None)
def describe() -> str:
    """The ISA for the plan's log line: the tier (and that it was forced, and torch's own level where it is
    not the tier's), e.g. ``avx2 (HF_PAGED_CPU_ISA; torch's own kernels AVX512)``; off x86-64 the SIMD features."""
    if not x86():
        flags = cpu_flags()
        parts = [name for name, flag in (("neon", "asimd"), ("bf16", "bf16"), ("sve", "sve")) if flag in flags]
        return "+".join(parts) or platform.machine()
    notes = []
    if forced():
        notes.append("HF_PAGED_CPU_ISA")
        level = torch_capability()
        if level != _EMULATION[tier()][0].upper():
            notes.append(f"torch's own kernels {level}")
    return tier() + (f" ({'; '.join(notes)})" if notes else "")
