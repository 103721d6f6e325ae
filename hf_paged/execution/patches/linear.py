"""Pre-packed weights for the model's plain ``nn.Linear`` layers, used only inside engine forwards (CPU): for hf_paged's
AMX kernel (:class:`AmxWeight`), its small-row kernel (:class:`SmallRowsWeight`) or oneDNN (whose per-call re-layout of
the weight ``F.linear`` would otherwise pay), each only where its probe passed (``kernels/cpu_isa.py``), so packing
cannot fail for a CPU feature; see "The CPU speed paths" in docs/architecture.md.

An engine owns its packed weights (:func:`build_packers`) and its runner installs each packed layer's ``forward`` only
for its own forwards; that ``forward`` uses the packed weight only inside :func:`packed_linears` and otherwise runs
``nn.Linear.forward``, so a plain ``model(...)``, even from another thread meanwhile, is unchanged. A changed weight is
re-packed before the next forward (``is_current``). Cost: one more copy of the linear weights (two for AMX
:class:`PackedGroup`s, which keep their concatenated weight for products too large for the kernel). Compiled layers call
the ``hf_paged::packed_linear`` op instead (a layer's own ``forward`` object would specialise the graph), which finds
the packer from the weight tensor (``F.linear`` for a weight with none, or changed since it was packed).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from ...cpu_runtime import empty_on_huge_pages
from ..kernels import cpu_isa, cpu_library

_active = threading.local()  # .on: inside an engine forward; .packers: that engine's packers by weight data_ptr


class AmxWeight:
    """A bf16 weight ``[N, K]`` in AMX tile layout (``kernels/csrc/amx_linear.c``), for products of up to
    ``AMX_MAX_ROWS`` rows (decode steps: no fixed cost per call, unlike oneDNN); more take ``F.linear``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed = empty_on_huge_pages(weight.numel(), torch.bfloat16)
        self._lib = cpu_library.load()
        self._lib.hf_amx_pack(weight.data_ptr(), weight.stride(0), self.out_features, self.in_features,
                              self.packed.data_ptr())

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        return (weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.stride(1) == 1
                and weight.shape[0] % 32 == 0 and weight.shape[1] % 32 == 0 and amx_available())

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        """``F.linear(x, weight, bias)``, or None where this kernel does not take ``x`` (too many rows, another
        dtype, a strided last dim, the kernels switched off)."""
        rows = x.numel() // self.in_features if x.shape[-1] == self.in_features else 0
        if not (0 < rows <= AMX_MAX_ROWS and x.dtype == torch.bfloat16
                and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous()))):
            return None
        x2 = x.reshape(rows, self.in_features)
        if x2.stride(1) != 1:
            return None
        out = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.bfloat16)
        rc = self._lib.hf_amx_linear(x2.data_ptr(), x2.stride(0), rows, self.packed.data_ptr(),
                                     None if bias is None else bias.data_ptr(), self.out_features, self.in_features,
                                     out.data_ptr(), self.out_features, torch.get_num_threads())
        return out if rc == 0 else None


AMX_MAX_ROWS = 256
_amx: bool | None = None


