"""Which code an engine's forwards run, decided once when the engine starts.

The choice depends on the device, the model's dtype, what this CPU can run (the C kernels built, and for which
tier: AVX2, AVX-512, AVX512_BF16, AMX tiles), what this torch can run (oneDNN's packed fp32 / bf16 weights,
triton), the engine's options and a few environment variables. Each capability is probed, not assumed: a real
attempt, once per process (``kernels/cpu_isa.py``, the C library's own probes), and the plan picks the best path
that passed, so nothing on the hot path can fail for a missing CPU feature. All of it is read here, once, into an
:class:`ExecutionPlan`; the hot path (attention dispatch, linears, fused layers) reads the plan it is handed and
never the environment. The plan is logged at INFO (with the CPU tier it targets, ``isa=...``) and kept as
``engine.plan``.

The environment's switches (``hf_paged.envs``: ``HF_PAGED_CPU_ISA``, ``HF_PAGED_CPU_KERNEL``, ``HF_PAGED_AMX``, ...) are
defaults; an engine option given explicitly wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import envs
from .kernels import triton_importable

@dataclass(frozen=True)
class ExecutionPlan:
    """What runs in an engine's forwards. ``attention``: ``triton`` | ``c`` (C kernels for decode tokens and
    prefill chunks; PyTorch for what they do not take: windows, soft-capping, int8 K/V in prefill) | ``torch``;
    ``cache_write``: ``triton`` | ``c`` | ``torch``; ``linears``: ``amx`` (hf_paged's AMX tile kernel for bf16
    products of up to 256 rows, unpacked above) | ``avx512`` / ``avx2`` (hf_paged's small-row kernel for fp32 /
    bf16 products of up to 128 rows, pre-packed oneDNN weights above; bf16 products of any size where the CPU has no
    bf16 arithmetic: AVX2, AVX-512 without AVX512_BF16) | ``onednn`` (pre-packed oneDNN weights) | ``torch``;
    ``kv_cache_dtype``: ``auto`` (K/V stored in ``dtype``) | ``int8``
    (int8 with a scale per token and KV head; the kernels quantize on write and dequantize on read);
    ``isa``: the CPU tier the C kernels and linears target (``kernels/cpu_isa.py``; empty off the CPU)."""

    device: str
    dtype: torch.dtype
    attention: str
    cache_write: str
    linears: str
    fused_layers: bool
    one_call_layers: bool
    compiled: bool
    cuda_graphs: bool = False  # decode-only steps replayed from CUDA graphs (hf_paged/execution/cuda_graphs.py)
    kv_cache_dtype: str = "auto"
    isa: str = ""

    @property
    def triton(self) -> bool:
        return self.attention == "triton"

    @property
    def cpu_kernels(self) -> bool:
        return self.attention == "c"

    def __str__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        kv = dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype
        isa = f" isa={self.isa}" if self.isa else ""
        return (f"device={self.device}{isa} dtype={dtype} kv_cache={kv} attention={self.attention} "
                f"cache_write={self.cache_write} linears={self.linears} fused_layers={self.fused_layers} "
                f"one_call_layers={self.one_call_layers} compiled={self.compiled} cuda_graphs={self.cuda_graphs}")


def build_plan(device: torch.device | str, dtype: torch.dtype, *, compile: bool = False,
               pack_weights: bool | None = None, fuse_layers: bool | None = None, cpu_kernels: bool | None = None,
               amx: bool | None = None, triton: bool | None = None,
               cuda_graphs: bool | None = None, tensor_parallel: bool = False,
               kv_cache_dtype: str = "auto") -> ExecutionPlan:
    """The plan for a model on ``device`` in ``dtype`` with these engine options (None: the default).
    ``kv_cache_dtype="int8"`` changes no path: every kernel has its int8 form.
    ``cuda_graphs`` (default: on for CUDA) needs a CUDA model and the Triton attention (the only attention whose
    launches read nothing from the host), and is off with ``compile``. ``tensor_parallel`` (a model sharded by
    transformers, see ``hf_paged.distributed``): plain linears (its DTensor weights cannot be packed or fused), no
    compile, no CUDA graphs; the attention kernels work on the local heads and stay."""
    device = torch.device(device).type
    on_cpu = device == "cpu"
    if tensor_parallel:
        for name, value in (("compile", compile), ("pack_weights", pack_weights), ("fuse_layers", fuse_layers),
                            ("cuda_graphs", cuda_graphs)):
            if value:
                raise ValueError(f"{name}: not available for a tensor-parallel (sharded) model")
        pack_weights, fuse_layers, cuda_graphs = False, False, False
    if compile:
        from .kernels.paged_attention import OPAQUE_METADATA

        if not OPAQUE_METADATA:
            raise ValueError(f"compile: needs torch's opaque reference types, which torch {torch.__version__} lacks")
    attention = _attention(on_cpu, triton, cpu_kernels)
    kernels = attention == "c"
    pack = on_cpu if pack_weights is None else pack_weights
    pack = pack and on_cpu and torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16)
    if amx and not pack:
        raise ValueError("amx: the AMX linears need pack_weights (a CPU model in bf16)")
    linears = _linears(dtype, kernels, amx) if pack else "torch"
    fused = (pack if fuse_layers is None else fuse_layers) and kernels and linears != "torch" and not compile
    graphs_possible = device == "cuda" and attention == "triton" and not compile
    if cuda_graphs and not graphs_possible:
        raise ValueError(f"cuda_graphs: needs a CUDA model with the Triton attention and without compile "
                         f"(device={device}, attention={attention}, compile={compile})")
    graphs = graphs_possible if cuda_graphs is None else bool(cuda_graphs)
    return ExecutionPlan(device=device, dtype=dtype, attention=attention, cache_write=attention, linears=linears,
                         fused_layers=bool(fused),
                         one_call_layers=bool(fused and linears in ("amx", "avx512", "avx2")),
                         compiled=bool(compile), cuda_graphs=graphs, kv_cache_dtype=kv_cache_dtype,
                         isa=_cpu_isa() if on_cpu else "")


def _attention(on_cpu: bool, triton: bool | None, cpu_kernels: bool | None) -> str:
    """``triton``, ``c`` or ``torch``: the attention and cache-write kernels."""
    if triton is None:
        triton = not envs.force_torch() and (not on_cpu or envs.force_triton())
    if triton and triton_importable():
        return "triton"
    if on_cpu and (envs.cpu_kernel() if cpu_kernels is None else cpu_kernels):
        from .kernels import cpu_library

        if cpu_library.available():
            return "c"
    return "torch"


def _linears(dtype: torch.dtype, kernels: bool, amx: bool | None) -> str:
    """The best linears that passed their probe: AMX tiles, hf_paged's small-row kernel, oneDNN's packed weights;
    none for bf16 on a CPU without a bf16 GEMM in oneDNN and the kernels off (F.linear)."""
    from .kernels import cpu_isa
    from .patches.linear import amx_available, small_rows_available, small_rows_isa

    if dtype == torch.bfloat16 and kernels and (envs.amx() if amx is None else amx) and amx_available():
        return "amx"
    if kernels and envs.small_row_linears() and small_rows_available(dtype):
        return small_rows_isa()
    return "onednn" if cpu_isa.onednn_packs(dtype) else "torch"


def _cpu_isa() -> str:
    from .kernels import cpu_isa

    return cpu_isa.describe()


def default_plan(tensor: torch.Tensor, kv_cache_dtype: str = "auto") -> ExecutionPlan:
    """The plan for kernels called outside an engine (``PagedCache``, direct kernel calls): from the tensor's
    device and dtype and the environment as it is now."""
    return build_plan(tensor.device, tensor.dtype, pack_weights=False, kv_cache_dtype=kv_cache_dtype)
