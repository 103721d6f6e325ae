"""Every environment variable hf_paged reads, typed, in one place.

Each is read where a decision is made once (an engine's plan is built, the C library is built and loaded, a process
group is joined, the package is imported), never on a hot path: a change takes effect at the next such decision.

=========================== ========================================================================================
``HF_PAGED_CPU_KERNEL``     hf_paged's C kernels (on unless 0/false/no/off)
``HF_PAGED_AMX``            AMX tiles for bf16 linears where the CPU has them (on)
``HF_PAGED_AVX512_LINEAR``  hf_paged's small-row linear kernel, AVX-512 or AVX2 (on)
``HF_PAGED_FORCE_TORCH``    the PyTorch paths everywhere, the kernels' oracle (off)
``HF_PAGED_FORCE_TRITON``   the Triton kernels on CPU tensors too, under ``TRITON_INTERPRET=1`` (off)
``HF_PAGED_TUNE_CPU``       ``cpu_runtime``'s process settings: OpenMP pool, malloc (on)
``HF_PAGED_CPU_ISA``        the x86 tier the C kernels are built for and the plan is capped at (``native``)
``HF_PAGED_CFLAGS``         target flags for the C library instead of the tier's
``CC``                      the C compiler to try first
``HF_PAGED_CACHE``          where the C library and the embedded model are kept (``~/.cache/hf_paged``)
``TRITON_INTERPRET``        ``1``: Triton kernels run in its interpreter
``HF_PAGED_ENGINE_OPTIONS`` a JSON object of engine options for ``import hf_paged.auto``
``HF_PAGED_TP_TIMEOUT``     seconds a tensor-parallel collective may wait before its requests fail (600)
``HF_PAGED_API_KEY``         ``hf-paged serve``'s API key when ``--api-key`` / ``--api-key-file`` give none
``WORLD_SIZE``/``LOCAL_RANK`` as torchrun sets them
=========================== ========================================================================================
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return True if value in ("1", "true", "yes", "on") else False if value in ("0", "false", "no", "off") else default


def cpu_kernel() -> bool:
    return _flag("HF_PAGED_CPU_KERNEL", True)


def amx() -> bool:
    return _flag("HF_PAGED_AMX", True)


def small_row_linears() -> bool:
    return _flag("HF_PAGED_AVX512_LINEAR", True)


def force_torch() -> bool:
    return _flag("HF_PAGED_FORCE_TORCH", False)


def force_triton() -> bool:
    return _flag("HF_PAGED_FORCE_TRITON", False)


def tune_cpu() -> bool:
    return _flag("HF_PAGED_TUNE_CPU", True)


def cpu_isa() -> str:
    return os.environ.get("HF_PAGED_CPU_ISA", "native").strip().lower() or "native"


def cflags() -> str | None:
    return os.environ.get("HF_PAGED_CFLAGS")


def c_compiler() -> str | None:
    return os.environ.get("CC") or None


def cache_dir() -> Path:
    root = os.environ.get("HF_PAGED_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "hf_paged"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def engine_options() -> str:
    return os.environ.get("HF_PAGED_ENGINE_OPTIONS", "").strip()


def tp_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("HF_PAGED_TP_TIMEOUT", 600)))


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def api_key() -> str | None:
    return os.environ.get("HF_PAGED_API_KEY") or None