class SmallRowsWeight:
    """An fp32 or bf16 weight ``[N, K]`` packed for hf_paged's small-row kernel (``kernels/csrc/small_linear.c``,
    AVX-512 or AVX2 + FMA, no AMX) for products of up to ``SMALL_MAX_ROWS`` rows (decode steps, bandwidth-bound); larger
    ones go to oneDNN's packed copy kept beside it, except bf16 on a CPU without bf16 arithmetic, where oneDNN's bf16 is
    missing or emulated and the kernel, widening bf16 to fp32, takes every row count."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        groups = -(-self.out_features // 64)  # the AVX-512 layout's groups; AVX2's (16 columns) fit in as many
        self.packed = empty_on_huge_pages(groups * 64 * self.in_features, weight.dtype)
        self._lib = cpu_library.load()
        pack = self._lib.hf_small_linear_pack_bf16 if self.bf16 else self._lib.hf_small_linear_pack_f32
        pack(weight.data_ptr(), weight.stride(0), self.out_features, self.in_features, self.packed.data_ptr())
        self._linear = self._lib.hf_small_linear_bf16 if self.bf16 else self._lib.hf_small_linear_f32
        # No bf16 arithmetic here: oneDNN's bf16 is missing (AVX2) or emulated, slower than the kernel at any row count.
        widened = self.bf16 and small_rows_bf16() == _BF16_WIDENED
        self.large = torch.ops.mkldnn._reorder_linear_weight(weight, None) \
            if cpu_isa.onednn_packs(self.dtype) and not widened else None
        self.max_rows = SMALL_MAX_ROWS if self.large is not None else 1 << 62  # the kernel takes any row count

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        if not (weight.dim() == 2 and weight.stride(1) == 1 and small_rows_available(weight.dtype)):
            return False
        return weight.dtype == torch.float32 or weight.shape[1] % 2 == 0

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[-1] != self.in_features or x.dtype != self.dtype:
            raise ValueError(f"a {self.dtype} linear of {self.in_features} inputs got {x.dtype} {tuple(x.shape)}")
        rows = x.numel() // self.in_features
        if rows > self.max_rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.large, bias, "none", [], "")
        out = torch.empty((*x.shape[:-1], self.out_features), dtype=self.dtype)
        if rows == 0:
            return out
        x2 = x.reshape(rows, self.in_features)
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        if bias is not None and (bias.dtype != self.dtype or not bias.is_contiguous()):
            bias = bias.to(self.dtype).contiguous()
        rc = self._linear(x2.data_ptr(), x2.stride(0), rows, self.packed.data_ptr(),
                          None if bias is None else bias.data_ptr(), self.out_features, self.in_features,
                          out.data_ptr(), self.out_features, torch.get_num_threads())
        if rc != 0:  # the one failure left: no memory for the kernel's scratch rows
            raise MemoryError(f"small_linear: no memory for {rows} rows of {self.in_features} scratch values")
        return out


SMALL_MAX_ROWS = 128
_SMALL_ROWS_ISA = {512: "avx512", 256: "avx2"}  # hf_small_linear_available(): the vector width it was built for


def small_rows_isa() -> str | None:
    """The tier the small-row kernel was built for (``avx512``, ``avx2``), or None where it was not built or the CPU
    tier (``HF_PAGED_CPU_ISA``) is below it."""
    if not cpu_library.available():
        return None
    isa = _SMALL_ROWS_ISA.get(int(cpu_library.load().hf_small_linear_available()))
    return isa if isa is not None and cpu_isa.allows(isa) else None


def small_rows_available(dtype: torch.dtype) -> bool:
    """Whether the small-row kernel runs here for ``dtype``: the CPU kernels built for an AVX-512 or AVX2 + FMA
    target within the CPU tier; bf16 on AVX-512 needs AVX512_BF16 too (on AVX2 it is widened to fp32)."""
    isa = small_rows_isa()
    if isa is None or dtype not in (torch.float32, torch.bfloat16):
        return False
    if dtype == torch.float32:
        return True
    kind = small_rows_bf16()
    return kind == _BF16_WIDENED or (kind == _BF16_DOT and cpu_isa.allows("avx512_bf16"))


_BF16_WIDENED, _BF16_DOT = 1, 2  # hf_small_linear_bf16_available(): bf16 widened to fp32, or AVX512_BF16 products


def small_rows_bf16() -> int:
    """How the small-row kernel multiplies bf16: 2 by AVX512_BF16 dot products, 1 widened to fp32, 0 not at all."""
    return int(cpu_library.load().hf_small_linear_bf16_available()) if small_rows_isa() else 0


def amx_available() -> bool:
    """Whether the AMX linear kernel runs here (built with AMX, in this CPU, allowed by Linux and the CPU tier)."""
    global _amx
    if _amx is None:
        _amx = cpu_library.available() and cpu_isa.allows("amx") and bool(cpu_library.load().hf_amx_available())
    return _amx


Packed = "AmxWeight | SmallRowsWeight | torch.Tensor"


def _pack(weight: torch.Tensor, kind: str) -> Packed | None:
    """``kind`` is the plan's ``linears`` (``amx``, ``avx512`` / ``avx2`` or ``onednn``); a weight the kernel does not
    take gets oneDNN's packed copy where oneDNN packs its dtype, else None (``F.linear``)."""
    if kind == "amx" and AmxWeight.supports(weight):
        return AmxWeight(weight)
    if kind in ("avx512", "avx2") and SmallRowsWeight.supports(weight):
        return SmallRowsWeight(weight)
    if cpu_isa.onednn_packs(weight.dtype):
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    return None


