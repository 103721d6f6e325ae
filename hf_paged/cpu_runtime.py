"""Process-level settings that decide CPU throughput more than any kernel (see docs/architecture.md).

* :func:`release_openmp_pool` frees the calling thread's idle OpenMP pool (``omp_pause_resource_all``): libgomp keeps a
  pool per thread that ran a parallel region, and with two alive (the engine thread's, the caller's) there are more
  OpenMP threads than cores and it parks its workers between regions (a futex wake-up per op). The pool returns on the
  thread's next parallel region.
* :func:`tune_malloc` raises glibc's mmap and trim thresholds, so a prefill step's activations are reused instead of
  page-faulted in from fresh ``mmap``s each step.
* :func:`zeros_on_huge_pages` advises the KV pool onto transparent huge pages before it is touched (decode reads a few
  KB from each of many scattered blocks: on 4 KB pages nearly each is a TLB miss).
* :func:`empty_on_huge_pages` does the same for the packed weights the small-row kernels stream: on 4 KB pages the
  stream pays a page walk every 64 cache lines. Most weights are smaller than a huge page, so they are carved
  side by side out of shared chunks (``_HugePageArena``).

All act through ``ctypes`` and do nothing where a call is missing (another libc, OpenMP runtime or OS);
``HF_PAGED_TUNE_CPU=0`` turns them off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import mmap
import os
import sys
import threading
import weakref

import torch

from . import envs

logger = logging.getLogger(__name__)

_OMP_PAUSE_HARD = 2
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper bound for M_MMAP_THRESHOLD on 64-bit
_TRIM_THRESHOLD_BYTES = 1 << 30
_MADV_HUGEPAGE = 14
_HUGE_PAGE_BYTES = 2 << 20
_ARENA_CHUNK_BYTES = 64 << 20

_lock = threading.Lock()
_omp_pause = None  # omp_pause_resource_all of the loaded OpenMP runtime, False if there is none
_malloc_tuned = False
_libc = None


def _loaded_openmp() -> str | None:
    """Path of the OpenMP runtime torch runs on (other packages may have loaded their own copies too)."""
    torch_dir = os.path.dirname(torch.__file__)
    found = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if os.path.basename(path).startswith(("libgomp", "libiomp5")) and path not in found:
                    found.append(path)
    except OSError:
        return None
    ours = [p for p in found if p.startswith(torch_dir)]
    return (ours or found or [None])[0]


def release_openmp_pool() -> bool:
    """Free the calling thread's idle OpenMP worker threads; True if the runtime did."""
    global _omp_pause
    if not envs.tune_cpu():
        return False
    if _omp_pause is None:
        with _lock:
            if _omp_pause is None:
                path = _loaded_openmp()
                fn = getattr(ctypes.CDLL(path), "omp_pause_resource_all", None) if path else None
                if fn is not None:
                    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                _omp_pause = fn or False
    return bool(_omp_pause) and _omp_pause(_OMP_PAUSE_HARD) == 0


def tune_malloc() -> bool:
    """Keep freed activations in the heap instead of unmapping them (glibc only; once per process)."""
    global _malloc_tuned
    if not envs.tune_cpu() or _malloc_tuned:
        return _malloc_tuned
    with _lock:
        mallopt = getattr(_c_library(), "mallopt", None)
        if mallopt is not None and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES) == 1:
            mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
            _malloc_tuned = True
            logger.info("malloc tuned for reuse of large activations (HF_PAGED_TUNE_CPU=0 to keep the defaults)")
    return _malloc_tuned


def _c_library():
    """The C library (False where none is found), loaded once."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    return _libc


def _advise_huge_pages(out: torch.Tensor) -> None:
    """Advise the 2 MB-aligned part of ``out``'s memory onto transparent huge pages (before it is touched: Linux
    only, best effort, nothing where THP is off)."""
    libc = _c_library()
    madvise = getattr(libc, "madvise", None)
    if madvise is not None:
        start = -(-out.data_ptr() // _HUGE_PAGE_BYTES) * _HUGE_PAGE_BYTES
        end = (out.data_ptr() + out.numel() * out.element_size()) // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES
        if end > start:
            madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            madvise(start, end - start, _MADV_HUGEPAGE)


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros(shape, dtype)`` on the CPU, its memory advised to be backed by transparent huge pages."""
    if not _huge_pages_wanted():
        return torch.zeros(shape, dtype=dtype)
    return _huge_page_bytes(math.prod(shape) * dtype.itemsize).view(dtype).view(shape).zero_()


def _huge_pages_wanted() -> bool:
    return envs.tune_cpu() and sys.platform.startswith("linux")


def _huge_page_mapping(nbytes: int) -> tuple[torch.Tensor, int]:
    """(a mapping of its own as uint8, the offset in it of ``nbytes`` starting on a huge-page boundary, advised onto
    huge pages). Its own: memory from the heap may have been touched already, on small pages, where advice no longer
    moves it. The tensor holds the mapping until the last view of it goes."""
    region = mmap.mmap(-1, max(nbytes, 1) + _HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    skip = -raw.data_ptr() % _HUGE_PAGE_BYTES
    _advise_huge_pages(raw[skip:skip + nbytes])
    return raw, skip


def _huge_page_bytes(nbytes: int) -> torch.Tensor:
    """``nbytes`` uint8 on huge pages, from a huge-page boundary."""
    raw, skip = _huge_page_mapping(nbytes)
    return raw[skip:skip + nbytes]


class _HugePageArena:
    """Carves buffers out of chunks on huge pages, 64-byte aligned, one after another. Each buffer is a view of its
    chunk's mapping and holds it, so a chunk lives while any buffer carved from it does; the arena keeps only a weak
    reference to the one it carves from (a new one when that is full or gone), so it holds no memory of its own."""

    def __init__(self) -> None:
        self._mapping: weakref.ref[torch.Tensor] | None = None  # the chunk's whole mapping
        self._next = self._end = 0  # offsets in that mapping: the next free byte, the chunk's end
        self._lock = threading.Lock()

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        if nbytes > _ARENA_CHUNK_BYTES // 4:  # large enough for huge pages of its own
            return _huge_page_bytes(nbytes).view(dtype)
        with self._lock:
            mapping = self._mapping() if self._mapping is not None else None
            if mapping is None or self._next + nbytes > self._end:
                mapping, self._next = _huge_page_mapping(_ARENA_CHUNK_BYTES)
                self._mapping = weakref.ref(mapping)
                self._end = self._next + _ARENA_CHUNK_BYTES
            out = mapping[self._next:self._next + nbytes].view(dtype)
            self._next += -(-nbytes // 64) * 64
        out.mapping = mapping  # what the weak reference follows (views of inference tensors keep no ``_base``)
        return out


_arena = _HugePageArena()


def empty_on_huge_pages(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(numel, dtype)`` on the CPU for a long-lived buffer that kernels stream through (packed weights),
    on transparent huge pages where the OS gives them; with ``HF_PAGED_TUNE_CPU=0``, plain ``torch.empty``."""
    if not _huge_pages_wanted():
        return torch.empty(numel, dtype=dtype)
    return _arena.empty(numel, dtype)