def _matmul(packed: Packed | None, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(packed, SmallRowsWeight):
        return packed.matmul(x, bias)
    if isinstance(packed, AmxWeight):
        out = packed.matmul(x, bias)
        return out if out is not None else F.linear(x, weight, bias)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def weight_state(weight: torch.Tensor) -> tuple[int, int, torch.dtype]:
    """What changes when a weight is replaced or modified in place."""
    return weight.data_ptr(), weight._version, weight.dtype


class _PackedLinearForward:
    """One ``nn.Linear``'s packed weight and the ``forward`` that uses it (installed by the engine's runner for its
    forwards). ``kind``: the plan's ``linears`` (see :func:`_pack`)."""

    def __init__(self, module: torch.nn.Linear, kind: str) -> None:
        self.module = module
        self.kind = kind
        self.source = weight_state(module.weight)
        with torch.inference_mode():
            self.packed = _pack(module.weight.detach(), kind)

    def is_current(self) -> bool:
        """Whether the packed copy still holds the module's weight."""
        return self.source == weight_state(self.module.weight)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _matmul(self.packed, self.module.weight, x, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if in_packed_call() and x.dtype == module.weight.dtype:
            return self.matmul(x, module.bias)
        return torch.nn.Linear.forward(module, x)


class PackedGroup:
    """Several ``nn.Linear`` of one input (q/k/v, gate/up) as one packed weight: one GEMM, its output theirs side by
    side. With AMX the concatenated weight is kept too, for products too large for the kernel."""

    def __init__(self, linears: list[torch.nn.Linear], kind: str) -> None:
        self.sources = [weight_state(m.weight) for m in linears]
        weight = torch.cat([m.weight.detach() for m in linears])
        has_bias = [m.bias is not None for m in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("a packed group needs a bias on all of its layers or on none")
        self.bias = torch.cat([m.bias.detach() for m in linears]) if all(has_bias) else None
        self.packed = _pack(weight, kind)
        self.weight = weight if self.packed is None or isinstance(self.packed, AmxWeight) else None
        self.dtype = weight.dtype

    def current(self, linears: list[torch.nn.Linear]) -> bool:
        """Whether it still holds these layers' weights."""
        return self.sources == [weight_state(m.weight) for m in linears]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _matmul(self.packed, self.weight, x, self.bias)


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    packer = getattr(_active, "packers", {}).get(weight.data_ptr())
    if packer is not None and x.dtype == weight.dtype and packer.source == weight_state(weight):
        return packer.matmul(x, bias)
    return F.linear(x, weight, bias)


# A plain library op, not torch.library.custom_op: less overhead per call, and it runs for every linear of a layer.
_lib = torch.library.Library("hf_paged", "FRAGMENT")
_lib.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_lib.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("hf_paged::packed_linear", lib=_lib)
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _packable(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and w is not None and w.device.type == "cpu"
            and w.dtype in (torch.float32, torch.bfloat16))


def build_packers(model: torch.nn.Module, kind: str, skip: Iterable[torch.nn.Module] = (),
                  previous: dict[torch.nn.Module, _PackedLinearForward] | None = None
                  ) -> dict[torch.nn.Module, _PackedLinearForward]:
    """A packed weight for every plain CPU ``nn.Linear`` of ``model`` but those in ``skip``, reusing those of
    ``previous`` that still hold their layer's weight; empty without oneDNN. Installs nothing."""
    if not torch.backends.mkldnn.is_available():
        return {}
    previous = previous or {}
    skipped = {id(m) for m in skip}
    packers = {}
    for module in model.modules():
        if id(module) not in skipped and _packable(module):
            kept = previous.get(module)
            packers[module] = kept if kept is not None and kept.kind == kind and kept.is_current() \
                else _PackedLinearForward(module, kind)
    return packers


def in_packed_call() -> bool:
    """Whether this thread is inside :func:`packed_linears` (an engine forward)."""
    return getattr(_active, "on", False)


@contextmanager
def packed_linears(packers_by_weight: dict[int, _PackedLinearForward] | None = None) -> Iterator[None]:
    """Packed layers use their packed weights (and compiled layers their graph, finding their packers by the weight's
    ``data_ptr`` in ``packers_by_weight``) in this thread while inside."""
    previous = getattr(_active, "on", False), getattr(_active, "packers", {})
    _active.on = True
    _active.packers = packers_by_weight or {}
    try:
        yield
    finally:
        _active.on, _active.packers = previous
